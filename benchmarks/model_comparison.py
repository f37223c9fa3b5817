"""Networks compared on the same queries under today's retrieval defaults, paired per query:

    python benchmarks/model_comparison.py [--sets dev,train-heldout,hard] [--base lite] --models DIR[,DIR...]

``--base`` is a preset (its shipped model) or a model folder; each of ``--models`` is a model
folder (``pipeline.train`` output or a head-only folder), extracted with the lite preset's pyramid
and feature budget. Per set, each network's features, index, searches and neighbour edges come from
``retrieval_quality.prepare`` (the same caches under bench_results/cache/, so a network measured
there is not searched again); the searches are then ranked as ``RetrievalConfig`` and
``NeighbourConfig`` default (today: votes, the neighbour table and verified expansion), as
``retrieval_quality.py`` scores its default setting. Printed per set and protocol (hard: both, its
hard protocol decides): each network's mAP, and per model the mean per-query AP difference from the
base with its standard error and the queries up / down. The project's rule for shipping a model:
no set loses more than ``--max-loss`` (one mAP point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import retrieval_quality as quality  # noqa: E402  (benchmarks/ is on the path)
import retrieval_sweep as sweep  # noqa: E402


def compare_set(set_name: str, args, networks: list[str], cache: str) -> dict:
    """{network: {protocol: AP per query}} of one set under the default setting."""
    from delf_retrieval.query.retrieval import RetrievalConfig

    root, rows, database, queries = quality.evaluation_set(set_name, args)
    config = RetrievalConfig(top=len(database), expand=0)  # as retrieval_quality: expansion re-applied offline
    default = quality.default_setting()
    out = {}
    for network in networks:
        data = quality.prepare(set_name, root, rows, database, queries, network, cache, config)
        scores = quality.score_settings(data, [default], config.min_inliers)[default]
        out[network] = {protocol: ap for protocol, (ap, _) in scores.items()}
        print(f"{set_name}: {data['preset']}: {data['descriptors']} descriptors, "
              f"{len(queries)} queries", flush=True)
    return out


def table(results: dict, networks: list[str], max_loss: float) -> tuple[str, dict]:
    """The markdown table (mAP in points; difference from the base, SE, queries up / down) and,
    per model, whether it loses more than ``max_loss`` on a deciding protocol."""
    base, models = networks[0], networks[1:]
    lines = ["| set (protocol) | queries | " + " | ".join(["base", *[f"model {i + 1}" for i in range(len(models))]])
             + " | " + " | ".join(f"model {i + 1} - base (SE), up / down" for i in range(len(models))) + " |",
             "|---" * (2 + 2 * len(models) + 1) + "|"]
    verdict = {m: {"worst_loss": 0.0, "deciding": {}} for m in models}
    for set_name, by_network in results.items():
        for protocol, base_ap in by_network[base].items():
            deciding = protocol == quality.DECIDING[set_name]
            cells, diffs = [f"{100 * base_ap.mean():.1f}"], []
            for m in models:
                ap = by_network[m][protocol]
                mean, se = sweep.paired(ap, base_ap)
                up, down = int(np.sum(ap > base_ap + 1e-9)), int(np.sum(ap < base_ap - 1e-9))
                cells.append(f"{100 * ap.mean():.1f}")
                diffs.append(f"{100 * mean:+.1f} ({100 * se:.1f}), {up} / {down}")
                if deciding:
                    verdict[m]["deciding"][set_name] = {"diff": mean, "se": se, "up": up, "down": down}
                    verdict[m]["worst_loss"] = max(verdict[m]["worst_loss"], -mean)
            name = f"{set_name} ({protocol})" if len(by_network[base]) > 1 else set_name
            lines.append(f"| {'**' + name + '**' if deciding and len(by_network[base]) > 1 else name} | "
                         f"{len(base_ap)} | " + " | ".join(cells + diffs) + " |")
    for m in models:
        verdict[m]["within_rule"] = verdict[m]["worst_loss"] <= max_loss + 1e-12
    return "\n".join(lines), verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="dev,train-heldout,hard")
    parser.add_argument("--base", default="lite", help="a preset (its shipped model) or a model folder")
    parser.add_argument("--models", required=True, help="model folders compared with the base, comma-separated")
    parser.add_argument("--data", default=quality.LANDMARKS_DEV, help="landmarks-dev")
    parser.add_argument("--train-data", default=quality.LANDMARKS_TRAIN, help="landmarks-train")
    parser.add_argument("--hard-data", default=quality.LANDMARKS_HARD, help="landmarks-hard")
    parser.add_argument("--train-queries", type=int, default=5, help="as retrieval_quality.py")
    parser.add_argument("--train-database", type=int, default=40, help="as retrieval_quality.py")
    parser.add_argument("--quick", action="store_true", help="as retrieval_quality.py")
    parser.add_argument("--max-loss", type=float, default=0.01, help="the rule: mAP lost on any set (default: one point)")
    parser.add_argument("--json", default=os.path.join(quality.RESULTS, "model_comparison.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    networks = [args.base] + [m for m in args.models.split(",") if m]
    missing = [m for m in networks[1:] if not os.path.isdir(m)]
    if missing:
        print(f"not a model folder: {', '.join(missing)}", file=sys.stderr)
        return 1
    cache = os.path.join(quality.RESULTS, "cache")
    os.makedirs(cache, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_at_start": os.getloadavg(),
              "command": sys.argv, "networks": networks, "setting": quality.default_setting().label()}
    results = {}
    for set_name in args.sets.split(","):
        results[set_name] = compare_set(set_name, args, networks, cache)
    text, verdict = table(results, networks, args.max_loss)
    print(f"\nbase: {networks[0]}; " + "; ".join(f"model {i + 1}: {m}" for i, m in enumerate(networks[1:]))
          + f"; setting: {report['setting']}; mAP in points\n\n{text}\n")
    for i, m in enumerate(networks[1:]):
        v = verdict[m]
        print(f"model {i + 1}: worst loss on a deciding protocol {100 * v['worst_loss']:.1f} points: "
              + ("within" if v["within_rule"] else "beyond") + f" the rule ({100 * args.max_loss:g})")
    report.update({"finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_at_end": os.getloadavg(),
                   "table": text, "verdict": verdict,
                   "ap_per_query": {s: {n: {p: ap.tolist() for p, ap in by.items()} for n, by in r.items()}
                                    for s, r in results.items()}})
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
