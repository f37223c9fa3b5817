"""Recognition at query time: a query's verified matches and the landmarks table -> its landmark and confidence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval.index import layout
from delf_retrieval.landmarks import table


@dataclass(frozen=True)
class RecognitionConfig:
    """A match is evidence for its image's landmark when RANSAC verified it with at least
    ``min_inliers`` inliers; the landmark with the most inliers over its images wins when that total
    reaches ``min_confidence`` (chosen on the three sets: benchmarks/landmarks.py)."""

    min_inliers: int = 10
    min_confidence: int = 10

    def __post_init__(self):
        if self.min_inliers < 1 or self.min_confidence < 1:
            raise ValueError("min_inliers and min_confidence must be >= 1")


@dataclass(frozen=True)
class Recognition:
    """The query's landmark (None: "none", nothing verifies against a landmark), its confidence
    (the RANSAC inliers of the query's verified matches in that landmark's images, summed), the
    images that gave it, and the representative of the landmark (uri, when known)."""

    landmark: int | None
    confidence: float
    images: int = 0
    representative: str | None = None

    def to_json(self) -> dict:
        return {"landmark": self.landmark if self.landmark is not None else "none", "confidence": self.confidence,
                "images": self.images, "representative": self.representative}


NONE = Recognition(None, 0.0)


class Recognizer:
    """The landmark of each indexed image (image id -> landmark id), looked up for a query's matches."""

    def __init__(self, image_ids: np.ndarray, landmarks: np.ndarray, representatives: dict | None = None,
                 config: RecognitionConfig = RecognitionConfig()):
        image_ids, landmarks = np.asarray(image_ids, np.int64), np.asarray(landmarks, np.int64)
        inside = landmarks >= 0
        order = np.argsort(image_ids[inside], kind="stable")
        self.image_ids, self.landmarks = image_ids[inside][order], landmarks[inside][order]
        self.representatives = representatives or {}
        self.config = config
        self.summary: list = []  # per landmark (table.summaries' records), when built from a table

    @classmethod
    def from_landmarks(cls, found, config: RecognitionConfig = RecognitionConfig()) -> "Recognizer":
        """From a ``table.Landmarks`` (its summary gives each landmark's representative)."""
        representatives = {int(s["landmark"]): s.get("representative") for s in found.summary}
        recognizer = cls(found.image_ids, found.landmarks, representatives, config)
        recognizer.summary = sorted(found.summary, key=lambda s: (-int(s["size"]), int(s["landmark"])))
        return recognizer

    def __len__(self) -> int:
        return len(self.image_ids)

    def landmark_of(self, image_ids: np.ndarray) -> np.ndarray:
        """The landmark of each image id (-1: in none, or not in the table)."""
        image_ids = np.asarray(image_ids, np.int64)
        if not len(self.image_ids):
            return np.full(len(image_ids), -1, np.int64)
        pos = np.clip(np.searchsorted(self.image_ids, image_ids), 0, len(self.image_ids) - 1)
        return np.where(self.image_ids[pos] == image_ids, self.landmarks[pos], -1)

    def recognize(self, matches: list) -> Recognition:
        """The landmark of a query from its matches (anything with ``image_id``, ``inliers`` and
        ``verified``): the landmark whose images the verified matches give the most inliers (ties:
        the lower id), or NONE when no landmark reaches ``min_confidence``."""
        evidence = [(m.image_id, m.inliers) for m in matches if m.verified and m.inliers >= self.config.min_inliers]
        if not evidence:
            return NONE
        ids = np.array([e[0] for e in evidence], np.int64)
        inliers = np.array([e[1] for e in evidence], np.float64)
        landmark = self.landmark_of(ids)
        inside = landmark >= 0
        if not inside.any():
            return NONE
        unique, position = np.unique(landmark[inside], return_inverse=True)
        totals = np.bincount(position, weights=inliers[inside])
        best = int(np.argmax(totals))  # the first maximum: the lower id
        if totals[best] < self.config.min_confidence:
            return NONE
        chosen = int(unique[best])
        return Recognition(chosen, float(totals[best]), int(np.sum(position == best)), self.representatives.get(chosen))


def load(root: str, config: RecognitionConfig = RecognitionConfig()) -> Recognizer | None:
    """The recognizer of the landmarks found beside the index at ``root`` (for whichever version: image
    ids are stable, so a table found before a nightly run still names the images that remain), or
    None when there are none, or they cannot be read (the index answers without them)."""
    try:
        found = table.load(root)
    except (layout.IndexStorageError, OSError, ValueError):
        return None
    return Recognizer.from_landmarks(found, config) if found is not None else None
