"""Shared pieces of the index benchmarks (``ann_vs_faiss.py``, ``index_scaling.py``), in the spirit of
faiss's ``contrib/datasets.py`` and ``contrib/evaluation.py``.

- Data sets live in one folder of ``.npy`` files (training sample, database, queries, exact ground
  truth) that every method reads the same way: :class:`Dataset`, made by :func:`prepare_real` or
  :func:`prepare_synthetic`. The database is read in chunks with plain file reads (not mapped), so
  a process's peak RSS counts only what the method itself holds.
- :class:`SyntheticDescriptors`: a mixture of anisotropic Gaussian clusters on the unit sphere,
  shaped like L2-PCA40-L2 DELF descriptors.
- :func:`recall_at`: faiss's "1-recall@R", the fraction of queries whose true nearest neighbour is
  among the first R results (R@1: ranked first). A database vector exactly as near as the nearest
  neighbour (a duplicate descriptor) counts as the nearest neighbour too.
- Building, searching (one thread) and sizing our index, process memory, and running one
  measurement in its own process.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from delf_retrieval.quantize.pca import l2_normalise

K_GT = 100  # neighbours in the ground truth; the largest R of recall@R
CHUNK_ROWS = 1 << 20  # database rows read, generated or encoded at a time (160 MB of 40-D float32)
FEATURES_PER_IMAGE = 1000  # synthetic image ids: this many consecutive descriptors per image


# ---------------------------------------------------------------------------------------------
# .npy files read and written a block of rows at a time


def npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered ``.npy`` file, read from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        return shape, dtype, f.tell()


def read_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of a 2-D ``.npy`` file, read (not mapped) into a new array."""
    shape, dtype, offset = npy_shape(path)
    stop = min(stop, shape[0])
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(offset + start * row_bytes)
        rows = np.fromfile(f, dtype, count=(stop - start) * int(np.prod(shape[1:])))
    return rows.reshape((stop - start,) + tuple(shape[1:]))


def write_rows(path: str, chunks, n: int, dim: int) -> None:
    """Write float32 chunks (each (rows, dim)) one after the other as an (n, dim) ``.npy`` file."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    start = 0
    for chunk in chunks:
        out[start:start + len(chunk)] = chunk
        start += len(chunk)
    if start != n:
        raise ValueError(f"{path}: wrote {start} rows, expected {n}")
    out.flush()
    del out


# ---------------------------------------------------------------------------------------------
# Data sets


@dataclass
class Dataset:
    """A data set in ``folder``: ``info.json``, ``train.npy``, ``database.npy``, ``queries.npy``,
    ``gt_D.npy`` / ``gt_I.npy`` (exact K_GT nearest neighbours, squared L2) and, for real data,
    what an index stores beside the codes: ``keypoints.npz`` (image id, location, scale, score of
    each database row), ``images.json`` (the image table) and ``pca.npz``."""

    folder: str
    info: dict

    @classmethod
    def open(cls, folder: str) -> "Dataset":
        with open(os.path.join(folder, "info.json")) as f:
            return cls(folder, json.load(f))

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def n_database(self) -> int:
        return npy_shape(self.path("database.npy"))[0][0]

    def train(self) -> np.ndarray:
        return np.load(self.path("train.npy"))

    def queries(self) -> np.ndarray:
        return np.load(self.path("queries.npy"))

    def ground_truth(self, suffix: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, ids) of the exact K_GT nearest neighbours of the queries; ``suffix``
        picks one written by :func:`write_ground_truth` for a database prefix."""
        return np.load(self.path(f"gt_D{suffix}.npy")), np.load(self.path(f"gt_I{suffix}.npy"))

    def database_chunks(self, stop: int | None = None, chunk_rows: int = CHUNK_ROWS):
        """(start row, rows) blocks of the first ``stop`` database rows (all by default)."""
        n = self.n_database if stop is None else min(stop, self.n_database)
        for start in range(0, n, chunk_rows):
            yield start, read_rows(self.path("database.npy"), start, min(n, start + chunk_rows))

    def keypoints(self, stop: int | None = None) -> dict[str, np.ndarray]:
        """Image id, location, scale and score of the first ``stop`` database rows: stored ones for
        real data, plausible made-up ones (1000 features per image) for synthetic data."""
        n = self.n_database if stop is None else min(stop, self.n_database)
        if os.path.exists(self.path("keypoints.npz")):
            with np.load(self.path("keypoints.npz")) as data:
                return {name: data[name][:n] for name in data.files}
        rng = np.random.default_rng(n)
        return {
            "image_ids": np.arange(n, dtype=np.int64) // FEATURES_PER_IMAGE,
            "locations": (rng.integers(0, [48, 64], (n, 2)) * 16 + 15).astype(np.float32),
            "scales": rng.choice(np.float32([0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]), n),
            "scores": rng.lognormal(0.0, 0.3, n).astype(np.float32),
        }

    def images(self, image_ids: np.ndarray) -> list[dict]:
        """Image-table records (``shards.IMAGE_SCHEMA``) of the images with these per-row ids."""
        if os.path.exists(self.path("images.json")):
            with open(self.path("images.json")) as f:
                return json.load(f)
        ids, counts = np.unique(image_ids, return_counts=True)
        return [{"image_id": int(i), "uri": f"synthetic/{i:09d}.jpg", "width": 1024, "height": 768,
                 "num_features": int(c), "content_hash": hashlib.sha256(str(i).encode()).hexdigest()}
                for i, c in zip(ids, counts)]

    def pca(self):
        """The PCA that produced the descriptors (real data), else None."""
        from delf_retrieval.quantize import pca

        return pca.PCA.load(self.path("pca.npz")) if os.path.exists(self.path("pca.npz")) else None


def _finish_dataset(folder: str, info: dict, train: np.ndarray, queries: np.ndarray,
                    ground_truth: bool = True) -> Dataset:
    """Write train/queries/info beside the database already written, then (unless told not to)
    the exact ground truth over the whole database."""
    np.save(os.path.join(folder, "train.npy"), np.ascontiguousarray(train, np.float32))
    np.save(os.path.join(folder, "queries.npy"), np.ascontiguousarray(queries, np.float32))
    with open(os.path.join(folder, "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    dataset = Dataset.open(folder)
    if ground_truth:
        write_ground_truth(dataset)
    return dataset


def write_ground_truth(dataset: Dataset, stop: int | None = None, suffix: str = "") -> None:
    """Exact K_GT neighbours of the queries among the first ``stop`` database rows, saved as
    ``gt_D{suffix}.npy`` / ``gt_I{suffix}.npy``."""
    distances, ids = exact_knn(dataset.queries(), dataset.database_chunks(stop), K_GT)
    np.save(dataset.path(f"gt_D{suffix}.npy"), distances)
    np.save(dataset.path(f"gt_I{suffix}.npy"), ids)


def prepare_real(folder: str, features_dir: str, query_images: int = 10, n_queries: int = 5000,
                 train_n: int = 500_000, dim: int = 40, seed: int = 0) -> Dataset:
    """DELF descriptors of a folder of feature files, reduced by our PCA to ``dim``: the descriptors
    of ``query_images`` held-out photos (spread over the non-distractor files; at most
    ``n_queries`` of them) are the queries, every other image's descriptors the database. PCA is
    fitted on the database only, so the queries are unseen data throughout."""
    from delf_retrieval.extraction.features import Features
    from delf_retrieval.quantize import pca

    files = sorted(glob.glob(os.path.join(features_dir, "*.npz")))
    if not files:
        raise FileNotFoundError(f"no .npz feature files in {features_dir}")
    features = [Features.from_npz(path) for path in files]
    photos = [i for i, path in enumerate(files) if "distractor" not in os.path.basename(path)] or list(range(len(files)))
    held_out = set(photos[::max(1, len(photos) // query_images)][:query_images])
    kept = [i for i in range(len(files)) if i not in held_out]
    database = [features[i] for i in kept]
    raw_db = np.concatenate([f.descriptors for f in database])
    model = pca.fit(raw_db, dim)
    db = model.transform(raw_db)
    del raw_db
    queries = model.transform(np.concatenate([features[i].descriptors for i in sorted(held_out)]))
    rng = np.random.default_rng(seed)
    if len(queries) > n_queries:
        queries = queries[np.sort(rng.choice(len(queries), n_queries, replace=False))]
    train = db if len(db) <= train_n else db[np.sort(rng.choice(len(db), train_n, replace=False))]
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "database.npy"), db)
    model.save(os.path.join(folder, "pca.npz"))
    images = [{"image_id": image_id, "uri": os.path.basename(files[i]), "height": int(features[i].image_size[0]),
               "width": int(features[i].image_size[1]), "num_features": len(features[i]),
               "content_hash": hashlib.sha256(os.path.basename(files[i]).encode()).hexdigest()}
              for image_id, i in enumerate(kept)]
    with open(os.path.join(folder, "images.json"), "w") as out:
        json.dump(images, out)
    counts = [len(f) for f in database]
    np.savez(os.path.join(folder, "keypoints.npz"),
             image_ids=np.repeat(np.arange(len(database), dtype=np.int64), counts),
             locations=np.concatenate([f.locations for f in database]).astype(np.float32),
             scales=np.concatenate([f.scales for f in database]).astype(np.float32),
             scores=np.concatenate([f.scores for f in database]).astype(np.float32))
    info = {"name": "real", "description": f"DELF descriptors of {features_dir}, L2-PCA{dim}-L2",
            "database_images": len(database), "query_images": sorted(os.path.basename(files[i]) for i in held_out),
            "n_database": len(db), "n_queries": len(queries), "n_train": len(train), "dim": dim}
    return _finish_dataset(folder, info, train, queries)


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic descriptors. The defaults were calibrated against the real
    landmarks-dev descriptors (L2-PCA40-L2, 195k database rows, 5000 queries from 10 held-out
    photos) at the same database size; faiss IVF5000,PQ10x5 at nprobe 8 as the yardstick:

    ============  ==========  ===========  ============  =====  ======  =======
    (medians)     d(NN)       d(10th NN)   d(100th NN)   R@1    R@10    R@100
    ============  ==========  ===========  ============  =====  ======  =======
    real          0.29        0.47         0.67          0.45   0.84    0.88
    synthetic     0.31        0.54         0.87          0.45   0.90    0.92
    ============  ==========  ===========  ============  =====  ======  =======

    (squared L2). The real data is denser at the 100-neighbour scale (many near-duplicate
    features of one photo); a one-level mixture cannot match that and the first neighbours at
    once, so the calibration favours the nearest neighbours and recall.
    """

    dim: int = 40
    n_clusters: int = 16384
    spectrum_decay: float = 0.8  # variance of PCA axis i ~ i^-decay (real: 0.095 ... 0.010)
    within: float = 0.25  # share of the variance inside the clusters
    anisotropy: float = 0.8  # log-normal sigma of each cluster's axis variances
    size_spread: float = 1.0  # log-normal sigma of the cluster weights (uneven "visual words")
    query_noise: float = 0.5  # query noise std, relative to the mean within-cluster std per axis
    seed: int = 0


# random streams of the synthetic draws (chunk i of the database is stream DATABASE_STREAM + i)
QUERY_STREAM, TRAIN_STREAM, DATABASE_STREAM = 2, 100, 1000


class SyntheticDescriptors:
    """A mixture of anisotropic Gaussian clusters, L2-normalised: cluster centres spread along a
    decaying PCA-like spectrum; each cluster has its own random rotation and axis variances and an
    uneven weight. ``sample(n, stream)`` is deterministic per stream, so the database, training
    sample and queries are independent draws that any process can regenerate."""

    def __init__(self, spec: SyntheticSpec = SyntheticSpec()):
        self.spec = spec
        d, c = spec.dim, spec.n_clusters
        rng = np.random.default_rng([spec.seed, 0])
        variance = np.arange(1, d + 1, dtype=np.float64) ** -spec.spectrum_decay
        variance /= variance.sum()
        self.centres = (rng.standard_normal((c, d)) * np.sqrt((1 - spec.within) * variance)).astype(np.float32)
        weights = rng.lognormal(0.0, spec.size_spread, c)
        self.weights = weights / weights.sum()
        axis_var = variance[np.argsort(rng.random((c, d)), axis=1)] * rng.lognormal(0.0, spec.anisotropy, (c, d))
        axis_var *= spec.within / axis_var.sum(axis=1, keepdims=True)
        rotations, _ = np.linalg.qr(rng.standard_normal((c, d, d)))
        # a point of cluster j is centre_j + z @ factors[j], z ~ N(0, I): covariance R^T diag(var) R
        self.factors = (np.sqrt(axis_var)[:, :, None] * rotations).astype(np.float32)

    def sample(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, 1, stream])
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.standard_normal((n, self.spec.dim), dtype=np.float32)
        out = self.centres[labels]
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(self.weights) + 1))
        for j in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[j]:bounds[j + 1]]
            out[rows] += z[rows] @ self.factors[j]
        return l2_normalise(out)

    def chunks(self, n: int, first_stream: int, chunk_rows: int = CHUNK_ROWS):
        """n points as blocks of ``chunk_rows``, block i from stream ``first_stream + i``."""
        for i, start in enumerate(range(0, n, chunk_rows)):
            yield self.sample(min(chunk_rows, n - start), first_stream + i)

    def queries(self, n: int) -> np.ndarray:
        """Noisy copies of fresh points (not in any database): the same landmark, seen again."""
        points = self.sample(n, QUERY_STREAM)
        rng = np.random.default_rng([self.spec.seed, 2])
        sigma = self.spec.query_noise * np.sqrt(self.spec.within / self.spec.dim)
        return l2_normalise(points + sigma * rng.standard_normal(points.shape, dtype=np.float32))


def prepare_synthetic(folder: str, n: int, n_queries: int = 2000, train_n: int = 500_000,
                      spec: SyntheticSpec = SyntheticSpec(), ground_truth: bool = True) -> Dataset:
    """n synthetic database vectors (generated and written chunk by chunk), an independent training
    sample of ``min(train_n, n)`` and ``n_queries`` queries; the ground truth unless told not to
    (:func:`write_ground_truth` can then compute it for database prefixes)."""
    gen = SyntheticDescriptors(spec)
    os.makedirs(folder, exist_ok=True)
    write_rows(os.path.join(folder, "database.npy"), gen.chunks(n, DATABASE_STREAM), n, spec.dim)
    train = np.concatenate(list(gen.chunks(min(train_n, n), TRAIN_STREAM)))
    info = {"name": "synthetic", "description": "mixture of anisotropic Gaussian clusters, L2-normalised",
            "spec": asdict(spec), "n_database": n, "n_queries": n_queries, "n_train": len(train), "dim": spec.dim}
    return _finish_dataset(folder, info, train, gen.queries(n_queries), ground_truth)


# ---------------------------------------------------------------------------------------------
# Ground truth and recall


def exact_knn(queries: np.ndarray, database_chunks, k: int = K_GT) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by squared L2 over (start, rows) blocks of the database: faiss's
    blocked matrix-product brute force per block, merged in a running top-k heap."""
    import faiss

    queries = np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(queries), k)
    for start, rows in database_chunks:
        distances, ids = faiss.knn(queries, np.ascontiguousarray(rows, np.float32), min(k, len(rows)))
        heap.add_result(distances, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


def nearest_found(ids: np.ndarray, gt_distances: np.ndarray, gt_ids: np.ndarray, r: int,
                  tie_tolerance: float = 1e-5) -> np.ndarray:
    """Per query, whether its nearest neighbour is among the first r of ``ids`` (nq, >= r). Every
    ground-truth row within ``tie_tolerance`` of the nearest distance is a nearest neighbour
    (duplicates), so ties do not cost recall."""
    is_nearest = gt_distances <= gt_distances[:, :1] + tie_tolerance  # (nq, K_GT)
    return ((ids[:, :r, None] == gt_ids[:, None, :]) & is_nearest[:, None, :]).any(axis=(1, 2))


def recall_at(ids: np.ndarray, gt_distances: np.ndarray, gt_ids: np.ndarray, ranks=(1, 10, 100)) -> dict[str, float]:
    """faiss's 1-recall@R for each R: the fraction of queries whose nearest neighbour is among the
    first R results (see :func:`nearest_found`)."""
    return {f"recall@{r}": round(float(nearest_found(ids, gt_distances, gt_ids, r).mean()), 4) for r in ranks}


def paired_difference(found_a: np.ndarray, found_b: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of the per-query difference of two methods' hits on the same queries:
    a recall difference within about two standard errors is noise."""
    diff = np.asarray(found_a, np.float64) - np.asarray(found_b, np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")


# ---------------------------------------------------------------------------------------------
# Our index: build, search, size


def encode_in_chunks(quantizer, chunks):
    """Encode (start, rows) blocks and concatenate: what a sharded build does, with memory bounded by
    one block's temporaries."""
    from delf_retrieval.quantize import Encoded

    parts = [quantizer.encode(rows) for _, rows in chunks]
    return Encoded(np.concatenate([p.cells for p in parts]), np.concatenate([p.regions for p in parts]),
                   np.concatenate([p.codes for p in parts]))


def build_ours(dataset: Dataset, params, stop: int | None = None) -> tuple[object, object, object, dict]:
    """Train on the data set's sample, encode the first ``stop`` database rows, group them into
    inverted lists. Returns (quantizer, encoded, lists, timings in seconds)."""
    from delf_retrieval import quantize
    from delf_retrieval.quantize.ivf import InvertedLists

    n = dataset.n_database if stop is None else min(stop, dataset.n_database)
    train = dataset.train()[:n]
    start = time.perf_counter()
    quantizer = quantize.train(train, params, expected_count=n)
    trained = time.perf_counter()
    encoded = encode_in_chunks(quantizer, dataset.database_chunks(n))
    encoded_at = time.perf_counter()
    lists = InvertedLists.build(quantizer.regions.n_regions, encoded)
    done = time.perf_counter()
    return quantizer, encoded, lists, {"train_s": trained - start, "encode_s": encoded_at - trained,
                                       "lists_s": done - encoded_at, "n_train": len(train)}


def lists_bytes(lists) -> int:
    """Bytes the in-memory inverted lists hold (codes, ids, offsets)."""
    return int(lists.codes.nbytes + lists.ids.nbytes + lists.offsets.nbytes)


@contextmanager
def single_thread():
    """Everything on one thread: BLAS (numpy's and faiss's), OpenMP (faiss, nmslib), numba."""
    import numba
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        numba.set_num_threads(previous)


def timed_search(search, queries: np.ndarray, warmup: int = 16, min_seconds: float = 1.0) -> tuple[np.ndarray, dict]:
    """Run ``search(queries) -> ids`` on one thread: a warm-up call on a few queries (numba compiles
    on its first call), then the whole batch again and again until ``min_seconds`` have passed (at
    least once). The fastest run is reported, as timeit does: on a shared machine the others carry
    other work's noise. Returns (ids, {"search_s", "queries_per_s", "cpu_per_wall", "runs"}); a
    cpu_per_wall near 1.0 confirms a single busy thread."""
    with single_thread():
        search(queries[:warmup])
        runs, cpu, started = [], time.process_time(), time.perf_counter()
        while not runs or time.perf_counter() - started < min_seconds:
            run_start = time.perf_counter()
            ids = search(queries)
            runs.append(time.perf_counter() - run_start)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    seconds = min(runs)
    return ids, {"search_s": round(seconds, 4), "queries_per_s": round(len(queries) / seconds, 1),
                 "cpu_per_wall": round(cpu / wall, 2), "runs": len(runs)}


def storage_bytes_per_descriptor(quantizer, encoded, dataset: Dataset) -> dict[str, float]:
    """Bytes on disk per descriptor of our index as ``delf_retrieval.index.shards.write_index`` writes it
    (Parquet postings with cell, region, image id, packed PQ code, keypoint y/x/scale/attention;
    quantizer; PCA; image table; manifest): ``{"all_in": ..., "postings": ...}``. The encoded rows
    are the data set's first database rows, whose keypoints and images the data set supplies."""
    import tempfile

    from delf_retrieval.index import layout, shards

    meta = dataset.keypoints(len(encoded.codes))
    with tempfile.TemporaryDirectory(prefix="index-") as folder:
        rows = shards.PostingRows(encoded, meta["image_ids"], meta["locations"], meta["scales"], meta["scores"])
        shards.write_index(folder, quantizer=quantizer, pca=dataset.pca(), rows=rows, images=shards.image_table(dataset.images(meta["image_ids"])))
        n = len(encoded.codes)
        return {"all_in": directory_bytes(folder) / n,
                "postings": directory_bytes(os.path.join(folder, layout.POSTINGS_DIR)) / n}


def directory_bytes(path: str) -> int:
    """Total size of the files under a directory (or of one file)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


# ---------------------------------------------------------------------------------------------
# Processes


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB: VmHWM of /proc/self/status, which starts
    afresh at exec. (getrusage's ru_maxrss does not: a child started by a big parent reports at
    least the parent's RSS at fork.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KB on Linux


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def run_worker(script: str, payload: dict) -> dict:
    """Run ``script --worker JSON`` in a fresh Python process (so peak RSS is that measurement's
    own) and return the JSON object it prints last. Its stderr passes through."""
    cmd = [sys.executable, script, "--worker", json.dumps(payload)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
