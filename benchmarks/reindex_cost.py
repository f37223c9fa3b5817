"""Cost of a nightly re-index against a full rebuild of the same corpus.

    python benchmarks/reindex_cost.py [--quick] [--corpus DIR] [--new-fraction 0.01]

Corpus: ../shared/data/landmarks-dev/images when present, else the bundled samples/ (linked, not
copied, into a scratch folder). Runs, each timed end to end in this process (python -m
pipeline.reindex's ``run``): an initial full build of all but ``--new-fraction`` of the images;
a nightly run after the rest arrive (only they are extracted); a nightly run with no change (the
fixed cost: listing, stat, carrying every posting row into the new version); and a full rebuild
(``--retrain``) of the same corpus. Prints a table and writes bench_results/reindex_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

LANDMARKS_DEV = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "landmarks-dev", "images")
SAMPLES = os.path.join(REPO_ROOT, "samples")
EXTRACTION = ["--scales", "0.5,1.0", "--max-features", "300", "--max-image-size", "640", "--no-progress"]


def images_of(folder: str) -> list[str]:
    from delf_retrieval.images import IMAGE_EXTENSIONS

    return sorted(os.path.relpath(os.path.join(root, n), folder) for root, _, names in os.walk(folder)
                  for n in names if n.lower().endswith(IMAGE_EXTENSIONS))


def link(source: str, target: str, names: list[str]) -> None:
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
        os.symlink(os.path.join(source, name), os.path.join(target, name))


def timed_run(corpus: str, root: str, extra: list[str]) -> dict:
    from delf_retrieval import shards, storage, versions
    from pipeline import reindex

    start = time.time()
    assert reindex.run(["--input", corpus, "--index", root, "--cells", "64"] + EXTRACTION + extra) == 0
    seconds = time.time() - start
    build = shards.read_manifest(root)["build"].split("/")[-1]
    report = json.loads(storage.read_bytes(storage.join(root, versions.REPORTS_DIR, f"{build}.json")))
    return {**{k: report[k] for k in ("mode", "listed", "added", "changed", "deleted", "unchanged", "reused",
                                      "re_extracted", "descriptors")}, "seconds": round(seconds, 1),
            "drift_ratio": report["drift"]["ratio"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="at most 40 images")
    parser.add_argument("--corpus", help="image folder (default: landmarks-dev if present, else samples/)")
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "bench_results", "reindex_cost.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    source = args.corpus or (LANDMARKS_DEV if os.path.isdir(LANDMARKS_DEV) else SAMPLES)
    names = images_of(source)
    limit = args.max_images or (40 if args.quick else None)
    if limit:
        step = max(len(names) // limit, 1)
        names = names[::step][:limit]
    n_new = max(1, round(len(names) * args.new_fraction))
    new = names[len(names) // 2::max(len(names) // n_new, 1)][:n_new]  # spread over the corpus, not one scene
    base = [n for n in names if n not in set(new)]

    scratch = tempfile.mkdtemp(prefix="reindex-cost-")
    try:
        corpus, root = os.path.join(scratch, "corpus"), os.path.join(scratch, "index")
        link(source, corpus, base)
        runs = {"initial full build": timed_run(corpus, root, [])}
        link(source, corpus, new)
        runs[f"nightly, {len(new)} new ({100 * len(new) / len(names):.1f}%)"] = timed_run(corpus, root, [])
        runs["nightly, no change"] = timed_run(corpus, root, [])
        runs["full rebuild (--retrain)"] = timed_run(corpus, root, ["--retrain"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    nightly = runs[next(k for k in runs if k.startswith("nightly, ") and "new" in k)]
    full = runs["full rebuild (--retrain)"]
    header = f"{'run':<28} {'mode':<11} {'images':>6} {'extracted':>9} {'reused':>6} {'descriptors':>11} {'seconds':>8}"
    print(f"corpus: {source} ({len(names)} images), extraction {' '.join(EXTRACTION[:-1])}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(header)
    for name, r in runs.items():
        print(f"{name:<28} {r['mode']:<11} {r['listed']:>6} {r['re_extracted']:>9} {r['reused']:>6} "
              f"{r['descriptors']:>11} {r['seconds']:>8.1f}")
    ratio = nightly["seconds"] / full["seconds"]
    print(f"nightly / full rebuild: {ratio:.2f} of the time ({full['seconds'] / nightly['seconds']:.1f}x faster)")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"corpus": source, "images": len(names), "new": len(new), "extraction": EXTRACTION,
                   "quick": args.quick, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
                   "machine": platform.platform(), "runs": runs, "nightly_over_full": round(ratio, 3)}, f, indent=1)
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
