"""The first stage at query time: every live image's vector in memory, the top K by dot product,
and those K images' rows read by ranges into small inverted lists that the ADC scan searches as
it searches the whole index."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from delf_retrieval import storage
from delf_retrieval.first_stage import duplicates, parts, vlad
from delf_retrieval.index import layout, segments
from delf_retrieval.index.shard_reader import Rows
from delf_retrieval.quantize.ivf import InvertedLists, Searcher

DEFAULT_MIN_IMAGES = 50_000  # "auto": the first stage answers from this many live images up
FIRST_STAGE = segments.FIRST_STAGE  # the version manifest's entry: {"format_version", "words", "segments": {id: [parts]}}


def records_of(manifest: dict) -> dict | None:
    """The manifest's first-stage entry, its part records checked; None if the version has none."""
    entry = manifest.get(FIRST_STAGE)
    if entry is None:
        return None
    where = "the manifest's first_stage"
    if (not isinstance(entry, dict) or entry.get("format_version") != parts.FORMAT_VERSION
            or not isinstance(entry.get("segments"), dict) or not isinstance(entry.get("words"), int)):
        raise layout.ManifestError(f"{where}: malformed, or a format this code does not read: {str(entry)[:200]}")
    for records in entry["segments"].values():
        if not isinstance(records, list):
            raise layout.ManifestError(f"{where}: a segment's parts are not a list")
        for record in records:
            parts.check_part(record, where)
    return entry


def entry(words: int, by_segment: dict[str, list[dict]]) -> dict:
    """The manifest's first-stage entry for these segments' part records."""
    return {"format_version": parts.FORMAT_VERSION, "words": int(words),
            "segments": {sid: sorted(records, key=lambda r: r["part"]) for sid, records in sorted(by_segment.items())}}


@dataclass
class CandidateRows:
    """The rows of a query's candidate images, image-major as read, searchable like an index
    reader: :meth:`search` returns positions into these rows, :meth:`rows` their attributes."""

    quantizer: object
    image_ids: np.ndarray  # (n,) int64, each row's image
    table: np.ndarray  # (n,) parts.row_dtype

    def search(self, queries: np.ndarray, k: int, nprobe: int = 8, image_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """ADC search of these rows as an index reader's ``search`` (``image_ids`` is accepted for
        that interface and unused: the rows are already the candidates'): (distances, positions)."""
        from delf_retrieval.first_stage.grouping_kernel import group_by_region  # heavy: numba compiles on first use

        regions = np.ascontiguousarray(self.table["region"])
        n_regions = self.quantizer.regions.n_regions
        if len(regions) and (regions.min() < 0 or regions.max() >= n_regions):
            raise layout.DamagedFile(f"candidate rows name regions outside the quantizer's {n_regions}")
        codes = np.ascontiguousarray(self.table["code"])  # one strided copy: the gather below is then dense
        if len(codes) and int(codes.max()) >= 1 << self.quantizer.params.pq_bits:
            raise layout.DamagedFile(f"candidate rows hold PQ codes beyond {self.quantizer.params.pq_bits} bits")
        order, offsets = group_by_region(regions, n_regions)
        lists = InvertedLists(offsets, np.ascontiguousarray(codes[order]), order)
        return Searcher(self.quantizer, lists).search(queries, k, nprobe)

    def rows(self, ids: np.ndarray) -> Rows:
        ids = np.asarray(ids, np.int64)
        valid = ids >= 0
        at = np.where(valid, ids, 0)
        table = self.table[at] if len(self.table) else np.zeros(ids.shape, self.table.dtype)
        image_ids = np.where(valid, self.image_ids[at] if len(self.image_ids) else -1, -1)
        locations = np.stack([table["y"], table["x"]], -1).astype(np.float32)
        return Rows(image_ids.astype(np.int64), locations, table["scale"].astype(np.float32),
                    table["attention"].astype(np.float32))


class FirstStage:
    """The first stage of an opened segmented version: ``top(descriptors, k)`` gives the ids of the
    K live images whose vectors are nearest the query's, ``rows_of(ids)`` their stored rows."""

    def __init__(self, root: str, quantizer, words: np.ndarray, image_ids: np.ndarray, vectors: np.ndarray,
                 part_index: np.ndarray, starts: np.ndarray, counts: np.ndarray, row_files: list[dict]):
        self.root, self.quantizer, self.words = root, quantizer, words
        self.image_ids, self.vectors = image_ids, vectors
        self.sketches = duplicates.sketches(vectors)  # near-duplicate groups are found in these
        self.part_index, self.starts, self.counts = part_index, starts, counts
        self.row_files = row_files
        self._files: dict[int, int] = {}  # part -> its open rows file
        self._paths: dict[int, str] = {}  # part -> its rows file's path, resolved (checked) once
        self._lock = threading.Lock()

    @classmethod
    def open(cls, reader) -> "FirstStage | None":
        """The first stage of a version opened by ``segment_reader.open_reader`` (None if the
        version has none, or lacks a segment's). Tombstoned images are left out."""
        entry = records_of(reader.manifest)
        if entry is None or not hasattr(reader, "refs"):
            return None
        if any(ref.segment_id not in entry["segments"] for ref in reader.refs):
            return None
        ids, vectors, part_index, starts, counts, row_files = [], [], [], [], [], []
        for ref in reader.refs:
            dropped = reader.tombstones.of(ref.segment_id)
            for record in entry["segments"][ref.segment_id]:
                arrays = parts.read_vectors(reader.root, record, f"segment {ref.segment_id}'s first stage")
                keep = ~np.isin(arrays["image_ids"], dropped)
                ids.append(arrays["image_ids"][keep])
                vectors.append(arrays["vectors"][keep])
                starts.append(arrays["starts"][keep])
                counts.append(arrays["counts"][keep])
                part_index.append(np.full(int(keep.sum()), len(row_files), np.int32))
                row_files.append(record["row_file"])
        every = np.concatenate(ids)
        order = np.argsort(every, kind="stable")
        if len(every) > 1 and np.any(every[order][1:] == every[order][:-1]):
            raise layout.ManifestError(f"{reader.root}: an image is live in two segments' first stages")
        words = vlad.words_of(reader.quantizer.coarse.centroids, entry["words"])
        matrix = np.concatenate(vectors)[order].astype(np.float32)
        return cls(reader.root, reader.quantizer, words, every[order], matrix, np.concatenate(part_index)[order],
                   np.concatenate(starts)[order], np.concatenate(counts)[order], row_files)

    def __len__(self) -> int:
        return len(self.image_ids)

    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.sketches.nbytes + self.image_ids.nbytes + 20 * len(self.image_ids))

    def vector(self, descriptors: np.ndarray) -> np.ndarray:
        """A query's vector from its PCA'd descriptors."""
        return vlad.aggregate(descriptors, self.words)

    def top(self, descriptors: np.ndarray, k: int, among: np.ndarray | None = None, **spread) -> np.ndarray:
        """Ids of the ``k`` images whose vectors are nearest the query's (dot product), nearest first,
        with at most ``slots`` images of a near-duplicate group (``duplicates``) before all the others;
        ``among`` limits them to those ids."""
        return self.top_vectors(self.vector(descriptors)[None], k, among, **spread)[0]

    def top_vectors(self, queries: np.ndarray, k: int, among: np.ndarray | None = None,
                    slots: int = duplicates.SLOTS, cosine: float = duplicates.COSINE,
                    candidates: int = duplicates.CANDIDATES) -> list[np.ndarray]:
        """:meth:`top` for a batch of query vectors (b, D): one matrix product for all of them
        (``slots`` 0: the plain ranking; the groups are sought among the nearest ``candidates`` x k)."""
        scores = np.asarray(queries, np.float32) @ self.vectors.T
        if among is not None:
            allowed = np.isin(self.image_ids, np.asarray(among, np.int64))
            scores[:, ~allowed] = -np.inf
        k = min(int(k), len(self.image_ids))
        ranked = min(k * candidates, len(self.image_ids)) if slots else k
        out = []
        for row in scores:
            best = np.argpartition(-row, ranked - 1)[:ranked] if ranked < len(row) else np.arange(len(row))
            best = best[np.lexsort((self.image_ids[best], -row[best]))]
            best = best[np.isfinite(row[best])]
            if slots:  # near-duplicate groups get at most ``slots`` of the k
                best = best[duplicates.spread(self.sketches[best], k, cosine, slots)]
            out.append(self.image_ids[best[:k]])
        return out

    def rows_of(self, image_ids: np.ndarray) -> CandidateRows:
        """The stored rows of these images (unknown ids ignored), read by ranges from their parts."""
        wanted = np.unique(np.asarray(image_ids, np.int64))
        pos = np.minimum(np.searchsorted(self.image_ids, wanted), max(len(self.image_ids) - 1, 0))
        pos = pos[self.image_ids[pos] == wanted] if len(self.image_ids) else pos[:0]
        pos = pos[np.lexsort((self.starts[pos], self.part_index[pos]))]  # by part, then place in it
        dtype = parts.row_dtype(self.quantizer.params.pq_m)
        table = np.empty(int(self.counts[pos].sum()), dtype)  # filled part by part, no concatenation
        at = 0
        for p in np.unique(self.part_index[pos]):
            here = pos[self.part_index[pos] == p]
            n = int(self.counts[here].sum())
            self._read(int(p), self.starts[here], self.counts[here], table[at:at + n])
            at += n
        return CandidateRows(self.quantizer, np.repeat(self.image_ids[pos], self.counts[pos]), table)

    def _read(self, part: int, starts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        """Read rows of ``part`` (ranges ``starts``, ``counts``) into ``out``, in order."""
        record = self.row_files[part]
        if record["row_bytes"] != out.dtype.itemsize:
            raise layout.ShardError(f"{record['path']}: rows of {record['row_bytes']} bytes, expected "
                                    f"{out.dtype.itemsize}")
        offset, size = int(record["data_offset"]), out.dtype.itemsize
        path = self._paths.get(part)
        if path is None:  # the check follows symbolic links: a cost per call that a query pays per part
            path = self._paths[part] = layout.resolve(self.root, record["path"])
        view = out.view(np.uint8)
        at = 0
        if storage.is_gcs(path):
            for s, c in zip(starts.tolist(), counts.tolist()):
                view[at:at + c * size] = np.frombuffer(storage.read_bytes(path, offset + s * size, c * size), np.uint8)
                at += c * size
            return
        fd = self._fd(part, path, record)
        for s, c in zip(starts.tolist(), counts.tolist()):
            got = os.preadv(fd, [memoryview(view[at:at + c * size])], offset + s * size)
            if got != c * size:
                raise layout.DamagedFile(f"{record['path']}: truncated (rows {s}..{s + c} not all there)")
            at += c * size

    def _fd(self, part: int, path: str, record: dict) -> int:
        with self._lock:
            fd = self._files.get(part)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                size = os.fstat(fd).st_size
                if size != record["bytes"]:
                    os.close(fd)
                    raise layout.DamagedFile(f"{record['path']}: {size} bytes, the manifest says {record['bytes']}")
                self._files[part] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
