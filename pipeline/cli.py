"""Command-line options shared by the entry points: choosing the network and extraction settings."""

from __future__ import annotations

import argparse
import os

from delf_retrieval import presets
from delf_retrieval.model import delf


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and extraction")
    g.add_argument("--preset", default=presets.DEFAULT_PRESET, choices=sorted(presets.PRESETS),
                   help="named configuration (default: %(default)s)")
    g.add_argument("--model", help="a model directory (model.json + weights) saved by training; overrides --preset's network")
    g.add_argument("--backbone", choices=delf.BACKBONES)
    g.add_argument("--weights", help="'imagenet', 'random', or a path/URL: Keras .h5, torch .pth, TF1 checkpoint prefix")
    g.add_argument("--keypoint-score", choices=delf.KEYPOINT_SCORES)
    g.add_argument("--threshold", type=float, help="keep features whose score is >= this")
    g.add_argument("--scales", type=lambda s: tuple(float(v) for v in s.split(",")), help="comma-separated pyramid scales")
    g.add_argument("--max-features", type=int)
    g.add_argument("--max-image-size", type=int, help="long side brought down to this before the pyramid")
    g.add_argument("--min-image-size", type=int, help="long side brought up to this before the pyramid")
    g.add_argument("--batch-pixels", type=int, help="pixels per network call (0: one pyramid level per call)")


def configs_from_args(args: argparse.Namespace):
    """(ModelConfig, ExtractionConfig) from parsed options: the network from --model or the preset."""
    extraction = presets.extraction_config(
        args.preset, scales=args.scales, max_features=args.max_features, max_image_size=args.max_image_size,
        min_image_size=args.min_image_size, batch_pixels=args.batch_pixels,
    )
    if args.model:
        model_config = delf.read_model_config(args.model)
        if args.keypoint_score:
            model_config.keypoint_score = args.keypoint_score
        if args.threshold is not None:
            model_config.score_threshold = args.threshold
    else:
        model_config = presets.model_config(
            args.preset, backbone=args.backbone, weights=args.weights,
            keypoint_score=args.keypoint_score, score_threshold=args.threshold,
        )
    return model_config, extraction


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
