"""The index's quantizer: coarse cells, optional LOPQ regions, PQ codebooks; train, encode, decode,
and save/load as one ``.npz``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from delf_retrieval import npz
from delf_retrieval.quantize import coarse, lopq, pq

QUANTIZER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class IndexParams:
    """What the index is, in one place; ``spec`` is its one-line summary (like faiss's factory
    strings) and the whole record is stored in the quantizer file and the manifest."""

    n_cells: int = coarse.DEFAULT_CELLS
    pq_m: int = 10
    pq_bits: int = 5
    # LOPQ: split cells into KD-tree regions of at most this many *indexed* descriptors (the paper's
    # 30K) and train a rotation + codebooks for each region with at least min_region_train training
    # rows; other regions keep the global codebooks, so LOPQ acts only where it has the data to win
    # (measured on landmarks-dev: recall@10 0.880 vs 0.806 with ~3000 rows per cell; benchmarks/README.md).
    lopq: bool = True
    max_region_features: int = 30000
    min_region_train: int = 1024
    kmeans_iterations: int = 15
    pq_iterations: int = 20
    seed: int = 0

    @property
    def spec(self) -> str:
        text = f"IVF{self.n_cells},PQ{self.pq_m}x{self.pq_bits}"
        return text + (f",LOPQ{self.max_region_features}" if self.lopq else "")

    @property
    def code_bytes(self) -> int:
        return pq.packed_bytes(self.pq_m, self.pq_bits)


@dataclass
class Encoded:
    cells: np.ndarray  # (n,) int64
    regions: np.ndarray  # (n,) int64
    codes: np.ndarray  # (n, M) uint8


@dataclass
class Quantizer:
    params: IndexParams  # n_cells is the trained count (after clamping)
    coarse: coarse.CoarseQuantizer
    pq: pq.ProductQuantizer  # global codebooks
    regions: lopq.RegionPartition

    @property
    def dim(self) -> int:
        return self.coarse.dim

    def encode(self, x: np.ndarray) -> Encoded:
        """Cell, region and PQ code of each row of PCA'd descriptors (n, d)."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected descriptors of shape (n, {self.dim}), got {x.shape}")
        cells = self.coarse.assign(x)
        residuals = x - self.coarse.centroids[cells]
        regions = self.regions.route(cells, residuals)
        models = self.regions.region_model[regions]
        codes = np.empty((len(x), self.pq.m), np.uint8 if self.pq.k <= 256 else np.uint16)
        for model, rows in _group_rows(models):
            if model == lopq.NO_MODEL:
                codes[rows] = self.pq.encode(residuals[rows])
            else:
                local = (residuals[rows] - self.regions.model_mean[model]) @ self.regions.model_rotation[model].T
                codes[rows] = pq.ProductQuantizer(self.regions.model_codebooks[model]).encode(local)
        return Encoded(cells, regions, codes)

    def decode(self, regions: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Reconstructed descriptors (n, d): what asymmetric distances are measured to."""
        regions = np.asarray(regions, np.int64)
        cells = self.regions.region_cell[regions]
        out = np.empty((len(regions), self.dim), np.float32)
        for model, rows in _group_rows(self.regions.region_model[regions]):
            if model == lopq.NO_MODEL:
                out[rows] = self.pq.decode(codes[rows])
            else:
                local = pq.ProductQuantizer(self.regions.model_codebooks[model]).decode(codes[rows])
                out[rows] = local @ self.regions.model_rotation[model] + self.regions.model_mean[model]
        return out + self.coarse.centroids[cells]

    def to_npz_bytes(self) -> bytes:
        arrays = {f"regions_{k}": v for k, v in asdict(self.regions).items()}
        return npz.to_bytes(QUANTIZER_FORMAT_VERSION, params=np.asarray(json.dumps(asdict(self.params))),
                            centroids=self.coarse.centroids, codebooks=self.pq.codebooks, **arrays)

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_npz_bytes())

    @classmethod
    def load(cls, source) -> "Quantizer":
        """Read a file written by :meth:`save` (path, file object or bytes); never unpickles."""
        data = npz.read(source, QUANTIZER_FORMAT_VERSION, "quantizer")
        params = IndexParams(**json.loads(str(data["params"])))
        regions = lopq.RegionPartition(**{name[len("regions_"):]: value for name, value in data.items()
                                          if name.startswith("regions_")})
        return cls(params, coarse.CoarseQuantizer(data["centroids"]), pq.ProductQuantizer(data["codebooks"]), regions)


def _group_rows(labels: np.ndarray):
    """(label, row indices) for each distinct label, in one sort."""
    if len(labels) == 0:
        return
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for s, e in zip(starts, ends):
        yield int(sorted_labels[s]), order[s:e]


def train(sample: np.ndarray, params: IndexParams = IndexParams(), expected_count: int | None = None) -> Quantizer:
    """Train on a sample of PCA'd descriptors (n, d). ``expected_count`` is how many descriptors the
    index will hold (default: the sample size); it scales LOPQ's region size to the sample."""
    sample = np.asarray(sample, np.float32)
    k = 2 ** params.pq_bits
    if len(sample) < k:
        raise ValueError(f"training a {params.spec} quantizer needs at least {k} descriptors, got {len(sample)}")
    cq = coarse.train(sample, params.n_cells, iterations=params.kmeans_iterations, seed=params.seed)
    params = replace(params, n_cells=cq.n_cells)
    cells = cq.assign(sample)
    residuals = sample - cq.centroids[cells]
    global_pq = pq.train(residuals, params.pq_m, params.pq_bits, iterations=params.pq_iterations, seed=params.seed)
    if params.lopq:
        scale = len(sample) / max(expected_count or len(sample), len(sample))
        max_region_train = max(1, int(params.max_region_features * scale))
        regions = lopq.train(cells, residuals, cq.n_cells, params.pq_m, k, max_region_train,
                             params.min_region_train, iterations=params.pq_iterations, seed=params.seed)
    else:
        regions = lopq.trivial(cq.n_cells, sample.shape[1], params.pq_m, k)
    return Quantizer(params, cq, global_pq, regions)
