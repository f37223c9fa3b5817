"""Does a trained attention head select better keypoints? Trains the attention head of the light
backbone (ImageNet EfficientNet-Lite0, descriptor frozen) on the scene labels of landmarks-dev,
then scores retrieval of held-out photos with keypoints selected three ways:

  (a) the untrained attention head (its seeded initialisation),
  (b) descriptor L2 norm (the ImageNet presets' ranking),
  (c) the trained attention head.

    python benchmarks/attention_training.py [--quick] [--steps N] [--json OUT]

Sized for a 2-core CPU (defaults: 200 steps of 8 crops of 320 px, extraction at long side 768 over
4 scales, top 1000 / 500 / 250): about 15 minutes on a lightly loaded machine.

Split: per scene with >= 5 photos, 2 are held out (3 when it has >= 20); training sees only the
others, and only their scene labels. Each held-out photo then queries every other scene photo
(training photos included: they are the indexed collection) plus the distractors; relevant = the
same scene. Candidates are extracted once (pyramid, all locations); the three methods differ only
in which top-K locations they keep, so the comparison is at an equal feature budget. Matching is
brute force: L2-PCA40-L2 descriptors, mutual nearest neighbours, then a deterministic affine
RANSAC (3 points, 20 px, 1000 trials); the score of a pair is its inlier count (mAP by inliers),
and, beside it, the number of mutual nearest neighbours (mAP by votes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-dev")
METHODS = ("untrained attention", "L2 norm", "trained attention")


def split_scenes(folder: str, seed: int = 0):
    """(train pairs, held-out pairs) of (path, scene): 2 held out per scene of >= 5 photos, 3 at >= 20."""
    from delf_retrieval.corpus.images import IMAGE_EXTENSIONS

    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for scene in sorted(os.listdir(folder)):
        paths = sorted(os.path.join(folder, scene, f) for f in os.listdir(os.path.join(folder, scene))
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        n_out = 3 if len(paths) >= 20 else 2 if len(paths) >= 5 else 0
        out = set(rng.choice(len(paths), n_out, replace=False).tolist()) if n_out else set()
        for i, path in enumerate(paths):
            (held_out if i in out else train).append((path, scene))
    return train, held_out


def affine_inliers(p: np.ndarray, q: np.ndarray, rng, trials: int = 1000, threshold: float = 20.0) -> int:
    """Most matches (p[i] -> q[i], (y, x) pixels) one affine map explains within ``threshold`` px,
    over ``trials`` random 3-point hypotheses, all solved and scored at once."""
    n = len(p)
    if n < 3:
        return 0
    samples = rng.integers(0, n, size=(trials, 3))
    src = np.concatenate([p[samples], np.ones((trials, 3, 1))], axis=2)  # (T, 3, 3) rows [y x 1]
    # Inverse of each 3x3 by cross products of its rows (vectorised; no LAPACK call per hypothesis).
    r0, r1, r2 = src[:, 0], src[:, 1], src[:, 2]
    adjugate = np.stack([np.cross(r1, r2), np.cross(r2, r0), np.cross(r0, r1)], axis=2)  # columns
    det = np.einsum("ti,ti->t", r0, adjugate[:, :, 0])
    ok = np.abs(det) > 1e-6
    if not ok.any():
        return 0
    maps = (adjugate[ok] / det[ok, None, None]) @ q[samples[ok]]  # (T', 3, 2): [y x 1] @ map = (y', x')
    squared = 0.0
    for d in range(2):  # elementwise on (T', n): far cheaper than T' tiny matrix products
        projected = p[None, :, 0] * maps[:, 0, d, None] + p[None, :, 1] * maps[:, 1, d, None] + maps[:, 2, d, None]
        squared = squared + (projected - q[None, :, d]) ** 2
    return int((squared < threshold**2).sum(axis=1).max())


def match_scores(query, database, rng) -> tuple[int, int]:
    """(RANSAC inliers, mutual nearest neighbours) between two images' (locations, descriptors)."""
    (loc_a, desc_a), (loc_b, desc_b) = query, database
    if len(desc_a) == 0 or len(desc_b) == 0:
        return 0, 0
    similarity = desc_a @ desc_b.T
    best_b = similarity.argmax(axis=1)
    best_a = similarity.argmax(axis=0)
    mutual = np.flatnonzero(best_a[best_b] == np.arange(len(desc_a)))
    return affine_inliers(loc_a[mutual], loc_b[best_b[mutual]], rng), len(mutual)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of a ranking by descending score (ties broken by index, i.e. deterministically)."""
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order]
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=LANDMARKS_DEV)
    parser.add_argument("--quick", action="store_true", help="a short smoke run: few steps, small images")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=384, help="training: central square resized to this")
    parser.add_argument("--crop-size", type=int, default=320, help="training: random crop")
    parser.add_argument("--min-rescale", type=float, default=0.5)
    parser.add_argument("--scales", default="0.3536,0.5,0.7071,1.0", help="extraction pyramid")
    parser.add_argument("--max-image-size", type=int, default=768)
    parser.add_argument("--top-k", default="1000,500,250", help="feature budgets compared")
    parser.add_argument("--distractors", type=int, default=40)
    parser.add_argument("--workdir", default="/tmp/attention_training_bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "attention_training.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.image_size, args.crop_size = min(args.steps, 20), 256, 224
        args.scales, args.max_image_size, args.distractors, args.top_k = "0.5,1.0", 512, 5, "300"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_retrieval.corpus.images import load_image
    from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor
    from delf_retrieval.model import attention as attention_head
    from delf_retrieval.model import delf
    from delf_retrieval.quantize import pca as pca_module
    from delf_retrieval.training import data, loop, steps

    if not os.path.isdir(args.data):
        print(f"{args.data} not found: this benchmark needs landmarks-dev", file=sys.stderr)
        return 1
    train, held_out = split_scenes(os.path.join(args.data, "images"), args.seed)
    distractor_dir = os.path.join(args.data, "distractors")
    distractors = sorted(os.path.join(distractor_dir, f) for f in os.listdir(distractor_dir))[: args.distractors]
    scales = tuple(float(s) for s in args.scales.split(","))
    budgets = [int(k) for k in args.top_k.split(",")]
    extraction = ExtractionConfig(scales=scales, max_image_size=args.max_image_size)
    print(f"{len(train)} training photos, {len(held_out)} held-out queries, {len(distractors)} distractors, "
          f"{len({s for _, s in train})} scenes")

    # 1. Train the attention head (descriptor frozen) on the training photos' scene labels.
    shutil.rmtree(args.workdir, ignore_errors=True)
    began = time.time()
    result = steps.train_attention(
        data.from_pairs(train), delf.ModelConfig(backbone="efficientnet_lite0", weights="imagenet"), args.workdir,
        loop.LoopConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        optimizer="adam", checkpoint_every=max(args.steps, 1), progress=True),
        data.Preprocessing(args.image_size, args.crop_size, args.min_rescale),
        steps.CalibrationConfig(target_features=max(budgets), images=10, extraction=extraction), seed=args.seed)
    train_seconds = time.time() - began
    losses = result.loop.losses
    tail = max(1, len(losses) // 10)

    # 2. Candidates of every photo, once: locations, descriptors, the three scores.
    net = delf.load(result.model_dir)
    untrained = attention_head.build(net.feature_channels, seed=delf.ModelConfig().seed)
    extractor = Extractor(net, ExtractionConfig(scales=scales, max_image_size=args.max_image_size,
                                                max_features=np.iinfo(np.int32).max, score_threshold=-np.inf))
    paths = [p for p, _ in train] + [p for p, _ in held_out] + distractors
    labels = [s for _, s in train] + [s for _, s in held_out] + [None] * len(distractors)
    began = time.time()
    candidates = []
    for path in paths:
        f = extractor.extract(load_image(path))
        # The head is pointwise (1x1 convolutions), so it scores descriptors directly.
        trained_scores = np.asarray(net.attention(f.descriptors[None, None]))[0, 0, :, 0]
        np.testing.assert_allclose(trained_scores, f.scores, rtol=1e-4, atol=1e-4)
        untrained_scores = np.asarray(untrained(f.descriptors[None, None]))[0, 0, :, 0]
        scores = {METHODS[0]: untrained_scores, METHODS[1]: np.linalg.norm(f.descriptors, axis=1), METHODS[2]: f.scores}
        candidates.append((f.locations.astype(np.float64), f.descriptors, scores))
    extract_seconds = time.time() - began
    sample = np.concatenate([c[1] for c in candidates[: len(train)]])
    sample = sample[np.random.default_rng(args.seed).permutation(len(sample))[:200_000]]
    pca = pca_module.fit(sample, 40)

    # 3. Leave-one-out retrieval of each held-out photo, per method and feature budget.
    query_ids = list(range(len(train), len(train) + len(held_out)))
    rows = []
    began = time.time()
    for k in budgets:
        for method in METHODS:
            selected = []
            for locations, descriptors, scores in candidates:
                keep = np.argsort(-scores[method], kind="stable")[:k]
                selected.append((locations[keep], pca.transform(descriptors[keep])))
            aps_inliers, aps_votes = [], []
            for q in query_ids:
                others = [i for i in range(len(paths)) if i != q]
                pairs = [match_scores(selected[q], selected[i], np.random.default_rng([args.seed, q, i])) for i in others]
                relevant = np.array([labels[i] == labels[q] for i in others])
                aps_inliers.append(average_precision(np.array([p[0] for p in pairs], float), relevant))
                aps_votes.append(average_precision(np.array([p[1] for p in pairs], float), relevant))
            rows.append({"top_k": k, "method": method, "map_inliers": float(np.mean(aps_inliers)),
                         "map_votes": float(np.mean(aps_votes)), "queries": len(query_ids)})
            print(f"  top {k:5d} {method:20s} mAP inliers {100 * rows[-1]['map_inliers']:.1f}  "
                  f"votes {100 * rows[-1]['map_votes']:.1f}", flush=True)
    match_seconds = time.time() - began

    print()
    print(f"training: {result.loop.step} steps x {args.batch_size} in {train_seconds:.0f} s (calibration included); "
          f"loss {np.mean(losses[:tail]):.3f} -> {np.mean(losses[-tail:]):.3f}, "
          f"accuracy {np.mean(result.loop.accuracies[:tail]):.2f} -> {np.mean(result.loop.accuracies[-tail:]):.2f}; "
          f"calibrated threshold {result.calibration.threshold:.3g} for {result.calibration.target_features} features")
    print(f"extraction: {len(paths)} photos in {extract_seconds:.0f} s; matching {match_seconds:.0f} s")
    print()
    print("| top K | keypoints by | mAP (inliers) | mAP (votes) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['top_k']} | {r['method']} | {100 * r['map_inliers']:.1f} | {100 * r['map_votes']:.1f} |")
    report = {"args": vars(args), "train_images": len(train), "queries": len(held_out), "distractors": len(distractors),
              "train_seconds": train_seconds, "extract_seconds": extract_seconds, "match_seconds": match_seconds,
              "loss_first": float(np.mean(losses[:tail])), "loss_last": float(np.mean(losses[-tail:])),
              "accuracy_first": float(np.mean(result.loop.accuracies[:tail])),
              "accuracy_last": float(np.mean(result.loop.accuracies[-tail:])),
              "calibration": result.calibration.to_json(), "results": rows,
              "held_out": [p for p, _ in held_out]}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
