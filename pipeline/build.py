"""The one index build's driver, which ``pipeline.run`` and ``pipeline.reindex`` are thin over: its
flags, the lock, the listing and the plan (``delf_retrieval.build.planning``), the Beam graph
(``transforms.index.BuildIndex``), submitting and waiting, and the run's report."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

from delf_retrieval import storage
from delf_retrieval.build import encode
from delf_retrieval.build import planning as plan_lib
from delf_retrieval.build.planning import BuildConfig
from delf_retrieval.corpus import inputs
from delf_retrieval.extraction.extractor import ExtractionConfig
from delf_retrieval.first_stage import search as first_stage
from delf_retrieval.index import layout, segments, versions
from delf_retrieval.index.neighbour_table import NeighbourConfig
from delf_retrieval.model import delf
from pipeline import build_quantizer, cli
from transforms.extract import ExtractImages
from transforms.index import BuildIndex

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CORPUS = os.path.join(REPO_ROOT, "samples")
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner")


def spellings(parser: argparse.ArgumentParser):
    """``add_argument`` that also accepts a Flex Template's underscore spelling of each flag (the
    template launcher passes ``--num_shards=4``)."""

    def add(name, *aliases, **kwargs):
        names = [name, *aliases]
        names += ["--" + n[2:].replace("-", "_") for n in names if "-" in n[2:]]
        kwargs.setdefault("dest", name[2:].replace("-", "_"))
        return parser.add_argument(*names, **kwargs)

    return add


def add_arguments(parser: argparse.ArgumentParser, root_default: str | None, input_default: str | None) -> None:
    """The flags of every build: source, index root, how the model is made, shards, extraction,
    reading, the lock and the publish guard, retention and the report."""
    add = spellings(parser)
    add("--input", default=input_default,
        help="folder (searched recursively), glob or listing CSV of the images, local or gs://"
             + (" (default: the bundled sample)" if input_default else ""))
    add("--index", "--output", dest="index", default=root_default, required=root_default is None,
        help="index root: local folder or gs:// prefix" + (" (default: %(default)s)" if root_default else ""))
    add("--label-from-folder", nargs="?", const=True, default=None, type=cli.flag,
        help="label each image with its folder's name (default: on for the bundled sample)")
    add("--quantizer", help="encode with the PCA + quantizer in this folder (pipeline.build_quantizer output) "
                            "instead of training them: a fixed-quantizer build")
    add("--num-shards", type=int, help="posting shards (default: one per ~--rows-per-shard descriptors)")
    add("--rows-per-shard", type=int, default=4_000_000)
    add("--batch-size", type=int, default=8, help="images per extraction call (at most)")
    add("--accelerator", help="Beam accelerator hint (Dataflow's right fitting) of the steps from reading an image to "
                              "its codes, e.g. 'type:nvidia-tesla-t4;count:1;machine_type:n1-standard-8;"
                              "install-nvidia-driver' (run_dataflow.sh passes it)")

    neighbours = NeighbourConfig()
    add("--verified-neighbours", type=int, default=neighbours.k,
        help="keep each image's verified neighbours (at most this many) for query expansion, which "
             "pipeline.search and pipeline.serve use by default; 0: no neighbour table (default %(default)s). "
             "Incremental runs keep the index's own setting; one over an index without a table adds it")
    add("--verified-min-inliers", type=int, default=neighbours.min_inliers,
        help="RANSAC inliers a verified neighbour needs (default %(default)s)")
    add("--keep", type=int, default=2, help="old versions kept besides the current one (default %(default)s)")
    add("--report", help="also write the run report JSON here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--wait", action="store_true", help="on a remote runner, wait for the job and print its result")
    cli.add_debug_argument(parser)
    cli.add_fetch_arguments(parser)
    cli.add_publish_arguments(parser, add=add)
    cli.add_model_arguments(parser)
    build_quantizer.add_index_arguments(parser)


def config_from_args(args: argparse.Namespace, params=None):
    """The ``BuildConfig`` of the flags (``params``: the index parameters, when they are the current
    version's rather than the flags')."""

    return BuildConfig(index=params or build_quantizer.params_from_args(args), pca_dim=args.pca_dim,
                       sample_size=args.sample_size, rows_per_shard=args.rows_per_shard, num_shards=args.num_shards)


def read_model_folder(folder: str):
    """The ``TrainedModel`` in a build_quantizer output folder (local or gs://)."""

    files = {name: storage.read_bytes(storage.join(folder, f"{name}.npz")) for name in ("pca", "quantizer")}
    report_path = storage.join(folder, "quantizer.json")
    report = json.loads(storage.read_bytes(report_path)) if storage.exists(report_path) else {}
    return encode.TrainedModel(files["pca"], files["quantizer"], int(report.get("sample_size", 0)))


def make_pipeline(beam_args: list[str]):
    """A Beam pipeline for the given options; local runs use the portable FnApiRunner directly,
    which works offline (Beam 2.77's DirectRunner first tries to download the Prism runner)."""
    import apache_beam as beam  # heavy: imported on first use
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # heavy: imported on first use

    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # heavy: imported on first use

        return beam.Pipeline(runner=FnApiRunner(), options=options), True
    return beam.Pipeline(options=options), False


def job_url(result, beam_args: list[str]) -> str | None:
    """The Dataflow console page of a submitted job."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions  # heavy: imported on first use

    job_id = getattr(result, "job_id", None)
    if not callable(job_id):
        return None
    cloud = PipelineOptions(beam_args).view_as(GoogleCloudOptions)
    return f"https://console.cloud.google.com/dataflow/jobs/{cloud.region}/{job_id()}?project={cloud.project}"


def add_build(pipeline, args: argparse.Namespace, mode: str, pointer: dict | None, token: str | None,
              lock_owner: str | None, local: bool, started: float, build_id: str):
    """Plan the build of ``mode`` and add its graph to ``pipeline``; returns the ``BuildJob``. The
    plan is written into the new version's folder (``builds/<build_id>``), where the build's steps read it."""

    if mode == plan_lib.INCREMENTAL:  # the current version's network, extraction and index parameters
        model_info = pointer["model"]
        model_config = delf.ModelConfig.from_json(dict(model_info["network"]))
        extraction_config = ExtractionConfig.from_json(model_info["extraction"])
        stored = (pointer.get("settings") or {}).get("build")  # the settings it was built with
        config = (plan_lib.BuildConfig.from_json(stored) if stored
                  else config_from_args(args, params=plan_lib.index_params(pointer["params"])))
        config = dataclasses.replace(config, rows_per_shard=args.rows_per_shard, num_shards=args.num_shards)
    else:
        model_config, extraction_config = cli.configs_from_args(args)
        model_info = {"network": model_config.to_json(), "extraction": extraction_config.to_json(),
                      "preset": args.preset}
        config = config_from_args(args)
    model = read_model_folder(args.quantizer) if mode == plan_lib.FIXED else None
    if args.verified_neighbours < 0:
        raise cli.UsageError("--verified-neighbours must be 0 (none) or more")
    neighbours, previous_neighbours = plan_lib.neighbour_settings(mode, pointer, args.verified_neighbours,
                                                                  args.verified_min_inliers)
    start = None
    if mode == plan_lib.INCREMENTAL and segments.is_segmented(pointer):  # found damaged: left out, extracted again
        scrub_bytes, scrub_fraction = getattr(args, "scrub_bytes", (None, plan_lib.DEFAULT_SCRUB_FRACTION))
        start = plan_lib.checked_start(args.index, pointer, scrub_bytes, scrub_fraction, getattr(args, "repair", False))
        if start.damaged and args.input is None:
            raise cli.UsageError(f"{args.index}: segment {', '.join(sorted(start.damaged))} is damaged "
                                 f"({next(iter(start.damaged.values()))}); repair it from the corpus: "
                                 "python -m pipeline.reindex --input SRC --index ROOT --repair")
        pointer = start.pointer
    previous = start.previous if start else plan_lib.previous_images(args.index, pointer)
    if args.input is None:  # a merge alone: the listing is the index's own images, all kept
        if mode != plan_lib.INCREMENTAL:
            raise cli.UsageError(f"{args.index}: a {mode} build needs --input")
        listed, repeats = [(r["uri"], r["label"], r["stamp"]) for r in previous], []
    else:
        label_from_folder = args.label_from_folder
        if label_from_folder is None:
            label_from_folder = os.path.abspath(args.input) == SAMPLE_CORPUS
        listed, repeats = inputs.list_stamped(args.input, label_from_folder, stat_objects=mode == plan_lib.INCREMENTAL)
    carry = mode == plan_lib.INCREMENTAL and not segments.is_segmented(pointer)
    counts = pointer and pointer["counts"]
    if start is not None:  # the live images and rows of the segments the run starts from
        counts = {**counts, "images": len(start.previous), "descriptors": start.descriptors}
    plan = plan_lib.plan_build(mode, listed, repeats, config, extraction_config.max_features, previous,
                               counts, pointer and pointer["params"]["n_cells"],
                               carry=carry, keep_all=args.input is None)
    build = f"{layout.BUILDS_DIR}/{build_id}"
    kept, merges, previous_files, codebooks, previous_first_stage = (), (), {}, {}, {}
    if mode == plan_lib.INCREMENTAL and not carry:
        kept, merges, previous_files = plan_lib.plan_segments(args.index, pointer, plan, build_id, config.rows_per_shard,
                                                     getattr(args, "max_segments", None) if getattr(args, "merge", False)
                                                     else None)
        codebooks = segments.codebook_records(pointer)
        previous_first_stage = (first_stage.records_of(pointer) or {}).get("segments", {})
    plan_record = layout.write_table_file(storage.join(args.index, build), plan_lib.PLAN_FILE, plan.table())
    fetch = cli.fetch_config_from_args(args)
    job = plan_lib.BuildJob(
        root=args.index, build=build, index_id=layout.new_index_id(), mode=mode, config=config, fetch=fetch,
        model_info=model_info, plan_path=storage.join(args.index, build, plan_lib.PLAN_FILE), plan_record=plan_record,
        listed=plan.listed, deleted=len(plan.deleted), repeats=tuple(plan.repeats),
        training_sample=plan.training_sample, num_shards=plan.num_shards, descriptor_bound=plan.descriptor_bound,
        expected_token=token, lock_owner=lock_owner, keep=args.keep, max_rejected_fraction=args.max_rejected_fraction,
        drift_threshold=getattr(args, "drift_threshold", plan_lib.DRIFT_THRESHOLD),
        drift_sample=getattr(args, "drift_sample", plan_lib.DRIFT_SAMPLE), started=started, neighbours=neighbours,
        previous_neighbours=previous_neighbours, carry=plan.carry, kept=plan.count(plan_lib.KEEP), segments=kept,
        previous_descriptors=counts["descriptors"] if counts else 0,
        merges=merges, previous_files=previous_files, codebooks=codebooks, previous_first_stage=previous_first_stage,
        scrub=start.scrub.to_json() if start else None, repaired=tuple(sorted(start.damaged)) if start else ())
    extract = functools.partial(
        ExtractImages, model_config, extraction_config, max_batch_size=args.batch_size, fetch=fetch,
        progress_total=plan.to_read if local and not args.no_progress else 0)
    _ = pipeline | "BuildIndex" >> BuildIndex(job, extract, model=model, pointer=pointer, accelerator=args.accelerator)
    return job


def execute(args: argparse.Namespace, beam_args: list[str], prog: str, choose_mode, test_pipeline=None):
    """Take the root's lock, plan and run the build, wait for it (locally, or with ``--wait``), and
    return its report (None when a remote job was submitted and not waited for).
    ``choose_mode(pointer)`` says the build's mode given the current version's manifest."""

    started = time.time()
    pipeline, local = (test_pipeline, True) if test_pipeline is not None else make_pipeline(beam_args)
    # One writer per root at a time: publishing is a compare-and-swap against the version found
    # here, and old versions are pruned under the lock.
    lock = cli.take_lock(args.index, args, local, prog)
    build_id = plan_lib.new_build_id()
    try:
        pointer, token = versions.current(args.index)
        mode = choose_mode(pointer)
        job = add_build(pipeline, args, mode, pointer, token, lock.owner, local, started, build_id)
        result = pipeline.run()
        report_path = storage.join(args.index, versions.REPORTS_DIR, f"{job.build_id}.json")
        if not local:
            print(f"job submitted: {job_url(result, beam_args) or 'see the runner log'}")
            print(f"the new version is published at {args.index} when the job finishes (report: {report_path})")
            if not args.wait:
                lock = None  # the job's publish step releases it (or it expires after --lock-ttl)
                return None
        state = result.wait_until_finish()
        if not local and str(state).split(".")[-1] != "DONE":
            raise cli.JobFailed(f"the job ended in state {state}; the previous version (if any) is still the "
                                "published one")
    except Exception as error:
        if lock is not None and lock.still_held():  # no other run writes under the root
            versions.discard_failed_run(args.index, build_id, keep_dead_letters=isinstance(error, encode.PublishRefused))
        raise
    finally:
        if lock is not None:
            lock.release()
    report = json.loads(storage.read_bytes(report_path))
    if args.report:
        storage.write_bytes(args.report, json.dumps(report, indent=1, sort_keys=True).encode())
    return report

