"""Training DELF: both steps train on tiny generated data (loss goes down), resume is exact, one and
two replicas agree, weak supervision puts the attention on the class-deciding pattern, and the
exported model (calibrated threshold) is what extraction and the Beam pipeline use."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from delf_retrieval.corpus.images import load_image
from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor
from delf_retrieval.extraction.features import Features
from delf_retrieval.index import segment_reader, segments
from delf_retrieval.model import delf
from delf_retrieval.training import calibrate, data, loop, steps
from tests.conftest import REPO_ROOT

IMAGE = 160  # side of the weak-supervision images
PATTERN = 32  # side of the class-deciding pattern pasted on them
CALIBRATION = ["--target-features", "20", "--calibration-images", "9", "--scales", "0.5,1.0"]


def clutter(rng, size):
    """Noise over a random background colour, with a dozen rectangles of random colours."""
    image = rng.integers(60, 200, size=(1, 1, 3)) + rng.normal(0, 12, size=(size, size, 3))
    for _ in range(12):
        h, w = rng.integers(8, size // 2, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        image[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return image


def pattern(label, n):
    """Class 0: black/white checkerboard; 1: red/blue stripes; 2: a yellow disc on black."""
    yy, xx = np.mgrid[:n, :n]
    if label == 0:
        return ((yy // 4 + xx // 4) % 2)[..., None] * 255.0 * np.ones(3)
    if label == 1:
        return np.where(((yy // 4) % 2)[..., None] == 1, [255, 0, 0], [0, 0, 255])
    return np.where((np.hypot(yy - n / 2 + 0.5, xx - n / 2 + 0.5) < n / 2.5)[..., None], [255, 255, 0], [0, 0, 0])


def pattern_image(rng, label, size=IMAGE, n=PATTERN, margin=16):
    """Clutter with the class's pattern pasted at a random place; returns the image and the box
    (y0, x0, y1, x1) of the pattern."""
    image = clutter(rng, size)
    y, x = rng.integers(margin, size - margin - n, 2)
    image[y : y + n, x : x + n] = pattern(label, n)
    return np.clip(image, 0, 255).astype(np.uint8), (y, x, y + n, x + n)


def write_classes(folder, per_class, seed, **kwargs):
    rng = np.random.default_rng(seed)
    for label in range(3):
        os.makedirs(folder / f"class{label}", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern_image(rng, label, **kwargs)[0]).save(folder / f"class{label}" / f"{i:03d}.png")
    return folder


def scalars(log_dir, tag):
    """(step, value) of a scalar in TensorBoard event files, read with TF alone."""
    import tensorflow as tf

    found = []
    for name in sorted(os.listdir(log_dir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                if value.tag == tag:
                    found.append((event.step, float(tf.make_ndarray(value.tensor))))
    return sorted(found)


@pytest.fixture(scope="module")
def pattern_folder(tmp_path_factory):
    return write_classes(tmp_path_factory.mktemp("patterns"), per_class=40, seed=0)


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory, pattern_folder, cache_dir):
    """Step 2 through the command line: the ImageNet light backbone frozen, 40 steps of Adam."""
    from pipeline import train

    output = tmp_path_factory.mktemp("attention-run")
    assert train.run(["attention", "--input", str(pattern_folder), "--output", str(output), "--steps", "40",
                      "--batch-size", "16", "--learning-rate", "1e-3", "--image-size", str(IMAGE), "--crop-size", "144",
                      "--min-rescale", "0.75", "--log-every", "5", "--no-progress"] + CALIBRATION) == 0
    return output


def test_threshold_for_target_matches_brute_force():
    rng = np.random.default_rng(3)
    for n_images in (1, 2, 7, 10):
        scores = [rng.gamma(2.0, 10.0, size=rng.integers(5, 80)) for _ in range(n_images)]
        for target in (1, 5, 30, 100):
            threshold = calibrate.threshold_for_target(scores, target)
            # Brute force: the highest candidate threshold at which at least half the images keep >= target.
            candidates = np.concatenate(scores)
            ok = [t for t in candidates if np.sum(calibrate.kept_counts(scores, t) >= target) >= n_images / 2]
            assert threshold == (max(ok) if ok else -np.inf)


def csv_listing(tmp_path):
    """36 images of three classes (large patterns on 80 px clutter) in a ``path_or_url,label`` CSV."""
    folder = write_classes(tmp_path / "images", per_class=12, seed=1, size=80, n=48, margin=4)
    listing = tmp_path / "train.csv"
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(folder.glob("*/*.png"))]
    listing.write_text("path_or_url,label\n" + "\n".join(rows) + "\n")
    return data.list_source(str(listing))


def test_descriptor_step_loss_goes_down_and_exports_the_trained_backbone(tmp_path, cache_dir):
    """Step 1 on 36 images from a CSV listing: the loss falls within 8 steps; the export holds the
    trained backbone (changed from ImageNet) and ranks keypoints by L2 norm; step 2 from it leaves
    that backbone untouched."""
    images = csv_listing(tmp_path)
    assert images.class_names == ["class0", "class1", "class2"] and len(images) == 36
    config = loop.LoopConfig(steps=8, batch_size=8, learning_rate=1e-4, optimizer="adam", log_every=1, progress=False)
    start = delf.ModelConfig(backbone="efficientnet_lite0", weights="imagenet")
    result = steps.train_descriptor(images, start, str(tmp_path / "run"), config, data.Preprocessing(72, 64),
                                    cache_dir=cache_dir)
    losses = result.loop.losses
    assert len(losses) == 8 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert [s for s, _ in scalars(tmp_path / "run" / loop.LOG_DIR, "loss")] == list(range(1, 9))

    exported = delf.load(result.model_dir, cache_dir=cache_dir)
    assert exported.config.keypoint_score == "l2norm"
    for a, b in zip(exported.backbone.weights, result.loop.model.backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    untouched = delf.load(start, cache_dir=cache_dir)
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(exported.backbone.weights, untouched.backbone.weights))

    # Step 2 from the step-1 model: the descriptor stays frozen, only the attention head changes.
    second = steps.train_attention(images, delf.read_model_config(result.model_dir), str(tmp_path / "run2"),
                                   loop.LoopConfig(steps=2, batch_size=4, progress=False), data.Preprocessing(80, 64, 0.75),
                                   steps.CalibrationConfig(10, 3, ExtractionConfig(scales=(1.0,))), cache_dir=cache_dir)
    final = delf.load(second.model_dir, cache_dir=cache_dir)
    for a, b in zip(final.backbone.weights, exported.backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert all(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(final.attention.weights, exported.attention.weights))
    assert final.config.keypoint_score == "attention" and final.config.score_threshold == second.calibration.threshold


def test_freeze_below_freezes_exactly_the_layers_before_the_named_block(tmp_path, cache_dir):
    """``pipeline.train descriptor --freeze-below block9`` (ImageNet Lite0, 3 steps, 64 px crops):
    every weight of the stem and of blocks 0-8 leaves the run bit for bit as it came in; the
    convolutions of blocks 9 and 10 (the last two of the stride-16 stage) all change, BatchNorm
    statistics nowhere. A block no layer has is refused, with the blocks there are."""
    from pipeline import train
    from delf_retrieval.training.models import DescriptorClassifier, freeze_below

    images = csv_listing(tmp_path)
    listing = tmp_path / "train.csv"
    assert train.run(["descriptor", "--input", str(listing), "--output", str(tmp_path / "run"), "--steps", "3",
                      "--batch-size", "8", "--learning-rate", "1e-3", "--image-size", "72", "--crop-size", "64",
                      "--freeze-below", "block9", "--no-progress"]) == 0
    trained = delf.load(str(tmp_path / "run" / steps.MODEL_DIR), cache_dir=cache_dir)
    start = delf.load(delf.ModelConfig(backbone="efficientnet_lite0", weights="imagenet"), cache_dir=cache_dir)
    changed = {}
    for after, before in zip(trained.backbone.weights, start.backbone.weights):
        assert after.path == before.path
        changed[after.path] = not np.array_equal(after.numpy(), before.numpy())
    upper = {p for p in changed if p.startswith(("block9_", "block10_"))}
    assert upper and not any(changed[p] for p in changed if p not in upper), [p for p in changed if changed[p]]
    assert all(changed[p] for p in upper if p.endswith("/kernel") or p.endswith("/depthwise_kernel")), changed
    assert not any(changed[p] for p in changed if "moving_" in p)
    info = json.loads((tmp_path / "run" / steps.MODEL_DIR / steps.TRAINING_FILE).read_text())
    frozen = [layer.name for layer in start.backbone.layers[: info["frozen_layers"]]]
    assert info["trainable_from"] == "block9" and frozen[0] == "image" and frozen[-1] == "block8_out"

    # The model alone: what trains is the upper blocks and the classifier; None freezes nothing.
    net = delf.load(delf.ModelConfig(backbone="efficientnet_lite0", weights="random"), cache_dir=cache_dir)
    model = DescriptorClassifier(net.backbone, images.num_classes, trainable_from="block10")
    model(np.zeros((1, 64, 64, 3), np.float32))
    layers = {v.path.split("/")[0] for v in model.trainable_variables}
    assert {n for n in layers if not n.startswith("descriptor_classifier")} == {
        "block10_expand_conv", "block10_expand_bn", "block10_dwconv", "block10_dw_bn", "block10_project_conv",
        "block10_project_bn"} and len(layers) == 7
    assert freeze_below(delf.load(delf.ModelConfig(weights="random")).backbone, None) == []
    with pytest.raises(ValueError, match="block11.*stem, block0, block1"):
        freeze_below(net.backbone, "block11")
    with pytest.raises(SystemExit):
        train.parse_args(["attention", "--input", "x", "--output", "y", "--freeze-below", "block9"])


def test_resume_continues_the_step_count_and_is_exact(tmp_path):
    """4 steps, stop, resume to 8: the same batches, losses and weights bit for bit as 8 straight
    steps (model, optimizer state, step and the data order all come back). A small network stands
    in for the backbone: the loop and the input pipeline are what is tested."""
    import keras

    images = csv_listing(tmp_path)
    identity = {"mean": [0.0] * 3, "std": [255.0] * 3, "bgr": False}
    make = lambda start, position=None: data.make_dataset(  # noqa: E731
        images, data.Preprocessing(40, 32), 4, identity, seed=3, start_step=start, start_position=position)

    def build():
        return keras.Sequential([keras.layers.Conv2D(8, 3, kernel_initializer=keras.initializers.GlorotUniform(1)),
                                 keras.layers.GlobalAveragePooling2D(),
                                 keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(2))])

    config = lambda n: loop.LoopConfig(steps=n, batch_size=4, learning_rate=1e-2, optimizer="adam",  # noqa: E731
                                       schedule="constant", checkpoint_every=100, progress=False)
    straight = loop.train(build, make, config(8), str(tmp_path / "straight"))
    first = loop.train(build, make, config(4), str(tmp_path / "resumed"))
    assert (first.start_step, first.step) == (0, 4)
    resumed = loop.train(build, make, config(8), str(tmp_path / "resumed"))
    assert (resumed.start_step, resumed.step) == (4, 8)
    assert resumed.losses == straight.losses[4:]
    for a, b in zip(straight.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    again = loop.train(build, make, config(8), str(tmp_path / "resumed"))
    assert (again.start_step, again.step, again.losses) == (8, 8, [])
    fresh = loop.train(build, make, config(8), str(tmp_path / "resumed"), resume=False)
    assert fresh.start_step == 0 and fresh.losses == straight.losses


def test_a_resumed_descriptor_run_sees_exactly_the_uninterrupted_stream(tmp_path, cache_dir, monkeypatch):
    """Through steps.train_descriptor, with unreadable images in the listing, a cosine schedule, a
    run that dies between checkpoints (after step 5, its last checkpoint at 3) and a stream that
    crosses epochs: the resumed run trains on the same batches, so its losses and final weights
    are those of the uninterrupted run, bit for bit."""
    folder = write_classes(tmp_path / "images", per_class=3, seed=4, size=40, n=16, margin=2)
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(folder.glob("*/*.png"))]
    (tmp_path / "images" / "class0" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "images" / "class2" / "empty.png").write_bytes(b"")
    rows[1:1] = ["images/class0/broken.png,class0"]
    rows[6:6] = ["images/class2/empty.png,class2"]
    (tmp_path / "train.csv").write_text("path_or_url,label\n" + "\n".join(rows) + "\n")
    images = data.list_source(str(tmp_path / "train.csv"))
    assert len(images) == 11  # 9 readable, 2 not: 10 steps of 2 cross the listing twice
    config = loop.LoopConfig(steps=10, batch_size=2, learning_rate=1e-3, optimizer="adam", schedule="cosine",
                             checkpoint_every=3, log_every=1, progress=False)
    start = delf.ModelConfig(backbone="efficientnet_lite0", weights="imagenet")
    preprocessing = data.Preprocessing(40, 32)
    straight = steps.train_descriptor(images, start, str(tmp_path / "straight"), config, preprocessing,
                                      cache_dir=cache_dir).loop
    real = data.make_dataset
    monkeypatch.setattr(data, "make_dataset", lambda *a, **k: real(*a, **k).take(5))  # the run dies after step 5
    died = steps.train_descriptor(images, start, str(tmp_path / "resumed"), config, preprocessing, cache_dir=cache_dir)
    assert died.loop.step == 5 and len(died.loop.losses) == 5
    monkeypatch.setattr(data, "make_dataset", real)
    resumed = steps.train_descriptor(images, start, str(tmp_path / "resumed"), config, preprocessing,
                                     cache_dir=cache_dir).loop
    assert (resumed.start_step, resumed.step) == (3, 10)  # from the last checkpoint
    assert resumed.losses == straight.losses[3:]
    for a, b in zip(straight.model.weights, resumed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_preprocessing_crops_inside_the_resized_center_square(tmp_path):
    """Each descriptor-step input is a crop of the central square resized (the paper's recipe), and
    attention-step batches are rescaled by r in [min_rescale, 1], one r per batch."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(60, 100, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    images = data.LabelledImages([str(tmp_path / "a.png")], np.array([0]), ["only"])
    identity = {"mean": [0.0] * 3, "std": [1.0] * 3, "bgr": False}
    square = tf.image.resize(image[:, 20:80].astype(np.float32), [40, 40], antialias=True).numpy()
    batches = data.make_dataset(images, data.Preprocessing(40, 32), 1, identity, seed=7).take(6)
    offsets = set()
    for patches, labels, _ in batches:
        patch = patches.numpy()[0]
        match = [(dy, dx) for dy in range(9) for dx in range(9) if np.allclose(square[dy : dy + 32, dx : dx + 32], patch)]
        assert len(match) == 1 and labels.numpy().tolist() == [0]
        offsets.add(match[0])
    assert len(offsets) > 1  # the crop is random

    sides = [p.shape[1] for p, _, _ in data.make_dataset(images, data.Preprocessing(40, 32, 0.5), 2, identity).take(8)]
    assert all(16 <= s <= 32 for s in sides) and len(set(sides)) > 1


def test_tfrecords_and_google_landmarks_csv_are_read(tmp_path, pattern_folder):
    folder = data.list_source(str(pattern_folder))
    subset = data.LabelledImages(folder.uris[::20], folder.labels[::20], folder.class_names)
    data.write_tfrecords(subset, str(tmp_path / "train-0.tfrecord"))
    records = data.list_source(str(tmp_path))
    assert records.tfrecord_files == [str(tmp_path / "train-0.tfrecord")] and records.num_classes == 3
    identity = {"mean": [0.0] * 3, "std": [1.0] * 3, "bgr": False}
    seen = [int(l) for _, labels, _ in data.make_dataset(records, data.Preprocessing(IMAGE, IMAGE), 1, identity).take(len(subset))
            for l in labels.numpy()]
    assert sorted(seen) == sorted(subset.labels.tolist())
    decoded = data.load_images(records, 2)
    np.testing.assert_array_equal(decoded[0], load_image(subset.uris[0]))

    (tmp_path / "gld.csv").write_text("id,url,landmark_id\na,images/x.jpg,17\nb,/abs/y.jpg,3\nc,https://h/z.jpg,17\n")
    gld = data.list_source(str(tmp_path / "gld.csv"))
    assert gld.uris == [str(tmp_path / "images" / "x.jpg"), "/abs/y.jpg", "https://h/z.jpg"]
    assert gld.class_names == ["3", "17"] and gld.labels.tolist() == [1, 0, 1]


def test_attention_step_loss_goes_down(attention_run):
    losses = scalars(attention_run / loop.LOG_DIR, "loss")
    assert [s for s, _ in losses] == list(range(5, 45, 5))
    assert np.mean([v for _, v in losses[-2:]]) < 0.8 * np.mean([v for _, v in losses[:2]])
    info = json.loads((attention_run / steps.MODEL_DIR / steps.TRAINING_FILE).read_text())
    assert info["steps_done"] == 40 and info["classes"] == 3


def top_features_in_pattern(model, cache_dir, n_images=24, top=4, seed=99):
    """Share of each image's ``top`` best-scoring features whose location lies in the pattern box
    (grown by half a stride), and the share of all its feature positions there (chance)."""
    net = delf.load(model, cache_dir=cache_dir)
    extractor = Extractor(net, ExtractionConfig(scales=(1.0,), max_features=10**6, score_threshold=-np.inf))
    rng = np.random.default_rng(seed)
    margin = net.stride / 2
    hits, chance = [], []
    for i in range(n_images):
        image, (y0, x0, y1, x1) = pattern_image(rng, i % 3)
        features = extractor.extract(image)  # best first
        y, x = features.locations.T
        inside = (y >= y0 - margin) & (y < y1 + margin) & (x >= x0 - margin) & (x < x1 + margin)
        hits.append(inside[:top].mean())
        chance.append(inside.mean())
    return float(np.mean(hits)), float(np.mean(chance))


def test_weak_supervision_puts_attention_on_the_pattern(attention_run, cache_dir):
    """Labels alone (no boxes) teach the head where the class is decided: the top features fall in
    the pattern's box far more often than chance, and than with the untrained head."""
    trained, chance = top_features_in_pattern(str(attention_run / steps.MODEL_DIR), cache_dir)
    untrained, _ = top_features_in_pattern(delf.ModelConfig(keypoint_score="attention"), cache_dir)
    assert chance < 0.15
    assert trained >= max(0.45, 4 * chance), (trained, chance)
    assert trained >= untrained + 0.3, (trained, untrained)


def test_exported_model_has_calibrated_threshold_and_drives_extraction(attention_run, pattern_folder, cache_dir, tmp_path):
    from pipeline import extract

    model_dir = str(attention_run / steps.MODEL_DIR)
    config = delf.read_model_config(model_dir)
    assert config.keypoint_score == "attention" and config.score_threshold > 0
    # The stored threshold is the one the sample calls for (same seed -> same calibration images).
    net = delf.load(model_dir, cache_dir=cache_dir)
    sample = data.load_images(data.list_source(str(pattern_folder)), 9, seed=0)
    scores = calibrate.candidate_scores(net, sample, ExtractionConfig(scales=(0.5, 1.0), max_image_size=1024))
    assert config.score_threshold == pytest.approx(calibrate.threshold_for_target(scores, 20), rel=1e-6)
    assert np.median(calibrate.kept_counts(scores, config.score_threshold)) == 20  # 9 images: odd median

    # pipeline.extract --model: features ranked by attention, the threshold applied, then the top 25.
    paths = [sample_path for sample_path in sorted(str(p) for p in pattern_folder.glob("class0/*.png"))[:3]]
    assert extract.run(paths + ["--output", str(tmp_path), "--model", model_dir, "--scales", "0.5,1.0",
                                "--max-features", "25", "--no-progress"]) == 0
    reference = Extractor(net, ExtractionConfig(scales=(0.5, 1.0), max_features=10**6, score_threshold=-np.inf))
    for path in paths:
        features = Features.from_npz(str(tmp_path / (os.path.splitext(os.path.basename(path))[0] + ".npz")))
        candidates = reference.extract(load_image(path)).scores
        expected = np.sort(candidates[candidates >= config.score_threshold])[::-1][:25]
        np.testing.assert_allclose(features.scores, expected, rtol=1e-5)


def test_beam_pipeline_indexes_with_the_trained_model(attention_run, pattern_folder, cache_dir, tmp_path):
    from pipeline import run as run_job

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for label in range(3):
        for i, src in enumerate(sorted(pattern_folder.glob(f"class{label}/*.png"))[:2]):
            (corpus / f"{label}-{i}.png").write_bytes(src.read_bytes())
    model_dir = str(attention_run / steps.MODEL_DIR)
    threshold = delf.read_model_config(model_dir).score_threshold
    assert run_job.run(["--input", str(corpus), "--output", str(tmp_path / "index"), "--model", model_dir,
                        "--scales", "0.5,1.0", "--no-progress"]) == 0
    reader = segment_reader.open_reader(str(tmp_path / "index"))
    network = reader.manifest["model"]["network"]
    assert network["keypoint_score"] == "attention" and network["score_threshold"] == threshold
    assert reader.manifest["counts"]["images"] == 6
    import pyarrow.parquet as pq

    postings = [pq.read_table(os.path.join(str(tmp_path / "index"), s["path"]))
                for s in segments.posting_shards(str(tmp_path / "index"), reader.manifest)]
    attention = np.concatenate([t.column("attention").to_numpy() for t in postings])
    assert len(attention) > 0 and attention.min() >= threshold * (1 - 1e-6)


def test_one_and_two_replicas_agree_and_mixed_precision_trains(tmp_path):
    """MirroredStrategy over two logical CPU devices (a fresh process: devices are fixed at TF start)
    gives the single-device losses and weights; float16 compute with loss scaling also trains."""
    script = f"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from delf_retrieval.training import loop

def build():
    return keras.Sequential([keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(1)),
                             keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(2))])

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 16, 16, 3)).astype(np.float32)
y = (x[..., 0].mean((1, 2)) > 0).astype(np.int64) + (x[..., 1].mean((1, 2)) > 0)
make = lambda start, position=None: (tf.data.Dataset.from_tensor_slices((x, y)).repeat().enumerate()
                                     .map(lambda i, r: (r[0], r[1], i)).batch(8, drop_remainder=True).skip(start))
out = {{}}
runs = (("one", tf.distribute.get_strategy(), False), ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), False),
        ("mixed", tf.distribute.get_strategy(), True))
for name, strategy, mixed in runs:
    config = loop.LoopConfig(steps=30, batch_size=8, learning_rate=0.2, optimizer="sgd", progress=False, mixed_precision=mixed)
    r = loop.train(build, make, config, {str(tmp_path)!r} + "/" + name, strategy=strategy)
    out[name] = {{"losses": r.losses, "weights": [w.tolist() for w in r.model.get_weights()], "strategy": r.strategy,
                  "compute": r.model.layers[0].compute_dtype, "variables": r.model.layers[0].kernel.dtype}}
out["policy_after"] = keras.config.dtype_policy().name
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["two"]["strategy"] == "MirroredStrategy" and out["one"]["strategy"] != "MirroredStrategy"
    np.testing.assert_allclose(out["two"]["losses"], out["one"]["losses"], rtol=1e-5)
    for a, b in zip(out["one"]["weights"], out["two"]["weights"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    mixed = out["mixed"]
    assert mixed["compute"] == "float16" and mixed["variables"] == "float32" and out["policy_after"] == "float32"
    assert np.all(np.isfinite(mixed["losses"])) and np.mean(mixed["losses"][-5:]) < 0.8 * np.mean(mixed["losses"][:5])
    np.testing.assert_allclose(mixed["losses"][:3], out["one"]["losses"][:3], rtol=2e-2)
