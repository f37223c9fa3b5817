"""Building an index from per-image features: sample descriptors, train PCA + quantizer, encode each
image's features into posting rows, and (for corpora that fit in memory) write the whole index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from delf_retrieval import pca as pca_lib
from delf_retrieval import quantize, shards
from delf_retrieval.features import Features


def sample_descriptors(features: Iterable[Features], max_rows: int, seed: int = 0) -> np.ndarray:
    """A uniform random sample of at most ``max_rows`` descriptors over all images, in one pass
    (reservoir sampling in blocks: memory stays at max_rows, whatever the corpus size)."""
    rng = np.random.default_rng(seed)
    reservoir: np.ndarray | None = None
    seen = 0
    for f in features:
        block = np.asarray(f.descriptors, np.float32)
        if reservoir is None:
            reservoir = np.empty((max_rows, block.shape[1]), np.float32)
        fill = min(max(max_rows - seen, 0), len(block))
        reservoir[seen:seen + fill] = block[:fill]
        # Each later row i (0-based overall) replaces a random slot with probability max_rows / (i + 1).
        later = np.arange(seen + fill, seen + len(block))
        slots = (rng.random(len(later)) * (later + 1)).astype(np.int64)
        keep = slots < max_rows
        reservoir[slots[keep]] = block[fill:][keep]
        seen += len(block)
    if reservoir is None:
        raise ValueError("no features to sample from")
    return reservoir[:min(seen, max_rows)]


def train(raw_sample: np.ndarray, params: quantize.IndexParams = quantize.IndexParams(), pca_dim: int = pca_lib.DEFAULT_DIM,
          expected_count: int | None = None) -> tuple[pca_lib.PCA, quantize.Quantizer]:
    """PCA and quantizer from a sample of raw descriptors (what the separate builder job does)."""
    projection = pca_lib.fit(raw_sample, pca_dim)
    return projection, quantize.train(projection.transform(raw_sample), params, expected_count)


@dataclass
class EncodedImage:
    """The posting rows of one image, before they are grouped by cell."""

    image_id: int
    encoded: quantize.Encoded
    locations: np.ndarray
    scales: np.ndarray
    attentions: np.ndarray


def encode_image(image_id: int, features: Features, projection: pca_lib.PCA, quantizer: quantize.Quantizer) -> EncodedImage:
    return EncodedImage(image_id, quantizer.encode(projection.transform(features.descriptors)),
                        features.locations, features.scales, features.scores)


def write(directory: str, images: list[EncodedImage], image_table, projection: pca_lib.PCA,
          quantizer: quantize.Quantizer, dead_letters=None, model: dict | None = None, **kwargs) -> dict:
    """Write an index from encoded images held in memory; returns the manifest."""
    def cat(get):
        parts = [get(i) for i in images]
        return np.concatenate(parts) if parts else np.zeros(0)

    m = quantizer.params.pq_m
    encoded = quantize.Encoded(cat(lambda i: i.encoded.cells).astype(np.int64), cat(lambda i: i.encoded.regions).astype(np.int64),
                               np.concatenate([i.encoded.codes for i in images]) if images else np.zeros((0, m), np.uint8))
    return shards.write_index(
        directory, quantizer=quantizer, pca=projection, encoded=encoded,
        image_ids=cat(lambda i: np.full(len(i.scales), i.image_id, np.int64)),
        locations=np.concatenate([i.locations for i in images]) if images else np.zeros((0, 2)),
        scales=cat(lambda i: i.scales), attentions=cat(lambda i: i.attentions),
        images=image_table, dead_letters=dead_letters, model=model, **kwargs)
