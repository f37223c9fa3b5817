"""Building an index from per-image features: sample descriptors, train PCA + quantizer, encode each
image's features into posting rows, and (for corpora that fit in memory) write the whole index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable
import numpy as np
from delf_retrieval.quantize import pca as pca_lib
from delf_retrieval import quantize
from delf_retrieval.index import shards
from delf_retrieval.extraction.features import Features
from delf_retrieval.corpus import inputs
import heapq
import time


class Reservoir:
    """A uniform random sample of at most ``max_rows`` rows of a stream of blocks, in bounded memory;
    two reservoirs of disjoint streams merge into a uniform sample of both (for parallel runs)."""

    def __init__(self, max_rows: int, seed: int = 0):
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)
        self._buffer: np.ndarray | None = None  # rows[:filled] hold the sample; grows by doubling
        self.seen = 0

    @property
    def rows(self) -> np.ndarray | None:
        """The sample so far, (min(seen, max_rows), d)."""
        return None if self._buffer is None else self._buffer[:min(self.seen, self.max_rows)]

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, np.float32)
        if len(block) == 0:
            return
        if self._buffer is None:
            self._buffer = np.empty((0, block.shape[1]), np.float32)
        fill = min(max(self.max_rows - self.seen, 0), len(block))
        if fill:
            need = self.seen + fill
            if need > len(self._buffer):  # amortised growth: no copy of the whole sample per block
                grown = np.empty((min(self.max_rows, max(need, 2 * len(self._buffer))), block.shape[1]), np.float32)
                grown[:self.seen] = self._buffer[:self.seen]
                self._buffer = grown
            self._buffer[self.seen:need] = block[:fill]
        # Algorithm R: the i-th row overall (0-based) takes a random slot with probability max_rows/(i+1);
        # within a block, later rows overwrite earlier ones exactly as a row-by-row loop would.
        later = np.arange(self.seen + fill, self.seen + len(block))
        slots = (self.rng.random(len(later)) * (later + 1)).astype(np.int64)
        keep = slots < self.max_rows
        self._buffer[slots[keep]] = block[fill:][keep]
        self.seen += len(block)

    def merge(self, other: "Reservoir") -> None:
        """Absorb another reservoir: the number of rows drawn from each side is hypergeometric in
        the two stream sizes, so the result is a uniform sample of the union."""
        if other.rows is None or other.seen == 0:
            return
        if self.rows is None or self.seen == 0:
            self._buffer, self.seen = other.rows.copy(), other.seen
            return
        total = min(self.max_rows, self.seen + other.seen)
        from_self = int(self.rng.hypergeometric(self.seen, other.seen, total))
        mine = self.rows[self.rng.choice(len(self.rows), from_self, replace=False)]
        theirs = other.rows[self.rng.choice(len(other.rows), total - from_self, replace=False)]
        self._buffer = np.concatenate([mine, theirs])
        self.seen += other.seen

    def result(self) -> np.ndarray:
        if self.rows is None:
            raise ValueError("no features to sample from")
        return self.rows


def sample_descriptors(features: Iterable[Features], max_rows: int, seed: int = 0) -> np.ndarray:
    """A uniform random sample of at most ``max_rows`` descriptors over all images, in one pass."""
    reservoir = Reservoir(max_rows, seed)
    for f in features:
        reservoir.add(f.descriptors)
    return reservoir.result()


def train(raw_sample: np.ndarray, params: quantize.IndexParams = quantize.IndexParams(), pca_dim: int = pca_lib.DEFAULT_DIM,
          expected_count: int | None = None) -> tuple[pca_lib.PCA, quantize.Quantizer]:
    """PCA and quantizer from a sample of raw descriptors (what the separate builder job does)."""
    projection = pca_lib.fit(raw_sample, pca_dim)
    return projection, quantize.train(projection.transform(raw_sample), params, expected_count)


def encode_image(image_id: int, features: Features, projection: pca_lib.PCA,
                 quantizer: quantize.Quantizer) -> shards.PostingRows:
    """One image's posting rows."""
    return shards.PostingRows(quantizer.encode(projection.transform(features.descriptors)),
                              np.full(len(features), image_id, np.int64), features.locations, features.scales,
                              features.scores)


def write(directory: str, parts: list[shards.PostingRows], image_table, projection: pca_lib.PCA,
          quantizer: quantize.Quantizer, dead_letters=None, model: dict | None = None, **kwargs) -> dict:
    """Write an index from posting rows held in memory; returns the manifest."""
    return shards.write_index(directory, quantizer=quantizer, pca=projection, images=image_table,
                              dead_letters=dead_letters, model=model,
                              rows=shards.PostingRows.concatenate(parts, quantizer.params.pq_m), **kwargs)


@dataclass(frozen=True)
class TrainedModel:
    """The PCA + quantizer an index encodes with, as the bytes of their two files (what travels
    between pipeline steps and lands in the index), and the record of their training: descriptors
    trained on, seconds, and the quantization error on the training sample (the drift baseline)."""

    pca: bytes
    quantizer: bytes
    sample_size: int = 0
    train_seconds: float = 0.0
    quantization_error: float | None = None

    @staticmethod
    def trained(raw_sample: np.ndarray, params: quantize.IndexParams, pca_dim: int,
                expected_count: int | None = None) -> "TrainedModel":
        """Train on a sample of raw descriptors (``train``), timed, with its quantization error."""

        start = time.time()
        projection, quantizer = train(raw_sample, params, pca_dim, expected_count)
        return TrainedModel(projection.to_npz_bytes(), quantizer.to_npz_bytes(), int(len(raw_sample)),
                            round(time.time() - start, 1), quantization_error(projection, quantizer, raw_sample))

    @staticmethod
    def from_record(pca: bytes, quantizer: bytes, training: dict | None) -> "TrainedModel":
        """Model files plus a training record as :meth:`training_record` writes it (a manifest's)."""
        training = training or {}
        return TrainedModel(pca, quantizer, int(training.get("sample_size", 0)), float(training.get("seconds", 0.0)),
                            training.get("quantization_error"))

    def load(self) -> tuple[pca_lib.PCA, quantize.Quantizer]:
        return pca_lib.PCA.load(self.pca), quantize.Quantizer.load(self.quantizer)

    def training_record(self) -> dict:
        """What the manifest records of the model's training."""
        record = {"sample_size": self.sample_size, "seconds": self.train_seconds}
        if self.quantization_error is not None:
            record["quantization_error"] = self.quantization_error
        return record


def shard_of_cells(cells: np.ndarray, n_cells: int, n_shards: int) -> np.ndarray:
    """Shard number of each cell: contiguous, near-equal ranges of cells, so shards cover disjoint
    cell ranges in order."""
    return (np.asarray(cells, np.int64) * n_shards) // n_cells


def quantization_error(projection: pca_lib.PCA, quantizer: quantize.Quantizer, raw: np.ndarray) -> float:
    """Mean squared distance between PCA'd descriptors and their quantized reconstructions: what
    the codebooks lose. Recorded at training; re-measured on new images to detect drift."""
    x = projection.transform(raw)
    encoded = quantizer.encode(x)
    return float(np.mean(np.sum((x - quantizer.decode(encoded.regions, encoded.codes)) ** 2, axis=1)))


def split_by_shard(rows: shards.PostingRows, n_cells: int, n_shards: int):
    """(shard, the rows that fall in it) for each shard the rows touch."""
    shard = shard_of_cells(rows.encoded.cells, n_cells, n_shards)
    for s in np.unique(shard):
        yield int(s), rows.take(np.flatnonzero(shard == s))


DEFAULT_MAX_REJECTED_FRACTION = 0.5


class PublishRefused(Exception):
    """A build that must not replace the serving index: inputs unaccounted for, an image id shared
    by two uris, or more of its inputs rejected than the run allows (a bug that rejects everything
    must not replace a good index)."""


def check_publishable(listed: int, indexed: int, dead_letters: list[dict],
                      max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION) -> None:
    """Raise :class:`PublishRefused` unless every listed input is indexed or rejected and at most
    ``max_rejected_fraction`` of them were rejected. (Image ids are checked unique when planned.)"""
    accounted = indexed + len(dead_letters)
    if accounted != listed:
        raise PublishRefused(f"{listed} inputs listed but {indexed} indexed + {len(dead_letters)} rejected: "
                             f"{listed - accounted} unaccounted for")
    if listed and len(dead_letters) / listed > max_rejected_fraction:
        reasons: dict[str, int] = {}
        for d in dead_letters:
            key = f"{d['stage']}/{d['reason']}"
            reasons[key] = reasons.get(key, 0) + 1
        common = ", ".join(f"{k} {n}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        raise PublishRefused(f"{len(dead_letters)} of {listed} inputs rejected ({len(dead_letters) / listed:.0%}, "
                             f"above the allowed {max_rejected_fraction:.0%}; {common}): not published, the "
                             "previous index keeps serving")


TRAINING_OVERSAMPLING = 2.0  # images yield fewer than max_features, small ones far fewer


def training_images(sample_size: int, max_features: int, oversampling: float = TRAINING_OVERSAMPLING) -> int:
    """How many images a training build extracts first, to draw its ``sample_size`` descriptors from:
    enough at ``max_features`` per image, ``oversampling`` times over (a corpus with fewer images
    is all sample)."""
    return max(int(np.ceil(oversampling * sample_size / max(int(max_features), 1))), 1)


def training_sample(uris, sample_size: int, max_features: int) -> set[int]:
    """The image ids of the training sample: the :func:`training_images` smallest image ids (a hash
    of the uri, so every run and worker agrees, the sample is spread over the whole listing whatever
    its order, and it has exactly that many images when the corpus has them)."""

    return set(heapq.nsmallest(training_images(sample_size, max_features), map(inputs.image_id, uris)))


def expected_descriptors(listed: int, per_image: float) -> int | None:
    """The index's descriptor count as the training sample predicts it (sizes LOPQ regions); None
    when the sample measured nothing."""
    return int(round(listed * per_image)) if np.isfinite(per_image) and per_image > 0 else None
