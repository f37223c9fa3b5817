"""The reader of a format-2 version: every segment searched as one index (``SegmentedReader``),
and ``open_reader``, which opens either format."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from delf_retrieval import storage
from delf_retrieval.index import layout, scrub, shard_reader
from delf_retrieval.index.neighbour_table import NeighbourTable
from delf_retrieval.index.segments import (in_segment, index_root, is_segmented, read_restamps, read_segment,
                                           read_tombstones, segment_refs, with_restamps, without_images)
from delf_retrieval.quantize.ivf import InvertedLists, Searcher

LOAD_BATCH_ROWS = 1 << 20  # SegmentedReader.load_all merges the cells of about this many rows at a time


def open_reader(directory: str, cache_bytes: int = 2 << 30, manifest: dict | None = None):
    """A reader for the index at ``directory``: :class:`~delf_retrieval.index.shard_reader.IndexReader` for a
    format-1 manifest, :class:`SegmentedReader` for a list of segments. Both answer the same calls
    (search, rows, images, stored_rows, postings, neighbours, load_all, resident_bytes)."""
    if manifest is None:
        manifest = layout.read_manifest(directory)
    if is_segmented(manifest):
        return SegmentedReader(directory, cache_bytes, manifest)
    return shard_reader.IndexReader(directory, cache_bytes, manifest)


@dataclass(frozen=True)
class _MergedCell:
    """One coarse cell's live rows of every segment, in the order one segment would store them."""

    counts: np.ndarray  # (regions of the cell,) int64: rows per region, in region order
    codes: np.ndarray  # (n, M) uint8
    ids: np.ndarray  # (n,) int64 global row ids
    ranks: np.ndarray  # (n,) int32: each row's image among the version's live image ids

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + self.codes.nbytes + self.ids.nbytes + self.ranks.nbytes


class SegmentedReader:
    """Searches every segment of a format-2 version as one index, with the calls and meaning of
    :class:`~delf_retrieval.index.shard_reader.IndexReader`: one IndexReader per segment (its own lazy row
    groups, checked by CRC-32), tombstoned images dropped, and the live rows of all segments merged
    per coarse cell in the order one segment stores them (by region, then image id), so results
    equal those of the same live images written as one segment.

    :meth:`load_all` (resident) merges every cell once into one set of inverted lists; otherwise
    each probed cell is merged when first searched and kept in an LRU cache of merged cells, so a
    search only gathers cached cells. ``cache_bytes`` is shared by the segments' row-group caches
    (in proportion to their rows) and the merged-cell cache. Searches may run in several threads
    at once: both caches are shared under locks.

    Global row ids are the segments' row ids, segment after segment, in the version's order;
    ``num_rows`` is the size of that id space, tombstoned rows included (as the manifest's
    ``counts.stored_descriptors``), until a merge drops them.
    """

    def __init__(self, directory: str, cache_bytes: int = 2 << 30, manifest: dict | None = None):
        """``manifest``: read the version folder ``directory`` (the root, or ``ROOT/builds/<id>``)
        by this manifest rather than its manifest file, as IndexReader does (a build reading its
        own version before publishing it)."""
        self.directory = directory
        if manifest is None:
            manifest = layout.read_manifest(directory)
        else:
            layout.check_manifest_paths(manifest, storage.join(directory, layout.MANIFEST))
        if not is_segmented(manifest):
            raise layout.ManifestError(f"{directory}: not a segmented (format version 2) manifest")
        self.manifest = manifest
        self.cache_bytes = cache_bytes
        self.refs = segment_refs(manifest)
        if not self.refs:
            raise layout.ManifestError(f"{directory}: the version lists no segments")
        self.tombstones = read_tombstones(directory, manifest)
        self.root = root = index_root(directory, manifest)
        self.segments: list[shard_reader.IndexReader] = []
        model = None
        for s, ref in enumerate(self.refs):
            with self._reading(s):
                segment = read_segment(root, ref)
                own = {"index_id": segment.index_id,
                       "files": {**manifest["codebooks"], "images": in_segment(ref, segment.images)},
                       "shards": [in_segment(ref, s) for s in segment.shards]}
                reader = shard_reader.IndexReader(root, cache_bytes, manifest=own, model=model)
            model = (reader.quantizer, reader.pca)  # read and checked once, shared by every segment
            self.segments.append(reader)
        self.quantizer, self.pca = model
        self._offsets = np.cumsum([0] + [s.num_rows for s in self.segments]).astype(np.int64)
        self.num_rows = int(self._offsets[-1])
        self._deleted = [self.tombstones.of(ref.segment_id) for ref in self.refs]
        for ref, reader, deleted in zip(self.refs, self.segments, self._deleted):
            if not np.isin(deleted, reader._sorted_image_ids).all():
                raise layout.ManifestError(f"{directory}: tombstones of segment {ref.segment_id} name images it "
                                           "does not hold")
        live = [np.setdiff1d(s._sorted_image_ids, d) for s, d in zip(self.segments, self._deleted)]
        every = np.concatenate(live)
        self._live_ids = np.unique(every)
        if len(self._live_ids) != len(every):
            ids, counts = np.unique(every, return_counts=True)
            raise layout.ManifestError(f"{directory}: image ids live in two segments (not tombstoned in the older "
                                       f"one): {ids[counts > 1][:5].tolist()}")
        # Each segment's image position (in its sorted ids) -> the image's rank among the live ids,
        # -1 when tombstoned: rows merge by the int64 key (region, rank), and image restrictions
        # and tombstones both cost one gather per row.
        self._ranks = [np.where(np.isin(s._sorted_image_ids, d), -1,
                                np.searchsorted(self._live_ids, s._sorted_image_ids)).astype(np.int32)
                       for s, d in zip(self.segments, self._deleted)]
        self._cell_regions = self.quantizer.regions.cell_regions(self.quantizer.coarse.n_cells)
        self._cells: OrderedDict[int, _MergedCell] = OrderedDict()
        self._cell_bytes = 0
        self._cell_lock = threading.Lock()
        self._resident: InvertedLists | None = None
        self._resident_ranks: np.ndarray | None = None
        self._share_cache(resident=False)
        self._images: pa.Table | None = None
        self._neighbours = None

    def _reading(self, s: int):
        """Reading segment ``s`` (``scrub.reading``: its damage named and noted)."""
        return scrub.reading(self.root, self.refs[s].segment_id)

    def _share_cache(self, resident: bool) -> None:
        """Split ``cache_bytes``: the segments' row-group caches in proportion to their rows, and
        (unless resident) the merged-cell cache, so that both can hold the same share of the rows."""
        m = self.quantizer.params.pq_m
        group_row, cell_row = shard_reader.cached_row_bytes(m), 0 if resident else m + 8 + 4
        groups = self.cache_bytes * group_row / (group_row + cell_row)
        for reader in self.segments:
            reader.cache_bytes = max(int(groups * reader.num_rows / max(self.num_rows, 1)), 1)
        self._cell_cache_bytes = max(int(self.cache_bytes - groups), 0)

    @property
    def images(self) -> pa.Table:
        """The live images of every segment (tombstoned rows dropped), segment after segment."""
        if self._images is None:
            parts = []
            restamps = read_restamps(self.directory, self.manifest)
            for ref, reader, deleted in zip(self.refs, self.segments, self._deleted):
                parts.append(with_restamps(without_images(reader.images, deleted), restamps.stamps.get(ref.segment_id)))
            self._images = pa.concat_tables(parts)
        return self._images

    def neighbours(self):
        """The version's neighbour table without edges from or to an image that is not live."""

        record = self.manifest["files"].get("neighbours")
        if record is None:
            return None
        if self._neighbours is None:
            table = NeighbourTable.from_bytes(layout.checked_read(self.directory, record, checksum=True), record["path"])
            keep = np.isin(table.image_ids, self._live_ids) & np.isin(table.neighbours, self._live_ids)
            self._neighbours = NeighbourTable(table.image_ids[keep], table.neighbours[keep], table.inliers[keep])
        return self._neighbours

    def resident_bytes(self) -> int:
        """About how much memory :meth:`load_all` takes: the segments' own estimates (cached row
        groups, resident lists and what loading leaves in the allocators), tombstoned rows
        counted too."""
        return sum(reader.resident_bytes() for reader in self.segments)

    def _merged(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The live rows of ``cells`` in every segment, merged: (regions, codes, global row ids,
        image ranks), sorted by (region, image rank), an image's rows in their stored order."""
        parts = []
        for s, reader in enumerate(self.segments):
            with self._reading(s):
                regions, codes, rows, index = reader._cell_rows(cells)
            ranks = self._ranks[s][index]
            if len(self._deleted[s]):
                keep = ranks >= 0
                regions, codes, rows, ranks = regions[keep], codes[keep], rows[keep], ranks[keep]
            if len(rows):
                parts.append((regions, codes, rows + self._offsets[s], ranks))
        if not parts:
            return (np.zeros(0, np.int64), np.zeros((0, self.quantizer.params.pq_m), np.uint8), np.zeros(0, np.int64),
                    np.zeros(0, np.int32))
        regions, codes, rows, ranks = (np.concatenate([p[i] for p in parts]) for i in range(4))
        if len(parts) > 1:
            # Each segment's rows are one run sorted by this key: the stable sort merges the runs.
            order = np.argsort(regions * len(self._live_ids) + ranks, kind="stable")
            regions, codes, rows, ranks = regions[order], codes[order], rows[order], ranks[order]
        return regions, codes, rows, ranks

    def _merge_cells(self, cells: np.ndarray) -> dict[int, _MergedCell]:
        regions, codes, rows, ranks = self._merged(cells)
        first, last = self._cell_regions[cells], self._cell_regions[cells + 1]
        lo, hi = np.searchsorted(regions, first), np.searchsorted(regions, last)
        return {int(c): _MergedCell(np.bincount(regions[a:b] - f, minlength=int(e - f)).astype(np.int64),
                                    codes[a:b].copy(), rows[a:b].copy(), ranks[a:b].copy())
                for c, f, e, a, b in zip(cells, first, last, lo, hi)}

    def _probed_lists(self, probe_cells: np.ndarray) -> tuple[InvertedLists, np.ndarray]:
        """Inverted lists of the probed cells' live rows (other regions empty) and each row's image
        rank, from the merged-cell cache; cells not cached are merged now, in one batch."""
        cells = np.unique(probe_cells[probe_cells >= 0]).astype(np.int64)
        found, missing = {}, []
        with self._cell_lock:
            for c in cells.tolist():
                entry = self._cells.get(c)
                if entry is None:
                    missing.append(c)
                else:
                    self._cells.move_to_end(c)
                    found[c] = entry
        if missing:
            built = self._merge_cells(np.asarray(missing, np.int64))
            found.update(built)
            with self._cell_lock:
                for c, entry in built.items():
                    if c not in self._cells:  # another thread may have merged it meanwhile
                        self._cells[c] = entry
                        self._cell_bytes += entry.nbytes
                while self._cell_bytes > self._cell_cache_bytes and self._cells:
                    _, evicted = self._cells.popitem(last=False)
                    self._cell_bytes -= evicted.nbytes
        n_regions = self.quantizer.regions.n_regions
        entries = [found[c] for c in cells.tolist()]
        counts = np.zeros(n_regions, np.int64)
        if entries:
            counts[shard_reader.regions_of_cells(self._cell_regions, cells)] = np.concatenate([e.counts for e in entries])
        offsets = np.zeros(n_regions + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        m = self.quantizer.params.pq_m
        codes = np.concatenate([e.codes for e in entries]) if entries else np.zeros((0, m), np.uint8)
        ids = np.concatenate([e.ids for e in entries]) if entries else np.zeros(0, np.int64)
        ranks = np.concatenate([e.ranks for e in entries]) if entries else np.zeros(0, np.int32)
        return InvertedLists(offsets, codes, ids), ranks

    def load_all(self) -> None:
        """Hold every live row in memory as one set of inverted lists, merged once (tombstoned rows
        dropped, in one segment's row order), with each row's image rank for image restrictions, so
        a search costs what one segment's does; the row groups stay cached for :meth:`rows`."""
        self._share_cache(resident=True)
        m, n_regions = self.quantizer.params.pq_m, self.quantizer.regions.n_regions
        live_rows = 0
        for s, reader in enumerate(self.segments):
            for group in range(reader.num_row_groups):
                with self._reading(s):
                    index = reader._load_group(group)["image_index"]
                live_rows += int((self._ranks[s][index] >= 0).sum())
        codes, ids = np.empty((live_rows, m), np.uint8), np.empty(live_rows, np.int64)
        ranks, counts = np.empty(live_rows, np.int32), np.zeros(n_regions, np.int64)
        n_cells = self.quantizer.coarse.n_cells
        edges = np.unique(np.linspace(0, n_cells, max(1, -(-self.num_rows // LOAD_BATCH_ROWS)) + 1).astype(np.int64))
        at = 0
        for a, b in zip(edges[:-1], edges[1:]):  # a batch of cells at a time: their rows are contiguous
            regions, c, i, r = self._merged(np.arange(a, b))
            codes[at:at + len(i)], ids[at:at + len(i)], ranks[at:at + len(i)] = c, i, r
            counts += np.bincount(regions, minlength=n_regions)
            at += len(i)
        if at != live_rows:
            raise layout.ShardError(f"{self.directory}: {at} live rows found by cell, {live_rows} by row group")
        offsets = np.zeros(n_regions + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        with self._cell_lock:
            self._resident, self._resident_ranks = InvertedLists(offsets, codes, ids), ranks
            self._cells.clear()
            self._cell_bytes = 0

    def _live_ranks(self, image_ids: np.ndarray) -> np.ndarray:
        """The ranks of those of ``image_ids`` that are live (others ignored), sorted."""
        ids = np.asarray(image_ids, np.int64)
        pos = np.minimum(np.searchsorted(self._live_ids, ids), max(len(self._live_ids) - 1, 0))
        found = (self._live_ids[pos] == ids) if len(self._live_ids) else np.zeros(len(ids), bool)
        return np.unique(pos[found]).astype(np.int32)

    def search(self, queries: np.ndarray, k: int, nprobe: int = 8,
               image_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ADC search as :meth:`IndexReader.search`, over the live rows of every segment:
        (squared distances, global row ids); ``image_ids`` restricts the scan to those images."""
        queries = np.ascontiguousarray(queries, np.float32)
        probe_cells, _ = self.quantizer.coarse.probe(queries, nprobe)
        if self._resident is not None:
            lists, ranks = self._resident, self._resident_ranks
        else:
            lists, ranks = self._probed_lists(probe_cells.ravel())
        if image_ids is not None:
            lists = lists.restrict_to_images(shard_reader.regions_of_cells(self._cell_regions, probe_cells), ranks,
                                             self._live_ranks(image_ids))
        return Searcher(self.quantizer, lists).search_cells(queries, probe_cells, k)

    def stored_rows(self):
        """Every live posting row group in turn as :class:`~delf_retrieval.index.shard_reader.StoredRows`
        (global row ids, image ids, decoded descriptors, keypoints), segment after segment;
        tombstoned rows dropped, groups left empty skipped."""
        for s, (reader, deleted) in enumerate(zip(self.segments, self._deleted)):
            blocks = reader.stored_rows()
            while True:
                with self._reading(s):
                    block = next(blocks, None)
                if block is None:
                    break
                if len(deleted):
                    block = block.take(~np.isin(block.image_ids, deleted))
                if len(block):
                    block.rows = block.rows + self._offsets[s]
                    yield block

    def postings(self):
        """:meth:`stored_rows` as (image ids, reconstructed PCA'd descriptors)."""
        for block in self.stored_rows():
            yield block.image_ids, block.descriptors

    def rows(self, ids: np.ndarray) -> shard_reader.Rows:
        """Image id, keypoint, scale and attention of global row ids (-1: image id -1)."""
        ids = np.asarray(ids, np.int64)
        flat = ids.ravel()
        out = shard_reader.Rows(np.full(flat.shape, -1, np.int64), np.zeros((flat.size, 2), np.float32),
                          np.zeros(flat.size, np.float32), np.zeros(flat.size, np.float32))
        valid = np.flatnonzero(flat >= 0)
        segment = np.searchsorted(self._offsets, flat[valid], side="right") - 1
        for s in np.unique(segment):
            where = valid[segment == s]
            with self._reading(int(s)):
                part = self.segments[int(s)].rows(flat[where] - self._offsets[s])
            out.image_ids[where], out.locations[where] = part.image_ids, part.locations
            out.scales[where], out.attentions[where] = part.scales, part.attentions
        shape = ids.shape
        return shard_reader.Rows(out.image_ids.reshape(shape), out.locations.reshape(shape + (2,)),
                           out.scales.reshape(shape), out.attentions.reshape(shape))
