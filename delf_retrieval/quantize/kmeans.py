"""Lloyd k-means in float32 numpy: nearest-centroid assignment (chunked BLAS), one large k-means for
the coarse cells, and many small ones run side by side for product-quantizer sub-codebooks."""

from __future__ import annotations

import numpy as np

# Rows per distance block (2048 x 8192 float32 = 64 MB); the matrix product dominates the time.
_ROWS_PER_CHUNK = 2048
# Up to this k the k nearest are picked by a compiled one-pass insertion (adc_kernel.smallest_k),
# beyond it by np.argpartition, which costs ~16 ns per centroid and row whatever k is (measured
# 80 us per row over 4401 centroids on one core: 9x the matrix product).
_COMPILED_SELECT_MAX_K = 64


def nearest(x: np.ndarray, centroids: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest centroids of each row: (labels (n, k) int64, squared distances (n, k)).

    Distances are ||x||^2 - 2 x.c + ||c||^2 evaluated in blocks with one matrix product each, the
    fastest exact method for tens of dimensions (a KD-tree degenerates to a scan at 40-D).
    """
    x = np.asarray(x, np.float32)
    centroids = np.asarray(centroids, np.float32)
    k = min(k, centroids.shape[0])
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    minus_two_ct = np.ascontiguousarray(-2.0 * centroids.T)
    labels = np.empty((x.shape[0], k), np.int64)
    dists = np.empty((x.shape[0], k), np.float32)
    for start in range(0, x.shape[0], _ROWS_PER_CHUNK):
        block = x[start:start + _ROWS_PER_CHUNK]
        d = block @ minus_two_ct
        x_sq = np.einsum("ij,ij->i", block, block)[:, None]
        if 1 < k <= _COMPILED_SELECT_MAX_K:
            from delf_retrieval.quantize import adc_kernel  # numba: compiled on first use

            top, top_d = adc_kernel.smallest_k(d, c_sq, k)  # the same float32 sums as d + c_sq
            labels[start:start + len(block)] = top
            dists[start:start + len(block)] = np.maximum(top_d + x_sq, 0.0)
            continue
        d += c_sq
        if k == 1:
            top = np.argmin(d, axis=1)[:, None]
        else:
            top = np.argpartition(d, k - 1, axis=1)[:, :k]
            order = np.argsort(np.take_along_axis(d, top, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
        labels[start:start + len(block)] = top
        dists[start:start + len(block)] = np.maximum(np.take_along_axis(d, top, axis=1) + x_sq, 0.0)
    return labels, dists


def _sum_by_label(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-label sums of the rows of x, (k, d) float32 (one bincount per column: far faster than
    np.add.at)."""
    return np.stack([np.bincount(labels, weights=x[:, j], minlength=k) for j in range(x.shape[1])],
                    axis=1).astype(np.float32)


def _initial_points(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, size=k, replace=False)


def kmeans(x: np.ndarray, k: int, iterations: int = 20, seed: int = 0,
           max_points_per_centroid: int = 64) -> np.ndarray:
    """Centroids (k, d) float32 of Lloyd's k-means with random-point initialisation.

    At most ``k * max_points_per_centroid`` rows are used (a random subset), as faiss does (its
    default is 256; it warns below 39): more points move the centroids very little and cost time
    linearly. An empty cluster is re-seeded on the point farthest from its centroid (as
    scikit-learn does), so all ``k`` centroids are used.
    """
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if k < 1:
        raise ValueError("k must be at least 1")
    if n < k:
        raise ValueError(f"k-means with {k} centroids needs at least {k} points, got {n}")
    rng = np.random.default_rng(seed)
    if n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, size=k * max_points_per_centroid, replace=False))]
        n = x.shape[0]
    centroids = x[_initial_points(n, k, rng)].copy()
    for _ in range(iterations):
        labels, dists = nearest(x, centroids)
        labels = labels[:, 0]
        counts = np.bincount(labels, minlength=k)
        sums = _sum_by_label(x, labels, k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = np.flatnonzero(~filled)
        if len(empty):  # re-seed on the worst-served points, as scikit-learn does
            centroids[empty] = x[np.argsort(-dists[:, 0], kind="stable")[:len(empty)]]
    return centroids


def kmeans_subspaces(x: np.ndarray, k: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """Independent k-means in each subspace at once: x (n, m, dsub) -> centroids (m, k, dsub).

    This is how product-quantizer codebooks are trained; running the m problems together keeps
    the Python overhead per iteration constant. Needs n >= k.
    """
    x = np.asarray(x, np.float32)
    n, m, dsub = x.shape
    if n < k:
        raise ValueError(f"training {k} centroids needs at least {k} points, got {n}")
    rng = np.random.default_rng(seed)
    centroids = np.stack([x[_initial_points(n, k, rng), j] for j in range(m)])  # (m, k, dsub)
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))  # (m, n, dsub)
    flat_offsets = (np.arange(m) * k)[:, None]
    for _ in range(iterations):
        c_sq = np.einsum("mkd,mkd->mk", centroids, centroids)[:, None, :]
        labels = np.empty((m, n), np.int64)
        served = np.empty((m, n), np.float32)  # squared distance of each point to its centroid
        for start in range(0, n, 65536):  # bounds the (m, chunk, k) distance block
            block = xt[:, start:start + 65536]
            d = c_sq - 2.0 * np.matmul(block, centroids.transpose(0, 2, 1))
            labels[:, start:start + 65536] = np.argmin(d, axis=2)
            served[:, start:start + 65536] = (np.take_along_axis(d, labels[:, start:start + 65536, None], 2)[:, :, 0]
                                              + np.einsum("mnd,mnd->mn", block, block))
        flat = (labels + flat_offsets).ravel()
        counts = np.bincount(flat, minlength=m * k).reshape(m, k)
        sums = _sum_by_label(xt.reshape(m * n, dsub), flat, m * k).reshape(m, k, dsub)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled][:, None]
        for j in np.flatnonzero((~filled).any(axis=1)):  # re-seed on the worst-served points
            empty = np.flatnonzero(~filled[j])
            centroids[j, empty] = xt[j, np.argsort(-served[j], kind="stable")[:len(empty)]]
    return centroids
