"""Geometric verification: affine RANSAC vectorised over hypotheses, deterministic for a seed.

Conventions
-----------
Points are ``(y, x)`` pixel coordinates, as stored in :class:`delf_retrieval.features.Features`
(``locations``). ``src[i]`` and ``dst[i]`` are one putative match. The model is a (2, 3) float64
matrix ``A`` mapping a source point to its destination::

    [y', x'] = A @ [y, x, 1]

A match is an inlier when the Euclidean distance between ``A @ [src, 1]`` and ``dst`` is strictly
below ``residual_threshold`` (as in ``skimage.measure.ransac``). Because an affine map treats both
coordinates alike, the inlier set does not depend on the (y, x) vs (x, y) order; only the layout of
``A`` does.

Algorithm (the DELF paper's verification: affine model, 3-point samples, 20 px, 1000 trials)
------------------------------------------------------------------------------------------------
- Hypotheses are drawn in blocks (32, 64, 128, then 256 at a time): all minimal samples of a block
  are drawn at once (three distinct indices per hypothesis, uniformly), solved in closed form and
  scored against every match in one array operation.
- Degenerate samples are rejected before scoring: a triplet whose source or destination triangle
  is (near-)collinear, i.e. its smallest height is below ``degenerate_ratio`` times its longest side
  (duplicated points are the zero-height case).
- When there are no more distinct triplets than ``max_trials``, all of them are tried in a fixed
  order instead (exhaustive, and then the result does not depend on the seed).
- Best hypothesis: most inliers; ties go to the smaller sum of squared inlier residuals, then to the
  earlier hypothesis. So the result is a function of (matches, parameters, seed) alone.
- Early exit (checked after each block): stop once the trials drawn reach
  ``log(1 - confidence) / log(1 - w**3)``, w the best inlier ratio so far (the standard RANSAC
  bound), or when every match is an inlier. ``confidence=1`` (or ``None``) disables it.
- The winner is refit by least squares on its inliers and re-scored; the refit is kept when it has
  at least as many inliers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import comb, log

import numpy as np

MIN_SAMPLES = 3  # an affine map of the plane is fixed by three non-collinear points
BLOCK_SIZES = (32, 64, 128, 256)  # hypotheses per block: small first (easy pairs exit early), then 256
DEGENERATE_RATIO = 0.01  # a triangle whose smallest height is under 1% of its longest side is degenerate


@dataclass
class VerifyResult:
    """The outcome of RANSAC on one set of putative matches."""

    model: np.ndarray | None  # (2, 3) float64 mapping [y, x, 1] of src to [y, x] of dst; None if unverified
    inliers: np.ndarray  # (N,) bool
    num_inliers: int
    trials: int  # hypotheses drawn (including rejected degenerate samples)

    @classmethod
    def empty(cls, n: int, trials: int = 0) -> "VerifyResult":
        return cls(None, np.zeros(n, bool), 0, trials)


def _triangle_ok(a: np.ndarray, b: np.ndarray, c: np.ndarray, ratio: float) -> np.ndarray:
    """Per row: False when triangle (a, b, c) is degenerate (smallest height < ratio x longest side).

    a, b, c: (..., 2). 2 x area = |cross(b - a, c - a)| = longest side x smallest height.
    """
    u, v, w = b - a, c - a, c - b
    cross = np.abs(u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0])
    longest2 = np.maximum(np.maximum((u * u).sum(-1), (v * v).sum(-1)), (w * w).sum(-1))
    # smallest height = cross / longest; compare squared without a sqrt, and reject zero-size triangles
    return (cross * cross >= ratio * ratio * longest2 * longest2) & (longest2 > 0)


def solve_affine_triplets(src3: np.ndarray, dst3: np.ndarray) -> np.ndarray:
    """The affine maps, (B, 2, 3), taking each source triplet exactly onto its destination triplet.

    src3, dst3: (B, 3, 2). Closed form: with U = [s1 - s0, s2 - s0] and P = [d1 - d0, d2 - d0] as
    columns, the linear part is M = P U^-1 and the translation d0 - M s0. Singular triplets give
    non-finite rows: reject them first.
    """
    u = src3[:, 1] - src3[:, 0]  # (B, 2)
    v = src3[:, 2] - src3[:, 0]
    p = dst3[:, 1] - dst3[:, 0]
    q = dst3[:, 2] - dst3[:, 0]
    det = u[:, 0] * v[:, 1] - v[:, 0] * u[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
    # U = [[u0, v0], [u1, v1]], U^-1 = inv * [[v1, -v0], [-u1, u0]]
    i00, i01, i10, i11 = v[:, 1] * inv, -v[:, 0] * inv, -u[:, 1] * inv, u[:, 0] * inv
    model = np.empty((len(src3), 2, 3))
    model[:, :, 0] = p * i00[:, None] + q * i10[:, None]  # row r of M = [p_r, q_r] @ U^-1
    model[:, :, 1] = p * i01[:, None] + q * i11[:, None]
    model[:, :, 2] = dst3[:, 0] - np.einsum("bij,bj->bi", model[:, :, :2], src3[:, 0])
    return model


def squared_residuals(models: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(B, N) squared distances between models[b] applied to src and dst. models: (B, 2, 3)."""
    homogeneous = np.concatenate([src.T, np.ones((1, len(src)), src.dtype)])  # (3, N)
    return _squared_residuals(models, homogeneous, np.ascontiguousarray(dst.T))


def _squared_residuals(models: np.ndarray, homogeneous: np.ndarray, dst_t: np.ndarray) -> np.ndarray:
    """squared_residuals on prepared arrays: homogeneous (3, N) source, dst_t (2, N); one product for
    all hypotheses, then in-place arithmetic (this is the inner loop of RANSAC).

    The product is an einsum, not ``@``: with K = 3 its own loop is as fast as BLAS on one thread,
    while multithreaded OpenBLAS (which ``@`` uses past a size) ran 5-20x slower on a loaded machine,
    and the result does not depend on the thread count."""
    flat = models.reshape(-1, 3).astype(homogeneous.dtype, copy=False)
    mapped = np.einsum("bk,kn->bn", flat, homogeneous).reshape(len(models), 2, -1)
    mapped -= dst_t
    mapped *= mapped
    return np.add(mapped[:, 0], mapped[:, 1])


def fit_affine_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """The least-squares affine map (2, 3) from src to dst, or None when the points are degenerate."""
    if len(src) < MIN_SAMPLES:
        return None
    design = np.concatenate([src, np.ones((len(src), 1))], axis=1)
    solution, _, rank, _ = np.linalg.lstsq(design, dst, rcond=None)
    if rank < 3 or not np.all(np.isfinite(solution)):
        return None
    return solution.T.copy()


def required_trials(num_inliers: int, num_points: int, confidence: float) -> float:
    """Trials after which an all-inlier 3-sample has been drawn with probability ``confidence``,
    given the inlier ratio w = num_inliers / num_points: log(1 - confidence) / log(1 - w^3)."""
    if num_inliers <= 0:
        return float("inf")
    w3 = (num_inliers / num_points) ** MIN_SAMPLES
    if w3 >= 1.0:
        return 0.0
    if confidence >= 1.0:
        return float("inf")
    return log(1.0 - confidence) / log(1.0 - w3)


def _random_triplets(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """(count, 3) indices, three distinct per row, uniform over ordered triplets of range(n)."""
    i = rng.integers(0, n, count)
    j = rng.integers(0, n - 1, count)
    k = rng.integers(0, n - 2, count)
    j += j >= i  # skip i
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    k += k >= lo  # skip the two taken, in increasing order
    k += k >= hi
    return np.stack([i, j, k], axis=1)


def _all_triplets(n: int) -> np.ndarray:
    """(C(n, 3), 3) every unordered triplet of range(n), in lexicographic order."""
    flat = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), MIN_SAMPLES)), np.int64)
    return flat.reshape(-1, MIN_SAMPLES)


def ransac_affine(src, dst, residual_threshold: float = 20.0, max_trials: int = 1000, min_inliers: int = MIN_SAMPLES,
                  confidence: float | None = 0.999, seed: int = 0,
                  degenerate_ratio: float = DEGENERATE_RATIO, refit: bool = True) -> VerifyResult:
    """Affine RANSAC over putative matches ``src[i] -> dst[i]`` ((N, 2) arrays of (y, x) points).

    Returns a :class:`VerifyResult`; ``model`` is None (and no inliers) when fewer than 3 matches are
    given, every sample is degenerate, or the best model has fewer than ``min_inliers`` inliers.
    ``refit=False`` returns the best hypothesis' model and inlier set as they are (as skimage does).
    Matches with non-finite coordinates are never inliers. Never raises on such data; raises
    ``ValueError`` only for arrays of the wrong shape.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1:] != (2,) or dst.shape != src.shape:
        raise ValueError(f"src and dst must both be (N, 2) arrays; got {src.shape} and {dst.shape}")
    n_all = len(src)
    finite = np.all(np.isfinite(src), axis=1) & np.all(np.isfinite(dst), axis=1)
    rows = np.flatnonzero(finite)
    src_f, dst_f = src[rows], dst[rows]
    n = len(rows)
    if n < MIN_SAMPLES:
        return VerifyResult.empty(n_all)
    # Hypotheses are solved (float64) and scored (float32, twice as fast) on centred coordinates,
    # where float32 keeps ~1e-4 px precision; the winner is re-scored in float64 on the originals.
    src_centre, dst_centre = src_f.mean(axis=0), dst_f.mean(axis=0)
    src_c, dst_c = src_f - src_centre, dst_f - dst_centre
    homogeneous32 = np.concatenate([src_c.T, np.ones((1, len(src_c)))]).astype(np.float32)
    dst32_t = np.ascontiguousarray(dst_c.T, dtype=np.float32)
    threshold2 = float(residual_threshold) ** 2
    confidence = 1.0 if confidence is None else float(confidence)

    exhaustive = comb(n, MIN_SAMPLES) <= max_trials
    triplets_all = _all_triplets(n) if exhaustive else None
    rng = None if exhaustive else np.random.default_rng(seed)
    budget = len(triplets_all) if exhaustive else int(max_trials)

    best_count, best_cost, best_model = 0, np.inf, None
    trials, block = 0, 0
    while trials < budget:
        size = min(BLOCK_SIZES[min(block, len(BLOCK_SIZES) - 1)], budget - trials)
        block += 1
        idx = triplets_all[trials:trials + size] if exhaustive else _random_triplets(rng, n, size)
        trials += size
        s3, d3 = src_c[idx], dst_c[idx]  # (B, 3, 2)
        ok = _triangle_ok(s3[:, 0], s3[:, 1], s3[:, 2], degenerate_ratio)
        ok &= _triangle_ok(d3[:, 0], d3[:, 1], d3[:, 2], degenerate_ratio)
        if ok.any():
            models = solve_affine_triplets(s3[ok], d3[ok])
            err2 = _squared_residuals(models, homogeneous32, dst32_t)  # (B', n)
            inside = err2 < threshold2
            counts = np.count_nonzero(inside, axis=1)
            top = counts.max()
            if top >= best_count:
                candidates = np.flatnonzero(counts == top)
                costs = np.where(inside[candidates], err2[candidates], 0.0).sum(axis=1, dtype=np.float64)
                pick = int(np.argmin(costs))  # first of equal costs: the earlier hypothesis
                if top > best_count or costs[pick] < best_cost:
                    best_count, best_cost = int(top), float(costs[pick])
                    best_model = models[candidates[pick]]
        if best_count == n or (not exhaustive and trials >= required_trials(best_count, n, confidence)):
            break

    if best_model is None:
        return VerifyResult.empty(n_all, trials)
    best_model = best_model.copy()  # back to original coordinates: t' = t + dst_centre - M src_centre
    best_model[:, 2] += dst_centre - best_model[:, :2] @ src_centre
    inside = squared_residuals(best_model[None], src_f, dst_f)[0] < threshold2
    refit_model = fit_affine_lstsq(src_f[inside], dst_f[inside]) if refit else None
    if refit_model is not None:
        refit_inside = squared_residuals(refit_model[None], src_f, dst_f)[0] < threshold2
        if refit_inside.sum() >= inside.sum():
            best_model, inside = refit_model, refit_inside
    if inside.sum() < max(min_inliers, MIN_SAMPLES):  # counted in float64, as reported
        return VerifyResult.empty(n_all, trials)
    inliers = np.zeros(n_all, bool)
    inliers[rows[inside]] = True
    return VerifyResult(best_model.copy(), inliers, int(inside.sum()), trials)


def mutual_nearest_neighbours(descriptors_a, descriptors_b, ratio: float | None = None,
                              max_distance: float | None = None) -> np.ndarray:
    """Putative matches between two descriptor sets: (M, 2) int64 rows (index in a, index in b) that
    are each other's nearest neighbour by L2 distance between L2-normalised descriptors, optionally
    also passing Lowe's ratio test (nearest < ratio x second nearest, in b) and a distance cap.
    Rows are sorted by index in a."""
    a = np.asarray(descriptors_a, np.float64)
    b = np.asarray(descriptors_b, np.float64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    distance2 = np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)  # (Na, Nb)
    nearest_in_b = distance2.argmin(axis=1)
    nearest_in_a = distance2.argmin(axis=0)
    rows = np.arange(len(a))
    keep = nearest_in_a[nearest_in_b] == rows
    best = distance2[rows, nearest_in_b]
    if ratio is not None and len(b) > 1:
        second = np.partition(distance2, 1, axis=1)[:, 1]
        keep &= np.sqrt(best) < ratio * np.sqrt(second)
    if max_distance is not None:
        keep &= best <= max_distance * max_distance
    return np.stack([rows[keep], nearest_in_b[keep]], axis=1).astype(np.int64)
