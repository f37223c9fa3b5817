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

This is the incremental mode of the one build (``pipeline.build``); its flags are ``pipeline.run``'s
and the ones below.
"""

from __future__ import annotations

import argparse
import sys

from delf_retrieval.build import planning as plan_lib
from delf_retrieval.index import versions
from pipeline import build, cli

EXIT_LOCKED = cli.EXIT_LOCKED


def parse_args(argv=None):
    """The job's own options and the rest (Beam's). Options a Flex Template sets have underscore
    spellings too (flex_template/metadata.json names them so) and booleans take an optional value."""

    parser = argparse.ArgumentParser(prog="python -m pipeline.reindex", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_arguments(parser, root_default=None, input_default=None)
    add = build.spellings(parser)
    add("--rollback", nargs="?", const=True, default=False, type=cli.flag,
        help="re-point ROOT to the previous version, verified first")
    add("--retrain", nargs="?", const=True, default=False, type=cli.flag,
        help="full rebuild: extract everything, train PCA + quantizer")
    add("--drift-threshold", type=float, default=plan_lib.DRIFT_THRESHOLD,
        help="retrain (on the next run) when the new descriptors' quantization error exceeds the training "
             "error by this factor (default %(default)s)")
    add("--drift-sample", type=int, default=plan_lib.DRIFT_SAMPLE, help="new descriptors sampled to measure drift (default %(default)s)")
    add("--merge", nargs="?", const=True, default=False, type=cli.flag,
        help="merge segments now, down to --max-segments, dropping deleted rows (without --input: only that); "
             "otherwise a run merges when the merge policy says so")
    add("--max-segments", type=int, default=1, help="segments left by --merge (default %(default)s)")
    add("--scrub-bytes", type=cli.bytes_or_share, default=(None, plan_lib.DEFAULT_SCRUB_FRACTION),
        help="segment bytes each run verifies by SHA-256, round-robin from where the last run stopped: a size "
             "(500M) or a share of the index (default 10%%: every byte within 10 runs); a segment found damaged "
             "is left out and its images are extracted again from the corpus")
    add("--repair", nargs="?", const=True, default=False, type=cli.flag,
        help="verify every byte of every segment now, and extract the images of any damaged one again from the "
             "corpus into this run's segment")
    add("--landmarks", nargs="?", const=True, default=False, type=cli.flag,
        help="then cluster the new version into landmarks (pipeline.landmarks, its defaults; persisting "
             "landmarks keep their ids)")
    args, beam_args = parser.parse_known_args(argv)
    if not args.rollback and not args.input and not args.merge:
        parser.error("--input is required (except with --rollback or --merge)")
    if args.repair and not args.input:
        parser.error("--repair extracts the damaged segments' images again: give --input")
    if args.max_segments < 1:
        parser.error("--max-segments must be at least 1")
    return args, beam_args


def report_line(report: dict) -> str:
    drift = report.get("drift") or {}
    ratio = drift.get("ratio")
    merged = sum(len(m) for m in report.get("merged", []))
    return (f"reindex {report['mode']}: added {report['added']}, changed {report['changed']}, deleted {report['deleted']}, "
            f"rejected {report['rejected']}, unchanged {report['unchanged']}; reused {report['reused']}, re-extracted "
            f"{report['re_extracted']}; drift {'n/a' if ratio is None else f'{ratio:.2f}'}"
            f"{' (retrain due)' if drift.get('retrain_due') else ''}; {report['segments']} segments"
            f"{'; repaired damaged segment ' + ', '.join(report['repaired']) if report.get('repaired') else ''}"
            f"{f' ({merged} merged)' if merged else ''}; {report['wall_seconds']:.1f} s -> {report['build']}")


def rollback(args) -> int:
    lock = cli.take_lock(args.index, args, True, "pipeline.reindex")
    try:
        before, _ = versions.current(args.index)
        pointer = versions.rollback(args.index)
    finally:
        lock.release()
    print(f"rollback: {args.index} now serves {pointer['build']} (was {before['build']})")
    return 0


def run(argv=None, test_pipeline=None) -> int:
    """The re-index job; ``test_pipeline`` (a Beam pipeline) lets tests supply their own."""

    args, beam_args = parse_args(argv)
    cli.quiet_tensorflow(args.debug)
    if args.rollback:
        return rollback(args)

    def choose_mode(pointer):
        if args.input is None:  # a merge alone
            if pointer is None:
                raise cli.UsageError(f"{args.index} has no published version to merge")
            return plan_lib.INCREMENTAL
        if plan_lib.retrain_due(pointer) and not args.retrain and not args.quantizer:
            print("reindex: the previous run found the codebooks drifted: retraining (full rebuild)", file=sys.stderr)
        return plan_lib.choose_mode(pointer, fixed_model=bool(args.quantizer), retrain=args.retrain)

    if args.input is None and (args.retrain or args.quantizer):
        raise cli.UsageError("--retrain and --quantizer rebuild from the inputs: give --input")
    report = build.execute(args, beam_args, "pipeline.reindex", choose_mode, test_pipeline)
    if report is not None:
        print(report_line(report))
        if args.landmarks:
            from pipeline import landmarks  # the landmarks job, on the same runner

            return landmarks.run(["--index", args.index, *beam_args], test_pipeline=None)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
