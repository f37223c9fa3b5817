"""Cluster the images of an index into landmarks, by verified matches and GPS:

    python -m pipeline.landmarks --index ROOT [--output DIR] [options] [Beam pipeline options]

Reads the current version's verified-neighbour table (each image's verified neighbours with their
RANSAC inliers; searched afresh, each image with its stored rows, when the version has none) and
its image table's EXIF GPS. Keeps each strong edge (``--min-inliers``) that shared neighbours
support (``--min-support``), joins images by connected components, splits any group whose
geotagged photos lie more than ``--max-distance-km`` apart, and leaves one-off photos in no
landmark (docs/landmarks.md). Landmarks that persist from the last run keep their ids.

Writes beside the index, under ROOT/landmarks/<index id>/: landmarks.parquet (uri, image_id,
landmark, score; landmark -1 for none), summary.json (per landmark: size, representative, GPS
centre and radius), ground_truth.json (``pipeline.evaluate``'s format) and sheets/ (contact
sheets of the ``--sheets`` largest landmarks); then ROOT/landmarks.json, last, naming the version.
``--output DIR`` gets a copy of the files. Runs on Beam's local runner, or on Dataflow with
``--runner DataflowRunner`` and its options.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from delf_retrieval import storage
from delf_retrieval.index import layout
from delf_retrieval.landmarks import table
from delf_retrieval.landmarks.clustering import ClusterConfig
from pipeline import cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.landmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ClusterConfig()
    parser.add_argument("--index", required=True, help="index root (folder or gs:// prefix)")
    parser.add_argument("--output", help="also copy the landmark files into this folder")
    parser.add_argument("--max-distance-km", type=float, default=defaults.max_distance_km,
                        help="geotagged photos farther apart never share a landmark (default %(default)s)")
    parser.add_argument("--min-inliers", type=int, default=defaults.min_inliers,
                        help="RANSAC inliers of a strong edge (default %(default)s)")
    parser.add_argument("--min-support", type=float, default=defaults.min_support,
                        help="share of shared strong neighbours an edge needs (default %(default)s)")
    parser.add_argument("--min-size", type=int, default=defaults.min_size,
                        help="images of the smallest landmark (default %(default)s)")
    parser.add_argument("--sheets", type=int, default=100, help="contact sheets of the largest landmarks (default %(default)s)")
    cli.add_debug_argument(parser)
    args, beam_args = parser.parse_known_args(argv)
    try:
        args.config = ClusterConfig(args.min_inliers, args.min_support, args.min_size, args.max_distance_km)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if args.sheets < 0:
        raise cli.UsageError("--sheets must be 0 or more")
    return args, beam_args


def make_job(root: str, config: ClusterConfig, sheets: int):
    from transforms.landmarks import LandmarksJob  # heavy: Beam, imported on first use

    pointer = layout.read_manifest(root)
    build = pointer.get("build") or ""
    manifest = layout.read_manifest(storage.join(root, build)) if build else pointer
    return LandmarksJob(root, build, manifest, config, sheets)


def run(argv=None, test_pipeline=None) -> int:
    args, beam_args = parse_args(argv)
    from pipeline.build import make_pipeline  # heavy: Beam, imported on first use
    from transforms.landmarks import FindLandmarks

    start = time.time()
    job = make_job(args.index, args.config, args.sheets)
    pipeline, local = (test_pipeline, True) if test_pipeline is not None else make_pipeline(beam_args)
    _ = pipeline | "FindLandmarks" >> FindLandmarks(job)
    result = pipeline.run()
    state = result.wait_until_finish()
    if not local and str(state).split(".")[-1] != "DONE":
        raise cli.JobFailed(f"the landmarks job ended in state {state}")
    found = table.load(args.index, job.index_id)
    if found is None:
        raise cli.JobFailed(f"{args.index}: the version changed while its landmarks were found: run again")
    if args.output:
        copy_files(args.index, args.output)
    clustered = int((found.landmarks >= 0).sum())
    print(f"{len(found.summary)} landmarks, {clustered} of {len(found.uris)} images clustered "
          f"({'neighbour table' if job.has_table() else 'neighbours searched'}), written beside {args.index}"
          f"{' and in ' + args.output if args.output else ''} in {time.time() - start:.1f} s")
    return 0


def copy_files(root: str, output: str) -> None:
    """The files landmarks.json lists, into ``output`` under their names."""
    import json

    record = json.loads(storage.read_bytes(storage.join(root, table.MANIFEST)))
    for name, meta in record["files"].items():
        data = layout.checked_read(root, meta, where=table.MANIFEST)
        target = storage.join(output, name)
        if not storage.is_gcs(target):
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        storage.write_bytes(target, data)


if __name__ == "__main__":
    sys.exit(cli.main(run))
