"""The verified-neighbour graph landmarks are found from, for a version that has no neighbour table:
every live image searched with its own stored rows (in memory, for small indexes)."""

from __future__ import annotations

import numpy as np

from delf_retrieval.index import neighbour_table
from delf_retrieval.index.neighbour_table import NeighbourConfig, NeighbourTable
from delf_retrieval.query import expansion
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever


def search_all(reader, config: NeighbourConfig = NeighbourConfig()) -> NeighbourTable:
    """The neighbour table a build would have kept (both ways, cut to ``config.k``), searched afresh:
    each live image's stored rows against the whole index, as ``pipeline.reindex`` does to add one.
    The whole index is read into memory: large versions get theirs from a re-index (Beam) instead."""
    retriever = Retriever(reader, RetrievalConfig())
    found = []
    for image_id, (descriptors, locations) in sorted(expansion.rows_by_image(reader).items()):
        neighbours, inliers = expansion.search_neighbours(retriever, image_id, descriptors, locations, config)
        found.append(np.stack([np.full(len(neighbours), image_id, np.int64), neighbours, inliers], axis=1))
    edges = np.concatenate(found) if found else np.zeros((0, 3), np.int64)
    return neighbour_table.cut(neighbour_table.symmetric(edges[:, 0], edges[:, 1], edges[:, 2]), config.k)
