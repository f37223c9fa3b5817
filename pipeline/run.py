"""The main job, the batch index build on Apache Beam:

    python -m pipeline.run [--input SRC] [--output INDEX] [options] [Beam pipeline options]

SRC is a local or gs:// folder (searched recursively) or glob of images, or a listing CSV
(``id,url,landmark_id`` as Google-Landmarks ships it, or ``path_or_url,label``); INDEX a local
folder or gs:// prefix. Stages: list -> spread over workers -> read/fetch -> decode -> batched
multi-scale extraction -> encode -> Parquet shards by cell -> tables -> manifest, last. The encoder's
PCA + quantizer are trained on a training sample of images (the smallest image ids) extracted first,
on their own, or come from ``--quantizer DIR`` (``pipeline.build_quantizer``); every other image
streams from extraction to its codes.

With no arguments it indexes the bundled sample (``samples/``, 42 photographs) offline into
``output/sample-index``. Locally it runs on Beam's portable in-process runner (add
``--direct_running_mode=multi_processing --direct_num_workers=N`` for worker processes);
``--runner DataflowRunner`` with the usual Google Cloud options runs it on Dataflow
(see ``run_dataflow.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from pipeline import build_quantizer, cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CORPUS = os.path.join(REPO_ROOT, "samples")
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=SAMPLE_CORPUS, help="folder, glob or listing CSV (default: the bundled sample)")
    parser.add_argument("--output", default="output/sample-index", help="index folder or gs:// prefix (default: %(default)s)")
    parser.add_argument("--label-from-folder", action=argparse.BooleanOptionalAction, default=None,
                        help="label each image with its folder's name (default: on for the bundled sample)")
    parser.add_argument("--quantizer", help="reuse PCA + quantizer from this folder (pipeline.build_quantizer output)")
    parser.add_argument("--num-shards", type=int, help="posting shards (default: one per ~4M descriptors)")
    parser.add_argument("--rows-per-shard", type=int, default=4_000_000)
    parser.add_argument("--batch-size", type=int, default=8, help="images per extraction call (at most)")
    parser.add_argument("--accelerator", help="Beam resource hint for the extraction step on Dataflow, e.g. "
                        "'type:nvidia-tesla-t4;count:1;install-nvidia-driver'")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--wait", action="store_true", help="on a remote runner, wait for the job and print the summary")
    cli.add_debug_argument(parser)
    cli.add_fetch_arguments(parser)
    cli.add_publish_arguments(parser)
    cli.add_model_arguments(parser)
    build_quantizer.add_index_arguments(parser)
    return parser.parse_known_args(argv)


def read_model_files(folder: str) -> dict:
    """PCA + quantizer bytes from a build_quantizer output folder (local or gs://)."""
    import json

    from delf_retrieval import storage

    files = {name: storage.read_bytes(storage.join(folder, f"{name}.npz")) for name in ("pca", "quantizer")}
    report_path = storage.join(folder, "quantizer.json")
    report = json.loads(storage.read_bytes(report_path)) if storage.exists(report_path) else {}
    return {**files, "sample_size": report.get("sample_size", 0), "train_seconds": 0.0}


def build_pipeline(pipeline, args, model_config, extraction_config, expected_token: str | None = None,
                   lock_owner: str | None = None, progress_total: int = 0):
    """Add the index build to ``pipeline`` (so tests can pass their own); returns the manifest PCollection.
    ``expected_token`` is the root pointer's token when the run took the lock: publishing replaces
    only that version (compare-and-swap); ``lock_owner``'s lock is released by the publish step."""
    import apache_beam as beam

    from transforms.extract import DEAD_LETTER, ExtractImages, ListInputs
    from transforms.index import BuildIndex

    label_from_folder = args.label_from_folder
    if label_from_folder is None:
        label_from_folder = os.path.abspath(args.input) == SAMPLE_CORPUS
    training = None if args.quantizer else (args.sample_size, extraction_config.max_features)
    listing = pipeline | "ListInputs" >> ListInputs(args.input, label_from_folder, training_sample=training)
    count = listing["count"]

    def extract(images, label):
        return images | label >> ExtractImages(
            model_config, extraction_config, max_batch_size=args.batch_size, accelerator=args.accelerator,
            fetch=cli.fetch_config_from_args(args), progress_total=progress_total)

    extracted = extract(listing["images"], "ExtractImages")
    inputs = {"features": extracted["features"], "listed": count}
    dead_letters = [listing[DEAD_LETTER], extracted[DEAD_LETTER]]
    if training:  # the training sample is extracted first, on its own: the model depends on it alone
        sample = extract(listing["sample"], "ExtractTrainingSample")
        inputs["sample_features"] = sample["features"]
        dead_letters.append(sample[DEAD_LETTER])
    params = build_quantizer.params_from_args(args)
    inputs[DEAD_LETTER] = dead_letters | "InputDeadLetters" >> beam.Flatten()
    return inputs | "BuildIndex" >> BuildIndex(
        args.output, dataclasses.asdict(params), pca_dim=args.pca_dim, sample_size=args.sample_size,
        model_files=read_model_files(args.quantizer) if args.quantizer else None, rows_per_shard=args.rows_per_shard,
        num_shards=args.num_shards, max_features=extraction_config.max_features,
        model_info={"network": model_config.to_json(), "extraction": extraction_config.to_json(),
                    "preset": args.preset},
        expected_token=expected_token, lock_owner=lock_owner, max_rejected_fraction=args.max_rejected_fraction)


def make_pipeline(beam_args: list[str]):
    """A Beam pipeline for the given options; local runs use the portable FnApiRunner directly,
    which works offline (Beam 2.77's DirectRunner first tries to download the Prism runner)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options), True
    return beam.Pipeline(options=options), False


def job_url(result, beam_args: list[str]) -> str | None:
    """The Dataflow console page of a submitted job."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

    job_id = getattr(result, "job_id", None)
    if not callable(job_id):
        return None
    cloud = PipelineOptions(beam_args).view_as(GoogleCloudOptions)
    return f"https://console.cloud.google.com/dataflow/jobs/{cloud.region}/{job_id()}?project={cloud.project}"


def summary_table(manifest: dict, root: str, seconds: float) -> str:
    """Indexed, rejected by reason, descriptors, shards, bytes, wall time."""
    import io

    import pyarrow.parquet as pq

    from delf_retrieval import shards, storage

    counts = manifest["counts"]
    rows = [("inputs", counts.get("inputs", "")), ("indexed", counts["images"]), ("rejected", counts["rejected"])]
    dead = manifest["files"].get("dead_letters")
    if dead and dead["rows"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(shards.resolve(root, dead["path"]))))
        reasons: dict = {}
        for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
            reasons[f"{stage}/{reason}"] = reasons.get(f"{stage}/{reason}", 0) + 1
        rows += [(f"  rejected: {r}", n) for r, n in sorted(reasons.items())]
    total_bytes = sum(f["bytes"] for f in manifest["files"].values()) + sum(s["bytes"] for s in manifest["shards"])
    rows += [("descriptors", counts["descriptors"]), ("shards", counts["shards"]), ("index", manifest["spec"]),
             ("bytes", total_bytes),
             ("bytes/descriptor", f"{sum(s['bytes'] for s in manifest['shards']) / max(counts['descriptors'], 1):.2f} (postings)"),
             ("seconds", f"{seconds:.1f}")]
    width = max(len(str(r[0])) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(argv=None) -> int:
    args, beam_args = parse_args(argv)
    cli.quiet_tensorflow()
    from delf_retrieval import shards

    from delf_retrieval import versions
    from delf_retrieval.inputs import list_source

    model_config, extraction_config = cli.configs_from_args(args)
    start = time.time()
    pipeline, local = make_pipeline(beam_args)
    if not local:
        args.no_progress = True
    # The same lock as pipeline.reindex: one writer per root at a time; publishing is a
    # compare-and-swap against the version found here, and old versions are pruned under the lock.
    lock = cli.take_lock(args.output, args, local, "pipeline.run")
    try:
        # Locally the source is listed here first (cheap next to extraction): a listing that cannot
        # be parsed stops the run before anything starts, and progress knows its total.
        total = len(list_source(args.input)[0]) if local else 0
        _, token = versions.current(args.output)
        build_pipeline(pipeline, args, model_config, extraction_config, expected_token=token, lock_owner=lock.owner,
                       progress_total=0 if args.no_progress else total)
        result = pipeline.run()
        if not local:
            print(f"job submitted: {job_url(result, beam_args) or 'see the runner log'}")
            print(f"the index is published at {args.output} when the job finishes")
            if not args.wait:
                lock = None  # the job's publish step releases it (or it expires after --lock-ttl)
                return 0
        state = result.wait_until_finish()
        if not local and str(state).split(".")[-1] != "DONE":
            print(f"job ended in state {state}; the previous index (if any) is still the published one",
                  file=sys.stderr)
            return cli.EXIT_FAILED
    finally:
        if lock is not None:
            lock.release()
    manifest = shards.read_manifest(args.output)
    print(summary_table(manifest, args.output, time.time() - start))
    print(f"index written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
