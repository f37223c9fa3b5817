"""ADC search against brute force over the decoded vectors, for plain IVF-PQ and LOPQ, both kernels."""

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.quantize.ivf import InvertedLists, Searcher
from tests.test_quantize import clustered


@pytest.fixture(scope="module", params=[False, True], ids=["ivfpq", "lopq"])
def index(request):
    x = clustered(12000, clusters=30, seed=11, anisotropic=True)
    params = quantize.IndexParams(n_cells=24, lopq=request.param, max_region_features=1500, min_region_train=400)
    trained = quantize.train(x, params)
    encoded = trained.encode(x)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3  # arbitrary caller ids travel with the rows
    searcher = Searcher(trained, InvertedLists.build(trained.regions.n_regions, encoded, ids))
    decoded = trained.decode(encoded.regions, encoded.codes)
    queries = clustered(300, clusters=30, seed=11, anisotropic=True)[::3] + 0.01
    return trained, searcher, decoded, ids, encoded, queries.astype(np.float32)


def brute_force(queries, vectors, k):
    d = ((queries[:, None, :].astype(np.float64) - vectors[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), d


def assert_exact_knn(distances, found, ids, vectors, queries, k):
    """The k smallest exact distances are returned, and each returned id really is at its distance
    (decoded vectors repeat, so ties make the ids themselves ambiguous)."""
    exact_sorted, exact_all = brute_force(queries, vectors, k)
    np.testing.assert_allclose(distances, exact_sorted, rtol=1e-4, atol=1e-5)
    row_of_id = {int(i): r for r, i in enumerate(ids)}
    rows = np.vectorize(row_of_id.__getitem__)(found)
    np.testing.assert_allclose(np.take_along_axis(exact_all, rows, 1), distances, rtol=1e-4, atol=1e-5)
    assert all(len(set(row)) == k for row in found)


@pytest.mark.parametrize("kernel", ["compiled", "numpy"])
def test_all_cells_probed_equals_brute_force_over_decoded(index, kernel):
    trained, searcher, decoded, ids, _, queries = index
    distances, found = searcher.search(queries, k=20, nprobe=trained.coarse.n_cells, kernel=kernel)
    assert_exact_knn(distances, found, ids, decoded, queries, 20)


def test_probed_cells_only(index):
    trained, searcher, decoded, ids, encoded, queries = index
    distances, found = searcher.search(queries, k=10, nprobe=3)
    probed, _ = trained.coarse.probe(queries, 3)
    for q in range(len(queries)):
        allowed = np.isin(encoded.cells, probed[q])
        assert_exact_knn(distances[q:q + 1], found[q:q + 1], ids[allowed], decoded[allowed], queries[q:q + 1], 10)


def test_kernels_agree_and_pad_short_results(index):
    trained, searcher, _, _, _, queries = index
    a = searcher.search(queries, k=5000, nprobe=1, kernel="compiled")
    b = searcher.search(queries, k=5000, nprobe=1, kernel="numpy")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    assert (a[1] == -1).any() and np.isinf(a[0][a[1] == -1]).all()
    np.testing.assert_array_equal(a[1] == -1, b[1] == -1)


def test_unknown_kernel(index):
    with pytest.raises(ValueError, match="unknown kernel"):
        index[1].search(index[5], 1, kernel="gpu")
