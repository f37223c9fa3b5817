"""The production Dataflow jobs translated offline (tests/dataflow_jobs.py, as the tests do it), each
printed as its fused stages: the steps of each stage, the resource hint of its environment, and the
shuffles and side inputs it waits for; then the seconds each translation took.

    python benchmarks/dataflow_stages.py [--json OUT]

Stages are those a runner can form from the job's proto (tests/job_graph.py: cut at GroupByKeys, at a
change of environment and at side inputs computed in the stage); Dataflow fuses on its side, by its
own rules, which no offline check can run (docs/dataflow.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import dataflow_jobs  # noqa: E402
from tests.conftest import emulated_gcs  # noqa: E402
from tests.job_graph import ACCELERATOR, GROUP_BY_KEY, JobGraph  # noqa: E402

OUR_COMPOSITES = ("ExtractImages", "ExtractTrainingSample", "Extract")


def short(label: str) -> str:
    """A step's name under the job's root: the first level, or two inside an extraction."""
    parts = label.split("/")[1:]
    return "/".join(parts[:2]) if parts[0] in OUR_COMPOSITES and len(parts) > 2 else parts[0]


def unique(names):
    return list(dict.fromkeys(names))


def stage_table(graph: JobGraph) -> list[dict]:
    """One record per fused stage, in the order of the job: steps, hint, what it waits for."""
    order = {tid: i for i, tid in enumerate(graph.order())}
    stages = []
    for stage in sorted(graph.stages(), key=lambda s: min(order[t] for t in s)):
        steps = sorted(stage, key=order.get)
        after = unique(short(graph.label(graph.producer[p])) for t in steps for p in graph.main_inputs[t]
                       if p in graph.producer and graph.leaves[graph.producer[p]].spec.urn == GROUP_BY_KEY)
        sides = unique(short(graph.label(graph.producer[p])) for t in steps for p in graph.side_inputs[t])
        stages.append({"steps": unique(short(graph.label(t)) for t in steps),
                       "accelerator": graph.hints(steps[0]).get(ACCELERATOR), "after_shuffle": after,
                       "side_inputs": sides})
    return stages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "dataflow_stages.json"))
    args = parser.parse_args(argv)
    from gcp_storage_emulator import server

    os.environ.setdefault("DELF_CACHE_DIR", tempfile.mkdtemp(prefix="delf-cache-"))
    started = time.time()
    with emulated_gcs(server) as gcs:
        jobs = dataflow_jobs.translate_all(f"{gcs}/dataflow-stages")
    total = time.time() - started
    report = {"load_average": os.getloadavg(), "seconds_total": round(total, 1), "jobs": {}}
    for name, job in jobs.items():
        graph = job.graph
        stages = stage_table(graph)
        report["jobs"][name] = {"seconds": job.seconds, "steps": len(graph.leaves), "stages": stages}
        print(f"\n{name}: {len(graph.leaves)} steps, {len(stages)} fused stages, translated in {job.seconds:.1f} s")
        for i, stage in enumerate(stages, 1):
            hint = "GPU" if stage["accelerator"] else "-"
            waits = [f"after {s}" for s in stage["after_shuffle"]] + [f"side input {s}" for s in stage["side_inputs"]]
            print(f"  {i:2d} {hint:3s} {', '.join(stage['steps'])}" + (f"   [{'; '.join(waits)}]" if waits else ""))
    hints = {s["accelerator"] for j in report["jobs"].values() for s in j["stages"] if s["accelerator"]}
    print(f"\naccelerator hint: {', '.join(sorted(hints))}")
    print(f"all jobs, with the local build of the index they start from: {total:.1f} s "
          f"(load average {os.getloadavg()[0]:.2f})")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
