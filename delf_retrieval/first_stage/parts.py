"""The first stage's files of a segment, written once beside it: per part (a bucket of its images
by id), the images' VLAD vectors (.npz) and their posting rows stored image-major (.npy), so that a
query reads the rows of its K candidate images by ranges instead of holding the cell lists."""

from __future__ import annotations

import io

import numpy as np

from delf_retrieval import npz, storage
from delf_retrieval.first_stage import vlad
from delf_retrieval.index import layout
from delf_retrieval.index.shards import PostingRows

FORMAT_VERSION = 1
FIRST_STAGE_DIR = "first_stage"  # under the segment's folder
IMAGES_PER_PART = 4096


def row_dtype(m: int) -> np.dtype:
    """One stored row, image-major: what the ADC scan (region, unpacked code) and verification
    (keypoint) need, 8 + m bytes and 6 more for scale and attention."""
    return np.dtype([("region", "<i4"), ("code", "u1", (m,)), ("y", "<u2"), ("x", "<u2"), ("scale", "<f2"),
                     ("attention", "<f2")])


def part_count(images: int) -> int:
    """Parts of a segment of ``images`` images (each image in part ``image_id % parts``)."""
    return max(1, -(-int(images) // IMAGES_PER_PART))


def part_of(image_ids: np.ndarray, parts: int) -> np.ndarray:
    """The part of each image: its id modulo the part count (ids are hashes of uris: even parts)."""
    return (np.asarray(image_ids, np.int64) % parts).astype(np.int64)


def part_paths(segment_id: str, number: int) -> tuple[str, str]:
    """(vectors, rows) paths of a part, from the index root."""
    base = f"segments/{segment_id}/{FIRST_STAGE_DIR}/part-{number:05d}"
    return base + ".npz", base + ".rows.npy"


def stored_rows(rows: PostingRows) -> np.ndarray:
    """Posting rows as the structured array of :func:`row_dtype` (keypoints rounded to pixels and
    values to float16, as the posting shards store them)."""
    out = np.zeros(len(rows), row_dtype(rows.encoded.codes.shape[1]))
    out["region"] = rows.encoded.regions
    out["code"] = rows.encoded.codes
    locations = np.clip(np.rint(np.asarray(rows.locations, np.float64).reshape(-1, 2)), 0, np.iinfo(np.uint16).max)
    out["y"], out["x"] = locations[:, 0], locations[:, 1]
    out["scale"], out["attention"] = rows.scales, rows.attentions
    return out


def write_part(root: str, segment_id: str, number: int, rows: PostingRows, quantizer, words: np.ndarray) -> dict:
    """Write one part: ``rows`` are every row of the part's images, each image's in stored order.
    Returns its record for the version manifest (both files' paths, sizes and SHA-256)."""
    order = np.argsort(rows.image_ids, kind="stable")
    rows = rows.take(order)
    ids, starts, counts = np.unique(rows.image_ids, return_index=True, return_counts=True)
    owners = np.repeat(np.arange(len(ids)), counts)
    vectors = vlad.image_vectors(quantizer.decode(rows.encoded.regions, rows.encoded.codes), owners, len(ids), words)
    buffer = io.BytesIO()
    table = stored_rows(rows)
    np.lib.format.write_array(buffer, table, allow_pickle=False)
    data = buffer.getvalue()
    vectors_path, rows_path = part_paths(segment_id, number)
    payload = npz.to_bytes(FORMAT_VERSION, image_ids=ids.astype(np.int64), starts=starts.astype(np.int64),
                           counts=counts.astype(np.int64), vectors=vectors.astype(np.float16))
    storage.write_bytes(storage.join(root, vectors_path), payload)
    storage.write_bytes(storage.join(root, rows_path), data)
    return {"part": int(number), "images": int(len(ids)), "rows": int(len(table)),
            "vectors": layout.bytes_record(vectors_path, payload),
            "row_file": layout.bytes_record(rows_path, data, data_offset=len(data) - table.nbytes,
                                            row_bytes=table.dtype.itemsize)}


def write_segment_parts(root: str, segment_id: str, rows: PostingRows, quantizer, words: np.ndarray,
                        images: int | None = None) -> list[dict]:
    """Every part of a segment whose rows are all in memory (tests, benchmarks, small builds)."""
    parts = part_count(images if images is not None else len(np.unique(rows.image_ids)))
    which = part_of(rows.image_ids, parts)
    return [write_part(root, segment_id, p, rows.take(np.flatnonzero(which == p)), quantizer, words)
            for p in range(parts) if np.any(which == p)]


def check_part(record: dict, where: str) -> dict:
    """A part record as a manifest lists it, its paths checked (never outside the root)."""
    try:
        for name in ("vectors", "row_file"):
            layout.check_relative(record[name]["path"], f"first_stage {name}.path", where)
        int(record["row_file"]["data_offset"]), int(record["row_file"]["row_bytes"]), int(record["part"])
    except (KeyError, TypeError, ValueError) as e:
        raise layout.ManifestError(f"{where}: a first-stage part record is malformed ({e!r})") from None
    return record


def read_vectors(root: str, record: dict, where: str) -> dict:
    """A part's vectors file, checked by size and SHA-256: image_ids, starts, counts, vectors."""
    data = layout.checked_read(root, record["vectors"], where=where)
    arrays = npz.read(data, FORMAT_VERSION, "first-stage vectors")
    n = len(arrays["image_ids"])
    if any(len(arrays[k]) != n for k in ("starts", "counts", "vectors")):
        raise layout.ShardError(f"{record['vectors']['path']}: its arrays disagree in length")
    if n and (arrays["starts"].min() < 0 or (arrays["starts"] + arrays["counts"]).max() > record["rows"]):
        raise layout.ShardError(f"{record['vectors']['path']}: row ranges outside its {record['rows']} rows")
    return arrays
