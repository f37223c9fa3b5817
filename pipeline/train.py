"""Train DELF in the paper's two steps from landmark labels alone:

    python -m pipeline.train descriptor --input SRC --output RUN1 [options]    # step 1: fine-tune the descriptor
    python -m pipeline.train attention  --input SRC --output RUN2 --model RUN1/model [options]   # step 2

SRC is a listing CSV (``path_or_url,label``, or Google-Landmarks ``id,url,landmark_id``; relative
paths are relative to the CSV), a folder with one sub-folder per class, or TFRecords (a file, a
glob, or a folder of ``*.tfrecord*`` files with ``image/encoded`` and ``image/class/label``).
RUN holds ``checkpoints/`` (a re-run resumes from the latest), ``logs/`` (TensorBoard),
``labels.json`` and the exported ``model/``, which ``--model`` of pipeline.extract / pipeline.run
reads. The attention step ranks keypoints by attention and calibrates the score threshold so that
a typical training image keeps ``--target-features`` features.
"""

from __future__ import annotations

import argparse
import sys

from delf_retrieval.extraction.extractor import PAPER_SCALES, ExtractionConfig
from delf_retrieval.model import delf
from delf_retrieval.training import STEPS
from pipeline import cli

# Per step: (resize, crop, min rescale) of the paper, learning rate, batch size.
STEP_DEFAULTS = {
    "descriptor": {"image_size": 250, "crop_size": 224, "min_rescale": 1.0, "learning_rate": 1e-4, "batch_size": 32},
    "attention": {"image_size": 900, "crop_size": 720, "min_rescale": 0.5, "learning_rate": 1e-3, "batch_size": 8},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS, help="descriptor (step 1) or attention (step 2)")
    parser.add_argument("--input", required=True, help="listing CSV, folder per class, or TFRecords")
    parser.add_argument("--output", required=True, help="run folder: checkpoints, logs, labels, exported model/")
    parser.add_argument("--num-classes", type=int, help="TFRecords only: classes (default: scan the labels once)")
    net = parser.add_argument_group("starting network")
    net.add_argument("--model", help="a model directory to start from (e.g. the descriptor step's RUN/model)")
    net.add_argument("--backbone", default="efficientnet_lite0", help="without --model (default: %(default)s)")
    net.add_argument("--weights", default="imagenet", help="without --model: 'imagenet', 'random', or a path/URL")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=10_000, help="total steps, resumed runs included (default: %(default)s)")
    train.add_argument("--batch-size", type=int, help="global batch (default: descriptor 32, attention 8)")
    train.add_argument("--learning-rate", type=float, help="(default: descriptor 1e-4, attention 1e-3)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    train.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    train.add_argument("--image-size", type=int, help="central square resized to this (paper: 250 / 900)")
    train.add_argument("--crop-size", type=int, help="random crop (paper: 224 / 720)")
    train.add_argument("--min-rescale", type=float, help="attention: batches rescaled by r in [this, 1] (default 0.5)")
    train.add_argument("--freeze-below", metavar="LAYER",
                       help="descriptor step: freeze the backbone's layers before LAYER, a layer or block name "
                            "(e.g. block9 of efficientnet_lite0, conv4_block5 of resnet50); default: all train")
    train.add_argument("--checkpoint-every", type=int, default=500)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--restart", action="store_true", help="ignore checkpoints in --output and start over")
    train.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                       help="float16 compute with loss scaling (default: on when a GPU is present)")
    train.add_argument("--no-progress", action="store_true")
    cal = parser.add_argument_group("attention threshold calibration")
    cal.add_argument("--target-features", type=int, default=1000, help="features a typical image keeps (default: %(default)s)")
    cal.add_argument("--calibration-images", type=int, default=50, help="training images sampled (default: %(default)s)")
    cal.add_argument("--scales", type=lambda s: tuple(float(v) for v in s.split(",")),
                     help="pyramid scales extraction will use (default: the paper's 7)")
    cal.add_argument("--max-image-size", type=int, default=1024, help="long side cap extraction will use (default: %(default)s)")
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.freeze_below and args.step != "descriptor":
        parser.error("--freeze-below is for the descriptor step (the attention step freezes the whole backbone)")
    return args


def main(args) -> int:
    from delf_retrieval.training import data, loop, steps  # heavy: TensorFlow and Keras, after quiet_tensorflow

    defaults = STEP_DEFAULTS[args.step]
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    images = data.list_source(args.input, args.num_classes)
    model_config = delf.read_model_config(args.model) if args.model else delf.default_config(args.backbone, args.weights)
    loop_config = loop.LoopConfig(
        steps=args.steps, batch_size=pick("batch_size"), learning_rate=pick("learning_rate"), optimizer=args.optimizer,
        schedule=args.schedule, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        mixed_precision=args.mixed_precision, progress=not args.no_progress)
    preprocessing = data.Preprocessing(pick("image_size"), pick("crop_size"), pick("min_rescale"))
    common = dict(seed=args.seed, resume=not args.restart, source=args.input)
    print(f"{args.step} step: {images.num_classes} classes"
          + (f", {len(images)} images" if not images.tfrecord_files else f", {len(images.tfrecord_files)} TFRecord files"))
    if args.step == "descriptor":
        result = steps.train_descriptor(images, model_config, args.output, loop_config, preprocessing,
                                        trainable_from=args.freeze_below, **common)
    else:
        extraction = ExtractionConfig(scales=args.scales or PAPER_SCALES, max_image_size=args.max_image_size)
        calibration = steps.CalibrationConfig(args.target_features, args.calibration_images, extraction)
        result = steps.train_attention(images, model_config, args.output, loop_config, preprocessing, calibration, **common)
    run = result.loop
    rows = [("steps", f"{run.start_step} -> {run.step}"), ("seconds", f"{run.seconds:.1f}"),
            ("strategy", run.strategy), ("mixed precision", run.mixed_precision)]
    if args.step == "descriptor" and args.freeze_below:
        rows.append(("frozen", f"{len(run.model.frozen_layers)} backbone layers before {args.freeze_below}"))
    if run.losses:
        tail = max(1, len(run.losses) // 10)
        rows += [("loss (last 10%)", f"{sum(run.losses[-tail:]) / tail:.4f}"),
                 ("accuracy (last 10%)", f"{sum(run.accuracies[-tail:]) / tail:.3f}")]
    if result.calibration:
        c = result.calibration
        rows += [("attention threshold", f"{c.threshold:.4g} (median image keeps {c.kept_median:.0f} of "
                                         f"target {c.target_features}, over {c.images} images)")]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    print(f"model written to {result.model_dir} (use --model {result.model_dir})")
    return 0


def run(argv=None) -> int:
    args = parse_args(argv)
    cli.quiet_tensorflow(args.debug)
    return main(args)


if __name__ == "__main__":
    sys.exit(cli.main(run))
