"""Attention threshold calibration: the score threshold at which a typical (median) image of a
sample keeps a target number of features, for a newly trained attention head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from delf_retrieval.extraction.extractor import Extractor

DEFAULT_TARGET_FEATURES = 1000
DEFAULT_CALIBRATION_IMAGES = 50


@dataclass
class Calibration:
    threshold: float
    target_features: int
    images: int
    kept_median: float  # features the median image keeps at the threshold (before the top-K cap)
    kept_quartiles: tuple  # 25th / 75th percentile of the same

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def kept_counts(score_lists: list[np.ndarray], threshold: float) -> np.ndarray:
    """How many features of each image score >= ``threshold``."""
    return np.array([int(np.count_nonzero(s >= threshold)) for s in score_lists])


def threshold_for_target(score_lists: list[np.ndarray], target: int) -> float:
    """The highest threshold at which at least half the images keep ``target`` features or more.

    An image keeps >= target features exactly when the threshold is at most its target-th best
    score, so the answer is the lower median of those scores over the images (an image with fewer
    candidates than ``target`` counts as -inf). When the median image has fewer than ``target``
    candidates in all, no threshold helps and the result is -inf (keep everything).
    """
    if not score_lists:
        raise ValueError("no images to calibrate on")
    kth = np.array([np.sort(s)[::-1][target - 1] if len(s) >= target else -np.inf for s in score_lists])
    # Lower median from the top: the ceil(n/2)-th largest value.
    return float(np.sort(kth)[::-1][(len(kth) + 1) // 2 - 1])


def candidate_scores(net, images: list[np.ndarray], extraction) -> list[np.ndarray]:
    """Every candidate feature's score per image under an extraction config (all pyramid levels,
    no threshold, no top-K)."""

    config = dataclasses.replace(extraction, score_threshold=-np.inf, max_features=np.iinfo(np.int32).max)
    extractor = Extractor(net, config)
    return [extractor.extract(image).scores for image in images]


def calibrate(net, images: list[np.ndarray], extraction, target: int = DEFAULT_TARGET_FEATURES) -> Calibration:
    """The threshold for ``net`` at which the median of ``images`` keeps ``target`` features when
    extracted with ``extraction`` (its scales and size limits matter; its threshold and top-K do not)."""
    scores = candidate_scores(net, images, extraction)
    threshold = threshold_for_target(scores, target)
    if not np.isfinite(threshold):
        threshold = 0.0  # attention scores are softplus outputs, >= 0: keep everything
    kept = kept_counts(scores, threshold)
    return Calibration(float(threshold), int(target), len(images), float(np.median(kept)),
                       (float(np.percentile(kept, 25)), float(np.percentile(kept, 75))))
