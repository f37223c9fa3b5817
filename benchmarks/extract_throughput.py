"""Extraction throughput: our batched, compiled extractor vs a naive reference that mimics the public
DELF release (eager, one scale at a time, one image at a time), per backbone, side by side.

    python benchmarks/extract_throughput.py [--images DIR] [--limit N] [--json OUT]

Each (backbone, method) runs in its own process so peak RSS is its own. Images: landmarks-dev
(../shared/data/landmarks-dev) when present, else the bundled sample; long side 1024, the 7 paper
scales, top 1000. ResNet50 runs with random weights (speed does not depend on the values, and the
ImageNet file needs a download).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-dev")


def list_images(folder: str, limit: int) -> list[str]:
    from pipeline.extract import expand_inputs

    paths = expand_inputs([folder])
    step = max(1, len(paths) // limit)  # spread over scenes rather than the first folder only
    return paths[::step][:limit]


def naive_extract(net, image, scales, max_features, max_image_size):
    """The public release's way: eager calls, one scale at a time, no buckets, no compilation."""
    import numpy as np
    import tensorflow as tf

    h, w = image.shape[:2]
    factor = min(1.0, max_image_size / max(h, w))
    locations, scores, descriptors = [], [], []
    for scale in scales:
        size = (int(round(h * factor * scale)), int(round(w * factor * scale)))
        resized = tf.image.resize(tf.cast(image, tf.float32)[None], size)
        features = net.backbone(net.normalise(resized.numpy()), training=False)
        score = tf.norm(features, axis=-1) if net.config.keypoint_score == "l2norm" else net.attention(features)[..., 0]
        fh, fw = features.shape[1:3]
        ys, xs = np.meshgrid(net.receptive_field.centres(fh), net.receptive_field.centres(fw), indexing="ij")
        locations.append(np.stack([ys.ravel(), xs.ravel()], 1) / (factor * scale))
        scores.append(score.numpy().ravel())
        descriptors.append(features.numpy().reshape(-1, features.shape[-1]))
    all_scores = np.concatenate(scores)
    keep = np.argsort(-all_scores)[:max_features]
    return np.concatenate(locations)[keep], all_scores[keep], np.concatenate(descriptors)[keep]


def worker(backbone: str, method: str, paths: list[str], cache_dir: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_retrieval.corpus import images as image_io
    from delf_retrieval.extraction.extractor import PAPER_SCALES, ExtractionConfig, Extractor
    from delf_retrieval.model import delf, efficientnet_lite

    weights = "imagenet" if backbone in efficientnet_lite.VARIANTS else "random"
    config = delf.default_config(backbone, weights)
    config.keypoint_score = "l2norm"
    net = delf.load(config, cache_dir=cache_dir)
    images = [image_io.load_image(p) for p in paths]
    extraction = ExtractionConfig(scales=PAPER_SCALES, max_features=1000, max_image_size=1024,
                                  batch_pixels=4_000_000 if method == "ours-batched" else 0)
    if method == "naive":
        run = lambda img: naive_extract(net, img, PAPER_SCALES, 1000, 1024)  # noqa: E731
    else:
        extractor = Extractor(net, extraction)
        run = extractor.extract
    start = time.perf_counter()
    run(images[0])  # warm-up (tracing, first allocations), timed apart
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    if method == "ours-batched":
        extractor.extract_batch(images[1:])
    else:
        for image in images[1:]:
            run(image)
    seconds = time.perf_counter() - start
    return {
        "backbone": backbone, "method": method, "images": len(images) - 1, "seconds": round(seconds, 2),
        "images_per_s": round((len(images) - 1) / seconds, 3), "warmup_s": round(warmup, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=LANDMARKS_DEV if os.path.isdir(LANDMARKS_DEV) else os.path.join(ROOT, "samples"))
    parser.add_argument("--limit", type=int, default=9, help="images to extract (the first is a warm-up)")
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    parser.add_argument("--methods", default="naive,ours,ours-batched")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "extract_throughput.json"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("BACKBONE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = list_images(args.images, args.limit)
    if args.worker:
        print(json.dumps(worker(*args.worker, paths, args.cache_dir)))
        return
    rows = []
    for backbone in args.backbones.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", backbone, method, "--images", args.images, "--limit", str(args.limit)]
            if args.cache_dir:
                cmd += ["--cache-dir", args.cache_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['backbone']:<20} {r['method']:<13} {r['images']:>4} img  {r['images_per_s']:>7.3f} img/s  "
                  f"{r['seconds']:>7.1f} s  warm-up {r['warmup_s']:>5.1f} s  peak RSS {r['peak_rss_mb']:>7.0f} MB", flush=True)
    for backbone in args.backbones.split(","):
        by = {r["method"]: r for r in rows if r["backbone"] == backbone}
        if "naive" in by:
            for m in by:
                if m != "naive":
                    print(f"{backbone}: {m} is {by[m]['images_per_s'] / by['naive']['images_per_s']:.2f}x the naive reference")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"images_dir": args.images, "scales": 7, "long_side": 1024, "max_features": 1000, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
