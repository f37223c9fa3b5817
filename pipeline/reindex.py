"""Scheduled re-indexing: bring the index at ROOT up to date with the corpus, as a new version.

    python -m pipeline.reindex --input SRC --index ROOT [options] [Beam pipeline options]
    python -m pipeline.reindex --index ROOT --rollback

Lists SRC with a cheap change marker per image (size + mtime locally, the object generation on
gs://; none for http(s) URLs, which are taken as immutable) and compares it with the current
version's image table: unchanged images keep their posting rows (copied from the current shards,
nothing read or extracted); images whose marker changed are read and hashed, and only those whose
content changed are extracted again, like new ones; images no longer listed are dropped. The PCA
and quantizer are reused; when the new descriptors' quantization error exceeds the error recorded
at training by more than ``--drift-threshold`` (a ratio), the version records ``retrain_due`` and
the next run retrains, which means a full rebuild (raw descriptors are not stored, so every image
is extracted again: the cost of ``pipeline.run``); ``--retrain`` does that now. An empty ROOT gets
a full build.

Every run writes an immutable version under ROOT/builds/<id>/ and, only once it is complete and
verified, replaces the pointer ROOT/manifest.json (compare-and-swap against the version it
started from). A lock (ROOT/reindex.lock) keeps two runs from overlapping; a run that finds it
held exits with status 75 (EX_TEMPFAIL) and changes nothing. ``--keep N`` old versions are kept;
``--rollback`` re-points to the previous one after verifying it. Each run prints one line and writes
a JSON report to ROOT/reports/<id>.json (and ``--report PATH``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

from pipeline import build_quantizer, cli
from pipeline import run as run_job

EXIT_LOCKED = cli.EXIT_LOCKED


def parse_args(argv=None):
    """The job's own options and the rest (Beam's). Options a Flex Template sets have underscore
    spellings too (flex_template/metadata.json names them so) and booleans take an optional value."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.reindex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument

    def both(name, **kwargs):
        spellings = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
        return add(*spellings, dest=name[2:].replace("-", "_"), **kwargs)

    both("--input", help="folder, glob or listing CSV, as pipeline.run's --input (not with --rollback)")
    both("--index", required=True, help="index root: local folder or gs:// prefix")
    both("--label-from-folder", nargs="?", const=True, default=False, type=cli.flag,
         help="label each image with its folder's name")
    both("--keep", type=int, default=2, help="old versions kept besides the current one (default %(default)s)")
    both("--rollback", nargs="?", const=True, default=False, type=cli.flag,
         help="re-point ROOT to the previous version, verified first")
    both("--retrain", nargs="?", const=True, default=False, type=cli.flag,
         help="full rebuild: extract everything, train PCA + quantizer")
    both("--drift-threshold", type=float, default=1.5,
         help="retrain (on the next run) when the new descriptors' quantization error exceeds the training "
              "error by this factor (default %(default)s; see README)")
    both("--drift-sample", type=int, default=100_000,
         help="new descriptors sampled to measure drift (default %(default)s)")
    both("--report", help="also write the run report JSON here")
    both("--num-shards", type=int, help="posting shards (default: one per ~--rows-per-shard descriptors)")
    both("--rows-per-shard", type=int, default=4_000_000)
    both("--batch-size", type=int, default=8, help="images per extraction call (at most)")
    both("--accelerator", help="Beam resource hint for the extraction step on Dataflow")
    add("--no-progress", action="store_true")
    add("--wait", action="store_true", help="on a remote runner, wait for the job and print the report")
    cli.add_debug_argument(parser)
    cli.add_fetch_arguments(parser)
    cli.add_publish_arguments(parser, add=both)
    cli.add_model_arguments(parser)
    build_quantizer.add_index_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    if not args.rollback and not args.input:
        parser.error("--input is required (except with --rollback)")
    return args, beam_args


def list_corpus(source: str, label_from_folder: bool) -> tuple[list[tuple[str, str | None, str | None]], list[dict]]:
    """((uri, label, stamp) of every image of the source, dead letters of uris listed again); stamps
    come from one listing on gs:// folders and globs, a stat per file locally, and are None for
    http(s) URLs."""
    from delf_retrieval import inputs, storage
    from delf_retrieval.inputs import LISTING_EXTENSIONS, list_source

    images, repeats = list_source(source, label_from_folder)
    bulk = {}
    if storage.is_gcs(source) and not source.lower().endswith(LISTING_EXTENSIONS):
        wildcard = min((source.find(c) for c in "*?[" if c in source), default=-1)
        bulk = storage.stamps_under(source if wildcard < 0 else source[:wildcard].rsplit("/", 1)[0])
    out = []
    for image in images:
        if inputs.is_url(image.uri):
            stamp = None
        else:
            stamp = bulk.get(image.uri) or storage.stamp(image.uri)
        out.append((image.uri, image.label, stamp))
    return out, repeats


PLAN_COLUMNS = ("uri", "label", "stamp", "action", "width", "height", "num_features", "content_hash")


def make_plan(listed: list[tuple], previous_images: list[dict], full: bool) -> tuple[list[dict], list[str]]:
    """Plan rows (what to do with each listed image) and the uris deleted since the previous version.
    keep: indexed with the same stamp; check: indexed, stamp differs (read + hash); extract: new."""
    from transforms.reindex import CHECK, EXTRACT, KEEP

    before = {r["uri"]: r for r in previous_images}
    rows, seen = [], set()
    for uri, label, stamp in listed:
        if uri in seen:
            continue
        seen.add(uri)
        old = before.get(uri)
        if old is None or full:
            action = EXTRACT
        elif old.get("stamp") is not None and old.get("stamp") == stamp or (stamp is None and old.get("stamp") is None
                                                                                and _immutable(uri)):
            action = KEEP
        else:
            action = CHECK
        fields = {k: old.get(k) for k in ("width", "height", "num_features", "content_hash")} if old else {}
        if label is None and old:
            label = old.get("label")  # a listing without labels keeps the ones the index has
        rows.append({"uri": uri, "label": label, "stamp": stamp, "action": action,
                     **{k: fields.get(k) for k in ("width", "height", "num_features", "content_hash")}})
    deleted = sorted(set(before) - seen)
    return rows, deleted


def _immutable(uri: str) -> bool:
    """http(s) URLs have no stamp: an indexed URL is taken as unchanged."""
    from delf_retrieval import inputs

    return inputs.is_url(uri)


def plan_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([("uri", pa.string()), ("label", pa.string()), ("stamp", pa.string()), ("action", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32()), ("num_features", pa.int32()),
                        ("content_hash", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def previous_images(root: str, pointer: dict | None) -> list[dict]:
    import pyarrow.parquet as pq

    from delf_retrieval import shards, storage

    if pointer is None:
        return []
    table = pq.read_table(io.BytesIO(storage.read_bytes(shards.resolve(root, pointer["files"]["images"]["path"]))))
    return table.to_pylist()


def report_line(report: dict) -> str:
    drift = report.get("drift") or {}
    ratio = drift.get("ratio")
    return (f"reindex {report['mode']}: added {report['added']}, changed {report['changed']}, deleted {report['deleted']}, "
            f"rejected {report['rejected']}, unchanged {report['unchanged']}; reused {report['reused']}, re-extracted "
            f"{report['re_extracted']}; drift {'n/a' if ratio is None else f'{ratio:.2f}'}"
            f"{' (retrain due)' if drift.get('retrain_due') else ''}; {report['wall_seconds']:.1f} s -> "
            f"{report['build']}")


def run(argv=None, test_pipeline=None) -> int:
    """The re-index job; ``test_pipeline`` (a Beam pipeline) lets tests supply their own."""
    args, beam_args = parse_args(argv)
    cli.quiet_tensorflow()
    import dataclasses

    from delf_retrieval import index, shards, storage, versions
    from transforms.index import new_build_id
    from transforms.reindex import EXTRACT, KEEP, PLAN_FILE, Reindex

    started = time.time()
    pipeline, local = (test_pipeline, True) if test_pipeline is not None else run_job.make_pipeline(beam_args)
    lock = cli.take_lock(args.index, args, local, "pipeline.reindex")
    try:
        if args.rollback:
            before, _ = versions.current(args.index)
            pointer = versions.rollback(args.index)
            print(f"rollback: {args.index} now serves {pointer['build']} (was {before['build']})")
            return 0
        pointer, token = versions.current(args.index)
        due = bool(pointer and (pointer.get("drift") or {}).get("retrain_due"))
        mode = "full" if pointer is None or args.retrain or due else "incremental"
        if due and not args.retrain:
            print("reindex: the previous run found the codebooks drifted: retraining (full rebuild)", file=sys.stderr)
        label_from_folder = args.label_from_folder or os.path.abspath(args.input) == run_job.SAMPLE_CORPUS
        listed, repeats = list_corpus(args.input, label_from_folder)
        rows, deleted = make_plan(listed, previous_images(args.index, pointer), full=mode == "full")
        build = f"{shards.BUILDS_DIR}/{new_build_id()}"
        plan_record = shards.write_table_file(storage.join(args.index, build), PLAN_FILE, plan_table(rows))
        plan_path = storage.join(args.index, build, PLAN_FILE)
        if mode == "incremental":
            model_info = pointer["model"]
            model_config, extraction_config = dict(model_info["network"]), dict(model_info["extraction"])
            params = pointer["params"]
            index_params = {k: params[k] for k in ("n_cells", "pq_m", "pq_bits", "lopq", "max_region_features", "seed")}
            kept = sum(r["num_features"] or 0 for r in rows if r["action"] != EXTRACT)
            per_image = pointer["counts"]["descriptors"] / max(pointer["counts"]["images"], 1)
            estimate = kept + per_image * sum(r["action"] == EXTRACT for r in rows)
            num_shards = args.num_shards or index.shard_count(int(estimate), params["n_cells"], args.rows_per_shard)
        else:
            network, extraction = cli.configs_from_args(args)
            model_config, extraction_config = network.to_json(), extraction.to_json()
            model_info = {"network": model_config, "extraction": extraction_config, "preset": args.preset}
            index_params = dataclasses.asdict(build_quantizer.params_from_args(args))
            num_shards = args.num_shards
        settings = {
            "root": args.index, "build": build, "index_id": shards.new_index_id(), "plan_path": plan_path,
            "plan_record": plan_record, "expected_token": token, "keep": args.keep, "mode": mode,
            "lock_owner": lock.owner, "started": started, "deleted": len(deleted), "model_info": model_info,
            "drift_threshold": args.drift_threshold,
            "sample_size": args.sample_size if mode == "full" else args.drift_sample, "pca_dim": args.pca_dim,
            "rows_per_shard": args.rows_per_shard, "num_shards": num_shards,
            "listing_dead_letters": repeats, "max_rejected_fraction": args.max_rejected_fraction,
        }
        to_extract = sum(r["action"] != KEEP for r in rows)
        # A full run trains on a sample of the images (by hash of the uri) and streams the rest;
        # shards are sized from the images to extract x the per-image bound.
        settings.update(to_extract=to_extract, descriptor_bound=to_extract * extraction_config["max_features"],
                        training_sample=index.training_sample((r["uri"] for r in rows if r["action"] == EXTRACT),
                                                              settings["sample_size"], extraction_config["max_features"])
                        if mode == "full" else set())
        extract_options = {
            "max_batch_size": args.batch_size, "accelerator": args.accelerator,
            "fetch": cli.fetch_config_from_args(args),
            "progress_total": 0 if args.no_progress or not local else to_extract,
        }
        _ = pipeline | "Reindex" >> Reindex(settings, model_config, extraction_config, extract_options, index_params,
                                            pointer)
        result = pipeline.run()
        if not local:
            print(f"job submitted: {run_job.job_url(result, beam_args) or 'see the runner log'}")
            print(f"the new version is published at {args.index} when the job finishes "
                  f"(report: {storage.join(args.index, versions.REPORTS_DIR, build.split('/')[-1] + '.json')})")
            if not args.wait:
                lock = None  # the job's publish step releases it (or it expires after --lock-ttl)
                return 0
        state = result.wait_until_finish()
        if not local and str(state).split(".")[-1] != "DONE":
            print(f"job ended in state {state}; the previous version is still the published one", file=sys.stderr)
            return 1
        report = json.loads(storage.read_bytes(storage.join(args.index, versions.REPORTS_DIR,
                                                            build.split("/")[-1] + ".json")))
        if args.report:
            storage.write_bytes(args.report, json.dumps(report, indent=1, sort_keys=True).encode())
        print(report_line(report))
        return 0
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(cli.main(run))
