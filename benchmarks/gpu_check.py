"""Extraction on the machine's accelerator, per preset: images per second one by one and batched,
and how closely batched features agree with one-by-one features.

    python benchmarks/gpu_check.py [--images DIR] [--limit N] [--json OUT]

Presets ``lite``, ``lite-gpu`` and ``resnet50``, the last with random weights (speed does not depend
on the values, and the ImageNet file needs a download). Images: landmarks-dev when present, else
the bundled sample. The first image of each run is a warm-up (graph tracing) and is not timed.
Agreement: per image, the share of one-by-one keypoints (location and scale) found by the batched
run, and the largest descriptor difference among those; batching only changes how pyramid levels
are grouped into network calls, so both should be near exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-dev")
PRESETS = ("lite", "lite-gpu", "resnet50")


def agreement(single, batched) -> dict:
    """Share of one-by-one keypoints the batched features have, and the largest descriptor gap."""
    import numpy as np

    if len(single) == 0:
        return {"keypoints_found": 1.0 if len(batched) == 0 else 0.0, "max_descriptor_diff": 0.0}
    key = lambda f: {(round(float(y), 1), round(float(x), 1), round(float(s), 4)): i  # noqa: E731
                     for i, ((y, x), s) in enumerate(zip(f.locations, f.scales))}
    a, b = key(single), key(batched)
    common = sorted(set(a) & set(b))
    diff = max((float(np.abs(single.descriptors[a[k]] - batched.descriptors[b[k]]).max()) for k in common), default=0.0)
    return {"keypoints_found": len(common) / len(a), "max_descriptor_diff": diff}


def measure(preset: str, paths: list[str]) -> dict:
    import numpy as np
    import tensorflow as tf

    from delf_retrieval.corpus.images import load_image
    from delf_retrieval.extraction import presets
    from delf_retrieval.extraction.extractor import Extractor
    from delf_retrieval.model import delf

    weights = "random" if preset == "resnet50" else None
    model_config = presets.model_config(preset, weights=weights)
    extractor = Extractor(delf.load(model_config), presets.extraction_config(preset))
    images = [load_image(p) for p in paths]
    extractor.extract(images[0])  # warm-up: traces the buckets' functions
    start = time.perf_counter()
    single = [extractor.extract(image) for image in images[1:]]
    single_s = time.perf_counter() - start
    extractor.extract_batch(images[:2])
    start = time.perf_counter()
    batched = extractor.extract_batch(images[1:])
    batched_s = time.perf_counter() - start
    agreements = [agreement(s, b) for s, b in zip(single, batched)]
    n = len(images) - 1
    return {"preset": preset, "images": n, "device": [d.name for d in tf.config.list_logical_devices("GPU")] or ["CPU"],
            "one_by_one_images_per_s": n / single_s, "batched_images_per_s": n / batched_s,
            "keypoints_found_min": min(a["keypoints_found"] for a in agreements),
            "max_descriptor_diff": max(a["max_descriptor_diff"] for a in agreements),
            "features_per_image": float(np.mean([len(f) for f in single]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=LANDMARKS_DEV if os.path.isdir(LANDMARKS_DEV) else os.path.join(ROOT, "samples"))
    parser.add_argument("--limit", type=int, default=17, help="images per preset (the first is a warm-up)")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "gpu_check.json"))
    args = parser.parse_args(argv)
    from pipeline.extract import expand_inputs

    paths = expand_inputs([args.images])
    paths = paths[::max(1, len(paths) // args.limit)][:args.limit]
    rows = [measure(p, paths) for p in args.presets.split(",")]
    print(f"{'preset':<10}{'device':<28}{'one-by-one img/s':>18}{'batched img/s':>15}{'keypoints found':>17}"
          f"{'max desc diff':>15}")
    for r in rows:
        print(f"{r['preset']:<10}{','.join(r['device']):<28}{r['one_by_one_images_per_s']:>18.2f}"
              f"{r['batched_images_per_s']:>15.2f}{r['keypoints_found_min']:>17.3f}{r['max_descriptor_diff']:>15.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"images_from": args.images, "runs": rows}, f, indent=1)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
