"""Retrieval quality: Revisited-Oxford mAP and mP@k, and the Google-Landmarks precision against true
positives over all queries (DELF paper, eq. 4), from a results file and a ground-truth file.

Inputs (JSON; every key below is required and no other key is accepted, so typos fail loudly)
---------------------------------------------------------------------------------------------
results:      {"results": [{"query": str, "matches": [{"uri": str, "score": float, "inliers": int,
                "votes": int}, ...]}, ...]}; matches best first (scores non-increasing), a uri at
                most once per query, a query at most once.
ground truth: {"queries": [{"query": str, "positives": [uri, ...], "junk": [uri, ...]}, ...]};
                a uri cannot be both positive and junk. A query with no positives is a distractor
                query: it counts only in the Google-Landmarks measure (only false positives).

**URIs and queries compare by exact string**: no normalisation of any kind (case, ``./``, trailing
slashes, ``file://``, ``gs://`` vs ``https://storage.googleapis.com/``). Use the database uri exactly
as indexed and the query exactly as given to the search.

Measures
--------
Per query, junk images are removed from the ranking first (later images move up); ranks below are
0-based in that cleaned ranking.

- AP (Revisited Oxford / Paris, as revisitop's ``compute_ap``): for the i-th positive found
  (i = 0, 1, ...) at rank r, precision_0 = i / r if r > 0 else 1, precision_1 = (i + 1) / (r + 1),
  AP += (precision_0 + precision_1) / 2 / n_positives (trapezoidal rule). Positives never retrieved
  add nothing. mAP: the mean over the queries that have positives.
- P@k: positives among the first k of the cleaned ranking / k (fewer than k retrieved: the missing
  ranks count as wrong). mP@k: the mean over the queries that have positives. (revisitop's code
  divides by min(k, rank of the last positive) instead; we use the plain definition.)
- Google-Landmarks (eq. 4): every retrieved (query, image) pair of every query carries its score.
  For a global threshold t, R_q(t) = images retrieved for q with score >= t (junk excluded) and
  TP_q(t) = the positives among them; precision(t) = sum_q |TP_q(t)| / sum_q |R_q(t)| is plotted
  against the absolute number of true positives sum_q |TP_q(t)|, one point per distinct score
  (pairs with equal scores enter together). Distractor queries contribute only false positives.
  Summary, ``gld_micro_ap``: the average precision of that pooled ranking normalised by all
  positives, sum over thresholds of precision(t) x (new true positives at t) / sum_q |positives_q|,
  i.e. the area under precision against recall with recall = true positives / all positives.

Queries of the ground truth missing from the results count as empty rankings (AP 0, P@k 0);
results for queries not in the ground truth are ignored and listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_KS = (1, 5, 10)


class SchemaError(ValueError):
    """A results or ground-truth document that does not follow its schema; the message says where."""


@dataclass(frozen=True)
class Match:
    uri: str
    score: float
    inliers: int
    votes: int


@dataclass(frozen=True)
class QueryTruth:
    positives: frozenset
    junk: frozenset


# --------------------------------------------------------------------------------------- schemas


def _expect_keys(obj, keys: set, where: str, optional: set = frozenset()) -> None:
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: expected an object with keys {sorted(keys)}, got {type(obj).__name__}")
    missing, unknown = keys - set(obj), set(obj) - keys - optional
    if missing:
        raise SchemaError(f"{where}: missing key(s) {sorted(missing)}")
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)} (expected exactly {sorted(keys)})")


def _expect_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _expect_str(value, where: str) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _expect_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _expect_score(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def parse_results(doc) -> dict[str, list[Match]]:
    """Validate a results document; returns query -> matches (best first), in file order."""
    _expect_keys(doc, {"results"}, "results file", optional={"notes"})
    out: dict[str, list[Match]] = {}
    for i, entry in enumerate(_expect_list(doc["results"], "results")):
        where = f"results[{i}]"
        _expect_keys(entry, {"query", "matches"}, where, optional={"landmark"})  # landmark: pipeline.search's
        query = _expect_str(entry["query"], f"{where}.query")
        if query in out:
            raise SchemaError(f"{where}: query {query!r} appears more than once")
        matches, seen = [], set()
        for j, m in enumerate(_expect_list(entry["matches"], f"{where}.matches")):
            mw = f"{where}.matches[{j}]"
            _expect_keys(m, {"uri", "score", "inliers", "votes"}, mw)
            match = Match(_expect_str(m["uri"], f"{mw}.uri"), _expect_score(m["score"], f"{mw}.score"),
                          _expect_int(m["inliers"], f"{mw}.inliers"), _expect_int(m["votes"], f"{mw}.votes"))
            if match.uri in seen:
                raise SchemaError(f"{mw}: uri {match.uri!r} appears more than once for query {query!r}")
            if matches and match.score > matches[-1].score:
                raise SchemaError(f"{mw}: matches must be best first (scores non-increasing): "
                                  f"{match.score} after {matches[-1].score}")
            seen.add(match.uri)
            matches.append(match)
        out[query] = matches
    return out


def parse_ground_truth(doc) -> dict[str, QueryTruth]:
    """Validate a ground-truth document; returns query -> positives and junk, in file order."""
    _expect_keys(doc, {"queries"}, "ground-truth file")
    out: dict[str, QueryTruth] = {}
    for i, entry in enumerate(_expect_list(doc["queries"], "queries")):
        where = f"queries[{i}]"
        _expect_keys(entry, {"query", "positives", "junk"}, where)
        query = _expect_str(entry["query"], f"{where}.query")
        if query in out:
            raise SchemaError(f"{where}: query {query!r} appears more than once")
        sets = {}
        for key in ("positives", "junk"):
            values = [_expect_str(v, f"{where}.{key}[{j}]")
                      for j, v in enumerate(_expect_list(entry[key], f"{where}.{key}"))]
            sets[key] = frozenset(values)
        both = sets["positives"] & sets["junk"]
        if both:
            raise SchemaError(f"{where}: uri(s) both positive and junk: {sorted(both)[:5]}")
        out[query] = QueryTruth(sets["positives"], sets["junk"])
    return out


# -------------------------------------------------------------------------------------- measures


def positive_ranks(ranking: list[str], truth: QueryTruth) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` once junk is removed."""
    cleaned = [uri for uri in ranking if uri not in truth.junk]
    return np.array([r for r, uri in enumerate(cleaned) if uri in truth.positives], dtype=np.int64)


def average_precision(ranks: np.ndarray, n_positives: int) -> float:
    """AP by the trapezoidal rule, as revisitop's ``compute_ap``: ranks are the sorted 0-based
    positions of the positives found (junk removed), n_positives all positives of the query."""
    if n_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    ranks = np.asarray(ranks, dtype=np.float64)
    found = np.arange(len(ranks), dtype=np.float64)  # positives before this one
    safe = np.where(ranks > 0, ranks, 1.0)
    precision_0 = np.where(ranks > 0, found / safe, 1.0)
    precision_1 = (found + 1.0) / (ranks + 1.0)
    return float(np.sum((precision_0 + precision_1) / 2.0) / n_positives)


def precision_at(ranks: np.ndarray, k: int) -> float:
    """Positives among the first k (junk removed) / k."""
    return float(np.count_nonzero(np.asarray(ranks) < k)) / k


@dataclass
class GldCurve:
    """Precision against the absolute number of true positives, one point per distinct score."""

    thresholds: np.ndarray  # (P,) distinct scores, decreasing
    true_positives: np.ndarray  # (P,) int: sum_q |TP_q(t)|
    retrieved: np.ndarray  # (P,) int: sum_q |R_q(t)|
    total_positives: int  # sum_q |positives_q|, over every query of the ground truth

    @property
    def precision(self) -> np.ndarray:
        return self.true_positives / np.maximum(self.retrieved, 1)

    def micro_ap(self) -> float:
        """sum_t precision(t) x (true positives added at t) / total positives."""
        if self.total_positives == 0 or len(self.thresholds) == 0:
            return 0.0
        new = np.diff(self.true_positives, prepend=0)
        return float(np.sum(self.precision * new) / self.total_positives)


def gld_curve(results: dict[str, list[Match]], truth: dict[str, QueryTruth]) -> GldCurve:
    """The Google-Landmarks curve (DELF eq. 4) over the queries of ``truth``; see the module doc."""
    scores, correct = [], []
    for query, qt in truth.items():
        for m in results.get(query, []):
            if m.uri not in qt.junk:
                scores.append(m.score)
                correct.append(m.uri in qt.positives)
    total = sum(len(qt.positives) for qt in truth.values())
    if not scores:
        empty = np.zeros(0, np.int64)
        return GldCurve(np.zeros(0), empty, empty, total)
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    order = np.argsort(-scores, kind="stable")
    scores, correct = scores[order], correct[order]
    cum_tp = np.cumsum(correct)
    last_of_tie = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # equal scores enter together
    return GldCurve(scores[last_of_tie], cum_tp[last_of_tie].astype(np.int64), (last_of_tie + 1).astype(np.int64),
                    total)


def evaluate(results: dict[str, list[Match]], truth: dict[str, QueryTruth], ks=DEFAULT_KS) -> dict:
    """All measures as a JSON-ready dict, with per-query AP and P@k, and the GLD curve."""
    per_query = []
    for query, qt in truth.items():
        if not qt.positives:
            continue
        ranks = positive_ranks([m.uri for m in results.get(query, [])], qt)
        per_query.append({"query": query, "positives": len(qt.positives), "found": int(len(ranks)),
                          "ap": average_precision(ranks, len(qt.positives)),
                          **{f"p@{k}": precision_at(ranks, k) for k in ks},
                          "in_results": query in results})
    curve = gld_curve(results, truth)
    mean = (lambda key: float(np.mean([q[key] for q in per_query]))) if per_query else (lambda key: None)
    precision = curve.precision
    tp_at_precision = {f"tp@precision>={p}": int(curve.true_positives[precision >= p].max(initial=0))
                       for p in (0.9, 0.99)}
    return {
        "map": mean("ap"),
        **{f"mp@{k}": mean(f"p@{k}") for k in ks},
        "gld_micro_ap": curve.micro_ap(),
        "gld_true_positives": int(curve.true_positives[-1]) if len(curve.thresholds) else 0,
        "gld_retrieved": int(curve.retrieved[-1]) if len(curve.thresholds) else 0,
        "gld_total_positives": curve.total_positives,
        **{f"gld_{k}": v for k, v in tp_at_precision.items()},
        "queries": len(truth),
        "queries_with_positives": len(per_query),
        "distractor_queries": sum(1 for qt in truth.values() if not qt.positives),
        "queries_missing_from_results": sorted(q for q in truth if q not in results),
        "ignored_results": sorted(q for q in results if q not in truth),
        "per_query": per_query,
        "gld_curve": {"thresholds": curve.thresholds.tolist(), "true_positives": curve.true_positives.tolist(),
                      "retrieved": curve.retrieved.tolist()},
    }


# -------------------------------------------------------------------------------------- the plot


def _ticks(x_max: int) -> list[int]:
    """0 and multiples of a 1 / 2 / 5 x 10^k step, at most ~6 ticks up to x_max."""
    step = 1
    while x_max / step > 5:
        for factor in (2, 2.5, 2):  # 1 -> 2 -> 5 -> 10 -> 20 ...
            step = int(step * factor)
            if x_max / step <= 5:
                break
    return list(range(0, x_max + 1, step))


def plot_gld_curve(curve: GldCurve, title: str = "", size: tuple[int, int] = (800, 560)):
    """The precision-vs-true-positives curve as a PIL image (white background, axes with ticks)."""
    from PIL import Image, ImageDraw, ImageFont  # heavy: imported on first use

    width, height = size
    left, right, top, bottom = 80, 30, 50, 70
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(14)
    x_max = max(1, curve.total_positives, int(curve.true_positives.max(initial=0)))
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(tp, precision):
        return left + tp / x_max * plot_w, top + (1.0 - precision) * plot_h

    for i in range(6):  # grid and ticks: precision 0..1
        _, y = to_px(0, i / 5)
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{i / 5:.1f}", fill="black", font=font, anchor="rm")
    for tp in _ticks(x_max):  # true positives 0..x_max, at 1, 2 or 5 x 10^k steps
        x, _ = to_px(tp, 0)
        draw.line([(x, top), (x, top + plot_h)], fill=(225, 225, 225))
        draw.text((x, top + plot_h + 8), f"{tp:,}", fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w / 2, height - 22), "true positives over all queries (sum_q |TP_q|)", fill="black",
              font=font, anchor="mm")
    label = Image.new("RGB", (120, 20), "white")
    ImageDraw.Draw(label).text((60, 10), "precision", fill="black", font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8, int(top + plot_h / 2 - 60)))
    draw.text((left + plot_w / 2, 22), title, fill="black", font=font, anchor="mm")
    if len(curve.thresholds):  # one point per threshold, joined
        points = [to_px(tp, p) for tp, p in zip(curve.true_positives, curve.precision)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        for x, y in points[:: max(1, len(points) // 200)]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    return image
