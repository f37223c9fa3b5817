"""Descriptor dimensionality reduction as in DELF: L2-normalise, PCA (fit on a sample), L2-normalise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval import npz

PCA_FORMAT_VERSION = 1
DEFAULT_DIM = 40


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


@dataclass(frozen=True)
class PCA:
    """A fitted projection. ``components`` rows are the principal axes, strongest first; no whitening
    (the paper's ``use_whitening: false``)."""

    mean: np.ndarray  # (D,) float32, mean of the L2-normalised sample
    components: np.ndarray  # (d, D) float32
    explained_variance: np.ndarray  # (d,) float32

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[0])

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """L2-normalise and project, without the final normalisation (equals sklearn's transform)."""
        x = np.asarray(descriptors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected descriptors of shape (n, {self.input_dim}), got {x.shape}")
        return (l2_normalise(x) - self.mean) @ self.components.T

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """The full DELF reduction: L2 -> PCA -> L2, float32 (n, d)."""
        return l2_normalise(self.project(descriptors))

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_npz_bytes())

    def to_npz_bytes(self) -> bytes:
        return npz.to_bytes(PCA_FORMAT_VERSION, mean=self.mean, components=self.components,
                            explained_variance=self.explained_variance)

    @classmethod
    def load(cls, source) -> "PCA":
        """Read a file written by :meth:`save` (path, file object or bytes); never unpickles."""
        data = npz.read(source, PCA_FORMAT_VERSION, "PCA")
        return cls(mean=data["mean"].astype(np.float32), components=data["components"].astype(np.float32),
                   explained_variance=data["explained_variance"].astype(np.float32))


def fit(descriptors: np.ndarray, dim: int = DEFAULT_DIM) -> PCA:
    """Fit on a sample of raw descriptors (n, D); n must be at least ``dim``.

    Uses scikit-learn's covariance eigendecomposition, which is exact and costs O(n D^2), so a
    sample of millions of 1024-D descriptors fits in minutes on one machine.
    """
    from sklearn.decomposition import PCA as SkPCA  # heavy: imported on first use

    x = l2_normalise(descriptors)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of descriptors, got shape {x.shape}")
    if dim > x.shape[1]:
        raise ValueError(f"cannot project {x.shape[1]}-D descriptors to {dim} dimensions")
    if x.shape[0] < dim:
        raise ValueError(f"PCA to {dim} dimensions needs at least {dim} descriptors, got {x.shape[0]}")
    model = SkPCA(n_components=dim, svd_solver="covariance_eigh").fit(x)
    return PCA(mean=model.mean_.astype(np.float32), components=model.components_.astype(np.float32),
               explained_variance=model.explained_variance_.astype(np.float32))
