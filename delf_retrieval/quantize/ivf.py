"""Approximate nearest-neighbour search over the inverted PQ index: inverted lists in memory and the
asymmetric-distance (ADC) scan over the probed cells, as a compiled kernel and a numpy reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval.quantize import Encoded, Quantizer


def expand_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The integers of the half-open ranges [starts[i], ends[i]) concatenated in order, without a
    Python loop (rows of regions, of cells, of row groups)."""
    starts = np.asarray(starts, np.int64)
    lengths = np.maximum(np.asarray(ends, np.int64) - starts, 0)
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))


@dataclass
class InvertedLists:
    """PQ codes grouped by region: the codes of region r are rows offsets[r]:offsets[r + 1]; ``ids``
    names each row for the caller (its row in the index's shards, or its insertion order).
    A region with no rows loaded is simply empty, so a partial working set is also an
    InvertedLists."""

    offsets: np.ndarray  # (n_regions + 1,) int64
    codes: np.ndarray  # (n, M) uint8
    ids: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def restrict_to_images(self, regions: np.ndarray, row_images: np.ndarray, images: np.ndarray) -> "InvertedLists":
        """Only the rows of ``regions`` whose image is one of ``images`` (others left empty): a
        query's working set under an image shortlist. ``row_images`` gives each row's image (an
        integer id or index) and must be sorted within each region, as an index's rows are; then
        each region costs two binary searches, not a pass over its rows."""
        images = np.unique(np.asarray(images, row_images.dtype))
        starts, ends = [], []
        for region in np.unique(np.asarray(regions, np.int64)):
            if region < 0:
                continue
            a, b = int(self.offsets[region]), int(self.offsets[region + 1])
            if a == b:
                continue
            span = row_images[a:b]
            lo, hi = np.searchsorted(span, images, "left"), np.searchsorted(span, images, "right")
            found = hi > lo
            starts.append(a + lo[found])
            ends.append(a + hi[found])
        rows = expand_ranges(np.concatenate(starts) if starts else np.zeros(0, np.int64),
                             np.concatenate(ends) if ends else np.zeros(0, np.int64))
        offsets = np.searchsorted(rows, self.offsets).astype(np.int64)
        return InvertedLists(offsets, self.codes[rows], self.ids[rows])

    @classmethod
    def build(cls, n_regions: int, encoded: Encoded, ids: np.ndarray | None = None) -> "InvertedLists":
        """Group encoded rows by region (ties kept in id order)."""
        ids = np.arange(len(encoded.regions), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        order = np.lexsort((ids, encoded.regions))
        regions = encoded.regions[order]
        offsets = np.searchsorted(regions, np.arange(n_regions + 1)).astype(np.int64)
        return cls(offsets, np.ascontiguousarray(encoded.codes[order]), ids[order])


class Searcher:
    """ADC search of a quantizer's inverted lists, faiss-style: ``search(queries, k, nprobe)``."""

    def __init__(self, quantizer: Quantizer, lists: InvertedLists):
        self.quantizer = quantizer
        self.lists = lists
        self.cell_regions = quantizer.regions.cell_regions(quantizer.coarse.n_cells)
        self._cell_table = None

    @property
    def cell_table(self) -> np.ndarray:
        """The cells' part of the global-codebook lookup tables (``adc_kernel.cell_tables``), computed
        once per quantizer and kept on it: readers build a Searcher for every query's working set."""
        if self._cell_table is None:
            self._cell_table = cell_table(self.quantizer)
        return self._cell_table

    def search(self, queries: np.ndarray, k: int, nprobe: int = 8, kernel: str = "compiled") -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored rows of each query by asymmetric distance over its ``nprobe``
        nearest cells: (squared distances (nq, k) float32, ids (nq, k) int64), nearest first,
        padded with (inf, -1) where fewer than k rows were scanned."""
        queries = np.ascontiguousarray(queries, np.float32)
        probe_cells, _ = self.quantizer.coarse.probe(queries, nprobe)
        return self.search_cells(queries, probe_cells, k, kernel)

    def search_cells(self, queries: np.ndarray, probe_cells: np.ndarray, k: int, kernel: str = "compiled"):
        """Like :meth:`search`, over cells chosen by the caller (n, nprobe); -1 entries are skipped."""
        queries = np.ascontiguousarray(queries, np.float32)
        q, r, lists = self.quantizer, self.quantizer.regions, self.lists
        args = (queries, np.ascontiguousarray(probe_cells, np.int64), q.coarse.centroids, self.cell_regions,
                r.region_model, r.model_mean, r.model_rotation, r.model_codebooks, q.pq.codebooks,
                lists.offsets, lists.codes, lists.ids, int(k))
        if kernel == "compiled":
            from delf_retrieval.quantize import adc_kernel  # heavy: numba compiles the kernel on first use

            return adc_kernel.search(*args, cell_table=self.cell_table)
        if kernel == "numpy":
            return _search_numpy(*args)
        raise ValueError(f"unknown kernel {kernel!r}: expected 'compiled' or 'numpy'")


_CELL_TABLE = "_adc_cell_table"  # attribute of a Quantizer: (centroids, codebooks, table)


def cell_table(quantizer: Quantizer) -> np.ndarray:
    """``adc_kernel.cell_tables`` of the quantizer's centroids and global codebooks (n_cells, M, K),
    cached on the quantizer object; recomputed if either array was replaced since."""
    centroids, codebooks = quantizer.coarse.centroids, quantizer.pq.codebooks
    cached = quantizer.__dict__.get(_CELL_TABLE)
    if cached is None or cached[0] is not centroids or cached[1] is not codebooks:
        from delf_retrieval.quantize import adc_kernel

        cached = (centroids, codebooks, adc_kernel.cell_tables(centroids, codebooks))
        quantizer.__dict__[_CELL_TABLE] = cached
    return cached[2]


def _search_numpy(queries, probe_cells, centroids, cell_regions, region_model, model_mean, model_rotation,
                  model_codebooks, codebooks, offsets, codes, ids, k):
    """Reference ADC scan in vectorised numpy, one query at a time (lookup tables per region)."""
    nq = len(queries)
    m = codebooks.shape[0]
    out_d = np.full((nq, k), np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for qi in range(nq):
        dists, rows = [], []
        for cell in probe_cells[qi]:
            if cell < 0:
                continue
            residual = queries[qi] - centroids[cell]
            for region in range(cell_regions[cell], cell_regions[cell + 1]):
                start, end = offsets[region], offsets[region + 1]
                if start == end:
                    continue
                model = region_model[region]
                if model < 0:
                    vector, books = residual, codebooks
                else:
                    vector = model_rotation[model] @ (residual - model_mean[model])
                    books = model_codebooks[model]
                sub = vector.reshape(m, -1)
                lut = ((sub[:, None, :] - books) ** 2).sum(axis=2)  # (M, K)
                dists.append(lut[np.arange(m), codes[start:end].astype(np.int64)].sum(axis=1))
                rows.append(np.arange(start, end))
        if not dists:
            continue
        dists, rows = np.concatenate(dists), np.concatenate(rows)
        top = min(k, len(dists))
        best = np.argpartition(dists, top - 1)[:top] if top < len(dists) else np.arange(len(dists))
        best = best[np.argsort(dists[best], kind="stable")]
        out_d[qi, :top] = dists[best]
        out_i[qi, :top] = ids[rows[best]]
    return out_d, out_i
