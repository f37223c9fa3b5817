"""Affine RANSAC: planted transforms recovered exactly, determinism (threads, processes), degenerate
input, agreement with skimage.measure.ransac and cv2.estimateAffine2D, and the compiled pieces (the
generator, the sampler, the closed-form solve, the refit, the scoring) against references."""

import itertools
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from math import comb, log

import numpy as np
import pytest

from delf_retrieval.query import ransac_kernel as kernel
from delf_retrieval.query import verify
from delf_retrieval.query.verify import ransac_affine

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUE_MODEL = np.array([[0.8, 0.25, 40.0], [-0.15, 1.2, -25.0]])  # [y', x'] = A @ [y, x, 1]


def apply(model, points):
    return points @ model[:, :2].T + model[:, 2]


def planted_problem(n, outlier_fraction, seed, noise=1.0, model=TRUE_MODEL, min_outlier_error=60.0):
    """n matches, a given fraction of them outliers placed at least ``min_outlier_error`` px from the
    true mapping (so the planted inlier set is the only right answer at a 20 px threshold)."""
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 800, (n, 2))
    dst = apply(model, src) + rng.normal(0, noise, (n, 2))
    is_outlier = np.zeros(n, bool)
    is_outlier[rng.permutation(n)[: int(round(outlier_fraction * n))]] = True
    for i in np.flatnonzero(is_outlier):
        while True:
            candidate = rng.uniform(-200, 1200, 2)
            if np.linalg.norm(candidate - apply(model, src[i:i + 1])[0]) > min_outlier_error:
                dst[i] = candidate
                break
    return src, dst, ~is_outlier


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_affine_with_60_percent_outliers(seed):
    src, dst, truth = planted_problem(300, 0.6, seed)
    result = ransac_affine(src, dst, residual_threshold=20.0, seed=seed)
    np.testing.assert_array_equal(result.inliers, truth)
    assert result.num_inliers == truth.sum() == 120
    # least-squares refit on 120 points with 1 px noise: linear part within 0.01, translation within 2 px
    np.testing.assert_allclose(result.model[:, :2], TRUE_MODEL[:, :2], atol=0.01)
    np.testing.assert_allclose(result.model[:, 2], TRUE_MODEL[:, 2], atol=2.0)
    assert result.model.shape == (2, 3) and result.model.dtype == np.float64
    assert 0 < result.trials <= 1000


@pytest.mark.parametrize("confidence", [0.999, None])
@pytest.mark.parametrize("refit", [True, False])
def test_recovers_planted_affine_exactly_with_80_percent_outliers(confidence, refit):
    """Noise-free inliers: the inlier set is exactly the planted one and the model the planted map up to
    round-off, whether the early exit is on or off and with or without the least-squares refit."""
    src, dst, truth = planted_problem(500, 0.8, 21, noise=0.0)
    result = ransac_affine(src, dst, confidence=confidence, refit=refit, seed=2)
    np.testing.assert_array_equal(result.inliers, truth)
    assert result.num_inliers == truth.sum() == 100
    np.testing.assert_allclose(result.model, TRUE_MODEL, rtol=1e-9, atol=1e-9)
    assert result.trials == 1000 if confidence is None else result.trials < 1000


def test_model_maps_src_to_dst_in_yx_order():
    src, dst, truth = planted_problem(100, 0.3, 5, noise=0.0)
    result = ransac_affine(src, dst)
    np.testing.assert_allclose(apply(result.model, src[truth]), dst[truth], atol=1e-6)
    np.testing.assert_allclose(result.model, TRUE_MODEL, atol=1e-8)


def test_deterministic_for_a_seed_and_close_for_another():
    src, dst, truth = planted_problem(400, 0.75, 7, noise=4.0)
    first = ransac_affine(src, dst, seed=3)
    again = ransac_affine(src.copy(), dst.copy(), seed=3)
    np.testing.assert_array_equal(first.model, again.model)
    np.testing.assert_array_equal(first.inliers, again.inliers)
    assert (first.num_inliers, first.trials) == (again.num_inliers, again.trials)
    other = ransac_affine(src, dst, seed=4)
    assert abs(other.num_inliers - first.num_inliers) <= 0.03 * first.num_inliers
    np.testing.assert_allclose(other.model[:, :2], first.model[:, :2], atol=0.02)
    np.testing.assert_allclose(other.model[:, 2], first.model[:, 2], atol=5.0)
    # both found (nearly) the planted set: noise of 4 px puts a few true matches past 20 px at most
    assert np.sum(first.inliers & truth) >= 0.97 * truth.sum()


def test_seeds_draw_different_samples():
    """The seed matters (no hidden fixed sequence): without early exit the hypotheses differ, which
    shows in the trial-by-trial best when the budget is tiny."""
    src, dst, _ = planted_problem(500, 0.9, 11, noise=3.0)
    results = {ransac_affine(src, dst, max_trials=40, seed=s).num_inliers for s in range(8)}
    assert len(results) > 1


def test_same_seed_same_answer_in_threads_and_processes():
    """No state outside the call: the same (matches, seed) give the same bytes when eight problems run
    at once in four threads (the loop releases the GIL) and in a fresh interpreter."""
    problems = [planted_problem(300, 0.7, 40 + i, noise=3.0)[:2] for i in range(8)]
    sequential = [ransac_affine(src, dst, seed=i) for i, (src, dst) in enumerate(problems)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda item: ransac_affine(*item[1], seed=item[0]), enumerate(problems)))
    for a, b in zip(sequential, threaded):
        np.testing.assert_array_equal(a.model, b.model)
        np.testing.assert_array_equal(a.inliers, b.inliers)
        assert a.trials == b.trials
    script = (
        "import numpy as np\n"
        "from tests.test_verify import planted_problem\n"
        "from delf_retrieval.query.verify import ransac_affine\n"
        "src, dst, _ = planted_problem(300, 0.7, 40, noise=3.0)\n"
        "r = ransac_affine(src, dst, seed=0)\n"
        "print(r.model.tobytes().hex(), np.packbits(r.inliers).tobytes().hex(), r.trials)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    first = sequential[0]
    assert out == [first.model.tobytes().hex(), np.packbits(first.inliers).tobytes().hex(), str(first.trials)]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_fewer_than_three_matches(n):
    points = np.arange(2 * n, dtype=float).reshape(n, 2)
    result = ransac_affine(points, points + 1)
    assert result.model is None and result.num_inliers == 0
    assert result.inliers.shape == (n,) and not result.inliers.any()


def test_collinear_points_are_degenerate():
    t = np.linspace(0, 500, 50)
    src = np.stack([t, 2 * t + 3], axis=1)  # every source point on one line
    dst = src + 10
    result = ransac_affine(src, dst)
    assert result.model is None and result.num_inliers == 0 and not result.inliers.any()
    # near-collinear (height at most 0.2 px over a 1100 px long line) is rejected as well
    rng = np.random.default_rng(0)
    near = src + rng.uniform(-0.1, 0.1, src.shape)
    assert ransac_affine(near, near + 10).model is None


def test_collinear_destination_is_degenerate():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 500, (40, 2))
    dst = np.stack([src[:, 0], np.full(40, 7.0)], axis=1)  # everything mapped onto a line: singular
    assert ransac_affine(src, dst).model is None


def test_all_duplicates():
    src = np.tile([[10.0, 20.0]], (30, 1))
    result = ransac_affine(src, src + 5)
    assert result.model is None and result.num_inliers == 0
    # duplicates among good points do not prevent the fit
    src, dst, truth = planted_problem(60, 0.2, 3)
    src = np.concatenate([src, np.tile(src[:1], (20, 1))])
    dst = np.concatenate([dst, np.tile(dst[:1], (20, 1))])
    result = ransac_affine(src, dst)
    assert result.num_inliers == truth.sum() + (20 if truth[0] else 0)


@pytest.mark.parametrize("case", ["all non-finite", "no trials", "collinear, ratio 0", "three collinear",
                                  "coincident source", "huge coordinates", "int coordinates"])
def test_degenerate_inputs_give_an_empty_result(case):
    rng = np.random.default_rng(12)
    t = np.linspace(0, 300, 40)
    line = np.stack([t, 0.5 * t - 7], axis=1)
    src, dst, kwargs = {
        "all non-finite": (np.full((20, 2), np.nan), np.ones((20, 2)), {}),
        "no trials": (*planted_problem(100, 0.1, 1)[:2], {"max_trials": 0}),
        "collinear, ratio 0": (line, line + 3, {"degenerate_ratio": 0.0}),
        "three collinear": (line[:3], line[:3] * 2, {}),
        "coincident source": (np.zeros((50, 2)), rng.uniform(0, 100, (50, 2)), {}),
        "huge coordinates": (line * 1e300, line * 1e300, {}),
        "int coordinates": (np.tile([[3, 4]], (10, 1)), np.tile([[5, 6]], (10, 1)), {}),
    }[case]
    result = ransac_affine(src, dst, **kwargs)
    assert result.model is None and result.num_inliers == 0
    assert result.inliers.shape == (len(src),) and not result.inliers.any()


def test_three_matches_give_their_exact_map():
    src = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    result = ransac_affine(src, apply(TRUE_MODEL, src))
    assert result.num_inliers == 3 and result.trials == 1
    np.testing.assert_allclose(result.model, TRUE_MODEL, atol=1e-9)


def test_non_finite_matches_are_never_inliers():
    src, dst, truth = planted_problem(80, 0.3, 4)
    src[0] = np.nan
    dst[1] = np.inf
    result = ransac_affine(src, dst)
    assert not result.inliers[0] and not result.inliers[1]
    expected = truth.copy()
    expected[:2] = False
    np.testing.assert_array_equal(result.inliers, expected)


def test_small_problems_are_exhaustive_and_seed_free():
    """C(12, 3) = 220 <= 1000 triplets: all are tried, so every seed gives the optimum."""
    src, dst, truth = planted_problem(12, 0.5, 9)
    results = [ransac_affine(src, dst, seed=s) for s in range(3)]
    for r in results:
        assert r.trials <= 220
        np.testing.assert_array_equal(r.inliers, truth)
        np.testing.assert_array_equal(r.model, results[0].model)


def test_exhaustive_order_is_every_triplet_once():
    for n in (3, 4, 7, 12):
        triplet, seen = (0, 1, 2), []
        for _ in range(comb(n, 3)):
            seen.append(triplet)
            triplet = kernel.next_triplet(*triplet, n)
        assert seen == list(itertools.combinations(range(n), 3))


def test_min_inliers():
    src, dst, truth = planted_problem(50, 0.8, 2)  # 10 true matches
    assert ransac_affine(src, dst, min_inliers=10).num_inliers == 10
    rejected = ransac_affine(src, dst, min_inliers=11)
    assert rejected.model is None and rejected.num_inliers == 0 and not rejected.inliers.any()


def test_early_exit_and_fixed_budget():
    src, dst, _ = planted_problem(300, 0.2, 6)  # 80% inliers: a handful of trials suffice
    assert ransac_affine(src, dst).trials < 100
    assert ransac_affine(src, dst, confidence=None).trials == 1000
    assert ransac_affine(src, dst, confidence=1.0, max_trials=777).trials == 777


def test_required_trials_formula():
    assert kernel.required_trials(50, 100, 0.99) == pytest.approx(log(0.01) / log(1 - 0.125))
    assert kernel.required_trials(0, 100, 0.99) == float("inf")
    assert kernel.required_trials(100, 100, 0.99) == 0.0
    assert kernel.required_trials(10, 100, 1.0) == float("inf")


def test_wrong_shapes_raise():
    with pytest.raises(ValueError):
        ransac_affine(np.zeros((5, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        ransac_affine(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        ransac_affine(np.zeros((5, 2)), np.zeros((5, 2)), seed=-1)


def test_triplet_solver_matches_least_squares():
    """The closed form maps its three points exactly, and equals least squares on them (3 points,
    6 unknowns: the unique solution)."""
    rng = np.random.default_rng(0)
    out = np.empty(6)
    for _ in range(50):
        s3, d3 = rng.uniform(-100, 100, (3, 2)), rng.uniform(-100, 100, (3, 2))
        assert kernel.solve_triplet(s3[:, 0].copy(), s3[:, 1].copy(), d3[:, 0].copy(), d3[:, 1].copy(), 0, 1, 2, out)
        model = out.reshape(2, 3)
        reference = np.linalg.lstsq(np.c_[s3, np.ones(3)], d3, rcond=None)[0].T
        np.testing.assert_allclose(model, reference, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(apply(model, s3), d3, atol=1e-9)
    line = np.array([0.0, 1.0, 2.0])
    assert not kernel.solve_triplet(line, 2 * line, line, line, 0, 1, 2, out)  # collinear source: singular


def test_refit_matches_numpy_least_squares():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 800, (200, 2))
    dst = apply(TRUE_MODEL, src) + rng.normal(0, 3, (200, 2))
    rows = np.flatnonzero(rng.random(200) < 0.5)
    out = np.empty(6)
    assert kernel.fit_affine(src[:, 0].copy(), src[:, 1].copy(), dst[:, 0].copy(), dst[:, 1].copy(), rows, out)
    reference = np.linalg.lstsq(np.c_[src[rows], np.ones(len(rows))], dst[rows], rcond=None)[0].T
    np.testing.assert_allclose(out.reshape(2, 3), reference, rtol=1e-9, atol=1e-9)
    t = np.linspace(0, 100, 10)
    assert not kernel.fit_affine(t, 3 * t + 1, t, t, np.arange(10), out)  # collinear: no unique fit
    assert not kernel.fit_affine(t, t, t, t, np.arange(2), out)  # fewer than 3


def test_inlier_count_brute_force_and_early_abandon():
    rng = np.random.default_rng(1)
    for n in (0, 5, 31, 32, 33, 100, 257):
        src, dst = rng.uniform(0, 50, (n, 2)), rng.uniform(0, 50, (n, 2))
        model = np.array([1.0, 0.05, 2.0, -0.03, 0.9, 1.0])
        residual2 = np.sum((apply(model.reshape(2, 3), src) - dst) ** 2, axis=1)
        expected = int(np.sum(residual2 < 300.0))
        args = (model, src[:, 0].copy(), src[:, 1].copy(), dst[:, 0].copy(), dst[:, 1].copy(), 300.0)
        assert kernel.count_inliers(*args, 0) == expected
        assert kernel.count_inliers(*args, expected) == expected
        assert kernel.count_inliers(*args, expected + 1) == -1  # cannot reach it: abandoned


def splitmix64_reference(seed, count):
    """splitmix64 (Steele, Lea and Flood 2014) in Python integers, written from its definition."""
    mask, state, out = (1 << 64) - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_generator_is_splitmix64(seed):
    state, bits = seed, []
    for _ in range(100):
        state, value = kernel._next64(np.uint64(state))  # a Python int would be typed int64
        bits.append(int(value))
    assert bits == splitmix64_reference(seed, 100)
    if seed == 0:
        assert bits[0] == 0xE220A8397B1DCDAF  # the published first output for seed 0


def test_random_triplets_distinct_and_uniform():
    state, triplets = np.uint64(7), []
    for _ in range(60000):
        state, i, j, k = kernel.draw_triplet(np.uint64(state), 5)
        triplets.append((i, j, k))
    t = np.array(triplets)
    assert np.all((t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2]))
    assert t.min() == 0 and t.max() == 4
    # 5 * 4 * 3 = 60 ordered triplets, each expected 1000 times
    counts = np.unique(t[:, 0] * 25 + t[:, 1] * 5 + t[:, 2], return_counts=True)[1]
    assert len(counts) == 60 and counts.min() > 850 and counts.max() < 1150
    # large n: every index drawn about equally often (no modulo bias towards small indices)
    state, first = np.uint64(8), []
    for _ in range(30000):
        state, i, _, _ = kernel.draw_triplet(np.uint64(state), 3000)
        first.append(i)
    assert abs(np.mean(first) - 1499.5) < 20 and np.max(first) >= 2990


def test_mutual_nearest_neighbours_brute_force():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(50, 8))
    na, nb = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    d = np.linalg.norm(na[:, None] - nb[None], axis=2)
    expected = [(i, int(np.argmin(d[i]))) for i in range(40) if np.argmin(d[:, np.argmin(d[i])]) == i]
    np.testing.assert_array_equal(verify.mutual_nearest_neighbours(a, b), np.array(expected).reshape(-1, 2))
    ratio = [(i, j) for i, j in expected if d[i, j] < 0.9 * np.sort(d[i])[1]]
    np.testing.assert_array_equal(verify.mutual_nearest_neighbours(a, b, ratio=0.9), np.array(ratio).reshape(-1, 2))
    capped = [(i, j) for i, j in expected if d[i, j] <= 1.2]
    np.testing.assert_array_equal(verify.mutual_nearest_neighbours(a, b, max_distance=1.2),
                                  np.array(capped).reshape(-1, 2))
    assert verify.mutual_nearest_neighbours(a[:0], b).shape == (0, 2)


@pytest.mark.parametrize("seed", range(6))
def test_inlier_counts_agree_with_skimage(seed):
    """Same putative matches, both with a fixed budget of 1000 hypotheses and no early exit (skimage's
    default stop_probability=1 never stops early below a 100% inlier ratio): the inlier counts agree
    within a few percent. Ours re-scores after the least-squares refit, skimage reports the best
    hypothesis' set, so ours may be slightly larger."""
    skimage_measure = pytest.importorskip("skimage.measure")
    from skimage.transform import AffineTransform

    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(60, 400))
    src, dst, _ = planted_problem(n, float(rng.uniform(0.3, 0.85)), 100 + seed, noise=float(rng.uniform(1, 8)),
                                  min_outlier_error=0.0)
    ours = ransac_affine(src, dst, confidence=None, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, sk_inliers = skimage_measure.ransac((src, dst), AffineTransform, min_samples=3, residual_threshold=20,
                                               max_trials=1000, rng=seed)
    theirs = int(np.sum(sk_inliers))
    assert abs(ours.num_inliers - theirs) <= max(2, 0.05 * theirs), (ours.num_inliers, theirs)


def opencv_inliers(cv2, src, dst, order):
    """Inliers of cv2.estimateAffine2D (RANSAC, 20 px, 1000 iterations, confidence 0.999) on the matches
    taken in ``order``. Its RANSAC draws from a generator with a fixed seed of its own (cv2.setRNGSeed
    does not reach it), so another order of the same matches is what another seed is for us."""
    _, mask = cv2.estimateAffine2D(src[order].astype(np.float32), dst[order].astype(np.float32), method=cv2.RANSAC,
                                   ransacReprojThreshold=20.0, maxIters=1000, confidence=0.999, refineIters=0)
    return 0 if mask is None else int(mask.sum())


def test_inlier_counts_agree_with_opencv_over_seeded_problems():
    """40 seeded problems, 100-1000 matches, 20-50% inliers, adaptive stopping on both sides: the
    distribution of our inlier counts (best hypothesis, no refit: what OpenCV reports) matches
    OpenCV's, judged against OpenCV's own run-to-run spread (another order of the same matches)."""
    cv2 = pytest.importorskip("cv2")
    ours, theirs, theirs_again = [], [], []
    for seed in range(40):
        rng = np.random.default_rng(500 + seed)
        n, fraction = int(rng.integers(100, 1001)), float(rng.uniform(0.2, 0.5))
        src, dst, _ = planted_problem(n, 1 - fraction, 500 + seed, noise=float(rng.uniform(1, 3)),
                                      min_outlier_error=0.0)
        ours.append(ransac_affine(src, dst, seed=seed, refit=False).num_inliers)
        theirs.append(opencv_inliers(cv2, src, dst, np.arange(n)))
        theirs_again.append(opencv_inliers(cv2, src, dst, rng.permutation(n)))
    ours, theirs, theirs_again = np.array(ours), np.array(theirs), np.array(theirs_again)
    assert abs(ours.sum() - theirs.sum()) <= 0.01 * theirs.sum(), (ours.sum(), theirs.sum())
    spread = np.abs(theirs_again - theirs) / theirs  # OpenCV against itself
    difference = np.abs(ours - theirs) / theirs
    assert difference.mean() <= 2 * spread.mean() + 0.005, (difference.mean(), spread.mean())
    assert np.sum(difference > 0.02) <= np.sum(spread > 0.02) + 2


def test_without_refit_the_model_is_the_best_hypothesis():
    src, dst, truth = planted_problem(200, 0.5, 8, noise=3.0)
    raw = ransac_affine(src, dst, refit=False)
    refit = ransac_affine(src, dst)
    residuals = np.linalg.norm(apply(raw.model, src) - dst, axis=1)
    assert np.sum(residuals < 1e-6) >= 3  # an exact fit of its three sample points
    np.testing.assert_array_equal(raw.inliers, residuals < 20.0)
    assert refit.num_inliers >= raw.num_inliers
    assert np.sum(refit.inliers & truth) >= np.sum(raw.inliers & truth)


def test_the_residual_threshold_decides_which_matches_are_inliers():
    """With Gaussian noise of 4 px per coordinate a 3 px threshold keeps a minority of the true
    matches and 20 px nearly all; either way the inliers are exactly the matches whose residual
    under the returned model is below the threshold."""
    src, dst, _ = planted_problem(300, 0.0, seed=5, noise=4.0)
    counts = {}
    for threshold in (3.0, 20.0):
        result = ransac_affine(src, dst, residual_threshold=threshold, seed=0)
        residual = np.linalg.norm(apply(result.model, src) - dst, axis=1)
        np.testing.assert_array_equal(result.inliers, residual < threshold)
        counts[threshold] = result.num_inliers
    assert counts[3.0] < 0.6 * 300 and counts[20.0] > 0.95 * 300
