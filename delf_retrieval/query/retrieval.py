"""Query-time retrieval over an index: per-descriptor ANN, one-to-one putative matches, votes per
database image, RANSAC verification of the shortlist, and the score that ranks the answer."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from delf_retrieval.extraction.extractor import ExtractionConfig
from delf_retrieval.extraction.features import Features
from delf_retrieval.index import segment_reader
from delf_retrieval.first_stage.search import DEFAULT_MIN_IMAGES, FirstStage
from delf_retrieval.model import delf
from delf_retrieval.query import verify
from delf_retrieval.query.expansion import expand
from delf_retrieval.query.matching import Match, count_votes, putative_matches

RANK_BY = ("combined", "inliers", "votes")


@dataclass(frozen=True)
class RetrievalConfig:
    """How a query is answered. The defaults were decided on three sets of real photographs
    (landmarks-dev, landmarks-train, landmarks-hard under its hard protocol): the best mean mAP
    among the settings that lose at most one point on any one set (benchmarks/retrieval_quality.py;
    docs/search.md)."""

    neighbours: int = 10  # K nearest database descriptors per query descriptor
    nprobe: int = 8  # coarse cells scanned per query descriptor
    max_distance: float = 0.9  # L2 distance between unit descriptors beyond which a neighbour is no match
    shortlist: int = 100  # images verified by RANSAC, the most voted first
    top: int = 100  # matches returned
    residual_threshold: float = 20.0  # RANSAC inlier threshold, pixels
    max_trials: int = 1000
    min_inliers: int = 4  # fewer inliers than this is no geometric evidence: counted as 0
    # "votes" (ties: more inliers first), "combined" (inliers + vote_weight x votes) or "inliers"
    # (the paper). With expansion, votes ranks best over the three sets.
    rank_by: str = "votes"
    vote_weight: float = 2.0  # combined score = inliers + vote_weight * votes
    seed: int = 0
    # Verified query expansion (the index's neighbour table): the top ``expand`` verified matches
    # with at least ``expand_min_inliers`` inliers bring their stored neighbours in; 0 is off.
    expand: int = 10
    expand_min_inliers: int = 20

    def __post_init__(self):
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, not {self.rank_by!r}")
        if self.neighbours < 1 or self.shortlist < 0 or self.top < 1:
            raise ValueError("neighbours and top must be >= 1 and shortlist >= 0")
        if self.expand < 0 or self.expand_min_inliers < 1:
            raise ValueError("expand must be >= 0 and expand_min_inliers >= 1")


def combined_score(inliers: np.ndarray, votes: np.ndarray, config: RetrievalConfig) -> np.ndarray:
    """The ranking score: RANSAC inliers (below ``min_inliers``: 0), votes, or inliers plus a share
    of the votes (which carry signal when the landmark is small or far and few inliers survive)."""
    inliers = np.where(np.asarray(inliers) >= config.min_inliers, inliers, 0).astype(np.float64)
    votes = np.asarray(votes, np.float64)
    if config.rank_by == "inliers":
        return inliers
    if config.rank_by == "votes":
        return votes
    return inliers + config.vote_weight * votes


@dataclass
class QueryResult:
    matches: list[Match]
    timings: dict  # seconds per stage: shortlist (with PCA; the first stage and reading its images' rows), ann, voting, ransac
    num_descriptors: int
    num_putative: int
    notes: tuple = ()  # what a user should know of how the query was answered


NO_NEIGHBOUR_TABLE = ("the index has no neighbour table: answered without query expansion (the next "
                      "pipeline.reindex run adds one)")


class Retriever:
    """Answers queries against an opened index (:class:`~delf_retrieval.index.shard_reader.IndexReader`).

    ``first_stage`` (a :class:`~delf_retrieval.first_stage.search.FirstStage`) restricts the
    descriptor search to the ``shortlist_size`` images nearest the query's image vector, read from
    their image-major rows: the index's cell lists are then not read at all (large corpora).
    """

    def __init__(self, reader, config: RetrievalConfig = RetrievalConfig(), first_stage: FirstStage | None = None,
                 shortlist_size: int = 1000):
        self.reader = reader
        self.config = config
        self.first_stage = first_stage
        self.shortlist_size = shortlist_size
        images = reader.images
        ids = images.column("image_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_uris = np.asarray(images.column("uri").to_pylist(), dtype=object)[order]
        self.neighbour_table = reader.neighbours() if config.expand else None

    def with_config(self, config: RetrievalConfig) -> "Retriever":
        """The same opened index answering with other settings (a request's own ``top``, ``rank_by``...):
        the reader, the first stage and the id tables are shared, nothing is read again."""
        if config == self.config:
            return self
        other = copy.copy(self)
        other.config = config
        if config.expand and other.neighbour_table is None:
            other.neighbour_table = self.reader.neighbours()
        return other

    def uri_of(self, image_ids: np.ndarray) -> list[str]:
        pos = np.searchsorted(self._sorted_ids, image_ids)
        return [str(u) for u in self._sorted_uris[np.minimum(pos, len(self._sorted_ids) - 1)]]

    def project(self, features: Features) -> np.ndarray:
        """The query's raw descriptors in the index's space (L2-PCA-L2)."""
        descriptors = features.descriptors.astype(np.float32)
        return self.reader.pca.transform(descriptors) if self.reader.pca is not None else descriptors

    def search(self, features: Features, among: np.ndarray | None = None) -> QueryResult:
        """The ranked answer for a query's features (locations in the query image's pixels);
        ``among`` limits the answer to those image ids (e.g. all but the query, in evaluations)."""
        start = time.perf_counter()
        projected = self.project(features)
        return self.search_projected(projected, features.locations, among, time.perf_counter() - start)

    def search_projected(self, projected: np.ndarray, locations: np.ndarray, among: np.ndarray | None = None,
                         projection_seconds: float = 0.0, shortlisted: np.ndarray | None = None) -> QueryResult:
        """:meth:`search` for descriptors already in the index's space, with their (y, x) keypoints:
        a query's, or a database image's own stored rows (decoded codes), as query expansion uses.
        ``shortlisted``: the first stage's candidates when the caller found them already (a batch
        of images searching at once)."""
        config = self.config
        timings = {}
        start = time.perf_counter() - projection_seconds
        candidates = None if among is None else np.asarray(among, np.int64)
        source = self.reader
        if self.first_stage is not None and len(projected):
            if shortlisted is None:
                shortlisted = self.first_stage.top(projected, self.shortlist_size, among=candidates)
            elif candidates is not None:
                shortlisted = shortlisted[np.isin(shortlisted, candidates)]
            source, candidates = self.first_stage.rows_of(shortlisted), None
        timings["shortlist"] = time.perf_counter() - start
        start = time.perf_counter()
        if len(projected):
            distances, rows = source.search(projected, config.neighbours, config.nprobe, image_ids=candidates)
        else:
            distances, rows = np.zeros((0, config.neighbours), np.float32), np.zeros((0, config.neighbours), np.int64)
        stored = source.rows(rows)
        timings["ann"] = time.perf_counter() - start

        start = time.perf_counter()
        putative = putative_matches(distances, rows, stored.image_ids, config.max_distance)
        images, votes = count_votes(putative)
        timings["voting"] = time.perf_counter() - start

        start = time.perf_counter()
        verified = min(config.shortlist, len(images))
        inliers = np.zeros(len(images), np.int64)
        points: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if verified:
            stored_locations = stored.locations.reshape(-1, 2)
            order = np.argsort(putative.images, kind="stable")
            lo = np.searchsorted(putative.images[order], images[:verified], side="left")
            hi = np.searchsorted(putative.images[order], images[:verified], side="right")
            for i in range(verified):
                members = order[lo[i]:hi[i]]
                src = locations[putative.query[members]].astype(np.float64)
                dst = stored_locations[putative.positions[members]].astype(np.float64)
                result = verify.ransac_affine(src, dst, residual_threshold=config.residual_threshold,
                                              max_trials=config.max_trials, min_inliers=max(config.min_inliers, 3),
                                              seed=config.seed)
                inliers[i] = result.num_inliers
                if result.num_inliers:
                    points[i] = (src[result.inliers].astype(np.float32), dst[result.inliers].astype(np.float32))
        timings["ransac"] = time.perf_counter() - start

        scores = combined_score(inliers, votes, config)
        # Verified images rank by score; the rest follow by votes.
        unverified = np.arange(len(images)) >= verified
        ranking = np.lexsort((images, -inliers, -votes, -scores, unverified))[: config.top]
        uris = self.uri_of(images[ranking])
        empty = np.zeros((0, 2), np.float32)
        matches = []
        for pos, uri in zip(ranking.tolist(), uris):
            query_points, database_points = points.get(pos, (empty, empty))
            matches.append(Match(int(images[pos]), uri, float(scores[pos]), int(inliers[pos]), int(votes[pos]),
                                 pos < verified, query_points, database_points))
        notes = ()
        if config.expand and self.neighbour_table is None:
            notes = (NO_NEIGHBOUR_TABLE,)
        elif config.expand:
            start = time.perf_counter()
            matches = expand(matches, self.neighbour_table, config.expand, config.expand_min_inliers, self.uri_of,
                             config.top)
            timings["expansion"] = time.perf_counter() - start
        return QueryResult(matches, timings, len(projected), len(putative), notes)


def index_configs(manifest: dict):
    """(ModelConfig, ExtractionConfig) the index was built with: queries must be extracted the same way."""

    model = manifest.get("model") or {}
    if "network" not in model or "extraction" not in model:
        raise ValueError("the index manifest does not say which network built it (no model.network / model.extraction)")
    return delf.ModelConfig.from_json(dict(model["network"])), ExtractionConfig.from_json(model["extraction"])


NO_FIRST_STAGE = ("{index} has no first stage (image shortlist) for its current version: the next "
                  "pipeline.reindex run writes it")


def open_index(index: str, config: RetrievalConfig = RetrievalConfig(), image_shortlist: str = "auto",
               shortlist_min_images: int = DEFAULT_MIN_IMAGES, shortlist_size: int = 1000,
               cache_bytes: int = 2 << 30, manifest: dict | None = None) -> Retriever:
    """A Retriever over the index at ``index`` (local or gs://; its current version, or the one
    whose pointer ``manifest`` was read from it: a server that must know which version it opened).
    The first stage (image shortlist) is used when ``image_shortlist`` is "on", or "auto" and the
    index has at least ``shortlist_min_images`` live images and the files of a first stage."""

    if image_shortlist not in ("auto", "on", "off"):
        raise ValueError("image_shortlist must be auto, on or off")
    reader = segment_reader.open_reader(index, cache_bytes=cache_bytes, manifest=manifest)
    first_stage = None
    if image_shortlist == "on" or (image_shortlist == "auto" and reader.manifest["counts"]["images"] >= shortlist_min_images):
        first_stage = FirstStage.open(reader)
        if first_stage is None and image_shortlist == "on":
            raise FileNotFoundError(NO_FIRST_STAGE.format(index=index))
    return Retriever(reader, config, first_stage, shortlist_size)


def results_document(answers: list[tuple[str, list[Match]]], notes=(), landmarks: dict | None = None) -> dict:
    """The results.json document: {"results": [{"query", "matches": [{uri, score, inliers, votes}]}]},
    with "notes" on how the queries were answered when there are any, and each query's "landmark"
    when ``landmarks`` (query -> recognition record) has it."""
    landmarks = landmarks or {}
    document = {"results": [{"query": query, "matches": [m.to_json() for m in matches],
                             **({"landmark": landmarks[query]} if query in landmarks else {})}
                            for query, matches in answers]}
    if notes:
        document["notes"] = list(notes)
    return document


def results_table(answers: list[tuple[str, list[Match]]], rows_per_query: int = 5) -> str:
    """A human-readable summary: each query and its best matches."""
    lines = []
    for query, matches in answers:
        lines.append(f"{query}: {len(matches)} matches" + ("" if matches else " (none)"))
        for rank, m in enumerate(matches[:rows_per_query], 1):
            lines.append(f"  {rank:>3}. score {m.score:8.2f}  inliers {m.inliers:4d}  votes {m.votes:5d}  {m.uri}")
    return "\n".join(lines)
