"""The sweep of retrieval defaults behind ``retrieval_quality.py``: every setting re-ranks the same
searches offline (one search per query, its votes and RANSAC inliers kept), expanded through
neighbour tables cut from one raw edge list per set, and scored per query by the Revisited-Oxford
AP of ``delf_retrieval.query.evaluation`` (the same functions, without re-validating the documents).

A setting is (rank_by, vote_weight, neighbour k, neighbour min inliers, expand K, expand T);
neighbour k 0 is no table, hence no expansion. The decision rule: the best mean mAP over the sets
among the settings that lose at most ``max_loss`` mAP against today's default on every set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Setting:
    rank_by: str
    vote_weight: float  # only for rank_by "combined"
    table_k: int = 0  # verified neighbours per image (0: no table, no expansion)
    table_min: int = 0  # inliers a neighbour edge needs
    expand: int = 0  # expand K: top verified matches that expand the query
    expand_min: int = 0  # expand T: inliers an expansion image needs

    @property
    def rule(self) -> tuple:
        return (self.rank_by, self.vote_weight if self.rank_by == "combined" else 0.0)

    @property
    def table(self) -> tuple | None:
        return (self.table_k, self.table_min) if self.table_k and self.expand else None

    def label(self) -> str:
        rule = f"combined w {self.vote_weight:g}" if self.rank_by == "combined" else self.rank_by
        if not self.table:
            return f"{rule}; no expansion"
        return f"{rule}; table k {self.table_k} >= {self.table_min}; expand K {self.expand} T {self.expand_min}"

    def to_json(self) -> dict:
        return asdict(self)


def settings(rules, table_ks, table_mins, expand_ks, expand_ts) -> list[Setting]:
    """Every rule without expansion, then every rule x table x (K, T)."""
    out = [Setting(r, w) for r, w in rules]
    out += [Setting(r, w, k, m, ek, et) for r, w in rules for k in table_ks if k for m in table_mins
            for ek in expand_ks if ek for et in expand_ts]
    return out


def rank_matches(matches, rank_by: str, weight: float, min_inliers: int) -> list:
    """A search's matches re-ranked as ``Retriever.search`` ranks them: verified first, by the score
    (``retrieval.combined_score``: inliers below ``min_inliers`` count 0), ties by votes, inliers, id."""
    from delf_retrieval.query.matching import Match

    def score(m):
        inliers = m.inliers if m.inliers >= min_inliers else 0
        if rank_by == "inliers":
            return float(inliers)
        if rank_by == "votes":
            return float(m.votes)
        return inliers + weight * m.votes
    keyed = sorted(((not m.verified, -score(m), -m.votes, -m.inliers, m.image_id, m) for m in matches),
                   key=lambda t: t[:5])
    return [Match(m.image_id, m.uri, -s, m.inliers, m.votes, m.verified) for _, s, _, _, _, m in keyed]


def raw_edges(reader, retriever, database_ids) -> tuple[np.ndarray, float]:
    """(image, neighbour, inliers) of every verified pair at >= 1 inlier, each database image
    searched with its own stored rows as the build's neighbour stage does
    (``expansion.search_neighbours``), and the seconds per image; tables of any (k, min inliers)
    are cut from it exactly (``table``)."""
    from delf_retrieval.index import neighbour_table
    from delf_retrieval.query import expansion

    everything = neighbour_table.NeighbourConfig(k=1 << 30, min_inliers=1)
    stored = expansion.rows_by_image(reader)
    found, start = [], time.perf_counter()
    for image_id in database_ids:
        if image_id not in stored:  # an image that kept no features has no rows to search with
            continue
        projected, locations = stored[image_id]
        neighbours, inliers = expansion.search_neighbours(retriever, image_id, projected, locations, everything)
        found += [(image_id, n, c) for n, c in zip(neighbours.tolist(), inliers.tolist())]
    seconds = (time.perf_counter() - start) / max(len(database_ids), 1)
    return np.asarray(found, np.int64).reshape(-1, 3), seconds


def table(edges: np.ndarray, k: int, min_inliers: int):
    """The neighbour table the build keeps with ``NeighbourConfig(k, min_inliers)``: per image the
    ``k`` verified neighbours with most inliers (ties: smaller id) at >= ``min_inliers``, made
    symmetric, each image's list cut to ``k`` (``expansion.search_neighbours``, ``symmetric``, ``cut``)."""
    from delf_retrieval.index import neighbour_table

    e = edges[edges[:, 2] >= min_inliers]
    e = e[np.lexsort((e[:, 1], -e[:, 2], e[:, 0]))]
    starts = np.flatnonzero(np.r_[True, e[1:, 0] != e[:-1, 0]]) if len(e) else np.zeros(0, np.int64)
    place = np.arange(len(e)) - np.repeat(starts, np.diff(np.r_[starts, len(e)])) if len(e) else np.zeros(0, np.int64)
    e = e[place < k]
    return neighbour_table.cut(neighbour_table.symmetric(e[:, 0], e[:, 1], e[:, 2]), k)


def answer_key(ordered: list, setting: Setting, rule_key) -> tuple:
    """What a query's answer under ``setting`` depends on, given ``ordered`` (its matches ranked by
    the setting's rule, keyed ``rule_key``): ``expansion.expand`` pins the top K verified matches with
    >= T inliers, in their order, and ranks every other image by its own inliers plus the edges' -
    not by the rule. So two settings with the same table and the same pinned images answer alike;
    with none pinned (or no expansion) the answer is ``ordered`` itself."""
    if setting.table:
        pinned = tuple(m.image_id for m in ordered if m.verified and m.inliers >= setting.expand_min)[:setting.expand]
        if pinned:
            return ("expanded", setting.table, pinned)
    return ("ranked", rule_key)


def ranking(ordered: list, setting: Setting, tables: dict, uri_of, top: int, query: str) -> list[str]:
    """The uris of a query's answer under ``setting`` (``ordered``: its matches ranked by the
    setting's rule), expanded as ``Retriever.search`` expands (``expansion.expand``), the query
    itself left out (a query that is a database image: its neighbours' edges lead back to it)."""
    from delf_retrieval.query import expansion

    if setting.table:
        ordered = expansion.expand(ordered, tables[setting.table], setting.expand, setting.expand_min, uri_of, top)
    return [m.uri for m in ordered if m.uri != query]


class Protocol:
    """A ground truth as per-query positives and junk, scored the way ``evaluation.evaluate`` scores
    (junk removed, trapezoidal AP, P@k over the cleaned ranking); queries without positives skipped."""

    def __init__(self, name: str, truth: dict, scene_of: dict | None = None):
        from delf_retrieval.query import evaluation

        parsed = evaluation.parse_ground_truth(truth)
        self.name = name
        self.queries = [q for q, t in parsed.items() if t.positives]
        self.positive = set(self.queries)
        self.truth = parsed
        self.scene_of = scene_of

    def score(self, rankings: dict) -> tuple[np.ndarray, np.ndarray]:
        """(AP, P@10) per query of ``self.queries``."""
        scored = [self.score_one(q, rankings.get(q, [])) for q in self.queries]
        return np.array([s[0] for s in scored]), np.array([s[1] for s in scored])

    def score_one(self, query: str, ranking: list[str]) -> tuple[float, float]:
        """(AP, P@10) of one query's ranking (uris, best first)."""
        from delf_retrieval.query import evaluation

        t = self.truth[query]
        ranks = evaluation.positive_ranks(ranking, t)
        return evaluation.average_precision(ranks, len(t.positives)), evaluation.precision_at(ranks, 10)

    def scene_mean(self, ap: np.ndarray) -> float | None:
        """The mean over scenes of each scene's mean AP (None without scenes)."""
        if not self.scene_of:
            return None
        by_scene: dict = {}
        for q, a in zip(self.queries, ap.tolist()):
            by_scene.setdefault(self.scene_of[q], []).append(a)
        return float(np.mean([np.mean(v) for v in by_scene.values()]))


def paired(ap: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Mean per-query AP difference and its standard error (std / sqrt(n))."""
    diff = np.asarray(ap) - np.asarray(base)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se


def decide(rows: list[dict], sets: list[str], max_loss: float) -> dict | None:
    """Marks each row admissible (no set's mAP below the default's by more than ``max_loss``) and
    returns the admissible row with the best mean mAP (ties: the earlier row, i.e. the simpler)."""
    best = None
    for row in rows:
        row["admissible"] = all(row["sets"][s]["diff"][0] >= -max_loss - 1e-12 for s in sets)
        if row["admissible"] and (best is None or row["mean_map"] > best["mean_map"] + 1e-12):
            best = row
    return best
