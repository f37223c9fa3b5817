"""The compiled ADC scan (numba): per query, lookup tables per probed region and a bounded max-heap
of the k best rows. Same inputs and results as ``search._search_numpy``."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_d, heap_i, size):
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and heap_d[right] > heap_d[left]:
            child = right
        if heap_d[child] <= heap_d[pos]:
            return
        heap_d[pos], heap_d[child] = heap_d[child], heap_d[pos]
        heap_i[pos], heap_i[child] = heap_i[child], heap_i[pos]
        pos = child


@numba.njit(cache=True, nogil=True, parallel=True)
def _kernel(queries, probe_cells, centroids, cell_regions, region_model, model_mean, model_rotation,
            model_codebooks, codebooks, offsets, codes, ids, k, out_d, out_i):
    nq, d = queries.shape
    m, n_centroids, dsub = codebooks.shape
    for q in numba.prange(nq):
        lut = np.empty((m, n_centroids), np.float32)
        residual = np.empty(d, np.float32)
        vector = np.empty(d, np.float32)
        heap_d = np.empty(k, np.float32)
        heap_i = np.empty(k, np.int64)
        size = 0
        for p in range(probe_cells.shape[1]):
            cell = probe_cells[q, p]
            if cell < 0:
                continue
            for t in range(d):
                residual[t] = queries[q, t] - centroids[cell, t]
            table_model = -2
            for region in range(cell_regions[cell], cell_regions[cell + 1]):
                start = offsets[region]
                end = offsets[region + 1]
                if start == end:
                    continue
                model = region_model[region]
                if model != table_model:
                    if model < 0:
                        for t in range(d):
                            vector[t] = residual[t]
                        books = codebooks
                    else:
                        for t in range(d):
                            acc = np.float32(0.0)
                            for u in range(d):
                                acc += model_rotation[model, t, u] * (residual[u] - model_mean[model, u])
                            vector[t] = acc
                        books = model_codebooks[model]
                    for j in range(m):
                        for c in range(n_centroids):
                            acc = np.float32(0.0)
                            for t in range(dsub):
                                diff = vector[j * dsub + t] - books[j, c, t]
                                acc += diff * diff
                            lut[j, c] = acc
                    table_model = model
                for row in range(start, end):
                    dist = np.float32(0.0)
                    for j in range(m):
                        dist += lut[j, codes[row, j]]
                    if size < k:
                        # sift up into the max-heap
                        pos = size
                        heap_d[pos] = dist
                        heap_i[pos] = ids[row]
                        size += 1
                        while pos > 0:
                            parent = (pos - 1) // 2
                            if heap_d[parent] >= heap_d[pos]:
                                break
                            heap_d[pos], heap_d[parent] = heap_d[parent], heap_d[pos]
                            heap_i[pos], heap_i[parent] = heap_i[parent], heap_i[pos]
                            pos = parent
                    elif dist < heap_d[0]:
                        heap_d[0] = dist
                        heap_i[0] = ids[row]
                        _sift_down(heap_d, heap_i, size)
        order = np.argsort(heap_d[:size], kind="mergesort")
        for r in range(size):
            out_d[q, r] = heap_d[order[r]]
            out_i[q, r] = heap_i[order[r]]


def search(queries, probe_cells, centroids, cell_regions, region_model, model_mean, model_rotation,
           model_codebooks, codebooks, offsets, codes, ids, k):
    nq = len(queries)
    out_d = np.full((nq, k), np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    if nq and k:
        _kernel(queries, probe_cells, np.ascontiguousarray(centroids, np.float32), cell_regions,
                region_model.astype(np.int64), np.ascontiguousarray(model_mean, np.float32),
                np.ascontiguousarray(model_rotation, np.float32), np.ascontiguousarray(model_codebooks, np.float32),
                np.ascontiguousarray(codebooks, np.float32), offsets, codes, ids, k, out_d, out_i)
    return out_d, out_i
