"""Verified query expansion, database-side: each database image's verified neighbours, found once at
index time by searching the index with the image's own stored rows (decoded PQ codes and their
keypoints), kept as a table of the version, updated by re-index runs, and merged into a query's
ranking (Chum et al., "Total Recall", ICCV 2007, with the neighbours precomputed)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

NEIGHBOURS_FILE = "neighbours.parquet"
SCHEMA = pa.schema([("image_id", pa.int64()), ("neighbour", pa.int64()), ("inliers", pa.int32())])


@dataclass(frozen=True)
class NeighbourConfig:
    """The index-time cut: at most ``k`` neighbours per image, each verified with at least
    ``min_inliers`` RANSAC inliers."""

    k: int = 20
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
    def from_bytes(data: bytes) -> "NeighbourTable":
        import pyarrow.parquet as pq

        return NeighbourTable.from_table(pq.read_table(io.BytesIO(data)))


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


def search_neighbours(retriever, image_id: int, projected: np.ndarray, locations: np.ndarray,
                      config: NeighbourConfig) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids, inliers) of one database image: the index searched with its own rows
    (``projected``: decoded codes; ``locations``: their keypoints), the verified images with at
    least ``min_inliers`` inliers but itself, the ``k`` with most. The search is not restricted
    to the other images: the image finds itself first, which costs one of the shortlist's
    verifications and is cheaper than filtering every probed list."""
    result = retriever.search_projected(projected, locations)
    found = [(m.image_id, m.inliers) for m in result.matches
             if m.verified and m.inliers >= config.min_inliers and m.image_id != image_id]
    found.sort(key=lambda f: (-f[1], f[0]))
    found = found[:config.k]
    return np.asarray([f[0] for f in found], np.int64), np.asarray([f[1] for f in found], np.int64)


def rows_by_image(reader) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every live image's stored rows as (decoded descriptors in the index's space, (y, x)
    keypoints), in stored order, from the reader's ``stored_rows()`` (either kind of index): the
    whole index in memory, for offline use on small indexes (benchmarks, tests)."""
    parts: dict[int, list] = {}
    for block in reader.stored_rows():
        ids = block.image_ids
        order = np.argsort(ids, kind="stable")
        bounds = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            rows = order[lo:hi]
            parts.setdefault(int(ids[rows[0]]), []).append((block.descriptors[rows], block.locations[rows]))
    return {i: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps])) for i, ps in parts.items()}


def expand(matches: list, table: NeighbourTable, k: int, min_inliers: int, uri_of, top: int) -> list:
    """A query's matches with verified expansion merged in: the top ``k`` verified matches with at
    least ``min_inliers`` inliers (the expansion images) stay on top in their order; every other
    image is ranked by its own inliers plus the inliers its stored neighbour edges from the
    expansion images carry (images reached only through those edges join the answer). Scores are
    non-increasing down the answer. ``uri_of`` maps image ids to uris. Returns at most ``top``
    matches."""
    from delf_retrieval.retrieval import Match

    pinned = [m for m in matches if m.verified and m.inliers >= min_inliers][:k]
    if not pinned:
        return matches[:top]
    pinned_ids = {m.image_id for m in pinned}
    gained: dict[int, int] = {}
    for m in pinned:
        neighbours, inliers = table.of(m.image_id)
        for n, c in zip(neighbours.tolist(), inliers.tolist()):
            if n not in pinned_ids:
                gained[n] = gained.get(n, 0) + c
    by_id = {m.image_id: m for m in matches}
    rest = []
    for image_id in set(by_id) | set(gained):
        if image_id in pinned_ids:
            continue
        m = by_id.get(image_id)
        own = m.inliers if m is not None and m.verified else 0
        rest.append((own + gained.get(image_id, 0), m.votes if m is not None else 0, image_id, m))
    rest.sort(key=lambda r: (-r[0], -r[1], r[2]))
    missing = [r[2] for r in rest[:max(top - len(pinned), 0)] if r[3] is None]
    uris = dict(zip(missing, uri_of(np.asarray(missing, np.int64)))) if missing else {}
    out = []
    for score, votes, image_id, m in rest[:max(top - len(pinned), 0)]:
        if m is None:
            m = Match(image_id, uris[image_id], float(score), 0, 0, False)
        else:
            m = Match(m.image_id, m.uri, float(score), m.inliers, m.votes, m.verified, m.query_points,
                      m.database_points)
        out.append(m)
    # An expansion image scores its own inliers, raised where needed to stay above the images after
    # it: scores decrease strictly down the pinned ones, so their order survives any consumer.
    floor = out[0].score if out else 0.0
    for m in reversed(pinned):
        floor = max(float(m.inliers), floor + 1.0)
        out.insert(0, Match(m.image_id, m.uri, floor, m.inliers, m.votes, m.verified, m.query_points,
                            m.database_points))
    return out[:top]
