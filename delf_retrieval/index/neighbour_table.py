"""The verified-neighbour table of a version: each image's neighbours with their inlier counts,
its file, and its upkeep by re-index runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from delf_retrieval.index import layout

NEIGHBOURS_FILE = "neighbours.parquet"
SCHEMA = pa.schema([("image_id", pa.int64()), ("neighbour", pa.int64()), ("inliers", pa.int32())])


@dataclass(frozen=True)
class NeighbourConfig:
    """The index-time cut: at most ``k`` neighbours per image, each verified with at least
    ``min_inliers`` RANSAC inliers."""

    k: int = 40
    min_inliers: int = 10

    def __post_init__(self):
        if self.k < 1 or self.min_inliers < 1:
            raise ValueError("neighbour k and min_inliers must be >= 1")

    def to_json(self) -> dict:
        return {"k": self.k, "min_inliers": self.min_inliers}

    @classmethod
    def from_json(cls, data: dict) -> "NeighbourConfig":
        return cls(int(data["k"]), int(data["min_inliers"]))


class NeighbourTable:
    """Edges image -> neighbour with their inlier counts, sorted by (image, -inliers, neighbour)."""

    def __init__(self, image_ids: np.ndarray, neighbours: np.ndarray, inliers: np.ndarray):
        image_ids, neighbours = np.asarray(image_ids, np.int64), np.asarray(neighbours, np.int64)
        inliers = np.asarray(inliers, np.int64)
        order = np.lexsort((neighbours, -inliers, image_ids))
        self.image_ids, self.neighbours, self.inliers = image_ids[order], neighbours[order], inliers[order]

    @staticmethod
    def empty() -> "NeighbourTable":
        return NeighbourTable(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.image_ids)

    def of(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour ids, inliers) of one image, most inliers first."""
        lo, hi = np.searchsorted(self.image_ids, [image_id, image_id + 1])
        return self.neighbours[lo:hi], self.inliers[lo:hi]

    def to_table(self) -> pa.Table:
        return pa.Table.from_arrays([pa.array(self.image_ids), pa.array(self.neighbours),
                                     pa.array(self.inliers.astype(np.int32))], schema=SCHEMA)

    @staticmethod
    def from_table(table: pa.Table) -> "NeighbourTable":
        return NeighbourTable(*(table.column(n).to_numpy() for n in ("image_id", "neighbour", "inliers")))

    @staticmethod
    def from_bytes(data: bytes, where: str = NEIGHBOURS_FILE) -> "NeighbourTable":
        """The table in a file's bytes, its columns checked (a ``ShardError`` naming ``where``)."""
        return NeighbourTable.from_table(layout.read_table(data, SCHEMA, where, not_null=SCHEMA.names))


def cut(edges: NeighbourTable, k: int) -> NeighbourTable:
    """The ``k`` edges of each image with the most inliers (ties: the smaller neighbour id)."""
    if not len(edges):
        return edges
    starts = np.flatnonzero(np.r_[True, edges.image_ids[1:] != edges.image_ids[:-1]])
    rank = np.arange(len(edges)) - np.repeat(starts, np.diff(np.r_[starts, len(edges)]))
    keep = rank < k
    return NeighbourTable(edges.image_ids[keep], edges.neighbours[keep], edges.inliers[keep])


def symmetric(image_ids, neighbours, inliers) -> NeighbourTable:
    """Verified pairs as edges both ways (a pair found from both sides keeps its larger count)."""
    a = np.concatenate([np.asarray(image_ids, np.int64), np.asarray(neighbours, np.int64)])
    b = np.concatenate([np.asarray(neighbours, np.int64), np.asarray(image_ids, np.int64)])
    n = np.concatenate([np.asarray(inliers, np.int64)] * 2)
    keep = a != b
    a, b, n = a[keep], b[keep], n[keep]
    order = np.lexsort((-n, b, a))
    a, b, n = a[order], b[order], n[order]
    first = np.r_[len(a) > 0, (a[1:] != a[:-1]) | (b[1:] != b[:-1])][:len(a)]  # no pairs at all: no edges
    return NeighbourTable(a[first], b[first], n[first])


def update(previous: NeighbourTable, found: NeighbourTable, searched: np.ndarray, removed: np.ndarray,
           k: int) -> NeighbourTable:
    """The table of a new version: ``previous`` without the edges that touch an image searched
    again (new or changed: its old content's edges are void) or removed (deleted or rejected), plus
    ``found``, the verified pairs of the images searched this run (both ways), each image's list cut
    to ``k``. Existing images thus gain edges to new images that verify against them."""
    void = np.union1d(np.asarray(searched, np.int64), np.asarray(removed, np.int64))
    keep = ~(np.isin(previous.image_ids, void) | np.isin(previous.neighbours, void))
    merged = symmetric(np.concatenate([previous.image_ids[keep], found.image_ids]),
                       np.concatenate([previous.neighbours[keep], found.neighbours]),
                       np.concatenate([previous.inliers[keep], found.inliers]))
    return cut(merged, k)
