"""Posting shards and their writer: Parquet rows grouped by cell (``PostingRows`` in, one file per
contiguous cell range out), the image and dead-letter tables, shard sizing, and a whole format-1
index written at once (its manifest, ``layout``, last).

Layout of a format-1 index directory (a segment holds the same image table and postings)::

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
import os
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval import storage
from delf_retrieval.index import layout
from delf_retrieval.index.layout import (DEAD_LETTERS_FILE, IMAGES_FILE, INDEX_FORMAT, INDEX_FORMAT_VERSION, PCA_FILE,
                                         POSTINGS_DIR, QUANTIZER_FILE, new_index_id, sha256_of_file, write_array_file,
                                         write_manifest, write_table_file)
from delf_retrieval.quantize import Encoded, Quantizer
from delf_retrieval.quantize import pca as pca_lib
from delf_retrieval.quantize import pq as pq_lib

ROWS_PER_GROUP = 65536
IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("num_features", pa.int32()), ("content_hash", pa.string()), ("label", pa.string()),
    ("stamp", pa.string()),  # the source's change marker when listed (storage.stamp), for re-indexing
    # EXIF GPS in degrees, null when the file has none (or a malformed one); tables written before
    # these columns are read with them null (read_image_table)
    ("latitude", pa.float64()), ("longitude", pa.float64()),
])
OPTIONAL_IMAGE_COLUMNS = ("latitude", "longitude")


DEAD_LETTER_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                                ("error", pa.string())])


def postings_schema(code_bytes: int) -> pa.Schema:
    return pa.schema([
        ("cell", pa.int32()), ("region", pa.int32()), ("image_id", pa.int64()),
        ("code", pa.binary(code_bytes)), ("y", pa.uint16()), ("x", pa.uint16()),
        ("scale", pa.float16()), ("attention", pa.float16()),
    ])


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
    return {"path": relative, "bytes": os.path.getsize(path), "sha256": sha256_of_file(path),
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
    defaults = {"label": None, "stamp": None, "latitude": None, "longitude": None}
    return pa.Table.from_pylist([{**defaults, **r} for r in records], schema=IMAGE_SCHEMA)


def read_image_table(data: bytes, where: str, not_null: tuple = ("image_id", "uri")) -> pa.Table:
    """An image table's checked Parquet bytes with the columns of ``IMAGE_SCHEMA`` in its order: the
    optional GPS columns null where an older table lacks them (``layout.read_table`` checks the rest)."""
    required = pa.schema([f for f in IMAGE_SCHEMA if f.name not in OPTIONAL_IMAGE_COLUMNS])
    table = layout.read_table(data, required, where, not_null=not_null)
    columns = []
    for field in IMAGE_SCHEMA:
        if field.name in table.schema.names:
            column = table.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise layout.ShardError(f"{where}: column {field.name!r} is {column.type}, not {field.type}") from None
            columns.append(column)
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=IMAGE_SCHEMA)


def dead_letter_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**{"error": None}, **r} for r in records], schema=DEAD_LETTER_SCHEMA)


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


def shard_count(descriptors: int, n_cells: int, rows_per_shard: int = 4_000_000) -> int:
    return int(max(1, min(n_cells, -(-descriptors // rows_per_shard))))
