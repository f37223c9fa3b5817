"""Our inverted PQ index (IVF-PQ and LOPQ) against faiss IndexIVFPQ and nmslib HNSW on 40-D
L2-normalised descriptors: recall, single-thread speed, bytes per descriptor, build time, peak RSS.

    python benchmarks/ann_vs_faiss.py [--quick] [--datasets real,synthetic] [--features DIR]
        [--synthetic-n N] [--nprobe 8] [--n-cells 8192] [--ef-search 100,200] [--json OUT]

Data sets (built once in a temporary folder as .npy files; see ann_common.py):
  real       DELF descriptors of the landmarks-dev photos (--features, default /tmp/lmdev-features,
             skipped with a note when missing), L2-PCA40-L2 fitted on the database; the queries are
             descriptors of 10 held-out photos (5000 by default), the database every other photo's.
  synthetic  --synthetic-n (default 5M) draws of a mixture of anisotropic Gaussian clusters shaped
             like the real descriptors; 2000 queries are noisy copies of fresh draws.
The ground truth is the exact 100 nearest neighbours (squared L2, brute force).

Methods, all on the same training sample (at most --train-n rows) and database:
  ours-ivfpq   IVF{n_cells},PQ10x5 (delf_retrieval.quantize, search.Searcher): a row for the
               compiled (numba) kernel and one for the numpy reference kernel, same index
  ours-lopq    the same with LOPQ regions (local rotations and codebooks)
  faiss-ivfpq  faiss IndexIVFPQ(IndexFlatL2, 40, n_cells, 10, nbits=5), same n_cells and nprobe
  hnsw         nmslib HNSW on the raw float vectors, l2, M=16, efConstruction=200, post=0, one row
               per efSearch of --ef-search (default 10, 40, 100: from about IVF-PQ's recall up to
               near-exact; nmslib still returns k=100 results below efSearch 100). The PyPI wheel
               of nmslib is built without SSE/AVX (it says so on import), so its speed is a lower bound.
n_cells is --n-cells clamped on small samples the way our library clamps it (at most n_train / 39),
and faiss gets the same number.

Columns: recall@R is faiss's "1-recall@R", the fraction of queries whose true nearest neighbour is
among the first R results (R@1: ranked first; an exact duplicate of it counts as it). q/s is queries
per second on ONE thread (BLAS, OpenMP and numba limited to one; warm-up first; cpu/wall near 1.0
confirms it). RAM B is bytes per stored descriptor held for search (ours: 10 one-byte codes + 8-byte
id as InvertedLists holds them; faiss: code_size + 8-byte id; hnsw: its saved index with vectors / n);
disk B is the saved index / n (ours: the all-in Parquet index of delf_retrieval.index.shards, n/a until it
exists). Build = train + add, using all cores for every library. Each method runs in its own process,
so peak RSS (MB) is its own; the database is streamed from disk in 1M-row chunks.

Goals printed beside the figures (from the index issue): recall@10 of ours >= faiss IVFPQ's; our
single-thread speed >= 0.5x faiss's; all-in storage <= 16 bytes per descriptor.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ann_common as common  # noqa: E402

from delf_retrieval import quantize

DEFAULT_FEATURES = "/tmp/lmdev-features"

# Named methods as plain data: the library that runs them and their fixed options.
METHODS = {
    "ours-ivfpq": {"library": "ours", "lopq": False, "kernels": ["compiled", "numpy"]},
    "ours-lopq": {"library": "ours", "lopq": True, "kernels": ["compiled"]},
    "faiss-ivfpq": {"library": "faiss"},
    "hnsw": {"library": "nmslib", "M": 16, "efConstruction": 200, "post": 0},
}
PQ_M, PQ_BITS = 10, 5
LOPQ_MIN_TRAIN = quantize.IndexParams().min_region_train
GOAL_SPEED_RATIO, GOAL_STORAGE_BYTES = 0.5, 16

# The settings --quick changes (a smoke run of a few minutes); everything else stays.
QUICK = {"synthetic_n": 300_000, "synthetic_queries": 500, "real_queries": 1000, "train_n": 100_000}


# ---------------------------------------------------------------------------------------------
# Workers: one method on one data set, in its own process


def quality(ids, dataset) -> dict:
    """Recall@1/10/100, and per query whether recall@10 found it (for the paired comparison)."""
    gt = dataset.ground_truth()
    return {**common.recall_at(ids, *gt), "found@10": common.nearest_found(ids, *gt, 10).astype(int).tolist()}


def run_ours(dataset, conf, task) -> list[dict]:
    from delf_retrieval.quantize.ivf import Searcher

    params = quantize.IndexParams(n_cells=task["n_cells"], pq_m=PQ_M, pq_bits=PQ_BITS, lopq=conf["lopq"])
    quantizer, encoded, lists, timing = common.build_ours(dataset, params)
    searcher = Searcher(quantizer, lists)
    rows = []
    for kernel in conf["kernels"]:
        ids, speed = common.timed_search(lambda q: searcher.search(q, task["k"], task["nprobe"], kernel=kernel)[1],
                                         dataset.queries())
        rows.append({"spec": quantizer.params.spec, "kernel": kernel, "setting": f"nprobe={task['nprobe']}",
                     **quality(ids, dataset), **speed, "peak_rss_mb": common.peak_rss_mb()})
    disk = common.storage_bytes_per_descriptor(quantizer, encoded, dataset)
    for row in rows:
        row.update(n_cells=quantizer.params.n_cells, regions=quantizer.regions.n_regions,
                   local_models=quantizer.regions.n_models,
                   ram_bytes_per_desc=round(common.lists_bytes(lists) / len(lists), 2),
                   disk_bytes_per_desc=round(disk["all_in"], 2), postings_bytes_per_desc=round(disk["postings"], 2),
                   train_s=round(timing["train_s"], 1), add_s=round(timing["encode_s"] + timing["lists_s"], 1))
    return rows


def run_faiss(dataset, conf, task) -> list[dict]:
    import faiss

    d = dataset.info["dim"]
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, task["n_cells"], PQ_M, PQ_BITS)
    start = time.perf_counter()
    index.train(dataset.train())
    trained = time.perf_counter()
    for _, rows in dataset.database_chunks():
        index.add(rows)
    added = time.perf_counter()
    index.nprobe = task["nprobe"]
    ids, speed = common.timed_search(lambda q: index.search(q, task["k"])[1], dataset.queries())
    peak = common.peak_rss_mb()
    return [{
        "spec": f"IVF{index.nlist},PQ{PQ_M}x{index.pq.nbits}", "setting": f"nprobe={index.nprobe}", "n_cells": index.nlist,
        **quality(ids, dataset), **speed,
        "ram_bytes_per_desc": index.code_size + 8,
        "disk_bytes_per_desc": round(len(faiss.serialize_index(index)) / index.ntotal, 2),
        "train_s": round(trained - start, 1), "add_s": round(added - trained, 1), "peak_rss_mb": peak,
    }]


def run_hnsw(dataset, conf, task) -> list[dict]:
    import nmslib
    import numpy as np

    index = nmslib.init(method="hnsw", space="l2", data_type=nmslib.DataType.DENSE_VECTOR)
    start = time.perf_counter()
    for first, rows in dataset.database_chunks():
        index.addDataPointBatch(rows, np.arange(first, first + len(rows)))
    index.createIndex({"M": conf["M"], "efConstruction": conf["efConstruction"], "post": conf["post"],
                       "indexThreadQty": os.cpu_count()}, print_progress=False)
    built = time.perf_counter()
    k = task["k"]

    def search(queries):
        ids = np.full((len(queries), k), -1, np.int64)
        for row, (found, _) in enumerate(index.knnQueryBatch(queries, k=k, num_threads=1)):
            ids[row, :len(found)] = found
        return ids

    rows = []
    for ef in task["ef_search"]:
        index.setQueryTimeParams({"efSearch": ef})
        ids, speed = common.timed_search(search, dataset.queries())
        rows.append({"spec": f"HNSW{conf['M']},efC{conf['efConstruction']}", "setting": f"efSearch={ef}",
                     **quality(ids, dataset), **speed,
                     "train_s": 0.0, "add_s": round(built - start, 1), "peak_rss_mb": common.peak_rss_mb()})
    with tempfile.TemporaryDirectory(prefix="hnsw-") as folder:
        index.saveIndex(os.path.join(folder, "index"), save_data=True)
        size = common.directory_bytes(folder) / dataset.n_database
    for row in rows:
        row["ram_bytes_per_desc"] = row["disk_bytes_per_desc"] = round(size, 1)
    return rows


RUNNERS = {"ours": run_ours, "faiss": run_faiss, "nmslib": run_hnsw}
LIBRARY_MODULES = {"ours": ["numba", "delf_retrieval.quantize.ivf", "threadpoolctl"], "faiss": ["faiss", "threadpoolctl"],
                   "nmslib": ["nmslib", "threadpoolctl"]}


def worker(task: dict) -> dict:
    dataset = common.Dataset.open(task["dataset"])
    conf = METHODS[task["method"]]
    for module in LIBRARY_MODULES[conf["library"]]:
        importlib.import_module(module)
    base = common.rss_mb()  # interpreter + the method's libraries, before any data
    rows = RUNNERS[conf["library"]](dataset, conf, task)
    for row in rows:
        row.update(dataset=dataset.name, method=task["method"], n_database=dataset.n_database,
                   n_queries=dataset.info["n_queries"], n_train=dataset.info["n_train"],
                   build_s=round(row["train_s"] + row["add_s"], 1), base_rss_mb=base)
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_datasets(args, workdir: str) -> list[common.Dataset]:
    datasets = []
    for name in args.datasets.split(","):
        start = time.perf_counter()
        folder = os.path.join(workdir, name)
        if name == "real":
            if not os.path.isdir(args.features):
                print(f"note: no feature folder {args.features}: the real data set is skipped", flush=True)
                continue
            dataset = common.prepare_real(folder, args.features, n_queries=args.real_queries, train_n=args.train_n)
        elif name == "synthetic":
            dataset = common.prepare_synthetic(folder, args.synthetic_n, n_queries=args.synthetic_queries,
                                               train_n=args.train_n)
        else:
            raise SystemExit(f"unknown data set {name!r}: expected real or synthetic")
        info = dataset.info
        print(f"{name}: {info['n_database']:,} database, {info['n_queries']:,} queries, {info['n_train']:,} "
              f"training rows, {info['dim']}-D; prepared with ground truth in {time.perf_counter() - start:.0f} s",
              flush=True)
        datasets.append(dataset)
    return datasets


HEADER = (f"{'dataset':<10} {'method':<12} {'index':<24} {'setting':<15} {'R@1':>6} {'R@10':>6} {'R@100':>6} "
          f"{'q/s 1thr':>9} {'cpu/wall':>8} {'RAM B':>6} {'disk B':>7} {'build s':>8} {'peak MB':>8}")


def format_row(r: dict) -> str:
    setting = r["setting"] + (f" {r['kernel']}" if r.get("kernel", "compiled") != "compiled" else "")
    return (f"{r['dataset']:<10} {r['method']:<12} {r['spec']:<24} {setting:<15} {r['recall@1']:>6.3f} "
            f"{r['recall@10']:>6.3f} {r['recall@100']:>6.3f} {r['queries_per_s']:>9.1f} {r['cpu_per_wall']:>8.2f} "
            f"{r['ram_bytes_per_desc']:>6.1f} {r['disk_bytes_per_desc']:>7.1f} {r['build_s']:>8.1f} {r['peak_rss_mb']:>8.0f}")


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals for each of our methods against faiss IVFPQ on the same data set."""
    out = []
    faiss_row = next((r for r in rows if r["method"] == "faiss-ivfpq"), None)
    for r in rows:
        if METHODS[r["method"]]["library"] != "ours" or r["kernel"] != "compiled":
            continue
        checks = []
        if faiss_row:
            diff, se = common.paired_difference(r["found@10"], faiss_row["found@10"])
            checks.append({"goal": "recall@10 >= faiss's", "value": r["recall@10"], "target": faiss_row["recall@10"],
                           "note": f"paired difference {diff:+.4f} +- {se:.4f} s.e."})
            checks.append({"goal": f"speed >= {GOAL_SPEED_RATIO}x faiss's",
                           "value": round(r["queries_per_s"] / faiss_row["queries_per_s"], 2), "target": GOAL_SPEED_RATIO})
        checks.append({"goal": f"all-in storage <= {GOAL_STORAGE_BYTES} B/descriptor", "value": r["disk_bytes_per_desc"],
                       "target": GOAL_STORAGE_BYTES, "at_most": True})
        for check in checks:
            at_most = check.pop("at_most", False)
            check["met"] = check["value"] <= check["target"] if at_most else check["value"] >= check["target"]
        out.append({"dataset": r["dataset"], "method": r["method"], "checks": checks})
    return out


def print_goals(results: list[dict]) -> None:
    for g in results:
        parts = [f"{c['goal']}: {c['value']} vs {c['target']} {'met' if c['met'] else 'NOT met'}"
                 + (f" ({c['note']})" if "note" in c else "") for c in g["checks"]]
        print(f"  goals {g['dataset']:<10} {g['method']:<12} " + "; ".join(parts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="real,synthetic")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--features", default=DEFAULT_FEATURES, help="folder of .npz feature files (the real set)")
    parser.add_argument("--synthetic-n", type=int, default=5_000_000)
    parser.add_argument("--synthetic-queries", type=int, default=2000)
    parser.add_argument("--real-queries", type=int, default=5000)
    parser.add_argument("--train-n", type=int, default=500_000, help="training sample cap, the same rows for all")
    parser.add_argument("--n-cells", type=int, default=8192)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--k", type=int, default=common.K_GT)
    parser.add_argument("--ef-search", default="10,40,100",
                        help="HNSW efSearch values, one row each (below k it trades recall for speed)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--workdir", default=None, help="where the data sets are written (default: a temp dir)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--json", default=os.path.join(common.ROOT, "bench_results", "ann_vs_faiss.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        vars(args).update(QUICK)
    from delf_retrieval.quantize.coarse import clamp_cells

    workdir = tempfile.mkdtemp(prefix="ann-bench-", dir=args.workdir)
    rows, goal_results = [], []
    try:
        datasets = prepare_datasets(args, workdir)
        print(HEADER, flush=True)
        for dataset in datasets:
            n_cells = clamp_cells(args.n_cells, dataset.info["n_train"])
            dataset_rows = []
            for method in args.methods.split(","):
                task = {"dataset": dataset.folder, "method": method, "n_cells": n_cells, "nprobe": args.nprobe,
                        "k": args.k, "ef_search": [int(v) for v in args.ef_search.split(",")]}
                for row in common.run_worker(os.path.abspath(__file__), task)["rows"]:
                    if row.get("n_cells", n_cells) != n_cells:
                        print(f"warning: {method} trained {row['n_cells']} cells, faiss got {n_cells}", flush=True)
                    dataset_rows.append(row)
                    print(format_row(row), flush=True)
                    if row.get("local_models") == 0 and METHODS[method].get("lopq"):
                        print(f"note: {method} trained no local model (a cell needs {LOPQ_MIN_TRAIN} training rows, "
                              f"it has ~{dataset.info['n_train'] // n_cells}): here it is plain IVF-PQ", flush=True)
            rows += dataset_rows
            dataset_goals = goals(dataset_rows)
            print_goals(dataset_goals)
            goal_results += dataset_goals
    finally:
        if args.keep_data:
            print(f"data sets kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "json", "workdir", "keep_data")}
    rows = [{k: v for k, v in row.items() if k != "found@10"} for row in rows]
    common.write_json(args.json, {"settings": settings, "methods": METHODS, "rows": rows, "goals": goal_results})


if __name__ == "__main__":
    main()
