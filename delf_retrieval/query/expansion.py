"""Verified query expansion: each database image's verified neighbours searched once at index time
with the image's own stored rows (decoded PQ codes and their keypoints; the table they fill is
``index.neighbour_table``), and merged into a query's ranking at query time (Chum et al., "Total
Recall", ICCV 2007, with the neighbours precomputed)."""

from __future__ import annotations

import numpy as np

from delf_retrieval.index.neighbour_table import NeighbourConfig, NeighbourTable
from delf_retrieval.query.matching import Match


def search_neighbours(retriever, image_id: int, projected: np.ndarray, locations: np.ndarray,
                      config: NeighbourConfig, shortlisted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour ids, inliers) of one database image: the index searched with its own rows
    (``projected``: decoded codes; ``locations``: their keypoints), the verified images with at
    least ``min_inliers`` inliers but itself, the ``k`` with most. The search is not restricted
    to the other images: the image finds itself first, which costs one of the shortlist's
    verifications and is cheaper than filtering every probed list. ``shortlisted``: the image's
    first-stage candidates, when found for a batch (:func:`search_neighbours_batch`)."""
    result = retriever.search_projected(projected, locations, shortlisted=shortlisted)
    found = [(m.image_id, m.inliers) for m in result.matches
             if m.verified and m.inliers >= config.min_inliers and m.image_id != image_id]
    found.sort(key=lambda f: (-f[1], f[0]))
    found = found[:config.k]
    return np.asarray([f[0] for f in found], np.int64), np.asarray([f[1] for f in found], np.int64)


def search_neighbours_batch(retriever, images: list, config: NeighbourConfig) -> list:
    """:func:`search_neighbours` of several images, ``images`` a list of (image id, projected,
    locations): with a first stage, their candidates come from one matrix product, so that the
    stage's cost per image stays flat as the index grows. One result (or exception) per image."""
    shortlisted = [None] * len(images)
    stage = retriever.first_stage
    if stage is not None and images:
        vectors = np.stack([stage.vector(projected) for _, projected, _ in images])
        shortlisted = stage.top_vectors(vectors, retriever.shortlist_size)
    out = []
    for (image_id, projected, locations), candidates in zip(images, shortlisted):
        try:
            out.append(search_neighbours(retriever, image_id, projected, locations, config, candidates))
        except Exception as e:  # noqa: BLE001 - one image's failure is that image's alone
            out.append(e)
    return out


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
