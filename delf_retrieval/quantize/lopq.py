"""Locally optimised PQ (the paper's refinement): a KD-tree splits each coarse cell into regions, and
a region with enough training data gets its own rotation and PQ codebooks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval.quantize import kmeans as km

LEAF = -1
NO_MODEL = -1


@dataclass
class RegionPartition:
    """KD-trees over residuals (descriptor minus cell centroid), one per cell, in flat arrays.

    A node with ``node_dim == -1`` is a leaf and ``node_left`` holds its region id. Regions are
    numbered cell by cell, so the regions of cell c are ``region_cell == c``, contiguous.
    Region r uses local model ``region_model[r]`` (rotation + codebooks), or the global codebooks
    when it is -1. A local model codes ``(residual - mean) @ rotation.T``.
    """

    cell_root: np.ndarray  # (n_cells,) int32
    node_dim: np.ndarray  # (n_nodes,) int32, -1 for a leaf
    node_split: np.ndarray  # (n_nodes,) float32
    node_left: np.ndarray  # (n_nodes,) int32: left child, or the region id of a leaf
    node_right: np.ndarray  # (n_nodes,) int32
    region_cell: np.ndarray  # (n_regions,) int32, non-decreasing
    region_model: np.ndarray  # (n_regions,) int32
    model_mean: np.ndarray  # (n_models, d) float32
    model_rotation: np.ndarray  # (n_models, d, d) float32, orthonormal rows
    model_codebooks: np.ndarray  # (n_models, M, K, dsub) float32

    @property
    def n_regions(self) -> int:
        return int(self.region_cell.shape[0])

    @property
    def n_models(self) -> int:
        return int(self.model_mean.shape[0])

    def route(self, cells: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """Region id of each (cell, residual) pair, walking all trees level by level at once."""
        node = self.cell_root[np.asarray(cells, np.int64)].astype(np.int64)
        rows = np.arange(len(node))
        active = self.node_dim[node] != LEAF
        while active.any():
            idx = rows[active]
            n = node[idx]
            go_left = residuals[idx, self.node_dim[n]] <= self.node_split[n]
            node[idx] = np.where(go_left, self.node_left[n], self.node_right[n])
            active[idx] = self.node_dim[node[idx]] != LEAF
        return self.node_left[node].astype(np.int64)

    def cell_regions(self, n_cells: int) -> np.ndarray:
        """Offsets (n_cells + 1,): the regions of cell c are offsets[c]:offsets[c + 1]."""
        return np.searchsorted(self.region_cell, np.arange(n_cells + 1)).astype(np.int64)


def trivial(n_cells: int, dim: int, m: int, k: int) -> RegionPartition:
    """One region per cell, no local models: plain IVF-PQ."""
    cells = np.arange(n_cells, dtype=np.int32)
    return RegionPartition(
        cell_root=cells.copy(), node_dim=np.full(n_cells, LEAF, np.int32), node_split=np.zeros(n_cells, np.float32),
        node_left=cells.copy(), node_right=np.full(n_cells, -1, np.int32), region_cell=cells.copy(),
        region_model=np.full(n_cells, NO_MODEL, np.int32), model_mean=np.zeros((0, dim), np.float32),
        model_rotation=np.zeros((0, dim, dim), np.float32), model_codebooks=np.zeros((0, m, k, dim // m), np.float32))


def allocate_eigenvalues(eigenvalues: np.ndarray, m: int) -> np.ndarray:
    """Order of the eigen-directions so that each of the m sub-spaces gets a similar product of
    variances (Ge et al., "Optimized Product Quantization": eigenvalue allocation). Directions are
    taken strongest first and each goes to the non-full sub-space with the smallest log-product."""
    d = len(eigenvalues)
    dsub = d // m
    order = np.argsort(eigenvalues)[::-1]
    logs = np.log(np.maximum(eigenvalues, 1e-12))
    logs = logs - logs.min() + 1.0  # all positive, so adding a direction always raises a total
    buckets: list[list[int]] = [[] for _ in range(m)]
    totals = np.zeros(m)
    for direction in order:
        open_buckets = [j for j in range(m) if len(buckets[j]) < dsub]
        j = min(open_buckets, key=lambda b: totals[b])
        buckets[j].append(int(direction))
        totals[j] += logs[direction]
    return np.concatenate([np.asarray(b, np.int64) for b in buckets])


def train_local_model(residuals: np.ndarray, m: int, k: int, iterations: int, seed: int):
    """(mean, rotation, codebooks) of one region: PCA rotation with eigenvalue allocation, then PQ."""
    mean = residuals.mean(axis=0)
    centred = residuals - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T.astype(np.float64) @ centred / len(centred))
    rotation = eigenvectors[:, allocate_eigenvalues(eigenvalues, m)].T.astype(np.float32)
    rotated = centred @ rotation.T
    codebooks = km.kmeans_subspaces(rotated.reshape(len(rotated), m, -1), k, iterations=iterations, seed=seed)
    return mean.astype(np.float32), rotation, codebooks


def train(cells: np.ndarray, residuals: np.ndarray, n_cells: int, m: int, k: int,
          max_region_train: int, min_model_train: int, iterations: int = 10, seed: int = 0) -> RegionPartition:
    """Partition each cell's training residuals by median splits on the widest dimension until every
    leaf holds at most ``max_region_train`` points; fit a local model on leaves with at least
    ``min_model_train`` points (the others use the global codebooks)."""
    residuals = np.asarray(residuals, np.float32)
    dim = residuals.shape[1]
    order = np.argsort(cells, kind="stable")
    bounds = np.searchsorted(cells[order], np.arange(n_cells + 1))
    node_dim, node_split, node_left, node_right = [], [], [], []
    region_cell, region_model = [], []
    means, rotations, codebooks = [], [], []
    cell_root = np.empty(n_cells, np.int32)

    def new_node() -> int:
        node_dim.append(LEAF), node_split.append(0.0), node_left.append(-1), node_right.append(-1)
        return len(node_dim) - 1

    def build(points: np.ndarray, cell: int) -> int:
        node = new_node()
        if len(points) > max_region_train:
            spread = points.var(axis=0)
            dim_ = int(np.argmax(spread))
            split = float(np.median(points[:, dim_]))
            left = points[:, dim_] <= split
            if 0 < left.sum() < len(points):  # a split that separates nothing would recurse forever
                node_dim[node], node_split[node] = dim_, split
                node_left[node] = build(points[left], cell)
                node_right[node] = build(points[~left], cell)
                return node
        node_left[node] = len(region_cell)
        region_cell.append(cell)
        if len(points) >= min_model_train:
            mean, rotation, books = train_local_model(points, m, k, iterations, seed + len(means))
            means.append(mean), rotations.append(rotation), codebooks.append(books)
            region_model.append(len(means) - 1)
        else:
            region_model.append(NO_MODEL)
        return node

    for cell in range(n_cells):
        cell_root[cell] = build(residuals[order[bounds[cell]:bounds[cell + 1]]], cell)
    n_models = len(means)
    return RegionPartition(
        cell_root=cell_root, node_dim=np.asarray(node_dim, np.int32), node_split=np.asarray(node_split, np.float32),
        node_left=np.asarray(node_left, np.int32), node_right=np.asarray(node_right, np.int32),
        region_cell=np.asarray(region_cell, np.int32), region_model=np.asarray(region_model, np.int32),
        model_mean=np.asarray(means, np.float32).reshape(n_models, dim),
        model_rotation=np.asarray(rotations, np.float32).reshape(n_models, dim, dim),
        model_codebooks=np.asarray(codebooks, np.float32).reshape(n_models, m, k, dim // m))
