"""Multi-scale attentive extraction: image pyramid, size buckets for batching without retracing,
receptive-field keypoint locations, and selection by score threshold and top-K (no I/O here)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from delf_retrieval.extraction.features import Features
from delf_retrieval.model.fold import fold_batch_norm

PAPER_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


@dataclass(frozen=True)
class ExtractionConfig:
    """How features are extracted from an image by a given network."""

    scales: tuple = PAPER_SCALES
    max_features: int = 1000  # top-K over all scales
    score_threshold: float | None = None  # None: the network's own threshold
    max_image_size: int | None = None  # long side brought down to this before the pyramid
    min_image_size: int | None = None  # long side brought up to this before the pyramid
    # Pixels per network call: bounds the batch size of each size bucket (0: one pyramid level per
    # call, best on CPU, and bit-identical features whatever else is extracted). Batching is for
    # GPUs: a level's features then vary with its batch neighbours by float rounding (~1e-5).
    batch_pixels: int = 0

    def to_json(self) -> dict:
        """Plain data for a manifest or a Beam step (scales as a list of floats)."""
        return {**dataclasses.asdict(self), "scales": [float(s) for s in self.scales]}

    @classmethod
    def from_json(cls, data: dict) -> "ExtractionConfig":
        """The inverse of :meth:`to_json`; keys this version does not know are ignored (an index
        written by a newer version still says how its queries are extracted)."""
        known = {f.name for f in dataclasses.fields(cls)}
        settings = {k: v for k, v in dict(data).items() if k in known}
        if "scales" in settings:
            settings["scales"] = tuple(float(s) for s in settings["scales"])
        return cls(**settings)


@dataclass(frozen=True)
class Level:
    """One pyramid level of one image: its size and the bucket shape it runs in."""

    image: int
    scale: float
    height: int
    width: int
    bucket: tuple


def bucket_size(n: int, multiple: int) -> int:
    """Round a side length up to the bucket ladder: steps of 32 up to 256, 64 up to 512, 128 up to
    1024, then 256 (all multiples of ``multiple``). At most ~25% padding per side, and a small fixed
    set of shapes, so the network compiles a bounded number of times."""
    if n <= 256:
        step = 32
    elif n <= 512:
        step = 64
    elif n <= 1024:
        step = 128
    else:
        step = 256
    step = int(np.lcm(step, multiple))
    return int(-(-n // step) * step)


def base_factor(height: int, width: int, config: ExtractionConfig) -> float:
    """Resize factor applied before the pyramid so the long side respects the size bounds."""
    long_side = max(height, width)
    if config.max_image_size and long_side > config.max_image_size:
        return config.max_image_size / long_side
    if config.min_image_size and long_side < config.min_image_size:
        return config.min_image_size / long_side
    return 1.0


def pyramid(height: int, width: int, config: ExtractionConfig, stride: int, image: int = 0) -> list[Level]:
    """The pyramid levels of an image; levels smaller than one network stride are skipped."""
    factor = base_factor(height, width, config)
    levels = []
    for scale in config.scales:
        h = int(round(height * factor * scale))
        w = int(round(width * factor * scale))
        if h < stride or w < stride:
            continue
        levels.append(Level(image, float(factor * scale), h, w, (bucket_size(h, stride), bucket_size(w, stride))))
    return levels


def select_keypoints(scores: np.ndarray, max_features: int, threshold: float) -> np.ndarray:
    """Indices of the features kept: score >= threshold, then the top ``max_features`` by score.

    Ties keep the lower index (stable), so selection is deterministic.
    """
    candidates = np.flatnonzero(scores >= threshold)
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:max_features]]


class Extractor:
    """Runs a :class:`~delf_retrieval.model.delf.DelfNet` over images, batched by size bucket.

    The network runs inside one ``tf.function`` whose input signature leaves batch, height and width
    free, so it is traced once; images are padded into bucket shapes so pyramid levels of similar
    size (from one image or many) share a call. Padding yields no features: a feature is kept only
    if its receptive-field centre lies inside the real image.
    """

    def __init__(self, net, config: ExtractionConfig = ExtractionConfig()):
        import tensorflow as tf  # heavy: imported on first use

        self.net = net
        self.config = config
        self.threshold = net.config.score_threshold if config.score_threshold is None else config.score_threshold
        self.use_attention = net.config.keypoint_score == "attention"
        spec = tf.TensorSpec([None, None, None, 3], tf.float32)
        backbone = fold_batch_norm(net.backbone)  # same function, fewer ops at inference
        attention = net.attention

        @tf.function(input_signature=[spec])
        def run(images):
            features = backbone(images, training=False)
            if self.use_attention:
                return features, attention(features, training=False)[..., 0]
            return features, tf.norm(features, axis=-1)  # the attention head is not needed

        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32)])
        def resize(image, size):
            return tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=False)

        self._run = run
        self._resize = resize

    def network_calls_traced(self) -> int:
        """How many times the network function was traced (1 means no retracing)."""
        return self._run.experimental_get_tracing_count()

    def score_map(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Dense keypoint scores of one pyramid level of ``image``, cropped to the real image."""
        config = dataclasses.replace(self.config, scales=(float(scale),))
        levels = pyramid(image.shape[0], image.shape[1], config, self.net.stride)
        if not levels:
            return np.zeros((0, 0), np.float32)
        level = levels[0]
        *_, scores = next(self._run_bucket([image], [level], level.bucket, 1))
        return scores

    def extract(self, image: np.ndarray) -> Features:
        return self.extract_batch([image])[0]

    def extract_batch(self, images: list[np.ndarray]) -> list[Features]:
        """Features of each RGB uint8 image (H, W, 3), computed with shared batched network calls."""
        stride = self.net.stride
        levels = [lv for i, img in enumerate(images) for lv in pyramid(img.shape[0], img.shape[1], self.config, stride, i)]
        by_bucket: dict[tuple, list[Level]] = defaultdict(list)
        for lv in levels:
            by_bucket[lv.bucket].append(lv)
        parts: dict[int, list[tuple]] = defaultdict(list)
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            batch = self.batch_size(bucket)
            for start in range(0, len(members), batch):
                chunk = members[start : start + batch]
                for lv, part in zip(chunk, self._run_bucket(images, chunk, bucket, self.padded_batch(len(chunk), batch))):
                    parts[lv.image].append((lv, part))
        return [self._assemble(img, sorted(parts[i], key=lambda p: p[0].scale)) for i, img in enumerate(images)]

    def batch_size(self, bucket: tuple) -> int:
        """Most pyramid levels per network call for a bucket shape."""
        return max(1, self.config.batch_pixels // (bucket[0] * bucket[1]))

    @staticmethod
    def padded_batch(n: int, limit: int) -> int:
        """Calls are padded to a power of two (at most ``limit``): few distinct shapes, little waste."""
        return min(limit, 1 << (n - 1).bit_length())

    def _run_bucket(self, images, chunk: list[Level], bucket: tuple, batch_size: int):
        batch = np.zeros((batch_size, bucket[0], bucket[1], 3), np.float32)
        for j, lv in enumerate(chunk):
            resized = self._resize(images[lv.image], np.array([lv.height, lv.width], np.int32)).numpy()
            batch[j, : lv.height, : lv.width] = self.net.normalise(resized)
        features, scores = self._run(batch)
        features, scores = features.numpy(), scores.numpy()
        ys = self.net.receptive_field.centres(features.shape[1])
        xs = self.net.receptive_field.centres(features.shape[2])
        for j, lv in enumerate(chunk):
            rows = np.flatnonzero((ys >= 0) & (ys <= lv.height - 1))
            cols = np.flatnonzero((xs >= 0) & (xs <= lv.width - 1))
            yield ys[rows], xs[cols], features[j][np.ix_(rows, cols)], scores[j][np.ix_(rows, cols)]

    def _assemble(self, image: np.ndarray, parts) -> Features:
        height, width = image.shape[:2]
        locations, scales, scores, descriptors = [], [], [], []
        for lv, (ys, xs, feats, sc) in parts:
            # Pixel-index centre in the level -> original image (bilinear resize with half-pixel centres).
            y = (ys + 0.5) * (height / lv.height) - 0.5
            x = (xs + 0.5) * (width / lv.width) - 0.5
            grid_y, grid_x = np.meshgrid(y, x, indexing="ij")
            locations.append(np.stack([grid_y.ravel(), grid_x.ravel()], axis=1))
            scales.append(np.full(grid_y.size, lv.scale))
            scores.append(sc.ravel())
            descriptors.append(feats.reshape(-1, feats.shape[-1]))
        channels = self.net.feature_channels
        if not parts:
            return Features(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                            np.zeros((0, channels), np.float32), (height, width))
        all_scores = np.concatenate(scores)
        keep = select_keypoints(all_scores, self.config.max_features, self.threshold)
        return Features(
            locations=np.concatenate(locations)[keep].astype(np.float32),
            scales=np.concatenate(scales)[keep].astype(np.float32),
            scores=all_scores[keep].astype(np.float32),
            descriptors=np.concatenate(descriptors)[keep].astype(np.float32),
            image_size=(height, width),
        )
