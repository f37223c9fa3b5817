"""The first stage's image vectors: VLAD over a few visual words, the words derived from the
quantizer's coarse centroids so that every index gets them without a pass over its data."""

from __future__ import annotations

import numpy as np

from delf_retrieval.quantize.kmeans import kmeans

DEFAULT_WORDS = 16


def words_of(centroids: np.ndarray, n_words: int = DEFAULT_WORDS, seed: int = 0) -> np.ndarray:
    """``n_words`` visual words (n_words, d): k-means of the coarse cells' centroids, which already
    summarise the descriptors the quantizer was trained on. A function of the codebooks alone, so
    every version (and every worker) derives the same words."""
    centroids = np.asarray(centroids, np.float32)
    return kmeans(centroids, min(n_words, len(centroids)), iterations=20, seed=seed)


def assign_words(descriptors: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Nearest visual word of each descriptor (the largest dot product after the norm correction)."""
    scores = descriptors @ words.T - 0.5 * np.sum(words * words, axis=1)
    return np.argmax(scores, axis=1)


def accumulate(descriptors: np.ndarray, owners: np.ndarray, n_owners: int, words: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """Add the residuals of ``descriptors`` to their nearest word into ``out`` (n_owners, k, d), per
    owner (the row of the image each descriptor belongs to). Unnormalised: finish with :func:`normalise`."""
    k, d = words.shape
    if out is None:
        out = np.zeros((n_owners, k, d), np.float32)
    if not len(descriptors):
        return out
    descriptors = np.asarray(descriptors, np.float32)
    assigned = assign_words(descriptors, words)
    residuals = descriptors - words[assigned]
    slot = np.asarray(owners, np.int64) * k + assigned  # (owner, word) flattened
    used, slot = np.unique(slot, return_inverse=True)
    flat = out.reshape(-1, d)
    for j in range(d):  # one bincount per dimension: far faster than np.add.at
        flat[used, j] += np.bincount(slot, weights=residuals[:, j], minlength=len(used)).astype(np.float32)
    return out


def normalise(vlad: np.ndarray) -> np.ndarray:
    """Signed square root, then L2 per word (intra-normalisation: no word dominates through repeated
    texture), then L2 overall. (n, k, d) -> (n, k * d) float32."""
    v = np.sign(vlad) * np.sqrt(np.abs(vlad))
    v = v / np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-12)
    v = v.reshape(len(v), -1)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def image_vectors(descriptors: np.ndarray, owners: np.ndarray, n_owners: int, words: np.ndarray) -> np.ndarray:
    """The VLAD vector (n_owners, k * d) of each owner's descriptors (an owner without any: zeros)."""
    return normalise(accumulate(descriptors, owners, n_owners, words))


def aggregate(descriptors: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The VLAD vector (k * d,) of one image's PCA'd descriptors."""
    descriptors = np.asarray(descriptors, np.float32)
    return image_vectors(descriptors, np.zeros(len(descriptors), np.int64), 1, words)[0]


def vectors_of_postings(postings, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted image ids, their vectors) from (image ids, descriptors) blocks, an image's rows in
    any number of blocks (a reader's ``postings()``: offline, for benchmarks and checks)."""
    blocks = [(np.asarray(ids, np.int64), np.asarray(d, np.float32)) for ids, d in postings]
    image_ids = np.unique(np.concatenate([ids for ids, _ in blocks])) if blocks else np.zeros(0, np.int64)
    total = np.zeros((len(image_ids), len(words), words.shape[1]), np.float32)
    for ids, descriptors in blocks:
        accumulate(descriptors, np.searchsorted(image_ids, ids), len(image_ids), words, out=total)
    return image_ids, normalise(total)
