"""The main job, the batch index build on Apache Beam:

    python -m pipeline.run [--input SRC] [--output INDEX] [options] [Beam pipeline options]

SRC is a local or gs:// folder (searched recursively) or glob of images, or a listing CSV
(``id,url,landmark_id`` as Google-Landmarks ships it, or ``path_or_url,label``); INDEX a local
folder or gs:// prefix, where the build is published as a new version (an existing index is
replaced; ``pipeline.reindex`` updates one instead). Stages: list -> plan -> spread over workers ->
read/fetch -> decode -> batched multi-scale extraction -> encode -> Parquet shards by cell -> tables
-> manifest, last. The encoder's PCA + quantizer are trained on a training sample of images (the
smallest image ids) extracted first, on their own, or come from ``--quantizer DIR``
(``pipeline.build_quantizer``); every other image streams from extraction to its codes. This is the
full (or fixed-quantizer) mode of the one build (``pipeline.build``).

With no arguments it indexes the bundled sample (``samples/``, 42 photographs) offline into
``output/sample-index``. Locally it runs on Beam's portable in-process runner (add
``--direct_running_mode=multi_processing --direct_num_workers=N`` for worker processes);
``--runner DataflowRunner`` with the usual Google Cloud options runs it on Dataflow
(see ``run_dataflow.sh``).
"""

from __future__ import annotations

import argparse
import io
import sys

import pyarrow.parquet as pq

from delf_retrieval import storage
from delf_retrieval.build import planning as plan_lib
from delf_retrieval.index import layout, segments
from pipeline import build, cli

SAMPLE_CORPUS = build.SAMPLE_CORPUS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_arguments(parser, root_default="output/sample-index", input_default=SAMPLE_CORPUS)
    return parser.parse_known_args(argv)


def summary_table(manifest: dict, root: str, seconds: float) -> str:
    """Indexed, rejected by reason, descriptors, shards, bytes, wall time."""

    counts = manifest["counts"]
    rows = [("inputs", counts.get("inputs", "")), ("indexed", counts["images"]), ("rejected", counts["rejected"])]
    dead = manifest["files"].get("dead_letters")
    if dead and dead["rows"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(layout.resolve(root, dead["path"]))))
        reasons: dict = {}
        for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
            reasons[f"{stage}/{reason}"] = reasons.get(f"{stage}/{reason}", 0) + 1
        rows += [(f"  rejected: {r}", n) for r, n in sorted(reasons.items())]
    shard_records = segments.posting_shards(root, manifest)
    if segments.is_segmented(manifest):
        rows.append(("segments", counts["segments"]))
    postings = sum(s["bytes"] for s in shard_records)
    total_bytes = (sum(f["bytes"] for f in manifest["files"].values())
                   + sum(f["bytes"] for f in manifest.get("codebooks", {}).values())
                   + sum(r.size_bytes for r in segments.segment_refs(manifest)) + sum(s["bytes"] for s in manifest.get("shards", [])))
    rows += [("descriptors", counts["descriptors"]), ("shards", len(shard_records)), ("index", manifest["spec"]),
             ("bytes", total_bytes), ("bytes/descriptor", f"{postings / max(counts['descriptors'], 1):.2f} (postings)"),
             ("seconds", f"{seconds:.1f}")]
    width = max(len(str(r[0])) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(argv=None, test_pipeline=None) -> int:
    """The main job; ``test_pipeline`` (a Beam pipeline) lets tests supply their own."""

    args, beam_args = parse_args(argv)
    cli.quiet_tensorflow(args.debug)
    mode = plan_lib.FIXED if args.quantizer else plan_lib.FULL
    report = build.execute(args, beam_args, "pipeline.run", lambda pointer: mode, test_pipeline)
    if report is None:
        return 0
    print(summary_table(layout.read_manifest(args.index), args.index, report["wall_seconds"]))
    print(f"index written to {args.index}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
