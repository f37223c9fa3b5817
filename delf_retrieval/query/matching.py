"""A query's matches: one-to-one putative matches from the ANN neighbour lists, votes per image,
and ``Match``, one database image in an answer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Match:
    """One database image in a query's answer; ``inliers`` is 0 when it was not verified."""

    image_id: int
    uri: str
    score: float
    inliers: int
    votes: int
    verified: bool
    # The inlier correspondences, (y, x) in the query and in the database image (for pictures).
    query_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32), repr=False)
    database_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32), repr=False)

    def to_json(self) -> dict:
        return {"uri": self.uri, "score": float(self.score), "inliers": int(self.inliers), "votes": int(self.votes)}


@dataclass
class PutativeMatches:
    """Query descriptor -> database row correspondences, at most one per (query descriptor, image)
    and one per database row (the closest), each with its image and its place in the neighbour list."""

    query: np.ndarray  # (n,) int64, index of the query descriptor
    rows: np.ndarray  # (n,) int64, global posting row
    images: np.ndarray  # (n,) int64, image id of the row
    distances: np.ndarray  # (n,) float32, L2 distance
    positions: np.ndarray  # (n,) int64, flat index into the (nq, K) neighbour arrays

    def __len__(self) -> int:
        return int(self.query.shape[0])


def _first_of_each(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct key, in their original order."""
    return np.sort(np.unique(keys, return_index=True)[1])


def putative_matches(squared_distances: np.ndarray, rows: np.ndarray, row_images: np.ndarray,
                     max_distance: float) -> PutativeMatches:
    """One-to-one matches from a (nq, K) neighbour list.

    A database row takes at most one query descriptor (its nearest), then a query descriptor keeps
    at most one row per image (its nearest there): repeated texture would otherwise cast many votes
    for one image and hand RANSAC many copies of one point.
    """
    nq, k = rows.shape
    distances = np.sqrt(np.maximum(squared_distances, 0.0)).astype(np.float32).ravel()
    positions = np.flatnonzero((rows.ravel() >= 0) & (distances <= max_distance))
    query = positions // max(k, 1)
    flat_rows, flat_images = rows.ravel(), row_images.ravel()
    # Nearest first (ties: lower query, lower row), so a first occurrence is the closest.
    positions = positions[np.lexsort((flat_rows[positions], query, distances[positions]))]
    positions = positions[_first_of_each(flat_rows[positions])]
    query = positions // max(k, 1)
    _, image_index = np.unique(flat_images[positions], return_inverse=True)
    positions = positions[_first_of_each(query * (int(image_index.max(initial=0)) + 1) + image_index)]
    positions = np.sort(positions)
    return PutativeMatches(positions // max(k, 1), flat_rows[positions], flat_images[positions],
                           distances[positions], positions)


def count_votes(matches: PutativeMatches) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, votes) with votes = number of distinct query descriptors matched, most first
    (ties: smaller image id first, so the order is deterministic)."""
    images, votes = np.unique(matches.images, return_counts=True)
    order = np.lexsort((images, -votes))
    return images[order], votes[order]
