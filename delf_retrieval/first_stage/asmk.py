"""The ASMK* image first stage: a visual-word codebook, per image its words' binarized aggregated residuals, one inverted file per segment, and the selective match kernel that ranks images."""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass

import numpy as np

from delf_retrieval import npz
from delf_retrieval.quantize.kmeans import kmeans, nearest

FORMAT_VERSION = 1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


@dataclass(frozen=True)
class AsmkConfig:
    """How the first stage is built and scored (ASMK*, Tolias, Avrithis, Jegou 2013/2016)."""

    words: int = 16384  # codebook size
    database_assignment: int = 1  # nearest words each database descriptor joins
    query_assignment: int = 1  # nearest words each query descriptor joins (multiple assignment)
    alpha: float = 3.0  # selectivity exponent
    tau: float = 0.0  # selectivity threshold on the signature similarity u in [-1, 1]
    idf: bool = True  # weight each word by log(N / images holding it)
    sample_rows: int = 200_000  # descriptors the codebook is trained on
    iterations: int = 10  # Lloyd iterations of the codebook
    seed: int = 0

    def __post_init__(self):
        if self.words < 1 or self.database_assignment < 1 or self.query_assignment < 1:
            raise ValueError("words and assignments must be at least 1")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "AsmkConfig":
        return cls(**record)


def binarize(residuals: np.ndarray) -> np.ndarray:
    """Packed sign bits (n, ceil(d / 8)) uint8 of (n, d) residuals: bit set where the component is > 0."""
    return np.packbits(np.asarray(residuals) > 0, axis=1)


def selectivity(u: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """sigma_alpha(u) = sign(u) |u|^alpha where u > tau, else 0."""
    u = np.asarray(u, np.float64)
    return np.where(u > tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


def similarity_table(bits: int, alpha: float, tau: float) -> np.ndarray:
    """sigma_alpha(u(h)) for every Hamming distance h in 0..bits, u(h) = 1 - 2 h / bits (the cosine
    of two +-1 vectors that differ in h components), float32."""
    return selectivity(1.0 - 2.0 * np.arange(bits + 1) / bits, alpha, tau).astype(np.float32)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed signatures, broadcast over leading axes."""
    return _POPCOUNT[np.bitwise_xor(a, b)].sum(axis=-1, dtype=np.int64)


def aggregate_sums(owners: np.ndarray, descriptors: np.ndarray, words: np.ndarray, multiple: int = 1):
    """Per (owner, word) of a chunk of rows, the sum of the residuals to that word of the owner's
    descriptors assigned to it (each descriptor to its ``multiple`` nearest words): (owners, words,
    sums (n, d) float64), sorted by owner then word; an owner is any int64 label (an image id).
    Unbinarized, so that the chunks of one image can add up."""
    descriptors = np.asarray(descriptors, np.float32)
    k, d = words.shape
    if not len(descriptors):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, d))
    labels, _ = nearest(descriptors, words, k=min(multiple, k))
    m = labels.shape[1]
    flat_words = labels.reshape(-1)
    residuals = np.repeat(descriptors, m, axis=0) - words[flat_words]
    distinct, local = np.unique(np.asarray(owners, np.int64), return_inverse=True)  # ids may be near 2^63
    used, slot = np.unique(np.repeat(local, m) * k + flat_words, return_inverse=True)
    sums = np.empty((len(used), d), np.float64)
    for j in range(d):  # one bincount per dimension: far faster than np.add.at
        sums[:, j] = np.bincount(slot, weights=residuals[:, j], minlength=len(used))
    return distinct[used // k], used % k, sums


class Codebook:
    """The visual words (k, d) float32, trained once and shared by every part of an index."""

    def __init__(self, words: np.ndarray):
        self.words = np.ascontiguousarray(words, np.float32)

    def __len__(self) -> int:
        return len(self.words)

    @property
    def bits(self) -> int:
        return self.words.shape[1]

    @classmethod
    def train(cls, sample: np.ndarray, config: AsmkConfig = AsmkConfig()) -> "Codebook":
        sample = np.asarray(sample, np.float32)
        if len(sample) > config.sample_rows:
            sample = sample[np.sort(np.random.default_rng(config.seed).choice(len(sample), config.sample_rows, False))]
        k = min(config.words, len(sample))
        return cls(kmeans(sample, k, iterations=config.iterations, seed=config.seed, max_points_per_centroid=256))

    def query(self, descriptors: np.ndarray, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(words, signatures) of one image's descriptors, sorted by word."""
        _, words, sums = aggregate_sums(np.zeros(len(descriptors), np.int64), descriptors, self.words, multiple)
        return words, binarize(sums)


class AsmkPart:
    """One segment's inverted file: for each word the images holding it (their positions in
    ``image_ids``) and their signatures, in image order. Built from that segment's rows alone."""

    def __init__(self, n_words: int, image_ids: np.ndarray, offsets: np.ndarray, images: np.ndarray,
                 signatures: np.ndarray):
        self.n_words = int(n_words)
        self.image_ids = np.asarray(image_ids, np.int64)
        self.offsets = np.asarray(offsets, np.int64)
        self.images = np.asarray(images, np.int32)
        self.signatures = np.ascontiguousarray(signatures, np.uint8)
        if (len(self.offsets) != self.n_words + 1 or self.offsets[-1] != len(self.images)
                or len(self.images) != len(self.signatures)):
            raise ValueError("an ASMK part's offsets, images and signatures disagree")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def entries(self) -> int:
        return len(self.images)

    def words(self) -> np.ndarray:
        """The word of each entry."""
        return np.repeat(np.arange(self.n_words, dtype=np.int64), np.diff(self.offsets))

    @classmethod
    def build(cls, codebook: Codebook, chunks, multiple: int = 1, image_ids: np.ndarray | None = None) -> "AsmkPart":
        """The part of a segment from its rows: ``chunks`` yields (image id per row, descriptors), in
        any order and split anywhere (an image's rows may span chunks). ``image_ids``: the segment's
        images (default: those met in the rows); an image without rows holds no word."""
        if isinstance(chunks, tuple):
            chunks = [chunks]
        collected = [aggregate_sums(ids, descriptors, codebook.words, multiple) for ids, descriptors in chunks]
        k = len(codebook)
        owner_ids = np.concatenate([c[0] for c in collected] + [np.zeros(0, np.int64)])
        words = np.concatenate([c[1] for c in collected] + [np.zeros(0, np.int64)])
        sums = np.concatenate([c[2] for c in collected] + [np.zeros((0, codebook.bits))])
        order = np.lexsort((words, owner_ids))  # an image's rows over several chunks add up
        owner_ids, words, sums = owner_ids[order], words[order], sums[order]
        starts = np.flatnonzero(np.r_[True, (owner_ids[1:] != owner_ids[:-1]) | (words[1:] != words[:-1])])
        if len(starts) < len(owner_ids):
            sums = np.add.reduceat(sums, starts, axis=0)
            owner_ids, words = owner_ids[starts], words[starts]
        if image_ids is None:
            image_ids = np.unique(owner_ids)
        image_ids = np.unique(np.asarray(image_ids, np.int64))
        positions = np.searchsorted(image_ids, owner_ids)
        if len(owner_ids) and (positions.max() >= len(image_ids) or (image_ids[positions] != owner_ids).any()):
            raise ValueError("rows of an image the part does not list")
        order = np.lexsort((positions, words))  # by word, then image
        offsets = np.zeros(k + 1, np.int64)
        offsets[1:] = np.cumsum(np.bincount(words, minlength=k))
        return cls(k, image_ids, offsets, positions[order], binarize(sums[order]))

    def to_bytes(self) -> bytes:
        return npz.to_bytes(FORMAT_VERSION, image_ids=self.image_ids, offsets=self.offsets, images=self.images,
                            signatures=self.signatures)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "AsmkPart":
        a = npz.read(io.BytesIO(payload), FORMAT_VERSION, "ASMK part")
        return cls(len(a["offsets"]) - 1, a["image_ids"], a["offsets"], a["images"], a["signatures"])


def scan_numpy(query_words, query_signatures, offsets, images, signatures, weights, table, out):
    """The kernel in numpy, one query word at a time: ``out[image] += weights[word] *
    table[hamming(query signature, image's signature)]`` over the word's inverted list."""
    for word, signature in zip(np.asarray(query_words).tolist(), query_signatures):
        lo, hi = offsets[word], offsets[word + 1]
        if lo == hi or weights[word] == 0:
            continue
        contribution = weights[word] * table[hamming(signatures[lo:hi], signature)]
        np.add.at(out, images[lo:hi], contribution.astype(out.dtype))
    return out


class AsmkSearcher:
    """Several parts (one per segment) searched as one index, with one codebook; ``removed`` image ids
    (tombstones) are never returned. idf and each image's self-similarity are computed once, here,
    over the live images of every part."""

    def __init__(self, codebook: Codebook, parts: list[AsmkPart], config: AsmkConfig = AsmkConfig(),
                 removed: np.ndarray | None = None, kernel: str = "compiled"):
        if kernel not in ("compiled", "numpy"):
            raise ValueError(f"unknown kernel {kernel!r}: expected 'compiled' or 'numpy'")
        self.codebook, self.parts, self.config, self.kernel = codebook, list(parts), config, kernel
        removed = np.zeros(0, np.int64) if removed is None else np.asarray(removed, np.int64)
        self.alive = [~np.isin(p.image_ids, removed) for p in self.parts]
        k = len(codebook)
        holding = np.zeros(k, np.float64)  # live images holding each word
        for part, alive in zip(self.parts, self.alive):
            if len(part.offsets) != k + 1:
                raise ValueError(f"an ASMK part of {len(part.offsets) - 1} words, the codebook has {k}")
            holding += np.bincount(part.words(), weights=alive[part.images], minlength=k)
        live = int(sum(a.sum() for a in self.alive))
        if config.idf:
            self.weights = np.where(holding > 0, np.log(max(live, 1) / np.maximum(holding, 1)), 0.0) ** 2
        else:
            self.weights = np.ones(k)
        self.weights = self.weights.astype(np.float32)
        # Self-similarity of each image: sigma(1) = 1 for each of its words, weighted.
        self.norms = [np.sqrt(np.bincount(p.images, weights=self.weights[p.words()], minlength=len(p)))
                      for p in self.parts]
        self.table = similarity_table(codebook.bits, config.alpha, config.tau)

    def __len__(self) -> int:
        return int(sum(a.sum() for a in self.alive))

    def scores(self, descriptors: np.ndarray) -> list[np.ndarray]:
        """Per part, each image's normalised ASMK similarity to the query (0 where no word is shared,
        -inf where removed)."""
        words, signatures = self.codebook.query(descriptors, self.config.query_assignment)
        query_norm = np.sqrt(self.weights[words].sum()) if len(words) else 1.0
        out = []
        for part, alive, norm in zip(self.parts, self.alive, self.norms):
            total = np.zeros(len(part), np.float32)
            if self.kernel == "compiled" and len(words):
                from delf_retrieval.quantize import hamming_kernel  # heavy: numba compiles it on first use

                hamming_kernel.scan(words, signatures, part.offsets, part.images, part.signatures, self.weights,
                                    self.table, total)
            elif len(words):
                scan_numpy(words, signatures, part.offsets, part.images, part.signatures, self.weights,
                           self.table, total)
            with np.errstate(invalid="ignore", divide="ignore"):
                total = np.where(norm > 0, total / (np.maximum(norm, 1e-30) * max(query_norm, 1e-30)), 0.0)
            out.append(np.where(alive, total, -np.inf))
        return out

    def search(self, descriptors: np.ndarray, k: int, exclude: np.ndarray | None = None):
        """(image ids, scores) of the ``k`` live images most similar to a query's PCA'd descriptors,
        best first (ties: smaller id); only images sharing a word with positive similarity."""
        scores = self.scores(descriptors)
        ids = np.concatenate([p.image_ids for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        keep = scores > 0
        if exclude is not None:
            keep &= ~np.isin(ids, np.asarray(exclude, np.int64))
        ids, scores = ids[keep], scores[keep]
        if len(ids) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            ids, scores = ids[top], scores[top]
        order = np.lexsort((ids, -scores))
        return ids[order], scores[order]


def save(codebook: Codebook, config: AsmkConfig) -> bytes:
    """The codebook with its settings, one .npz (parts are saved with :meth:`AsmkPart.to_bytes`)."""
    return npz.to_bytes(FORMAT_VERSION, words=codebook.words, config=np.frombuffer(
        json.dumps(config.to_json(), sort_keys=True).encode(), np.uint8))


def load(payload: bytes) -> tuple[Codebook, AsmkConfig]:
    a = npz.read(io.BytesIO(payload), FORMAT_VERSION, "ASMK codebook")
    return Codebook(a["words"]), AsmkConfig.from_json(json.loads(a["config"].tobytes().decode()))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64: a well-spread 64-bit key per input."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_rows_of(reader, image_ids: np.ndarray, sample_rows: int, seed: int = 0) -> np.ndarray:
    """About ``sample_rows`` of an index's reconstructed descriptors, chosen and ordered by a
    pseudo-random key of (seed, image id, the row's place among its image's rows): the smallest keys
    win. The sample depends only on the live images' rows, not on how they are split into row groups
    or segments, so one corpus gives one vocabulary however it was written. ``image_ids``: the
    sorted ids of the index's images."""
    sample_rows = max(int(sample_rows), 1)
    salt = _mix(np.asarray([seed], np.uint64))[0]
    seen = np.zeros(len(image_ids), np.int64)  # rows of each image met so far
    keys, picked, held, threshold = [], [], 0, None
    for ids, reconstructed in reader.postings():
        owners = np.searchsorted(image_ids, ids)
        order = np.argsort(owners, kind="stable")
        starts = np.flatnonzero(np.r_[True, owners[order][1:] != owners[order][:-1]])
        place = np.empty(len(ids), np.int64)
        place[order] = seen[owners[order]] + np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
        seen += np.bincount(owners, minlength=len(image_ids))
        key = _mix(_mix(np.asarray(ids).astype(np.uint64) ^ salt) + place.astype(np.uint64))
        take = np.flatnonzero(key < threshold) if threshold is not None else np.arange(len(key))
        keys.append(key[take])
        picked.append(reconstructed[take])
        held += len(take)
        if held >= 2 * sample_rows:  # keep the smallest keys (amortised: the pool at most doubles)
            keys, picked = [np.concatenate(keys)], [np.concatenate(picked)]
            best = np.argpartition(keys[0], sample_rows - 1)[:sample_rows]
            keys, picked = [keys[0][best]], [picked[0][best]]
            held, threshold = sample_rows, keys[0].max()
    if not held:
        return np.zeros((0, 0), np.float32)
    key, sample = np.concatenate(keys), np.concatenate(picked)
    best = np.argsort(key, kind="stable")[:sample_rows]
    return sample[best]
