"""The separate builder: PCA + coarse quantizer (k-means cells, KD-tree lookup) + PQ/LOPQ codebooks
from a feature sample, so nightly runs can reuse a fixed quantizer and only encode.

    python -m pipeline.build_quantizer --features DIR [--sample raw.npy] --output DIR [index options]

``--features`` takes feature files written by ``pipeline.extract`` (folders, globs or files);
``--sample`` a ``.npy`` array (n, D) of raw descriptors. Writes ``pca.npz``, ``quantizer.npz`` and
``quantizer.json`` (parameters, sample size, timings) into ``--output``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

from delf_retrieval import quantize
from delf_retrieval.build import encode
from delf_retrieval.extraction.features import Features
from pipeline import cli


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = quantize.IndexParams()
    g = parser.add_argument_group("index")
    g.add_argument("--cells", type=int, default=defaults.n_cells, help="coarse cells (default %(default)s; "
                   "clamped to sample/39 on small samples)")
    g.add_argument("--pq-m", type=int, default=defaults.pq_m, help="PQ sub-vectors (default %(default)s)")
    g.add_argument("--pq-bits", type=int, default=defaults.pq_bits, help="bits per sub-vector (default %(default)s)")
    g.add_argument("--lopq", action=argparse.BooleanOptionalAction, default=defaults.lopq,
                   help="locally optimised PQ regions (default %(default)s; see docs/index-format.md)")
    g.add_argument("--max-region-features", type=int, default=defaults.max_region_features)
    g.add_argument("--pca-dim", type=int, default=40)
    g.add_argument("--sample-size", type=int, default=1_000_000, help="descriptors to train on (default %(default)s)")
    g.add_argument("--expected-count", type=int, help="descriptors the index will hold (scales LOPQ regions)")
    g.add_argument("--seed", type=int, default=0)


def params_from_args(args: argparse.Namespace) -> quantize.IndexParams:
    return quantize.IndexParams(n_cells=args.cells, pq_m=args.pq_m, pq_bits=args.pq_bits, lopq=args.lopq,
                                max_region_features=args.max_region_features, seed=args.seed)


def feature_files(patterns: list[str]) -> list[str]:
    found = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found += glob.glob(os.path.join(pattern, "**", "*.npz"), recursive=True)
        else:
            found += glob.glob(pattern, recursive=True) or [pattern]
    return sorted(set(found))


def main(output: str, params: quantize.IndexParams, features: list[str] | None = None, sample: str | None = None,
         sample_size: int = 1_000_000, pca_dim: int = 40, expected_count: int | None = None) -> dict:
    start = time.time()
    if sample:
        raw = np.load(sample, allow_pickle=False)
        if len(raw) > sample_size:
            raw = raw[np.sort(np.random.default_rng(params.seed).choice(len(raw), sample_size, replace=False))]
        source = {"sample": sample}
    else:
        paths = feature_files(features or [])
        if not paths:
            raise cli.UsageError(f"no feature files found in {features}")
        raw = encode.sample_descriptors((Features.from_npz(p) for p in paths), sample_size, seed=params.seed)
        source = {"feature_files": len(paths)}
    sampled = time.time()
    projection, quantizer = encode.train(raw, params, pca_dim, expected_count)
    os.makedirs(output, exist_ok=True)
    projection.save(os.path.join(output, "pca.npz"))
    quantizer.save(os.path.join(output, "quantizer.npz"))
    report = {
        "spec": quantizer.params.spec, "params": quantizer.params.__dict__, "sample_size": int(len(raw)),
        "input_dim": projection.input_dim, "pca_dim": projection.output_dim,
        "pca_variance_kept": float(projection.explained_variance.sum()),
        "regions": quantizer.regions.n_regions, "local_models": quantizer.regions.n_models,
        "seconds": {"sample": round(sampled - start, 1), "train": round(time.time() - sampled, 1)}, **source,
    }
    with open(os.path.join(output, "quantizer.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.build_quantizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", nargs="+", help="feature files, folders or globs")
    source.add_argument("--sample", help=".npy array (n, D) of raw descriptors")
    parser.add_argument("--output", required=True)
    add_index_arguments(parser)
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    report = main(args.output, params_from_args(args), args.features, args.sample, args.sample_size,
                  args.pca_dim, args.expected_count)
    print(f"{report['spec']}: {report['regions']} regions, {report['local_models']} local models, trained on "
          f"{report['sample_size']} descriptors in {report['seconds']['train']} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
