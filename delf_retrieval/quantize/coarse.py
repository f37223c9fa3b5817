"""The coarse quantizer: k-means cells over PCA'd descriptors, with exact nearest-cell lookup by
matrix products or by a KD-tree over the centroids."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from delf_retrieval.quantize import kmeans as km

DEFAULT_CELLS = 8192
# A cell should get at least this many training points; fewer cells are used on small samples.
MIN_POINTS_PER_CELL = 39


def clamp_cells(requested: int, n_train: int) -> int:
    """The number of cells to train on ``n_train`` points: ``requested``, but no more than
    n_train / 39 (faiss's lower bound for a meaningful centroid), and at least 1."""
    return int(max(1, min(requested, n_train // MIN_POINTS_PER_CELL)))


@dataclass
class CoarseQuantizer:
    """Centroids of the inverted-file cells. ``probe`` is exact: both methods return the same cells.

    The KD-tree (scipy cKDTree over the centroids) is built on first use. At 40 dimensions it
    visits most leaves, so blocked matrix products are faster; ``method="matmul"`` is therefore the default and the tree is kept for callers
    that probe few points against very many low-dimensional centroids.
    """

    centroids: np.ndarray  # (n_cells, d) float32
    _tree: object = field(default=None, repr=False, compare=False)

    @property
    def n_cells(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def tree(self):
        if self._tree is None:
            from scipy.spatial import cKDTree  # heavy: imported on first use

            self._tree = cKDTree(self.centroids.astype(np.float64))
        return self._tree

    def probe(self, x: np.ndarray, nprobe: int = 1, method: str = "matmul") -> tuple[np.ndarray, np.ndarray]:
        """The ``nprobe`` nearest cells of each row, nearest first: (cells (n, nprobe) int64,
        squared distances (n, nprobe) float32)."""
        x = np.asarray(x, np.float32)
        nprobe = min(nprobe, self.n_cells)
        if method == "matmul":
            return km.nearest(x, self.centroids, nprobe)
        if method == "kdtree":
            dist, cells = self.tree.query(x, k=nprobe)
            cells = np.asarray(cells, np.int64).reshape(len(x), nprobe)
            return cells, (np.asarray(dist, np.float32).reshape(len(x), nprobe) ** 2)
        raise ValueError(f"unknown probe method {method!r}: expected 'matmul' or 'kdtree'")

    def assign(self, x: np.ndarray, method: str = "matmul") -> np.ndarray:
        """The nearest cell of each row, (n,) int64."""
        return self.probe(x, 1, method)[0][:, 0]


def train(sample: np.ndarray, n_cells: int = DEFAULT_CELLS, iterations: int = 15, seed: int = 0,
          max_points_per_centroid: int = 64) -> CoarseQuantizer:
    """k-means cells over a sample of PCA'd descriptors; the count is clamped by :func:`clamp_cells`."""
    sample = np.asarray(sample, np.float32)
    cells = clamp_cells(n_cells, sample.shape[0])
    return CoarseQuantizer(km.kmeans(sample, cells, iterations=iterations, seed=seed,
                                     max_points_per_centroid=max_points_per_centroid))
