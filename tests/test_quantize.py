"""PCA, k-means, coarse quantizer, PQ and LOPQ against references: sklearn, scipy, brute force."""

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.quantize import coarse, kmeans, lopq
from delf_retrieval.quantize import pca as pca_lib
from delf_retrieval.quantize import pq


def clustered(n, d=40, clusters=50, spread=0.3, seed=0, anisotropic=False):
    """Unit vectors around random centres; anisotropic clusters have a few strong directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    noise = rng.normal(size=(n, d))
    if anisotropic:
        noise *= np.geomspace(3.0, 0.05, d)[rng.permutation(d)]
    x = centres[rng.integers(0, clusters, n)] + spread * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pca_matches_sklearn_and_round_trips(tmp_path):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    raw = (rng.normal(size=(3000, 128)) @ rng.normal(size=(128, 128))).astype(np.float32)
    model = pca_lib.fit(raw, 40)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    reference = PCA(n_components=40, svd_solver="full").fit(unit.astype(np.float64))
    projected = model.project(raw)
    # Component signs are arbitrary: align each axis before comparing.
    signs = np.sign(np.sum(model.components * reference.components_, axis=1))
    np.testing.assert_allclose(projected * signs, reference.transform(unit), atol=1e-5)
    np.testing.assert_allclose(model.explained_variance, reference.explained_variance_, rtol=1e-4)
    reduced = model.transform(raw)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)
    model.save(tmp_path / "pca.npz")
    np.testing.assert_array_equal(pca_lib.PCA.load(str(tmp_path / "pca.npz")).transform(raw), reduced)
    with pytest.raises(ValueError, match="at least 40"):
        pca_lib.fit(raw[:10], 40)


def test_nearest_equals_brute_force():
    x = clustered(3000, seed=2)
    centroids = clustered(300, seed=3)
    exact = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    labels, dists = kmeans.nearest(x, centroids, k=5)
    expected = np.argsort(exact, axis=1)[:, :5]
    np.testing.assert_allclose(dists, np.take_along_axis(exact, expected, 1), atol=1e-5)
    # Labels agree wherever the ranking is not a float32 tie.
    gaps = np.diff(np.take_along_axis(exact, np.argsort(exact, axis=1)[:, :6], 1), axis=1)
    clear = gaps.min(axis=1) > 1e-5
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(labels[clear], expected[clear])


def test_kmeans_as_good_as_sklearn_lloyd_from_the_same_start():
    from sklearn.cluster import KMeans

    x = clustered(5000, clusters=20, spread=0.05, seed=4)
    ours = kmeans.kmeans(x, 20, iterations=25, seed=0, max_points_per_centroid=len(x))
    start = x[np.random.default_rng(0).choice(len(x), 20, replace=False)]  # our random-point start
    reference = KMeans(20, init=start, n_init=1, max_iter=25, algorithm="lloyd").fit(x)
    labels, dists = kmeans.nearest(x, ours)
    assert dists.sum() <= 1.02 * reference.inertia_
    assert len(np.unique(labels)) == 20  # empty clusters were re-seeded


def test_kmeans_subspaces_equals_sklearn_in_each_subspace():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 3, 4)).astype(np.float32)
    together = kmeans.kmeans_subspaces(x, 8, iterations=30, seed=0)
    starts = np.random.default_rng(0)  # our start: random points, drawn sub-space by sub-space
    for j in range(3):
        start = x[starts.choice(len(x), 8, replace=False), j]
        reference = KMeans(8, init=start, n_init=1, max_iter=30, tol=0, algorithm="lloyd").fit(x[:, j])
        ours = kmeans.nearest(x[:, j], together[j])[1].sum()
        assert ours == pytest.approx(reference.inertia_, rel=1e-3)


def test_coarse_probe_kdtree_equals_matmul_and_cells_are_clamped():
    x = clustered(4000, seed=6)
    quantizer = coarse.train(x, n_cells=8192)
    assert quantizer.n_cells == 4000 // coarse.MIN_POINTS_PER_CELL
    cells_m, d_m = quantizer.probe(x[:500], 4, method="matmul")
    cells_k, d_k = quantizer.probe(x[:500], 4, method="kdtree")
    np.testing.assert_allclose(d_m, d_k, atol=1e-5)
    assert (cells_m == cells_k).mean() > 0.99  # only float32 ties may differ
    with pytest.raises(ValueError, match="unknown probe method"):
        quantizer.probe(x[:2], 1, method="lsh")


def test_pq_encode_is_nearest_codeword_and_error_falls_with_bits():
    x = clustered(6000, seed=7)
    errors = []
    for bits in (2, 4, 6, 8):
        quantizer = pq.train(x, m=10, bits=bits, iterations=15)
        codes = quantizer.encode(x)
        sub = x.reshape(len(x), 10, 4)
        exact = ((sub[:, :, None, :].astype(np.float64) - quantizer.codebooks[None]) ** 2).sum(-1)
        chosen = np.take_along_axis(exact, codes[:, :, None].astype(np.int64), 2)[:, :, 0]
        np.testing.assert_allclose(chosen, exact.min(-1), atol=1e-6)  # the nearest codeword, up to float32 ties
        assert (codes == exact.argmin(-1)).mean() > 0.999
        errors.append(float(((quantizer.decode(codes) - x) ** 2).sum(1).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 11, 16])
def test_code_packing_round_trips(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(257, 10))
    packed = pq.pack_codes(codes, bits)
    assert packed.shape == (257, pq.packed_bytes(10, bits))
    np.testing.assert_array_equal(pq.unpack_codes(packed, 10, bits), codes)
    with pytest.raises(ValueError, match="does not fit"):
        pq.pack_codes(codes + 2 ** bits, bits)


def test_eigenvalue_allocation_is_a_balanced_permutation():
    eigenvalues = np.geomspace(100.0, 0.01, 40)
    order = lopq.allocate_eigenvalues(eigenvalues, 10)
    assert sorted(order.tolist()) == list(range(40))
    products = np.log(eigenvalues[order]).reshape(10, 4).sum(axis=1)
    naive = np.log(eigenvalues).reshape(10, 4).sum(axis=1)  # consecutive directions per sub-space
    assert np.ptp(products) < np.ptp(naive) / 3


def test_lopq_regions_route_and_models_lower_the_error():
    x = clustered(40000, clusters=8, spread=0.4, seed=8, anisotropic=True)
    plain = quantize.train(x, quantize.IndexParams(n_cells=8, lopq=False))
    local = quantize.train(x, quantize.IndexParams(n_cells=8, lopq=True, max_region_features=2500, min_region_train=1000))
    regions = local.regions
    assert regions.n_regions > 8 and regions.n_models > 0
    rotations = regions.model_rotation
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(40), rotations.shape), atol=1e-4)
    # Routing: every region's points come from its own cell and leaves hold <= the split size.
    encoded = local.encode(x)
    np.testing.assert_array_equal(regions.region_cell[encoded.regions], encoded.cells)
    assert np.bincount(encoded.regions).max() <= 2500 * 1.2
    error = {name: float(((q.decode(e.regions, e.codes) - x) ** 2).sum(1).mean())
             for name, q, e in (("plain", plain, plain.encode(x)), ("lopq", local, encoded))}
    assert error["lopq"] < 0.9 * error["plain"], error


def test_quantizer_save_load_encodes_identically(tmp_path):
    x = clustered(20000, seed=9, anisotropic=True)
    trained = quantize.train(x, quantize.IndexParams(n_cells=16, lopq=True, max_region_features=3000, min_region_train=500))
    trained.save(str(tmp_path / "q.npz"))
    loaded = quantize.Quantizer.load(str(tmp_path / "q.npz"))
    assert loaded.params == trained.params and loaded.params.spec == "IVF16,PQ10x5,LOPQ3000"
    a, b = trained.encode(x[:3000]), loaded.encode(x[:3000])
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.regions, b.regions)
    with open(tmp_path / "q.npz", "rb") as f:
        payload = f.read()
    assert b"pickle" not in payload[:200]  # plain arrays; np.load(allow_pickle=False) reads it
