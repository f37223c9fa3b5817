"""Per-image local features (locations, scales, scores, descriptors) and their ``.npz`` file format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval import npz

FEATURES_FORMAT_VERSION = 1


@dataclass
class Features:
    """Local features of one image, all arrays aligned on the first axis.

    ``locations`` are (y, x) pixel indices in the original (upright) image: (0, 0) is the centre of
    the top-left pixel. ``scales`` is the pyramid scale each feature came from, ``scores`` its
    keypoint score (attention, or descriptor L2 norm), ``descriptors`` the raw float32 features.
    """

    locations: np.ndarray  # (N, 2) float32
    scales: np.ndarray  # (N,) float32
    scores: np.ndarray  # (N,) float32
    descriptors: np.ndarray  # (N, D) float32
    image_size: tuple[int, int]  # (height, width) of the original upright image

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_npz_bytes(self) -> bytes:
        return npz.to_bytes(
            FEATURES_FORMAT_VERSION,
            locations=self.locations.astype(np.float32),
            scales=self.scales.astype(np.float32),
            scores=self.scores.astype(np.float32),
            descriptors=self.descriptors.astype(np.float32),
            image_size=np.asarray(self.image_size, np.int64),
        )

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_npz_bytes())

    @classmethod
    def from_npz(cls, source) -> "Features":
        """Read a file written by :meth:`save` (a path, file object or bytes); never unpickles."""
        data = npz.read(source, FEATURES_FORMAT_VERSION, "features")
        return cls(
            locations=data["locations"],
            scales=data["scales"],
            scores=data["scores"],
            descriptors=data["descriptors"],
            image_size=tuple(int(v) for v in data["image_size"]),
        )
