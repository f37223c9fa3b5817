"""Product quantization: M sub-vectors, 2^bits centroids each; encoding, decoding, distance tables
for asymmetric search, and bit-packing of codes (50 bits in 7 bytes by default)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from delf_retrieval.quantize import kmeans as km


@dataclass
class ProductQuantizer:
    """Codebooks (M, K, dsub): sub-vector j of a vector is coded by its nearest row of codebooks[j]."""

    codebooks: np.ndarray  # (M, K, dsub) float32

    @property
    def m(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def k(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def dsub(self) -> int:
        return int(self.codebooks.shape[2])

    @property
    def dim(self) -> int:
        return self.m * self.dsub

    @property
    def bits(self) -> int:
        return int(np.ceil(np.log2(self.k)))

    def _split(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {x.shape}")
        return x.reshape(len(x), self.m, self.dsub)

    def distance_tables(self, x: np.ndarray) -> np.ndarray:
        """Squared distances of each sub-vector to each centroid: (n, M, K) float32. The distance of
        x to a code c is sum_j tables[j, c_j] (asymmetric: x itself is not quantized)."""
        sub = self._split(x)
        diff = sub[:, :, None, :] - self.codebooks[None]
        return np.einsum("nmkd,nmkd->nmk", diff, diff)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes (n, M) uint16 if K > 256 else uint8: the nearest centroid per sub-vector."""
        dtype = np.uint8 if self.k <= 256 else np.uint16
        sub = self._split(x)
        out = np.empty((len(sub), self.m), dtype)
        # ||c||^2 - 2 x.c per sub-space with one matrix product each (||x||^2 does not change the argmin).
        c_sq = np.einsum("mkd,mkd->mk", self.codebooks, self.codebooks)
        for j in range(self.m):
            for start in range(0, len(sub), 65536):
                block = sub[start:start + 65536, j]
                out[start:start + 65536, j] = np.argmin(c_sq[j] - 2.0 * (block @ self.codebooks[j].T), axis=1)
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstructions (n, M * dsub) float32."""
        codes = np.asarray(codes)
        k = self.codebooks.shape[1]
        # One gather from the flattened codebooks: sub-space j's centroid c is row j * k + c.
        rows = codes.astype(np.intp) + np.arange(0, self.m * k, k, dtype=np.intp)
        return np.take(self.codebooks.reshape(self.m * k, -1), rows, axis=0).reshape(len(codes), self.dim)


def train(x: np.ndarray, m: int = 10, bits: int = 5, iterations: int = 20, seed: int = 0) -> ProductQuantizer:
    """Codebooks from vectors (n, d), d divisible by m; needs n >= 2^bits."""
    x = np.asarray(x, np.float32)
    if x.shape[1] % m:
        raise ValueError(f"dimension {x.shape[1]} is not divisible into {m} sub-vectors")
    if not 1 <= bits <= 16:
        raise ValueError("bits per sub-vector must be in 1..16")
    sub = x.reshape(len(x), m, x.shape[1] // m)
    return ProductQuantizer(km.kmeans_subspaces(sub, 2 ** bits, iterations=iterations, seed=seed))


def packed_bytes(m: int, bits: int) -> int:
    return (m * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, M) codes -> (n, ceil(M*bits/8)) uint8, little-endian bit order, no padding between codes."""
    codes = np.asarray(codes).astype(np.uint32)
    n, m = codes.shape
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    bit_planes = ((codes[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bit_planes.reshape(n, m * bits), axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, m: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (n, M) uint8 (uint16 above 8 bits)."""
    packed = np.asarray(packed, np.uint8)
    if packed.ndim != 2 or packed.shape[1] != packed_bytes(m, bits):
        raise ValueError(f"expected packed codes of shape (n, {packed_bytes(m, bits)}), got {packed.shape}")
    planes = np.unpackbits(packed, axis=1, count=m * bits, bitorder="little").reshape(len(packed), m, bits)
    weights = (1 << np.arange(bits, dtype=np.uint32))
    values = (planes.astype(np.uint32) * weights).sum(axis=2)
    return values.astype(np.uint8 if bits <= 8 else np.uint16)
