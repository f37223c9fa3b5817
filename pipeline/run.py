"""The main job: ``python -m pipeline.run [--input SRC] [--output DIR]``.

With no arguments it runs on the bundled sample (``samples/``, 42 photographs), offline. For now
the job is multi-scale DELF extraction of every image (feature files + a summary table); the Beam
index build (PCA, quantizer, Parquet shards) replaces it as the index is built.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import cli, extract

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CORPUS = os.path.join(REPO_ROOT, "samples")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=SAMPLE_CORPUS, help="folder, glob or file of images (default: the bundled sample)")
    parser.add_argument("--output", default="output/sample-features", help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    cli.add_model_arguments(parser)
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    cli.quiet_tensorflow()
    model_config, extraction_config = cli.configs_from_args(args)
    summary = extract.main(model_config, extraction_config, [args.input], args.output,
                           overwrite=args.overwrite, progress=not args.no_progress)
    extract.report(summary)
    print(f"features written to {os.path.abspath(args.output)}")
    return 0 if not summary.rejected else 1


if __name__ == "__main__":
    sys.exit(run())
