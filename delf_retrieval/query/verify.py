"""Geometric verification: affine RANSAC, compiled (numba), deterministic for a seed.

Conventions
-----------
Points are ``(y, x)`` pixel coordinates, as stored in :class:`delf_retrieval.extraction.features.Features`
(``locations``). ``src[i]`` and ``dst[i]`` are one putative match. The model is a (2, 3) float64
matrix ``A`` mapping a source point to its destination::

    [y', x'] = A @ [y, x, 1]

A match is an inlier when the Euclidean distance between ``A @ [src, 1]`` and ``dst`` is strictly
below ``residual_threshold`` (as in ``skimage.measure.ransac``). Because an affine map treats both
coordinates alike, the inlier set does not depend on the (y, x) vs (x, y) order; only the layout of
``A`` does.

Algorithm (the DELF paper's verification: affine model, 3-point samples, 20 px, 1000 trials)
------------------------------------------------------------------------------------------------
The loop is :func:`delf_retrieval.query.ransac_kernel.ransac`, one hypothesis at a time:

- A minimal sample is three distinct indices, uniform, from a splitmix64 generator started at
  ``seed``: a local 64-bit state, nothing global or shared, so the result is a function of (matches,
  parameters, seed) alone, in any thread or process (and, with IEEE float64 arithmetic and no
  fast-math, on any machine).
- Degenerate samples are rejected before solving: a triplet whose source or destination triangle
  is (near-)collinear, i.e. its smallest height is below ``degenerate_ratio`` times its longest side
  (duplicated points are the zero-height case). They count as trials.
- When there are no more distinct triplets than ``max_trials``, all of them are tried in
  lexicographic order instead (exhaustive, and then the result does not depend on the seed).
- Each sample is solved in closed form and scored against the matches in chunks; a hypothesis that
  can no longer reach the best count is abandoned between chunks.
- Best hypothesis: most inliers; ties go to the smaller sum of squared inlier residuals, then to the
  earlier hypothesis.
- Early exit (checked after each trial, the bound re-computed after each improvement): stop once
  the trials reach ``log(1 - confidence) / log(1 - w**3)``, w the best inlier ratio so far (the
  standard RANSAC bound), or when every match is an inlier. ``confidence=1`` (or ``None``) disables it.
- The winner is refit by least squares on its inliers and re-scored; the refit is kept when it has
  at least as many inliers.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 3  # an affine map of the plane is fixed by three non-collinear points
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


def _seed_state(seed) -> np.uint64:
    """The generator state of the compiled loop: the seed itself, a non-negative int below 2**64."""
    value = operator.index(seed)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed!r}")
    return np.uint64(value)


def ransac_affine(src, dst, residual_threshold: float = 20.0, max_trials: int = 1000, min_inliers: int = MIN_SAMPLES,
                  confidence: float | None = 0.999, seed: int = 0,
                  degenerate_ratio: float = DEGENERATE_RATIO, refit: bool = True) -> VerifyResult:
    """Affine RANSAC over putative matches ``src[i] -> dst[i]`` ((N, 2) arrays of (y, x) points).

    Returns a :class:`VerifyResult`; ``model`` is None (and no inliers) when fewer than 3 matches are
    given, every sample is degenerate, or the best model has fewer than ``min_inliers`` inliers.
    ``refit=False`` returns the best hypothesis' model and inlier set as they are (as skimage does).
    Matches with non-finite coordinates are never inliers. Never raises on such data; raises
    ``ValueError`` only for arrays of the wrong shape or a seed outside [0, 2**64).
    The first call in a process loads the compiled loop from numba's cache, or compiles it (seconds)
    where there is none yet.
    """
    from delf_retrieval.query import ransac_kernel  # heavy: numba compiles the kernel on first use

    src = np.ascontiguousarray(src, dtype=np.float64)
    dst = np.ascontiguousarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1:] != (2,) or dst.shape != src.shape:
        raise ValueError(f"src and dst must both be (N, 2) arrays; got {src.shape} and {dst.shape}")
    threshold2 = float(residual_threshold) ** 2
    confidence = 1.0 if confidence is None else float(confidence)
    model, inliers, num_inliers, trials = ransac_kernel.ransac(
        src, dst, threshold2, int(max_trials), confidence, _seed_state(seed), float(degenerate_ratio), bool(refit))
    if num_inliers < max(min_inliers, MIN_SAMPLES):
        return VerifyResult.empty(len(src), int(trials))
    return VerifyResult(model, inliers, int(num_inliers), int(trials))


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
