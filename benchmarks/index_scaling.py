"""Build and search cost of our index as the database grows (1e5, 1e6, 1e7 synthetic descriptors by
default), and a fitted extrapolation to 1e9 descriptors for the README.

    python benchmarks/index_scaling.py [--sizes 1e5,1e6,1e7] [--train-n 500000] [--queries 200]
        [--n-cells 8192] [--nprobe 8] [--lopq] [--quick] [--extrapolate-to 1e9] [--json OUT]

The synthetic descriptors (ann_common.SyntheticDescriptors, 40-D, shaped like L2-PCA40-L2 DELF
descriptors) are generated once for the largest size, chunk by chunk; a smaller size is a prefix
of the same database. Each size runs in its own process (peak RSS is its own): train on an
independent sample of min(--train-n, n) rows (n_cells clamped to n_train / 39 as the library does),
encode the database in 1M-row chunks, group it into InvertedLists, then search --queries queries on
ONE thread (nprobe 8, k 100, warm-up first) and measure recall against the exact 100 nearest
neighbours among those n rows (faiss's 1-recall@R: the true nearest neighbour among the first R).
Training and encoding use all cores.

Columns: train s; encode s and descriptors/s; lists s (InvertedLists.build); q/s on one thread;
probe us (the coarse-cell probe alone, per query); scanned (codes the scan visits per query); cell us
and codes/cell (what one more probed cell costs and holds, from a second search at --nprobe-scan);
R@10; lists MB (codes + ids + offsets held in memory) and bytes per descriptor; peak RSS.

Extrapolation model (printed with its constants):
  train   constant once the sample is capped (same sample size and cells): the largest size's time
  encode  linear in n: n / (descriptors/s of the largest size)
  lists   linear in n (a sort, n log n: linear is optimistic by a few per cent per decade)
  memory  lists: measured bytes per descriptor x n. Peak RSS: a line a + b n through the sizes
          trained on the largest size's sample (training memory is then the same); below 1M rows
          (one encode chunk) the chunk's temporaries grow with n too and steepen the line
  search  per query = c_probe x n_cells (the probe: one product with the centroids)
                    + c_fixed (output, call overhead) + c_table x nprobe (distance tables)
                    + c_scan x codes scanned, codes scanned = s x nprobe x n / n_cells,
          s = measured / uniform (big cells are probed more often). c_table and c_scan: a line
          through the sizes' (codes per cell, cost of a probed cell); the rest from the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ann_common as common  # noqa: E402

QUICK = {"sizes": "1e5,3e5", "train_n": 100_000, "queries": 100}
CELL_COUNTS_AT_SCALE = (8192, 65536, 262144)  # n_cells the extrapolation is printed for


def worker(task: dict) -> dict:
    from delf_retrieval import quantize
    from delf_retrieval.quantize.ivf import Searcher

    dataset = common.Dataset.open(task["dataset"])
    n, k, nprobe, wide = task["n"], task["k"], task["nprobe"], task["nprobe_scan"]
    params = quantize.IndexParams(n_cells=task["n_cells"], lopq=task["lopq"])
    quantizer, _, lists, timing = common.build_ours(dataset, params, stop=n)
    queries = dataset.queries()
    searcher = Searcher(quantizer, lists)
    ids, speed = common.timed_search(lambda q: searcher.search(q, k, nprobe)[1], queries)
    cells, probe = common.timed_search(lambda q: quantizer.coarse.probe(q, nprobe)[0], queries)
    wide_cells, _ = quantizer.coarse.probe(queries, wide)
    _, wide_speed = common.timed_search(lambda q: searcher.search(q, k, wide)[1], queries)
    peak = common.peak_rss_mb()
    scanned, wide_scanned = scanned_codes(searcher, cells).mean(), scanned_codes(searcher, wide_cells).mean()
    extra_s = (1.0 / wide_speed["queries_per_s"] - 1.0 / speed["queries_per_s"]) / (wide - nprobe)
    return {
        "n": n, "spec": quantizer.params.spec, "n_cells": quantizer.params.n_cells, "n_train": timing["n_train"],
        "nprobe": nprobe, "k": k, "n_queries": len(queries),
        "train_s": round(timing["train_s"], 2), "encode_s": round(timing["encode_s"], 2),
        "encode_per_s": round(n / timing["encode_s"]), "lists_s": round(timing["lists_s"], 2),
        **speed, "probe_us": round(1e6 * probe["search_s"] / len(queries), 2),
        "scanned_per_query": round(float(scanned), 1),
        "cell_us": round(1e6 * extra_s, 3), "codes_per_cell": round(float(wide_scanned - scanned) / (wide - nprobe), 1),
        "nprobe_scan": wide,
        **common.recall_at(ids, *dataset.ground_truth(suffix=f"_{n}"), ranks=(1, 10, 100)),
        "lists_bytes": common.lists_bytes(lists), "lists_bytes_per_desc": round(common.lists_bytes(lists) / n, 2),
        "peak_rss_mb": peak,
    }


def scanned_codes(searcher, probe_cells: np.ndarray) -> np.ndarray:
    """Codes the ADC scan visits per query: the rows of all regions of the probed cells."""
    rows_per_cell = np.diff(searcher.lists.offsets[searcher.cell_regions])
    return rows_per_cell[probe_cells].sum(axis=1)


def extrapolate(rows: list[dict], target: int, nprobe: int) -> dict:
    """The module docstring's model, its constants from the measured sizes, evaluated at ``target``."""
    big = max(rows, key=lambda r: r["n"])
    same_sample = [r for r in rows if r["n_train"] == big["n_train"]]
    if len(same_sample) > 1:
        per_desc_mb, intercept_mb = np.polyfit([r["n"] for r in same_sample], [r["peak_rss_mb"] for r in same_sample], 1)
    else:  # one point: the lists' own bytes as the slope
        per_desc_mb = big["lists_bytes_per_desc"] / 2**20
        intercept_mb = big["peak_rss_mb"] - per_desc_mb * big["n"]
    c_table, c_scan = fit_cell_cost(rows)
    probe_s = big["probe_us"] / 1e6
    model = {
        "train_s": big["train_s"], "encode_per_s": big["encode_per_s"], "lists_s_per_desc": big["lists_s"] / big["n"],
        "lists_bytes_per_desc": big["lists_bytes_per_desc"],
        "peak_rss_mb": {"intercept": round(float(intercept_mb), 1), "per_million": round(float(per_desc_mb) * 1e6, 2),
                        "sizes": [r["n"] for r in same_sample]},
        "c_probe_s_per_cell": probe_s / big["n_cells"], "c_table_s": c_table, "c_scan_s_per_code": c_scan,
        "c_fixed_s": max(0.0, 1.0 / big["queries_per_s"] - probe_s - nprobe * c_table - c_scan * big["scanned_per_query"]),
        "scan_imbalance": big["scanned_per_query"] / (nprobe * big["n"] / big["n_cells"]),
        "fitted_on": {"n": big["n"], "n_cells": big["n_cells"], "nprobe": nprobe},
    }
    at_target = {
        "n": target, "train_s": model["train_s"], "encode_s": target / model["encode_per_s"],
        "lists_s": target * model["lists_s_per_desc"], "lists_gb": target * model["lists_bytes_per_desc"] / 1e9,
        "peak_rss_gb_one_process": (intercept_mb + per_desc_mb * target) / 1024,
        "search": [search_at(model, target, n_cells, nprobe) for n_cells in CELL_COUNTS_AT_SCALE],
    }
    return {"model": model, "at_target": at_target}


def fit_cell_cost(rows: list[dict]) -> tuple[float, float]:
    """(seconds per probed cell, seconds per code scanned) from each size's marginal cost of one more
    probed cell against the codes such a cell holds: a least-squares line over the sizes (all of
    it per code when there is one size, or the line comes out negative)."""
    codes = np.array([r["codes_per_cell"] for r in rows], np.float64)
    seconds = np.array([r["cell_us"] / 1e6 for r in rows], np.float64)
    if len(rows) > 1 and np.ptp(codes) > 0:
        per_code, per_cell = np.polyfit(codes, seconds, 1)
        if per_code > 0 and per_cell >= 0:
            return float(per_cell), float(per_code)
    big = int(np.argmax(codes))
    return 0.0, float(max(seconds[big], 0.0) / max(codes[big], 1.0))


def search_at(model: dict, n: int, n_cells: int, nprobe: int) -> dict:
    scanned = model["scan_imbalance"] * nprobe * n / n_cells
    seconds = (model["c_probe_s_per_cell"] * n_cells + model["c_fixed_s"] + nprobe * model["c_table_s"]
               + model["c_scan_s_per_code"] * scanned)
    return {"n_cells": n_cells, "scanned_per_query": round(scanned), "ms_per_query": round(1000 * seconds, 2),
            "queries_per_s": round(1 / seconds, 2)}


HEADER = (f"{'n':>11} {'index':<16} {'train s':>8} {'encode s':>9} {'desc/s':>8} {'lists s':>8} {'q/s 1thr':>9} "
          f"{'probe us':>9} {'scanned':>8} {'cell us':>8} {'codes/cell':>10} {'R@10':>6} {'lists MB':>9} "
          f"{'B/desc':>7} {'peak MB':>8}")


def format_row(r: dict) -> str:
    return (f"{r['n']:>11,} {r['spec']:<16} {r['train_s']:>8.1f} {r['encode_s']:>9.1f} {r['encode_per_s']:>8,} "
            f"{r['lists_s']:>8.2f} {r['queries_per_s']:>9.1f} {r['probe_us']:>9.1f} {r['scanned_per_query']:>8,.0f} "
            f"{r['cell_us']:>8.2f} {r['codes_per_cell']:>10,.0f} {r['recall@10']:>6.3f} {r['lists_bytes'] / 2**20:>9.1f} "
            f"{r['lists_bytes_per_desc']:>7.2f} {r['peak_rss_mb']:>8.0f}")


def print_extrapolation(fit: dict, nprobe: int) -> None:
    m, t = fit["model"], fit["at_target"]
    rss = m["peak_rss_mb"]
    print(f"\nExtrapolation to {t['n']:.0e} descriptors (constants from n={m['fitted_on']['n']:,}, "
          f"{m['fitted_on']['n_cells']} cells, on this machine):")
    print(f"  train    {t['train_s']:8.0f} s      constant: the sample is capped")
    print(f"  encode   {t['encode_s'] / 3600:8.1f} h      n / {m['encode_per_s']:,} descriptors/s (one process, all its cores)")
    print(f"  lists    {t['lists_s'] / 60:8.1f} min    n x {m['lists_s_per_desc'] * 1e9:.0f} ns")
    print(f"  memory   {t['lists_gb']:8.1f} GB     in-memory lists at {m['lists_bytes_per_desc']} B/descriptor; one process "
          f"building it all would peak at {t['peak_rss_gb_one_process']:.0f} GB ({rss['intercept']:.0f} MB + "
          f"{rss['per_million']:.1f} MB per million, line through n = {', '.join(f'{n:.0e}' for n in rss['sizes'])})")
    print(f"  search   per query = {m['c_probe_s_per_cell'] * 1e9:.1f} ns x n_cells + {m['c_fixed_s'] * 1e6:.1f} us + "
          f"{m['c_table_s'] * 1e6:.2f} us x nprobe + {m['c_scan_s_per_code'] * 1e9:.2f} ns x codes scanned; "
          f"scanned = {m['scan_imbalance']:.2f} x nprobe x n / n_cells")
    for s in t["search"]:
        print(f"           n_cells {s['n_cells']:>7,}, nprobe {nprobe}: {s['scanned_per_query']:>10,} codes scanned, "
              f"{s['ms_per_query']:>8.2f} ms/query, {s['queries_per_s']:>8.1f} queries/s on one thread "
              f"({s['ms_per_query'] * common.FEATURES_PER_IMAGE / 1000:.1f} s per image of "
              f"{common.FEATURES_PER_IMAGE} descriptors)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="database sizes, comma-separated")
    parser.add_argument("--train-n", type=int, default=500_000, help="training sample cap")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--n-cells", type=int, default=8192)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--nprobe-scan", type=int, default=128,
                        help="a wide probe that scans many codes: the scan cost per code is measured against it")
    parser.add_argument("--k", type=int, default=common.K_GT)
    parser.add_argument("--lopq", action="store_true", help="the LOPQ variant (default: plain IVF-PQ)")
    parser.add_argument("--extrapolate-to", type=float, default=1e9)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--workdir", default=None, help="where the data set is written (default: a temp dir)")
    parser.add_argument("--json", default=os.path.join(common.ROOT, "bench_results", "index_scaling.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        vars(args).update(QUICK)
    sizes = sorted(int(float(s)) for s in args.sizes.split(","))
    workdir = tempfile.mkdtemp(prefix="index-scaling-", dir=args.workdir)
    rows = []
    try:
        start = time.perf_counter()
        dataset = common.prepare_synthetic(workdir, sizes[-1], n_queries=args.queries, train_n=args.train_n,
                                           ground_truth=False)
        for n in sizes:
            common.write_ground_truth(dataset, stop=n, suffix=f"_{n}")
        print(f"synthetic: {sizes[-1]:,} database rows, {args.queries} queries, training sample "
              f"{dataset.info['n_train']:,}; generated with ground truth in {time.perf_counter() - start:.0f} s", flush=True)
        print(HEADER, flush=True)
        for n in sizes:
            task = {"dataset": workdir, "n": n, "n_cells": args.n_cells, "nprobe": args.nprobe,
                    "nprobe_scan": args.nprobe_scan, "k": args.k, "lopq": args.lopq}
            rows.append(common.run_worker(os.path.abspath(__file__), task))
            print(format_row(rows[-1]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    fit = extrapolate(rows, int(args.extrapolate_to), args.nprobe)
    print_extrapolation(fit, args.nprobe)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "json", "workdir")}
    common.write_json(args.json, {"settings": settings, "rows": rows, "extrapolation": fit})


if __name__ == "__main__":
    main()
