"""Evaluation measures on hand-computed examples (arithmetic written out), a literal transcription
of revisitop's compute_ap loop as a reference, schema errors, and the CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from delf_retrieval.query import evaluation
from pipeline import evaluate as evaluate_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def match(uri, score, inliers=10, votes=20):
    return {"uri": uri, "score": score, "inliers": inliers, "votes": votes}


# Query A: 4 positives (p4 never retrieved), one junk image ranked third.
# Query B: 1 positive, ranked second. Query C: 1 positive, no results at all.
# Query D: a distractor query (no positives). "extra" is not in the ground truth.
RESULTS = {"results": [
    {"query": "A.jpg", "matches": [match("p1", 0.9), match("n1", 0.8), match("j1", 0.7), match("p2", 0.6),
                                   match("n2", 0.5), match("p3", 0.4)]},
    {"query": "B.jpg", "matches": [match("n1", 0.85), match("q1", 0.6)]},
    {"query": "D.jpg", "matches": [match("n3", 0.95), match("n4", 0.3)]},
    {"query": "extra.jpg", "matches": [match("p1", 1.0)]},
]}
GROUND_TRUTH = {"queries": [
    {"query": "A.jpg", "positives": ["p1", "p2", "p3", "p4"], "junk": ["j1"]},
    {"query": "B.jpg", "positives": ["q1"], "junk": []},
    {"query": "C.jpg", "positives": ["r1"], "junk": []},
    {"query": "D.jpg", "positives": [], "junk": []},
]}


def parsed():
    return evaluation.parse_results(RESULTS), evaluation.parse_ground_truth(GROUND_TRUTH)


def revisitop_compute_ap(ranks, nres):
    """revisitop's compute_ap, transcribed loop for loop (ranks: 0-based positions, junk removed)."""
    nimgranks = len(ranks)
    ap = 0.0
    recall_step = 1.0 / nres
    for j in range(nimgranks):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def test_average_precision_by_hand():
    results, truth = parsed()
    # A after junk removal: [p1, n1, p2, n2, p3] -> positives at ranks 0, 2, 4; 4 positives in all.
    ranks = evaluation.positive_ranks([m.uri for m in results["A.jpg"]], truth["A.jpg"])
    np.testing.assert_array_equal(ranks, [0, 2, 4])
    # r=0, i=0: (1 + 1/1) / 2 / 4            = 1/4   = 60/240
    # r=2, i=1: (1/2 + 2/3) / 2 / 4 = 7/48    = 35/240
    # r=4, i=2: (2/4 + 3/5) / 2 / 4 = 11/80   = 33/240   -> AP = 128/240 = 8/15
    assert evaluation.average_precision(ranks, 4) == pytest.approx(8 / 15, abs=1e-12)
    # B: [n1, q1] -> rank 1: (0/1 + 1/2) / 2 / 1 = 1/4
    assert evaluation.average_precision(evaluation.positive_ranks(["n1", "q1"], truth["B.jpg"]), 1) == pytest.approx(0.25)
    # C: nothing retrieved -> 0
    assert evaluation.average_precision(np.zeros(0, np.int64), 1) == 0.0


def test_junk_is_removed_not_counted_as_negative():
    _, truth = parsed()
    ranking = ["p1", "n1", "j1", "p2", "n2", "p3"]
    as_negative = evaluation.QueryTruth(truth["A.jpg"].positives, frozenset())
    # keeping j1 as a negative: ranks 0, 3, 5 -> 1/4 + (1/3 + 2/4)/8 + (2/5 + 3/6)/8 = 60/240 + 25/240 + 27/240 = 7/15
    assert evaluation.average_precision(evaluation.positive_ranks(ranking, as_negative), 4) == pytest.approx(7 / 15)
    assert evaluation.average_precision(evaluation.positive_ranks(ranking, truth["A.jpg"]), 4) == pytest.approx(8 / 15)
    # junk anywhere (even first) never changes the AP
    assert evaluation.average_precision(evaluation.positive_ranks(["j1"] + ranking, truth["A.jpg"]), 4) == \
        pytest.approx(8 / 15)


def test_average_precision_matches_revisitop_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_pos = int(rng.integers(1, 20))
        ranks = np.sort(rng.choice(60, size=int(rng.integers(0, n_pos + 1)), replace=False))
        assert evaluation.average_precision(ranks, n_pos) == pytest.approx(revisitop_compute_ap(ranks, n_pos), abs=1e-12)


def test_map_and_mean_precision_at_k_by_hand():
    metrics = evaluation.evaluate(*parsed())
    # mAP over A, B, C (D has no positives): (8/15 + 1/4 + 0) / 3 = (32/60 + 15/60) / 3 = 47/180
    assert metrics["map"] == pytest.approx(47 / 180, abs=1e-12)
    # P@k after junk removal: A [p1 n1 p2 n2 p3]: P@1 = 1, P@5 = 3/5, P@10 = 3/10
    #                         B [n1 q1]:          P@1 = 0, P@5 = 1/5, P@10 = 1/10;   C: all 0
    assert metrics["mp@1"] == pytest.approx(1 / 3)
    assert metrics["mp@5"] == pytest.approx((3 / 5 + 1 / 5) / 3)
    assert metrics["mp@10"] == pytest.approx((3 / 10 + 1 / 10) / 3)
    assert metrics["queries"] == 4 and metrics["queries_with_positives"] == 3 and metrics["distractor_queries"] == 1
    assert metrics["queries_missing_from_results"] == ["C.jpg"]
    assert metrics["ignored_results"] == ["extra.jpg"]
    by_query = {q["query"]: q for q in metrics["per_query"]}
    assert by_query["A.jpg"]["p@5"] == pytest.approx(0.6) and by_query["C.jpg"]["ap"] == 0.0


def test_precision_at_k_counts_missing_ranks_as_wrong():
    assert evaluation.precision_at(np.array([0]), 5) == pytest.approx(1 / 5)
    assert evaluation.precision_at(np.array([0, 1, 2, 3, 4, 5]), 5) == 1.0


def test_gld_measure_by_hand():
    """Pooled over all queries (junk j1 dropped, C retrieves nothing, D only false positives),
    sorted by score: 0.95 D- | 0.9 A+ | 0.85 B- | 0.8 A- | 0.6 A+ and 0.6 B+ (a tie: one threshold)
    | 0.5 A- | 0.4 A+ | 0.3 D-.  All positives: 4 + 1 + 1 = 6 (D has none; "extra" is ignored)."""
    curve = evaluation.gld_curve(*parsed())
    np.testing.assert_allclose(curve.thresholds, [0.95, 0.9, 0.85, 0.8, 0.6, 0.5, 0.4, 0.3])
    np.testing.assert_array_equal(curve.true_positives, [0, 1, 1, 1, 3, 3, 4, 4])
    np.testing.assert_array_equal(curve.retrieved, [1, 2, 3, 4, 6, 7, 8, 9])
    np.testing.assert_allclose(curve.precision, [0, 1 / 2, 1 / 3, 1 / 4, 3 / 6, 3 / 7, 4 / 8, 4 / 9])
    assert curve.total_positives == 6
    # micro-AP: precision x new true positives / all positives = (1/2 x 1 + 3/6 x 2 + 4/8 x 1) / 6 = 1/3
    assert curve.micro_ap() == pytest.approx(1 / 3)
    metrics = evaluation.evaluate(*parsed())
    assert metrics["gld_micro_ap"] == pytest.approx(1 / 3)
    assert (metrics["gld_true_positives"], metrics["gld_retrieved"], metrics["gld_total_positives"]) == (4, 9, 6)
    assert metrics["gld_tp@precision>=0.9"] == 0


def test_gld_perfect_and_empty():
    truth = evaluation.parse_ground_truth({"queries": [{"query": "q", "positives": ["a", "b"], "junk": []},
                                                     {"query": "d", "positives": [], "junk": []}]})
    perfect = evaluation.parse_results({"results": [{"query": "q", "matches": [match("a", 3), match("b", 2)]},
                                                  {"query": "d", "matches": [match("x", 1)]}]})
    curve = evaluation.gld_curve(perfect, truth)
    assert curve.micro_ap() == 1.0  # both positives score above the distractor's false positive
    assert evaluation.evaluate(perfect, truth)["gld_tp@precision>=0.99"] == 2
    nothing = evaluation.evaluate({}, truth)
    assert nothing["gld_micro_ap"] == 0.0 and nothing["map"] == 0.0 and nothing["gld_true_positives"] == 0


def test_uris_compare_by_exact_string():
    truth = evaluation.parse_ground_truth({"queries": [{"query": "q", "positives": ["img/a.jpg"], "junk": []}]})
    for other in ("./img/a.jpg", "img/A.jpg", "img/a.jpg ", "/img/a.jpg"):
        results = evaluation.parse_results({"results": [{"query": "q", "matches": [match(other, 1.0)]}]})
        assert evaluation.evaluate(results, truth)["map"] == 0.0
    dotted = evaluation.parse_results({"results": [{"query": "./q", "matches": [match("img/a.jpg", 1)]}]})
    assert evaluation.evaluate(dotted, truth)["queries_missing_from_results"] == ["q"]


@pytest.mark.parametrize("doc, message", [
    ([], "expected an object"),
    ({}, "missing key(s) ['results']"),
    ({"results": {}}, "results: expected a list"),
    ({"results": [{"query": "q"}]}, "results[0]: missing key(s) ['matches']"),
    ({"results": [{"query": "q", "matches": [], "extra": 1}]}, "unknown key(s) ['extra']"),
    ({"results": [{"query": 3, "matches": []}]}, "results[0].query: expected a string"),
    ({"results": [{"query": "q", "matches": [{"uri": "a", "score": "high", "inliers": 1, "votes": 1}]}]},
     "results[0].matches[0].score: expected a finite number"),
    ({"results": [{"query": "q", "matches": [{"uri": "a", "score": float("nan"), "inliers": 1, "votes": 1}]}]},
     "expected a finite number"),
    ({"results": [{"query": "q", "matches": [{"uri": "a", "score": 1, "inliers": True, "votes": 1}]}]},
     "results[0].matches[0].inliers: expected a non-negative integer"),
    ({"results": [{"query": "q", "matches": [{"uri": "a", "score": 1, "inliers": 1, "votes": -2}]}]},
     "votes: expected a non-negative integer"),
    ({"results": [{"query": "q", "matches": [{"uri": "a", "score": 1, "inliers": 1}]}]}, "missing key(s) ['votes']"),
    ({"results": [{"query": "q", "matches": [match("a", 1), match("a", 0.5)]}]}, "uri 'a' appears more than once"),
    ({"results": [{"query": "q", "matches": [match("a", 1), match("b", 2)]}]}, "best first"),
    ({"results": [{"query": "q", "matches": []}, {"query": "q", "matches": []}]}, "query 'q' appears more than once"),
])
def test_results_schema_errors(doc, message):
    with pytest.raises(evaluation.SchemaError) as e:
        evaluation.parse_results(doc)
    assert message in str(e.value)


@pytest.mark.parametrize("doc, message", [
    ({"results": []}, "missing key(s) ['queries']"),
    ({"queries": [{"query": "q", "positives": ["a"]}]}, "queries[0]: missing key(s) ['junk']"),
    ({"queries": [{"query": "q", "positives": "a", "junk": []}]}, "queries[0].positives: expected a list"),
    ({"queries": [{"query": "q", "positives": [1], "junk": []}]}, "queries[0].positives[0]: expected a string"),
    ({"queries": [{"query": "q", "positives": ["a"], "junk": ["a"]}]}, "both positive and junk"),
    ({"queries": [{"query": "q", "positives": [], "junk": [], "label": 3}]}, "unknown key(s) ['label']"),
    ({"queries": [{"query": "q", "positives": [], "junk": []}] * 2}, "appears more than once"),
])
def test_ground_truth_schema_errors(doc, message):
    with pytest.raises(evaluation.SchemaError) as e:
        evaluation.parse_ground_truth(doc)
    assert message in str(e.value)


def write_inputs(tmp_path):
    results, gt = tmp_path / "results.json", tmp_path / "gt.json"
    results.write_text(json.dumps(RESULTS))
    gt.write_text(json.dumps(GROUND_TRUTH))
    return str(results), str(gt)


def test_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    results, gt = write_inputs(tmp_path)
    plot, metrics_json = str(tmp_path / "out" / "pr.png"), str(tmp_path / "out" / "metrics.json")
    assert evaluate_cli.run(["--results", results, "--ground-truth", gt, "--plot", plot, "--json", metrics_json]) == 0
    out = capsys.readouterr()
    assert "mAP (%, junk removed, trapezoidal)" in out.out and f"{100 * 47 / 180:.2f}" in out.out
    assert any(line.startswith("GLD micro-AP (%)") and line.endswith(" 33.33") for line in out.out.splitlines())
    assert "ignored (not in ground truth): extra.jpg" in out.err
    metrics = json.loads(open(metrics_json).read())
    assert metrics["map"] == pytest.approx(47 / 180) and metrics["gld_micro_ap"] == pytest.approx(1 / 3)
    assert metrics["gld_curve"]["true_positives"] == [0, 1, 1, 1, 3, 3, 4, 4]
    image = Image.open(plot)
    assert image.format == "PNG" and image.size == (800, 560)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert np.sum(np.all(pixels == (31, 119, 180), axis=1)) > 100  # the curve is drawn


def test_cli_reports_schema_errors(tmp_path, capsys):
    results, gt = write_inputs(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [{"query": "q", "matches": [{"uri": "a"}]}]}))
    assert evaluate_cli.run(["--results", str(bad), "--ground-truth", gt]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "results[0].matches[0]: missing key(s)" in err
    (tmp_path / "broken.json").write_text("{not json")
    assert evaluate_cli.run(["--results", results, "--ground-truth", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert evaluate_cli.run(["--results", str(tmp_path / "absent.json"), "--ground-truth", gt]) == 2


def test_cli_as_a_module(tmp_path):
    results, gt = write_inputs(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--results", results, "--ground-truth", gt],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=True)
    assert f"{100 * 47 / 180:.2f}" in done.stdout


def test_gld_curve_against_brute_force_with_ties():
    """Random rankings with coarse (tied) scores: each point recounted from scratch per threshold."""
    rng = np.random.default_rng(3)
    queries, results = [], []
    for q in range(15):
        positives = [f"img{i}" for i in rng.choice(40, size=int(rng.integers(0, 6)), replace=False)]
        junk = [f"img{i}" for i in range(40, 42)]
        queries.append({"query": f"q{q}", "positives": positives, "junk": junk})
        retrieved = rng.choice(42, size=int(rng.integers(0, 12)), replace=False)
        scores = np.sort(np.round(rng.uniform(0, 1, len(retrieved)), 1))[::-1]
        results.append({"query": f"q{q}", "matches": [match(f"img{i}", float(s)) for i, s in zip(retrieved, scores)]})
    truth = evaluation.parse_ground_truth({"queries": queries})
    parsed_results = evaluation.parse_results({"results": results})
    curve = evaluation.gld_curve(parsed_results, truth)
    pairs = [(m.score, m.uri in truth[q].positives) for q in truth for m in parsed_results[q]
             if m.uri not in truth[q].junk]
    thresholds = sorted({s for s, _ in pairs}, reverse=True)
    np.testing.assert_allclose(curve.thresholds, thresholds)
    expected_tp = [sum(c for s, c in pairs if s >= t) for t in thresholds]
    expected_retrieved = [sum(1 for s, _ in pairs if s >= t) for t in thresholds]
    np.testing.assert_array_equal(curve.true_positives, expected_tp)
    np.testing.assert_array_equal(curve.retrieved, expected_retrieved)
    total = sum(len(q["positives"]) for q in queries)
    expected_ap = sum(tp / r * (tp - previous) for tp, r, previous in
                      zip(expected_tp, expected_retrieved, [0] + expected_tp[:-1])) / total
    assert curve.micro_ap() == pytest.approx(expected_ap)
