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


def test_kernels_agree_across_probes(index):
    """k larger than any one cell's rows but smaller than the probed rows: the heap keeps rows of
    several cells, so the distances of different probes (each with its own ||q - c||^2 in the
    precomputed tables) are compared with each other. On the LOPQ index both kinds of region, the
    global codebooks' tables and the local models', are scanned in the same query."""
    trained, searcher, _, ids, _, queries = index
    counts = np.diff(searcher.lists.offsets)
    per_cell = np.add.reduceat(counts, searcher.cell_regions[:-1])
    k = int(per_cell.max()) + 50
    nprobe = 6
    probed, _ = trained.coarse.probe(queries, nprobe)
    assert (per_cell[probed].sum(axis=1) > k).all()
    if trained.params.lopq:
        region_model, bounds = trained.regions.region_model, searcher.cell_regions
        mixed = 0
        for cells in probed:
            models = np.concatenate([region_model[bounds[c]:bounds[c + 1]][counts[bounds[c]:bounds[c + 1]] > 0]
                                     for c in cells])
            mixed += bool((models < 0).any() and (models >= 0).any())
        assert mixed > len(probed) // 4  # many queries scan both kinds of region
    a_d, a_i = searcher.search(queries, k=k, nprobe=nprobe, kernel="compiled")
    b_d, b_i = searcher.search(queries, k=k, nprobe=nprobe, kernel="numpy")
    assert (a_i >= 0).all()
    np.testing.assert_allclose(a_d, b_d, rtol=1e-5, atol=1e-6)
    # each id the compiled kernel returns is at the distance the reference gives it
    for q in range(len(queries)):
        ref = dict(zip(b_i[q].tolist(), b_d[q].tolist()))
        shared = [i for i in a_i[q].tolist() if i in ref]
        assert len(shared) >= k - 5  # ties at the k-th distance may swap a few ids
        np.testing.assert_allclose([d for i, d in zip(a_i[q].tolist(), a_d[q].tolist()) if i in ref],
                                   [ref[i] for i in shared], rtol=1e-5, atol=1e-6)


def test_cell_table_is_computed_once_per_quantizer(index):
    trained, searcher, _, _, _, _ = index
    again = Searcher(trained, searcher.lists)
    assert again.cell_table is searcher.cell_table
    m, n_centroids, dsub = trained.pq.codebooks.shape
    c = trained.coarse.centroids.reshape(-1, m, dsub).astype(np.float64)
    b = trained.pq.codebooks.astype(np.float64)
    expected = 2 * np.einsum("njt,jct->njc", c, b) + (b ** 2).sum(-1)[None]
    np.testing.assert_allclose(searcher.cell_table, expected, rtol=1e-5, atol=1e-6)


def test_smallest_k_keeps_ties_in_column_order():
    from delf_retrieval.quantize import adc_kernel

    rng = np.random.default_rng(5)
    d = rng.integers(0, 6, size=(50, 300)).astype(np.float32)  # many exact ties
    add = rng.integers(0, 3, size=300).astype(np.float32)
    for k in (1, 2, 8, 64, 300):
        cols, values = adc_kernel.smallest_k(d, add, k)
        expected = np.argsort(d + add, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(cols, expected)
        np.testing.assert_array_equal(values, np.take_along_axis(d + add, expected, 1))


@pytest.mark.parametrize("k", [1, 7, 100, 400])
def test_compiled_top_k_matches_a_full_sort_with_many_ties(k):
    """The reservoir's cuts (quickselect) and final sort against a full sort, on codes that repeat
    so that many distances tie exactly: the same sorted distances, and each id at its distance."""
    from delf_retrieval.quantize import adc_kernel

    rng = np.random.default_rng(k)
    n_cells, m, n_centroids, dsub = 3, 4, 4, 2
    codebooks = rng.normal(size=(m, n_centroids, dsub)).astype(np.float32)
    centroids = rng.normal(size=(n_cells, m * dsub)).astype(np.float32)
    offsets = np.array([0, 300, 310, 900], np.int64)
    codes = rng.integers(0, n_centroids, size=(900, m)).astype(np.uint8)
    ids = rng.permutation(900).astype(np.int64)
    queries = rng.normal(size=(5, m * dsub)).astype(np.float32)
    probe = np.array([[0, 1, 2], [2, -1, 0], [1, -1, -1], [2, 1, 0], [-1, -1, -1]], np.int64)
    cell_regions = np.arange(n_cells + 1, dtype=np.int64)
    none = (np.full(n_cells, -1, np.int64), np.zeros((0, m * dsub), np.float32),
            np.zeros((0, m * dsub, m * dsub), np.float32), np.zeros((0, m, n_centroids, dsub), np.float32))
    from delf_retrieval.quantize.ivf import _search_numpy

    args = (queries, probe, centroids, cell_regions, *none, codebooks, offsets, codes, ids, k)
    a_d, a_i = adc_kernel.search(*args)
    b_d, b_i = _search_numpy(*args)
    np.testing.assert_allclose(a_d, b_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a_i == -1, b_i == -1)
    for q in range(len(queries)):
        found = a_i[q][a_i[q] >= 0]
        assert len(set(found.tolist())) == len(found)
        rows = np.argsort(ids)[found]  # row of each returned id
        cells = np.searchsorted(offsets, rows, side="right") - 1
        assert np.isin(cells, probe[q]).all()
