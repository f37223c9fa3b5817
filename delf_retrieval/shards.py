"""The index on storage: Parquet posting shards grouped by cell, the image and dead-letter tables, the
PCA and quantizer arrays, and the JSON manifest written last that publishes and verifies them all.

Layout of an index directory::

    manifest.json                 written last: nothing is an index until it exists
    pca.npz, quantizer.npz        the trained projection and quantizer
    images.parquet                one row per indexed image
    dead_letters.parquet          one row per rejected input (uri, stage, reason, error)
    postings/part-00000.parquet   rows sorted by (cell, region, image id); each file covers a
                                  contiguous range of cells, so a probe reads few row groups

Every file is listed in the manifest with its size and SHA-256, and every posting row group with
its byte range and CRC-32, so a reader checks exactly the bytes it reads.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import json
import os
import struct
import tempfile
import threading
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval import pca as pca_lib
from delf_retrieval import storage
from delf_retrieval.quantize import Encoded, Quantizer
from delf_retrieval.quantize import pq as pq_lib
from delf_retrieval.search import InvertedLists, Searcher, expand_ranges

INDEX_FORMAT = "delf-retrieval-index"
INDEX_FORMAT_VERSION = 1  # one set of shards; version 2 lists segments (delf_retrieval.segments)
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PCA_FILE = "pca.npz"
QUANTIZER_FILE = "quantizer.npz"
IMAGES_FILE = "images.parquet"
DEAD_LETTERS_FILE = "dead_letters.parquet"
POSTINGS_DIR = "postings"
BUILDS_DIR = "builds"  # the pipeline writes each run under builds/<build id>/ and publishes it
ROWS_PER_GROUP = 65536
LOAD_TRANSIENT_BYTES_PER_ROW = 32  # IndexReader.load_all: per row, beyond the arrays it keeps (measured)

IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("num_features", pa.int32()), ("content_hash", pa.string()), ("label", pa.string()),
    ("stamp", pa.string()),  # the source's change marker when listed (storage.stamp), for re-indexing
])
DEAD_LETTER_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                                ("error", pa.string())])


def postings_schema(code_bytes: int) -> pa.Schema:
    return pa.schema([
        ("cell", pa.int32()), ("region", pa.int32()), ("image_id", pa.int64()),
        ("code", pa.binary(code_bytes)), ("y", pa.uint16()), ("x", pa.uint16()),
        ("scale", pa.float16()), ("attention", pa.float16()),
    ])


class IndexStorageError(Exception):
    """Base of the errors about an index on storage."""


class ManifestError(IndexStorageError):
    """The manifest is missing, unreadable, or of another format/version."""


class ShardError(IndexStorageError):
    """A file the manifest lists is missing, truncated, corrupt, or belongs to another index."""


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class PostingRows:
    """Posting rows in one shape, from the encoder to the shard writer, and back from a shard when a
    re-index carries them over: each row's cell, region and PQ code, its image and its keypoint."""

    encoded: Encoded
    image_ids: np.ndarray  # (n,) int64
    locations: np.ndarray  # (n, 2) float32, y, x
    scales: np.ndarray  # (n,) float32 (float16 once stored)
    attentions: np.ndarray  # (n,) float32 (float16 once stored)

    def __len__(self) -> int:
        return len(self.image_ids)

    def take(self, rows: np.ndarray) -> "PostingRows":
        e = self.encoded
        return PostingRows(Encoded(e.cells[rows], e.regions[rows], e.codes[rows]), self.image_ids[rows],
                           self.locations[rows], self.scales[rows], self.attentions[rows])

    @staticmethod
    def empty(m: int) -> "PostingRows":
        return PostingRows(Encoded(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, m), np.uint8)),
                           np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                           np.zeros(0, np.float32))

    @staticmethod
    def concatenate(parts: list["PostingRows"], m: int) -> "PostingRows":
        if not parts:
            return PostingRows.empty(m)
        if len(parts) == 1:
            return parts[0]
        return PostingRows(
            Encoded(*(np.concatenate([getattr(p.encoded, n) for p in parts]) for n in ("cells", "regions", "codes"))),
            *(np.concatenate([getattr(p, n) for p in parts]) for n in ("image_ids", "locations", "scales", "attentions")))


def postings_table(rows: PostingRows, bits: int) -> pa.Table:
    """Rows for the posting shards, sorted by (cell, region, image id); codes bit-packed."""
    encoded = rows.encoded
    m = encoded.codes.shape[1]
    code_bytes = pq_lib.packed_bytes(m, bits)
    order = np.lexsort((np.asarray(rows.image_ids), encoded.regions, encoded.cells))
    packed = pq_lib.pack_codes(encoded.codes[order], bits)
    locations = np.clip(np.rint(np.asarray(rows.locations, np.float64).reshape(-1, 2)[order]), 0,
                        np.iinfo(np.uint16).max)
    columns = [
        pa.array(encoded.cells[order].astype(np.int32)),
        pa.array(encoded.regions[order].astype(np.int32)),
        pa.array(np.asarray(rows.image_ids, np.int64)[order]),
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(code_bytes), len(order), [None, pa.py_buffer(packed.tobytes())]),
        pa.array(locations[:, 0].astype(np.uint16)),
        pa.array(locations[:, 1].astype(np.uint16)),
        pa.array(np.asarray(rows.scales, np.float16)[order]),
        pa.array(np.asarray(rows.attentions, np.float16)[order]),
    ]
    return pa.Table.from_arrays(columns, schema=postings_schema(code_bytes))


def unpacked_codes(table: pa.Table, m: int, bits: int) -> np.ndarray:
    """The (n, m) PQ codes of a posting table's ``code`` column."""
    code_bytes = pq_lib.packed_bytes(m, bits)
    packed = np.frombuffer(table.column("code").combine_chunks().buffers()[1], np.uint8,
                           count=table.num_rows * code_bytes).reshape(-1, code_bytes)
    return pq_lib.unpack_codes(packed, m, bits)


def posting_rows(table: pa.Table, m: int, bits: int) -> PostingRows:
    """A posting table (a shard, or part of one) back as rows: codes unpacked, values as stored."""
    column = lambda name: table.column(name).to_numpy()  # noqa: E731
    return PostingRows(
        Encoded(column("cell").astype(np.int64), column("region").astype(np.int64), unpacked_codes(table, m, bits)),
        column("image_id").astype(np.int64), np.stack([column("y"), column("x")], 1).astype(np.float32),
        column("scale"), column("attention"))


def _sha256_of_file(local_path: str) -> str:
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bytes_record(relative: str, data: bytes, **extra) -> dict:
    return {"path": relative, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}


def _row_group_ranges(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """(offset, length) of each row group's column chunks in the file."""
    ranges = []
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        starts, ends = [], []
        for j in range(group.num_columns):
            column = group.column(j)
            start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            starts.append(start)
            ends.append(start + column.total_compressed_size)
        ranges.append((min(starts), max(ends) - min(starts)))
    return ranges


def write_shard(directory: str, relative: str, table: pa.Table, index_id: str,
                rows_per_group: int = ROWS_PER_GROUP) -> dict:
    """Write one posting shard (rows already sorted) and return its manifest record. The file is
    made in a local temporary folder, checksummed there, then copied to ``directory`` (local or gs://)."""
    with tempfile.TemporaryDirectory(prefix="delf-shard-") as scratch:
        path = os.path.join(scratch, "shard.parquet")
        record = _write_local_shard(path, relative, table.replace_schema_metadata({"index_id": index_id}),
                                    rows_per_group)
        storage.upload(path, storage.join(directory, relative))
    return record


def _write_local_shard(path: str, relative: str, table: pa.Table, rows_per_group: int) -> dict:
    # Dictionary encoding suits the sorted cell/region/scale columns; image ids ascend within a
    # region, so deltas are small; zstd takes what is left.
    pq.write_table(table, path, row_group_size=rows_per_group, compression="zstd",
                   use_dictionary=["cell", "region", "scale"],
                   column_encoding={"image_id": "DELTA_BINARY_PACKED", "y": "BYTE_STREAM_SPLIT",
                                    "x": "BYTE_STREAM_SPLIT", "attention": "BYTE_STREAM_SPLIT",
                                    "code": "PLAIN"},
                   write_statistics=["cell", "region"])
    metadata = pq.ParquetFile(path).metadata
    groups = []
    with open(path, "rb") as f:
        for i, (offset, length) in enumerate(_row_group_ranges(metadata)):
            f.seek(offset)
            groups.append({"rows": metadata.row_group(i).num_rows, "offset": offset, "length": length,
                           "crc32": zlib.crc32(f.read(length))})
    cells = table.column("cell")
    return {"path": relative, "bytes": os.path.getsize(path), "sha256": _sha256_of_file(path),
            "rows": table.num_rows, "row_groups": groups,
            "first_cell": int(cells[0].as_py()) if table.num_rows else None,
            "last_cell": int(cells[-1].as_py()) if table.num_rows else None}


def split_by_cells(table: pa.Table, rows_per_shard: int) -> list[pa.Table]:
    """Cut a cell-sorted table into pieces of about ``rows_per_shard`` rows, never splitting a cell,
    so every shard covers a disjoint, contiguous range of cells."""
    cells = table.column("cell").to_numpy()
    cuts, start = [], 0
    while start < len(cells):
        end = min(start + rows_per_shard, len(cells))
        if end < len(cells):  # move the cut to the end of the cell it falls in
            end = int(np.searchsorted(cells, cells[end - 1], side="right"))
        cuts.append((start, end))
        start = end
    return [table.slice(s, e - s) for s, e in cuts]


def image_table(records: list[dict]) -> pa.Table:
    """The image table from dicts with the keys of ``IMAGE_SCHEMA`` (label may be absent)."""
    return pa.Table.from_pylist([{**{"label": None, "stamp": None}, **r} for r in records], schema=IMAGE_SCHEMA)


def dead_letter_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**{"error": None}, **r} for r in records], schema=DEAD_LETTER_SCHEMA)


def write_table_file(directory: str, relative: str, table: pa.Table) -> dict:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return write_array_file(directory, relative, buffer.getvalue(), rows=table.num_rows)


def write_array_file(directory: str, relative: str, payload: bytes, **extra) -> dict:
    storage.write_bytes(storage.join(directory, relative), payload)
    return _bytes_record(relative, payload, **extra)


def write_manifest(directory: str, manifest: dict) -> None:
    """Publish the index in one atomic write (see :func:`storage.write_bytes`)."""
    storage.write_bytes(storage.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


def new_index_id() -> str:
    return uuid.uuid4().hex


def build_manifest(index_id: str, quantizer: Quantizer, files: dict, shards: list[dict],
                   model: dict | None = None, extra: dict | None = None) -> dict:
    """The manifest record; ``files`` maps pca/quantizer/images/dead_letters to file records."""
    images = files["images"]["rows"]
    descriptors = sum(s["rows"] for s in shards)
    return {
        "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "index_id": index_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": quantizer.params.spec,
        "params": {**quantizer.params.__dict__, "regions": quantizer.regions.n_regions,
                   "local_models": quantizer.regions.n_models, "dim": quantizer.dim},
        "model": model or {},
        "counts": {"images": images, "descriptors": descriptors,
                   "rejected": files["dead_letters"]["rows"] if files.get("dead_letters") else 0,
                   "shards": len(shards)},
        "files": files, "shards": shards, **(extra or {}),
    }


def write_index(directory: str, *, quantizer: Quantizer, pca: pca_lib.PCA | None, rows: PostingRows,
                images: pa.Table, dead_letters: pa.Table | None = None, model: dict | None = None,
                rows_per_shard: int = 4_000_000, rows_per_group: int = ROWS_PER_GROUP) -> dict:
    """Write a whole index held in memory (the Beam pipeline writes the same files in parallel).
    Returns the manifest, which is written last."""
    index_id = new_index_id()
    table = postings_table(rows, quantizer.params.pq_bits)
    shards = [write_shard(directory, f"{POSTINGS_DIR}/part-{i:05d}.parquet", piece, index_id, rows_per_group)
              for i, piece in enumerate(split_by_cells(table, rows_per_shard))]
    files = {"quantizer": write_array_file(directory, QUANTIZER_FILE, quantizer.to_npz_bytes()),
             "images": write_table_file(directory, IMAGES_FILE, images)}
    if pca is not None:
        files["pca"] = write_array_file(directory, PCA_FILE, pca.to_npz_bytes())
    if dead_letters is not None:
        files["dead_letters"] = write_table_file(directory, DEAD_LETTERS_FILE, dead_letters)
    manifest = build_manifest(index_id, quantizer, files, shards, model)
    write_manifest(directory, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def _read_footer(path: str, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of a Parquet file's footer: metadata, its length and the magic, at the end."""
    tail = storage.read_bytes(path, size - 8, 8)
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ShardError(f"{path} is not a complete Parquet file (no footer magic)")
    length = struct.unpack("<I", tail[:4])[0] + 8
    if length > size:
        raise ShardError(f"{path}: footer length {length} exceeds the file size {size}")
    return size - length, storage.read_bytes(path, size - length, length)


def check_relative(relative, field: str, where: str = MANIFEST) -> str:
    """A path from a manifest, as it must be: relative to the index root, '/'-separated, with no
    empty, '.' or '..' part, no backslash, NUL or scheme; otherwise a ManifestError naming the
    field. So no manifest can send a reader outside the root it was opened from."""
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{where}: {field} is not a path: {relative!r}")
    parts = relative.split("/")
    if (any(p in ("", ".", "..") for p in parts) or "\\" in relative or "\x00" in relative or "://" in relative
            or os.path.isabs(relative)):
        raise ManifestError(f"{where}: {field} {relative!r} does not stay inside the index root")
    return relative


def resolve(directory: str, relative: str, field: str = "path") -> str:
    """``directory/relative`` for a checked manifest path; locally, symbolic links inside the index may
    not lead out of it either (its real path must lie under the directory's)."""
    path = storage.join(directory, check_relative(relative, field))
    if not storage.is_gcs(directory):
        real_root = os.path.realpath(directory)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise ManifestError(f"{field} {relative!r} leads outside the index root {directory} (a symbolic link)")
    return path


def check_manifest_paths(manifest: dict, where: str = MANIFEST) -> None:
    """Every path a manifest names (files, shards, its version folder and the one it replaced)."""
    files = manifest.get("files")
    listing = "segments" if manifest.get("format_version") == 2 else "shards"
    if not isinstance(files, dict) or not isinstance(manifest.get(listing), list):
        raise ManifestError(f"{where}: no files/{listing} lists")
    for name, record in files.items():
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: files.{name} is not a file record")
        check_relative(record.get("path"), f"files.{name}.path", where)
    for i, record in enumerate(manifest[listing]):
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: {listing}[{i}] is not a file record")
        check_relative(record.get("path"), f"{listing}[{i}].path", where)
    if listing == "segments":  # the shared model (paths from the root, as segments')
        codebooks = manifest.get("codebooks")
        if not isinstance(codebooks, dict) or not isinstance(codebooks.get("quantizer"), dict):
            raise ManifestError(f"{where}: no codebooks.quantizer record")
        for name, record in codebooks.items():
            if not isinstance(record, dict):
                raise ManifestError(f"{where}: codebooks.{name} is not a file record")
            check_relative(record.get("path"), f"codebooks.{name}.path", where)
    for field in ("build", "previous", "version_folder"):
        if manifest.get(field) is not None:
            check_relative(manifest[field], field, where)


def read_manifest(directory: str) -> dict:
    path = storage.join(directory, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ManifestError(f"{directory} is not an index: no {MANIFEST} (a build that did not finish "
                            "publishes nothing)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ManifestError(f"{path} is not a {INDEX_FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ManifestError(f"{path}: index format version {manifest.get('format_version')}, this reader "
                            f"reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    check_manifest_paths(manifest, path)
    return manifest


def _check_file(directory: str, record: dict, checksum: bool) -> bytes | None:
    """Check a listed file's size (and SHA-256 when ``checksum``); returns its bytes if it read them."""
    path = resolve(directory, record["path"])
    try:
        size = storage.size(path) if not checksum else None
        data = storage.read_bytes(path) if checksum else None
    except FileNotFoundError:
        raise ShardError(f"{record['path']} is listed in the manifest but missing from {directory}") from None
    size = len(data) if checksum else size
    if size != record["bytes"]:
        raise ShardError(f"{record['path']} has {size} bytes, the manifest says {record['bytes']} "
                         "(truncated or replaced)")
    if checksum and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ShardError(f"{record['path']} does not match its SHA-256 in the manifest (corrupt)")
    return data


def verify(directory: str, deep: set[str] | None = None) -> dict:
    """Check every file of an index byte for byte against the manifest; return the manifest. Of a
    version of segments, ``deep`` names the segments whose files are read byte for byte (None:
    all); the others are checked by their recorded checksums and sizes (``segments.verify``)."""
    manifest = read_manifest(directory)
    if manifest["format_version"] == 2:
        from delf_retrieval import segments

        segments.verify(directory, manifest, deep)
        return manifest
    for record in list(manifest["files"].values()) + manifest["shards"]:
        _check_file(directory, record, checksum=True)
    return manifest


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
            self.quantizer = Quantizer.load(_check_file(directory, files["quantizer"], checksum=True))
            self.pca = pca_lib.PCA.load(_check_file(directory, files["pca"], checksum=True)) if "pca" in files else None
        self._images_bytes = _check_file(directory, files["images"], checksum=True)
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
            _check_file(self.directory, shard, checksum=False)
            path = resolve(self.directory, shard["path"])
            footer = _read_footer(path, shard["bytes"])
            try:
                # The footer alone parses as a file: the magic, then the footer (which ends in it).
                metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer[1]))
            except (OSError, pa.ArrowException) as e:
                raise ShardError(f"{shard['path']}: unreadable Parquet footer ({e})") from e
            self._shard_paths.append(path), self._footers.append(footer), self._metadata.append(metadata)
            if (metadata.metadata or {}).get(b"index_id", b"").decode() != self.manifest["index_id"]:
                raise ShardError(f"{shard['path']} belongs to another index (index_id differs)")
            if metadata.num_rows != shard["rows"] or metadata.num_row_groups != len(shard["row_groups"]):
                raise ShardError(f"{shard['path']} has {metadata.num_rows} rows in {metadata.num_row_groups} "
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
            self._images = pq.read_table(io.BytesIO(self._images_bytes))
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
            raise ShardError(f"{shard['path']} row group {g} does not match its CRC-32 in the manifest (corrupt)")
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
        from delf_retrieval.expansion import NeighbourTable

        record = self.manifest["files"].get("neighbours")
        if record is None:
            return None
        if self._neighbours is None:
            self._neighbours = NeighbourTable.from_bytes(_check_file(self.directory, record, checksum=True))
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
