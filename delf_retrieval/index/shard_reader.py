"""Reading a format-1 index (one set of posting shards): the lazy, CRC-checked ``IndexReader``,
its resident lists, and the rows it hands to the query side."""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval import storage
from delf_retrieval.index.layout import (MANIFEST, DamagedFile, ManifestError, check_manifest_paths, checked_read,
                                         read_manifest, resolve)
from delf_retrieval.index.neighbour_table import NeighbourTable
from delf_retrieval.index.shards import read_image_table, unpacked_codes
from delf_retrieval.quantize import Quantizer
from delf_retrieval.quantize import pca as pca_lib
from delf_retrieval.quantize.ivf import InvertedLists, Searcher, expand_ranges

LOAD_TRANSIENT_BYTES_PER_ROW = 32  # IndexReader.load_all: per row, beyond the arrays it keeps (measured)


def _read_footer(path: str, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of a Parquet file's footer: metadata, its length and the magic, at the end."""
    tail = storage.read_bytes(path, size - 8, 8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise DamagedFile(f"{path} is not a complete Parquet file (no footer magic)")
    length = struct.unpack("<I", tail[:4])[0] + 8
    if length > size:
        raise DamagedFile(f"{path}: footer length {length} exceeds the file size {size}")
    return size - length, storage.read_bytes(path, size - length, length)


@dataclass
class Rows:
    """Stored attributes of posting rows, aligned with the ids asked for (-1 ids give image_id -1)."""

    image_ids: np.ndarray  # int64
    locations: np.ndarray  # (n, 2) float32, y, x
    scales: np.ndarray  # float32
    attentions: np.ndarray  # float32


@dataclass
class StoredRows:
    """A block of an index's stored posting rows as a reader yields them
    (:meth:`IndexReader.stored_rows`): their global row ids, image ids, reconstructed PCA'd
    descriptors (decoded PQ codes) and (y, x) keypoints, aligned."""

    rows: np.ndarray  # (n,) int64, global posting row ids (what search returns and rows() takes)
    image_ids: np.ndarray  # (n,) int64
    descriptors: np.ndarray  # (n, d) float32
    locations: np.ndarray  # (n, 2) float32, y, x

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def take(self, keep: np.ndarray) -> "StoredRows":
        return StoredRows(self.rows[keep], self.image_ids[keep], self.descriptors[keep], self.locations[keep])


def regions_of_cells(cell_regions: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Every region of the given cells (-1 ignored); cell c owns cell_regions[c]:cell_regions[c + 1]."""
    cells = np.unique(np.asarray(cells)[np.asarray(cells) >= 0])
    return expand_ranges(cell_regions[cells], cell_regions[cells + 1])


def cached_row_bytes(pq_m: int) -> int:
    """Bytes per row of a row group in IndexReader's cache: region, unpacked codes, image id,
    keypoint (y, x), scale, attention and image position."""
    return 8 + pq_m + 8 + 2 + 2 + 2 + 2 + 4


class IndexReader:
    """Reads an index lazily: the small files on open (checked by SHA-256), posting row groups only
    when a probed cell needs them (checked by CRC-32), kept in an LRU cache of ``cache_bytes``.

    ``search`` takes PCA'd query descriptors; ids in results are global posting row numbers, and
    :meth:`rows` gives their image ids and keypoints. Searches may run in several threads at once
    (a server's workers): the row-group cache is shared under a lock.
    """

    def __init__(self, directory: str, cache_bytes: int = 2 << 30, manifest: dict | None = None,
                 model: tuple | None = None):
        """``manifest``: read the version folder ``directory`` by this manifest (its paths checked
        as on disk) rather than its manifest file: a build reading its own version before publishing.
        ``model``: the (quantizer, pca) of these very files, already read and checked (the segments
        of one version share them), so they are not read again."""
        self.directory = directory
        if manifest is None:
            self.manifest = read_manifest(directory)
        else:
            check_manifest_paths(manifest, storage.join(directory, MANIFEST))
            self.manifest = manifest
        if self.manifest.get("format_version") == 2:
            raise ManifestError(f"{directory} lists segments: open it with segments.open_reader")
        files = self.manifest["files"]
        if model is not None:
            self.quantizer, self.pca = model
        else:
            self.quantizer = Quantizer.load(checked_read(directory, files["quantizer"], checksum=True))
            self.pca = pca_lib.PCA.load(checked_read(directory, files["pca"], checksum=True)) if "pca" in files else None
        self._images_bytes = checked_read(directory, files["images"], checksum=True)
        self._images: pa.Table | None = None
        self._neighbours = None
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._resident: InvertedLists | None = None
        self._cell_regions = self.quantizer.regions.cell_regions(self.quantizer.coarse.n_cells)
        self._index_groups()

    def _index_groups(self) -> None:
        """Global tables of row groups: shard, position, first global row, cell range."""
        shard_of, group_of, first_row, first_cell, last_cell = [], [], [], [], []
        row = 0
        self._shard_paths, self._footers, self._metadata = [], [], []
        for s, shard in enumerate(self.manifest["shards"]):
            checked_read(self.directory, shard, checksum=False)
            path = resolve(self.directory, shard["path"])
            footer = _read_footer(path, shard["bytes"])
            try:
                # The footer alone parses as a file: the magic, then the footer (which ends in it).
                metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer[1]))
            except (OSError, pa.ArrowException) as e:
                raise DamagedFile(f"{shard['path']}: unreadable Parquet footer ({e})") from e
            self._shard_paths.append(path), self._footers.append(footer), self._metadata.append(metadata)
            if (metadata.metadata or {}).get(b"index_id", b"").decode() != self.manifest["index_id"]:
                raise DamagedFile(f"{shard['path']} belongs to another index (index_id differs)")
            if metadata.num_rows != shard["rows"] or metadata.num_row_groups != len(shard["row_groups"]):
                raise DamagedFile(f"{shard['path']} has {metadata.num_rows} rows in {metadata.num_row_groups} "
                                 f"row groups, the manifest says {shard['rows']} in {len(shard['row_groups'])}")
            cell_column = metadata.schema.to_arrow_schema().get_field_index("cell")
            for g in range(metadata.num_row_groups):
                stats = metadata.row_group(g).column(cell_column).statistics
                shard_of.append(s), group_of.append(g), first_row.append(row)
                first_cell.append(stats.min), last_cell.append(stats.max)
                row += metadata.row_group(g).num_rows
        self.num_rows = row
        self._group_shard = np.asarray(shard_of, np.int64)
        self._group_index = np.asarray(group_of, np.int64)
        self._group_first_row = np.asarray(first_row + [row], np.int64)
        self._group_first_cell = np.asarray(first_cell, np.int64)
        self._group_last_cell = np.asarray(last_cell, np.int64)

    @property
    def images(self) -> pa.Table:
        if self._images is None:
            self._images = read_image_table(self._images_bytes, self.manifest["files"]["images"]["path"])
        return self._images

    def _load_group(self, group: int) -> dict:
        with self._cache_lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
        s, g = int(self._group_shard[group]), int(self._group_index[group])
        shard = self.manifest["shards"][s]
        record = shard["row_groups"][g]
        # One ranged read per row group; Parquet then parses it with the footer read on open.
        data = storage.read_bytes(self._shard_paths[s], record["offset"], record["length"])
        if len(data) != record["length"] or zlib.crc32(data) != record["crc32"]:
            raise DamagedFile(f"{shard['path']} row group {g} does not match its CRC-32 in the manifest (corrupt)")
        view = storage.RangeFile(shard["bytes"], dict([self._footers[s], (record["offset"], data)]))
        table = pq.ParquetFile(view, metadata=self._metadata[s]).read_row_group(g)
        params = self.quantizer.params
        arrays = {
            "region": table.column("region").to_numpy().astype(np.int64),
            "codes": unpacked_codes(table, params.pq_m, params.pq_bits),
            "image_id": table.column("image_id").to_numpy(),
            "y": table.column("y").to_numpy(), "x": table.column("x").to_numpy(),
            "scale": table.column("scale").to_numpy(), "attention": table.column("attention").to_numpy(),
        }
        # Each row's position in the sorted image ids: image filters then cost one gather per row.
        arrays["image_index"] = np.searchsorted(self._sorted_image_ids, arrays["image_id"]).astype(np.int32)
        arrays["nbytes"] = sum(a.nbytes for a in arrays.values())
        with self._cache_lock:
            if group in self._cache:  # another thread read it meanwhile
                return self._cache[group]
            self._cache[group] = arrays
            self._cached_bytes += arrays["nbytes"]
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted["nbytes"]
        return arrays

    def _groups_for_cells(self, cells: np.ndarray) -> np.ndarray:
        cells = np.unique(cells[cells >= 0])
        # Row groups are sorted by cell: those whose [first, last] range meets a probed cell.
        lo = np.searchsorted(self._group_last_cell, cells, side="left")
        hi = np.searchsorted(self._group_first_cell, cells, side="right")
        return np.unique(expand_ranges(lo, hi))

    @functools.cached_property
    def _sorted_image_ids(self) -> np.ndarray:
        return np.sort(self.images.column("image_id").to_numpy().astype(np.int64))

    def _allowed_images(self, image_ids: np.ndarray) -> np.ndarray:
        """A mask over the sorted image ids: True for the given ids (unknown ids are ignored)."""
        ids = np.asarray(image_ids, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_image_ids, ids), max(len(self._sorted_image_ids) - 1, 0))
        allowed = np.zeros(len(self._sorted_image_ids), bool)
        if len(allowed):
            allowed[pos[self._sorted_image_ids[pos] == ids]] = True
        return allowed

    def _lists(self, groups: np.ndarray, image_ids: np.ndarray | None = None) -> InvertedLists:
        n_regions = self.quantizer.regions.n_regions
        if len(groups) == 0:
            return InvertedLists(np.zeros(n_regions + 1, np.int64), np.zeros((0, self.quantizer.params.pq_m), np.uint8),
                                 np.zeros(0, np.int64))
        loaded = [self._load_group(int(g)) for g in groups]
        regions = np.concatenate([a["region"] for a in loaded])
        codes = np.concatenate([a["codes"] for a in loaded])
        ids = np.concatenate([np.arange(self._group_first_row[g], self._group_first_row[g + 1]) for g in groups])
        if image_ids is not None:
            # Rows stay sorted by region when filtered, so the offsets below still hold.
            keep = self._allowed_images(image_ids)[np.concatenate([a["image_index"] for a in loaded])]
            regions, codes, ids = regions[keep], codes[keep], ids[keep]
        return InvertedLists(np.searchsorted(regions, np.arange(n_regions + 1)).astype(np.int64), codes, ids)

    def resident_bytes(self) -> int:
        """About how much memory :meth:`load_all` takes: per posting row, the cached row group's
        columns (region, unpacked codes, image id, keypoint, scale, attention, image position), the
        resident lists' codes, row ids and image positions, and what building them leaves in the
        allocators (together 92 bytes per row measured on a 2e6-row index with 10-byte codes)."""
        m = self.quantizer.params.pq_m
        held = cached_row_bytes(m) + (m + 8 + 4)
        return self.num_rows * (held + LOAD_TRANSIENT_BYTES_PER_ROW)

    def load_all(self) -> None:
        """Keep all postings in memory (when the index fits) so searches skip the per-batch
        assembly; the row-group cache is then only used for :meth:`rows`."""
        groups = np.arange(len(self._group_shard))
        self._resident = self._lists(groups)
        self._resident_image_index = np.concatenate([self._load_group(int(g))["image_index"] for g in groups]
                                                    or [np.zeros(0, np.int32)])

    def search(self, queries: np.ndarray, k: int, nprobe: int = 8,
               image_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ADC search of PCA'd queries (n, d): (squared distances, global row ids), as Searcher.
        ``image_ids`` restricts the scan to the rows of those images (an image shortlist)."""
        queries = np.ascontiguousarray(queries, np.float32)
        probe_cells, _ = self.quantizer.coarse.probe(queries, nprobe)
        if image_ids is not None and self._resident is not None:
            lists = self._resident.restrict_to_images(regions_of_cells(self._cell_regions, probe_cells),
                                                      self._resident_image_index,
                                                      np.flatnonzero(self._allowed_images(image_ids)))
        elif image_ids is not None:
            lists = self._lists(self._groups_for_cells(probe_cells.ravel()), np.asarray(image_ids, np.int64))
        elif self._resident is not None:
            lists = self._resident
        else:
            lists = self._lists(self._groups_for_cells(probe_cells.ravel()))
        return Searcher(self.quantizer, lists).search_cells(queries, probe_cells, k)

    def neighbours(self):
        """The version's verified-neighbour table (``expansion.NeighbourTable``), checked by
        SHA-256 and read once; None if the index was built without one."""

        record = self.manifest["files"].get("neighbours")
        if record is None:
            return None
        if self._neighbours is None:
            self._neighbours = NeighbourTable.from_bytes(checked_read(self.directory, record, checksum=True),
                                                         record["path"])
        return self._neighbours

    @property
    def num_row_groups(self) -> int:
        return len(self._group_shard)

    def stored_rows(self):
        """Every posting row group in turn as :class:`StoredRows` (global row ids, image ids,
        decoded descriptors, keypoints), in stored order: for builders and checks that read the
        whole index once (the image shortlist, the neighbour stage, a version's probe)."""
        for group in range(self.num_row_groups):
            arrays = self._load_group(group)
            yield StoredRows(np.arange(self._group_first_row[group], self._group_first_row[group + 1]),
                             arrays["image_id"].astype(np.int64),
                             self.quantizer.decode(arrays["region"], arrays["codes"]),
                             np.stack([arrays["y"], arrays["x"]], 1).astype(np.float32))

    def postings(self):
        """:meth:`stored_rows` as (image ids, reconstructed PCA'd descriptors) per row group."""
        for block in self.stored_rows():
            yield block.image_ids, block.descriptors

    def _cell_rows(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rows of ``cells`` in stored order (by region, then image id): their regions, codes,
        global row ids and image positions (in the sorted image ids). Only the row groups that
        hold those cells are read; within them, each cell's rows are found by binary search."""
        cells = np.unique(np.asarray(cells, np.int64))
        cells = cells[cells >= 0]
        bounds = np.stack([self._cell_regions[cells], self._cell_regions[cells + 1]])
        parts = []
        for group in self._groups_for_cells(cells):
            arrays = self._load_group(int(group))
            lo, hi = np.searchsorted(arrays["region"], bounds)  # rows are sorted by region (so by cell)
            take = expand_ranges(lo, hi)
            if not len(take):
                continue
            whole = len(take) == len(arrays["region"])  # the group lies inside the cells: no gather
            columns = [arrays[name] if whole else arrays[name][take] for name in ("region", "codes", "image_index")]
            parts.append((columns[0], columns[1], take + self._group_first_row[group], columns[2]))
        if not parts:
            m = self.quantizer.params.pq_m
            return np.zeros(0, np.int64), np.zeros((0, m), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int32)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))

    def rows(self, ids: np.ndarray) -> Rows:
        """Image id, keypoint (y, x), scale and attention of global posting rows."""
        ids = np.asarray(ids, np.int64)
        flat = ids.ravel()
        out = Rows(np.full(flat.shape, -1, np.int64), np.zeros((flat.size, 2), np.float32),
                   np.zeros(flat.size, np.float32), np.zeros(flat.size, np.float32))
        valid = np.flatnonzero(flat >= 0)
        groups = np.searchsorted(self._group_first_row, flat[valid], side="right") - 1
        for g in np.unique(groups):
            where = valid[groups == g]
            arrays = self._load_group(int(g))
            local = flat[where] - self._group_first_row[g]
            out.image_ids[where] = arrays["image_id"][local]
            out.locations[where, 0] = arrays["y"][local]
            out.locations[where, 1] = arrays["x"][local]
            out.scales[where] = arrays["scale"][local]
            out.attentions[where] = arrays["attention"][local]
        shape = ids.shape
        return Rows(out.image_ids.reshape(shape), out.locations.reshape(shape + (2,)),
                    out.scales.reshape(shape), out.attentions.reshape(shape))
