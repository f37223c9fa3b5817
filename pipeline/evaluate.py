"""Score search results against ground truth: ``python -m pipeline.evaluate --results results.json
--ground-truth gt.json [--plot pr.png] [--json metrics.json]``.

Prints mAP (Revisited Oxford protocol: junk removed, trapezoidal AP), mP@1/5/10 and the
Google-Landmarks measure (DELF eq. 4: precision against true positives over all queries, with its
micro-AP); ``--plot`` writes that curve as a PNG, ``--json`` every figure with per-query AP and P@k.
URIs and queries compare by exact string. See ``delf_retrieval.query.evaluation`` for the definitions.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from delf_retrieval import storage
from delf_retrieval.query import evaluation
from pipeline import cli


def read_json(path: str, what: str):
    try:
        return json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as e:
        raise evaluation.SchemaError(f"{what} {path}: not valid JSON: {e}") from None


def main(results_path: str, ground_truth_path: str, plot: str | None = None, json_out: str | None = None,
         ks=evaluation.DEFAULT_KS) -> dict:
    """Evaluate, write the optional PNG and JSON, and return the metrics dict."""
    try:
        results = evaluation.parse_results(read_json(results_path, "results"))
    except evaluation.SchemaError as e:
        raise evaluation.SchemaError(f"{results_path}: {e}") from None
    try:
        truth = evaluation.parse_ground_truth(read_json(ground_truth_path, "ground truth"))
    except evaluation.SchemaError as e:
        raise evaluation.SchemaError(f"{ground_truth_path}: {e}") from None
    metrics = evaluation.evaluate(results, truth, ks)
    metrics["results_file"], metrics["ground_truth_file"] = results_path, ground_truth_path
    if plot:
        curve = evaluation.gld_curve(results, truth)
        image = evaluation.plot_gld_curve(curve, f"Google-Landmarks measure: micro-AP {metrics['gld_micro_ap']:.4f}, "
                                               f"{metrics['queries']} queries")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        storage.write_bytes(plot, buffer.getvalue())
    if json_out:
        storage.write_bytes(json_out, json.dumps(metrics, indent=2).encode())
    return metrics


def table(metrics: dict, ks=evaluation.DEFAULT_KS) -> str:
    def fmt(v):
        return "n/a (no query has positives)" if v is None else f"{100 * v:.2f}"

    rows = [("queries", metrics["queries"]),
            ("  with positives", metrics["queries_with_positives"]),
            ("  distractor (no positives)", metrics["distractor_queries"]),
            ("  missing from results (empty rankings)", len(metrics["queries_missing_from_results"])),
            ("results ignored (query not in ground truth)", len(metrics["ignored_results"])),
            ("mAP (%, junk removed, trapezoidal)", fmt(metrics["map"]))]
    rows += [(f"mP@{k} (%)", fmt(metrics[f"mp@{k}"])) for k in ks]
    rows += [("GLD micro-AP (%)", f"{100 * metrics['gld_micro_ap']:.2f}"),
             ("GLD true positives / retrieved / all positives",
              f"{metrics['gld_true_positives']} / {metrics['gld_retrieved']} / {metrics['gld_total_positives']}"),
             ("GLD true positives at precision >= 0.9", metrics["gld_tp@precision>=0.9"]),
             ("GLD true positives at precision >= 0.99", metrics["gld_tp@precision>=0.99"])]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="results.json written by the search")
    parser.add_argument("--ground-truth", required=True, help="gt.json: queries with positives and junk")
    parser.add_argument("--plot", help="write the precision-vs-true-positives curve here (PNG)")
    parser.add_argument("--json", help="write all metrics here (JSON)")
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    try:
        metrics = main(args.results, args.ground_truth, args.plot, args.json)
    except (evaluation.SchemaError, FileNotFoundError) as e:
        print(f"python -m pipeline.evaluate: error: {e}", file=sys.stderr)
        return cli.EXIT_USAGE
    print(table(metrics))
    for query in metrics["ignored_results"][:10]:
        print(f"ignored (not in ground truth): {query}", file=sys.stderr)
    if len(metrics["ignored_results"]) > 10:
        print(f"... and {len(metrics['ignored_results']) - 10} more ignored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
