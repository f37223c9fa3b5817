"""Training data: listing labelled images (CSV, folder per class, TFRecords) and the tf.data input
pipelines of the two training steps (parallel decode, seeded shuffle, the paper's crops, prefetch)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from delf_retrieval import storage
from delf_retrieval.corpus import images as image_io
from delf_retrieval.corpus import inputs

log = logging.getLogger(__name__)

TFRECORD_IMAGE_KEY = "image/encoded"  # the keys of the official DELF / Google-Landmarks TFRecords
TFRECORD_LABEL_KEY = "image/class/label"


@dataclass(frozen=True)
class Preprocessing:
    """How a training image becomes a network input: the central square resized to ``resize``
    pixels, a random ``crop`` x ``crop`` window, then each batch rescaled by a random factor
    r in [``min_rescale``, 1] (1: no rescale)."""

    resize: int
    crop: int
    min_rescale: float = 1.0

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop {self.crop} must be in (0, resize={self.resize}]")
        if not 0 < self.min_rescale <= 1:
            raise ValueError(f"min_rescale {self.min_rescale} must be in (0, 1]")


# The paper (section 4.1): step 1 center crop -> 250x250 -> random 224x224; step 2 center crop ->
# 900x900 -> random 720x720 -> random rescale by r <= 1 (its lower bound is not given; ours 0.5).
DESCRIPTOR_PREPROCESSING = Preprocessing(resize=250, crop=224)
ATTENTION_PREPROCESSING = Preprocessing(resize=900, crop=720, min_rescale=0.5)


@dataclass
class LabelledImages:
    """A training set: either image uris or TFRecord files, and integer labels 0..n-1 with names."""

    uris: list[str]  # local paths, gs:// or http(s) uris (empty for TFRecords)
    labels: np.ndarray  # (n,) int64 class index per uri (empty for TFRecords)
    class_names: list[str]
    tfrecord_files: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.uris)


def _class_index(names: list[str]) -> dict[str, int]:
    unique = set(names)
    key = (lambda s: (int(s), s)) if all(s.lstrip("-").isdigit() for s in unique) else (lambda s: (0, s))
    return {name: i for i, name in enumerate(sorted(unique, key=key))}


def from_pairs(pairs: list[tuple[str, str]]) -> LabelledImages:
    """Labelled images from (uri, label name) pairs; classes numbered in sorted order of their names."""
    if not pairs:
        raise ValueError("no labelled images")
    index = _class_index([label for _, label in pairs])
    names = sorted(index, key=index.get)
    return LabelledImages([u for u, _ in pairs], np.array([index[l] for _, l in pairs], np.int64), names)


def list_csv(path: str) -> LabelledImages:
    """A listing CSV (``path_or_url,label`` or Google-Landmarks ``id,url,landmark_id``); relative
    paths are taken relative to the CSV's folder. Rows without a label are refused."""
    rows = inputs.parse_csv(storage.read_bytes(path).decode("utf-8-sig", errors="replace"), name=path)
    unlabelled = [r.uri for r in rows if r.label is None]
    if unlabelled:
        raise ValueError(f"{path}: {len(unlabelled)} rows have no label, e.g. {unlabelled[0]}")
    base = inputs.listing_folder(path)
    return from_pairs([(inputs.resolve_uri(r.uri, base), r.label) for r in rows])


def list_class_folders(folder: str) -> LabelledImages:
    """A folder with one sub-folder per class (searched recursively), local or gs://."""
    folder = folder.rstrip("/")
    pairs = []
    for path in storage.list_files(folder):
        if not path.lower().endswith(image_io.IMAGE_EXTENSIONS):
            continue
        relative = storage.relative(path, folder)
        if "/" not in relative.replace(os.sep, "/"):
            raise ValueError(f"{path}: images must be in a sub-folder named after their class")
        pairs.append((path, relative.replace(os.sep, "/").split("/", 1)[0]))
    return from_pairs(sorted(pairs))


def _is_tfrecord(path: str) -> bool:
    return ".tfrecord" in os.path.basename(path).lower()


def list_tfrecords(files: list[str], num_classes: int | None = None) -> LabelledImages:
    """TFRecord files of ``tf.train.Example`` with ``image/encoded`` and ``image/class/label``
    (the official DELF format). Without ``num_classes`` the labels are scanned once to count them."""
    if num_classes is None:
        num_classes = int(max(_tfrecord_labels(files))) + 1
    return LabelledImages([], np.zeros(0, np.int64), [str(i) for i in range(num_classes)], tfrecord_files=files)


def _tfrecord_labels(files: list[str]):
    import tensorflow as tf  # heavy: imported on first use

    spec = {TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
    for record in tf.data.TFRecordDataset(files):
        yield int(tf.io.parse_single_example(record, spec)[TFRECORD_LABEL_KEY])


def list_source(source: str, num_classes: int | None = None) -> LabelledImages:
    """Labelled images from a listing CSV, a folder per class, or TFRecords (a file, a glob, or a
    folder holding ``*.tfrecord*`` files)."""
    if any(c in source for c in "*?["):
        files = storage.glob(source)
        if files and all(_is_tfrecord(f) for f in files):
            return list_tfrecords(sorted(files), num_classes)
        raise ValueError(f"{source}: a glob must match TFRecord files")
    if source.lower().endswith(inputs.LISTING_EXTENSIONS):
        return list_csv(source)
    if _is_tfrecord(source):
        return list_tfrecords([source], num_classes)
    files = storage.list_files(source)
    records = sorted(f for f in files if _is_tfrecord(f))
    if records:
        return list_tfrecords(records, num_classes)
    return list_class_folders(source)


def write_tfrecords(images: LabelledImages, path: str) -> None:
    """Write labelled images (their encoded bytes, unchanged) as one TFRecord file."""
    import tensorflow as tf  # heavy: imported on first use

    with tf.io.TFRecordWriter(path) as writer:
        for uri, label in zip(images.uris, images.labels):
            example = tf.train.Example(features=tf.train.Features(feature={
                TFRECORD_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[inputs.read_image_bytes(uri)])),
                TFRECORD_LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            writer.write(example.SerializeToString())


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        return image_io.decode_image(data, name=name)
    except image_io.ImageError as e:
        log.warning("skipping training image: %s", e)
        return np.zeros((0, 0, 3), np.uint8)


def _decode_uri(uri) -> np.ndarray:
    uri = uri.decode() if isinstance(uri, bytes) else str(uri)
    try:
        data = inputs.read_image_bytes(uri)
    except (OSError, inputs.FetchError) as e:
        log.warning("skipping training image %s: %s", uri, e)
        return np.zeros((0, 0, 3), np.uint8)
    return _decode(data, uri)


def _decode_bytes(data) -> np.ndarray:
    return _decode(bytes(data), "<tfrecord>")


def load_images(images: LabelledImages, limit: int, seed: int = 0) -> list[np.ndarray]:
    """Up to ``limit`` decoded images of a training set (a seeded random sample of a listing, or the
    first records of TFRecords): the sample threshold calibration looks at."""
    if images.tfrecord_files:
        import tensorflow as tf  # heavy: imported on first use

        spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
        records = tf.data.TFRecordDataset(images.tfrecord_files).take(limit)
        decoded = [_decode_bytes(tf.io.parse_single_example(r, spec)[TFRECORD_IMAGE_KEY].numpy()) for r in records]
    else:
        order = np.random.default_rng(seed).permutation(len(images))[:limit]
        decoded = [_decode_uri(images.uris[i]) for i in sorted(order)]
    return [image for image in decoded if image.size]


def center_square(image):
    """The largest central square of an (H, W, C) image tensor."""
    import tensorflow as tf  # heavy: imported on first use

    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top = (shape[0] - side) // 2
    left = (shape[1] - side) // 2
    return image[top : top + side, left : left + side]


def normaliser(normalisation: dict):
    """The network's pixel normalisation (ModelConfig.normalisation) as a TF function of RGB floats."""
    import tensorflow as tf  # heavy: imported on first use

    mean = tf.constant(normalisation["mean"], tf.float32)
    std = tf.constant(normalisation["std"], tf.float32)
    bgr = bool(normalisation["bgr"])

    def normalise(rgb):
        x = rgb[..., ::-1] if bgr else rgb
        return (x - mean) / std

    return normalise


def make_dataset(images: LabelledImages, preprocessing: Preprocessing, batch_size: int, normalisation: dict,
                 seed: int = 0, start_step: int = 0, shuffle_buffer: int = 10_000, start_position: int | None = None):
    """An endless ``tf.data.Dataset`` of (normalised images (B, s, s, 3) float32, labels (B,) int64,
    positions (B,) int64): each image's position in the stream of listed records.

    The sequence is a function of ``seed`` alone: batch ``k`` is the same whether training started
    at step 0 or resumed at ``start_step``. A resume skips the records already used, before
    decoding: from ``start_position`` (one past the largest position of the last batch trained on,
    which the training loop checkpoints), since unreadable images are logged and left out, so the
    records used are not ``start_step x batch_size`` when the listing holds any. Every random crop
    and rescale draws from stateless generators keyed by the position or the step.
    """
    import tensorflow as tf  # heavy: imported on first use

    if images.tfrecord_files:
        spec = {TFRECORD_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
                TFRECORD_LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
        raw = tf.data.TFRecordDataset(images.tfrecord_files).map(
            lambda r: tuple(tf.io.parse_single_example(r, spec)[k] for k in (TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY)))
        raw = raw.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        decode = _decode_bytes
    else:
        uris = tf.constant(images.uris)
        labels = tf.constant(images.labels, tf.int64)
        # Shuffling indices (not images) over the whole listing: a full shuffle costs 8 bytes per image.
        raw = tf.data.Dataset.range(len(images.uris)).shuffle(len(images.uris), seed=seed, reshuffle_each_iteration=True)
        raw = raw.map(lambda i: (tf.gather(uris, i), tf.gather(labels, i)))
        decode = _decode_uri
    first = start_step * batch_size if start_position is None else start_position
    raw = raw.repeat().skip(first).enumerate(start=first)
    normalise = normaliser(normalisation)
    size = preprocessing.resize
    crop = preprocessing.crop

    def load(position, record):
        data, label = record
        image = tf.numpy_function(decode, [data], tf.uint8, stateful=False)
        image = tf.ensure_shape(image, [None, None, 3])
        return position, image, label

    def preprocess(position, image, label):
        square = tf.image.resize(center_square(image), [size, size], antialias=True)
        seed_pair = tf.stack([tf.cast(seed, tf.int64), position])
        patch = tf.image.stateless_random_crop(square, [crop, crop, 3], seed=seed_pair)
        return normalise(patch), label, position

    data = raw.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    data = data.filter(lambda position, image, label: tf.size(image) > 0)
    data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    data = data.batch(batch_size, drop_remainder=True)
    if preprocessing.min_rescale < 1:
        low = preprocessing.min_rescale

        def rescale(step, batch):
            patches, labels_, positions = batch
            r = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64) + 1, step]), minval=low, maxval=1.0)
            side = tf.cast(tf.round(r * crop), tf.int32)
            return tf.image.resize(patches, tf.stack([side, side]), antialias=True), labels_, positions

        data = data.enumerate(start=start_step).map(rescale, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return data.prefetch(tf.data.AUTOTUNE)
