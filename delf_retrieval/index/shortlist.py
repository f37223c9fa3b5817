"""The image-level shortlist for large corpora: one VLAD vector per image aggregated from its PCA'd
local descriptors, an nmslib HNSW graph over them, and its files beside the index."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import numpy as np

from delf_retrieval import npz, storage
from delf_retrieval.index import layout
from delf_retrieval.quantize.kmeans import kmeans

SHORTLIST_DIR = "shortlist"
SHORTLIST_MANIFEST = "shortlist.json"
VECTORS_FILE = "vectors.npz"
GRAPH_FILE = "hnsw.bin"
FORMAT_VERSION = 1
DEFAULT_WORDS = 16


def assign_words(descriptors: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Nearest visual word of each descriptor (both unit-norm-ish, so the largest dot product after
    the norm correction)."""
    scores = descriptors @ words.T - 0.5 * np.sum(words * words, axis=1)
    return np.argmax(scores, axis=1)


def accumulate_vlad(descriptors: np.ndarray, owners: np.ndarray, n_owners: int, words: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Add the residuals of ``descriptors`` to their nearest word into ``out`` (n_owners, k, d), per
    owner (the row of the image each descriptor belongs to). Unnormalised: finish with :func:`normalise`."""
    k, d = words.shape
    if out is None:
        out = np.zeros((n_owners, k, d), np.float32)
    assigned = assign_words(descriptors, words)
    residuals = descriptors - words[assigned]
    slot = np.asarray(owners, np.int64) * k + assigned  # (owner, word) flattened
    used, slot = np.unique(slot, return_inverse=True)
    flat = out.reshape(-1, d)
    for j in range(d):  # one bincount per dimension: far faster than np.add.at
        flat[used, j] += np.bincount(slot, weights=residuals[:, j], minlength=len(used)).astype(np.float32)
    return out


def normalise(vlad: np.ndarray) -> np.ndarray:
    """Signed square root, then L2 per word (intra-normalisation: no word dominates through repeated
    texture), then L2 overall. (n, k, d) -> (n, k * d) float32."""
    v = np.sign(vlad) * np.sqrt(np.abs(vlad))
    v = v / np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-12)
    v = v.reshape(len(v), -1)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def aggregate(descriptors: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The VLAD vector (k * d,) of one image's PCA'd descriptors."""
    descriptors = np.asarray(descriptors, np.float32)
    return normalise(accumulate_vlad(descriptors, np.zeros(len(descriptors), np.int64), 1, words))[0]


def train_words(sample: np.ndarray, n_words: int = DEFAULT_WORDS, seed: int = 0) -> np.ndarray:
    return kmeans(np.asarray(sample, np.float32), n_words, iterations=20, seed=seed)


def _graph(vectors: np.ndarray):
    import nmslib  # heavy: imported on first use

    graph = nmslib.init(method="hnsw", space="cosinesimil", data_type=nmslib.DataType.DENSE_VECTOR)
    graph.addDataPointBatch(vectors)
    return graph


class ImageShortlist:
    """``candidates(query descriptors)`` -> the ids of the ``size`` images whose VLAD vectors are
    nearest (cosine) to the query's, from an HNSW graph."""

    def __init__(self, words: np.ndarray, image_ids: np.ndarray, vectors: np.ndarray, graph=None,
                 size: int = 1000, M: int = 16, ef_construction: int = 200, ef_search: int | None = None):
        self.words = np.asarray(words, np.float32)
        if size < 1:
            raise ValueError("the shortlist size must be at least 1")
        if len(image_ids) == 0:
            raise ValueError("no image has descriptors: nothing to shortlist")
        self.image_ids = np.asarray(image_ids, np.int64)
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.size = size
        self.params = {"M": M, "efConstruction": ef_construction}
        if graph is None:
            graph = _graph(self.vectors)
            # One build thread: the graph (and so the candidates) is the same on every build.
            graph.createIndex({"M": M, "efConstruction": ef_construction, "post": 0, "indexThreadQty": 1},
                              print_progress=False)
        self.graph = graph
        self.set_ef(ef_search or max(2 * size, 100))

    def set_ef(self, ef: int) -> None:
        self.graph.setQueryTimeParams({"efSearch": int(ef)})

    def __len__(self) -> int:
        return len(self.image_ids)

    def candidates(self, descriptors: np.ndarray, size: int | None = None) -> np.ndarray:
        """Image ids of the shortlist for a query's PCA'd descriptors, nearest first."""
        size = min(size or self.size, len(self.image_ids))
        if len(descriptors) == 0 or size == 0:
            return np.zeros(0, np.int64)
        positions, _ = self.graph.knnQuery(aggregate(descriptors, self.words), k=size)
        return self.image_ids[np.asarray(positions, np.int64)]

    def save(self, directory: str, index_id: str) -> dict:
        """Write the shortlist beside an index (``directory`` = its root): the vectors (.npz), the
        graph (nmslib's file), and shortlist.json, last, naming the index it belongs to."""
        vectors = npz.to_bytes(FORMAT_VERSION, words=self.words, image_ids=self.image_ids, vectors=self.vectors)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, GRAPH_FILE)
            self.graph.saveIndex(path, save_data=False)
            with open(path, "rb") as f:
                graph = f.read()
        files = {}
        for name, payload in ((VECTORS_FILE, vectors), (GRAPH_FILE, graph)):
            relative = f"{SHORTLIST_DIR}/{index_id}/{name}"
            storage.write_bytes(storage.join(directory, relative), payload)
            files[name] = {"path": relative, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        record = {"format_version": FORMAT_VERSION, "index_id": index_id, "images": len(self.image_ids),
                  "words": len(self.words), "dim": int(self.vectors.shape[1]), "params": self.params, "files": files}
        storage.write_bytes(storage.join(directory, SHORTLIST_MANIFEST), json.dumps(record, indent=1).encode())
        # Shortlists of other index versions are now unreachable: remove them.
        root = storage.join(directory, SHORTLIST_DIR)
        stale = {storage.relative(path, root).split("/")[0] for path in storage.list_files(root)} - {index_id}
        for other in sorted(stale):
            storage.delete_tree(storage.join(root, other))
        return record

    @classmethod
    def load(cls, directory: str, index_id: str, size: int = 1000) -> "ImageShortlist | None":
        """The shortlist saved beside the index at ``directory``, or None if there is none for this
        index (absent, or built for an older version of it). Files are checked by SHA-256."""
        path = storage.join(directory, SHORTLIST_MANIFEST)
        if not storage.exists(path):
            return None
        record = json.loads(storage.read_bytes(path))
        if record.get("index_id") != index_id:
            return None
        if record.get("format_version") != FORMAT_VERSION:
            raise layout.ManifestError(f"{path}: shortlist format {record.get('format_version')}, this code reads {FORMAT_VERSION}")
        payloads = {}
        for name, meta in record["files"].items():
            path = layout.resolve(directory, meta["path"], f"{SHORTLIST_MANIFEST} files.{name}.path")
            if not storage.exists(path):  # replaced by a newer version's shortlist meanwhile
                return None
            payloads[name] = layout.checked_read(directory, meta, where=SHORTLIST_MANIFEST)
        arrays = npz.read(io.BytesIO(payloads[VECTORS_FILE]), FORMAT_VERSION, "shortlist")
        graph = _graph(arrays["vectors"])
        with tempfile.TemporaryDirectory() as tmp:
            graph_path = os.path.join(tmp, GRAPH_FILE)
            with open(graph_path, "wb") as f:
                f.write(payloads[GRAPH_FILE])
            graph.loadIndex(graph_path, load_data=False)
        params = record.get("params", {})
        return cls(arrays["words"], arrays["image_ids"], arrays["vectors"], graph=graph, size=size,
                   M=params.get("M", 16), ef_construction=params.get("efConstruction", 200))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64: a well-spread 64-bit key per input."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_rows_of(reader, image_ids: np.ndarray, sample_rows: int, seed: int = 0) -> np.ndarray:
    """About ``sample_rows`` of an index's reconstructed descriptors, chosen and ordered by a
    pseudo-random key of (seed, image id, the row's place among its image's rows): the smallest keys
    win. The sample depends only on the live images' rows, not on how they are split into row groups
    or segments, so one corpus gives one vocabulary however it was written. ``image_ids``: the
    sorted ids of the index's images."""
    sample_rows = max(int(sample_rows), 1)
    salt = _mix(np.asarray([seed], np.uint64))[0]
    seen = np.zeros(len(image_ids), np.int64)  # rows of each image met so far
    keys, picked, held, threshold = [], [], 0, None
    for ids, reconstructed in reader.postings():
        owners = np.searchsorted(image_ids, ids)
        order = np.argsort(owners, kind="stable")
        starts = np.flatnonzero(np.r_[True, owners[order][1:] != owners[order][:-1]])
        place = np.empty(len(ids), np.int64)
        place[order] = seen[owners[order]] + np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
        seen += np.bincount(owners, minlength=len(image_ids))
        key = _mix(_mix(np.asarray(ids).astype(np.uint64) ^ salt) + place.astype(np.uint64))
        take = np.flatnonzero(key < threshold) if threshold is not None else np.arange(len(key))
        keys.append(key[take])
        picked.append(reconstructed[take])
        held += len(take)
        if held >= 2 * sample_rows:  # keep the smallest keys (amortised: the pool at most doubles)
            keys, picked = [np.concatenate(keys)], [np.concatenate(picked)]
            best = np.argpartition(keys[0], sample_rows - 1)[:sample_rows]
            keys, picked = [keys[0][best]], [picked[0][best]]
            held, threshold = sample_rows, keys[0].max()
    if not held:
        return np.zeros((0, 0), np.float32)
    key, sample = np.concatenate(keys), np.concatenate(picked)
    best = np.argsort(key, kind="stable")[:sample_rows]
    return sample[best]


def build_from_index(reader, n_words: int = DEFAULT_WORDS, sample_rows: int = 200_000, seed: int = 0,
                     **kwargs) -> ImageShortlist:
    """Aggregate every live image of an opened index (``segments.open_reader``: either format)
    from its stored codes (the reconstructed descriptors), with words trained on a sample of them
    (:func:`sample_rows_of`)."""
    image_ids = np.sort(reader.images.column("image_id").to_numpy().astype(np.int64))
    sample = sample_rows_of(reader, image_ids, sample_rows, seed) if reader.num_rows else np.zeros((0, 0))
    if not len(sample):
        raise ValueError("the index has no posting rows: nothing to build a shortlist from")
    words = train_words(sample, min(n_words, len(sample)), seed)
    vlad = np.zeros((len(image_ids), len(words), words.shape[1]), np.float32)
    counts = np.zeros(len(image_ids), np.int64)
    for ids, reconstructed in reader.postings():
        owners = np.searchsorted(image_ids, ids)
        accumulate_vlad(reconstructed, owners, len(image_ids), words, out=vlad)
        counts += np.bincount(owners, minlength=len(image_ids))
    described = counts > 0  # an image without descriptors can never be a candidate
    return ImageShortlist(words, image_ids[described], normalise(vlad[described]), **kwargs)
