"""Near-duplicate groups in a ranked shortlist: each group of near-identical image vectors gets at
most a few of the K slots, so that copies of one look-alike cannot push every true match out.

A web corpus holds many near-copies of some photos (re-uploads, crops, bursts). When a query
resembles one of them, the first stage ranks all its copies together; at a million images they
can fill the whole shortlist. Walking the ranking in order, an image whose vector has a cosine of
at least ``cosine`` with an earlier group's leader joins that group, else it leads a new one; a
group's images past its first ``slots`` wait behind every other candidate. Copies of a true match
that wait can still come back through the verified match's neighbours (expansion).
"""

from __future__ import annotations

import numba
import numpy as np

COSINE = 0.65  # sketches this close are one group: copies of one photo measure ~0.73, other pairs ~0.26
SLOTS = 16  # a group's most images among the first K
CANDIDATES = 16  # the spread looks at the nearest CANDIDATES * K images
DIMS = 128  # the sketch's dimensions
SEED = 0  # the projection's: every process that opens the same vectors makes the same sketches


def sketches(vectors: np.ndarray, dims: int = DIMS, rows_at_once: int = 1 << 16) -> np.ndarray:
    """(n, dims) float16 unit rows: ``vectors`` projected on a fixed random orthonormal basis."""
    dims = min(dims, vectors.shape[1])
    basis = np.linalg.qr(np.random.default_rng(SEED).standard_normal((vectors.shape[1], dims)))[0]
    basis = basis.astype(np.float32)
    out = np.empty((len(vectors), dims), np.float16)
    for a in range(0, len(vectors), rows_at_once):
        block = np.asarray(vectors[a:a + rows_at_once], np.float32) @ basis
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        out[a:a + rows_at_once] = block
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)
def _keep(sketched, k, cosine, slots):
    """The kept mask of :func:`spread`: each candidate in order is compared with the groups'
    leaders in the order they were found, and stops at the first close enough (copies of a
    top-ranked photo find their leader among the first few)."""
    n, dims = sketched.shape
    leaders = np.empty(n, np.int64)
    members = np.zeros(n, np.int64)
    keep = np.zeros(n, np.bool_)
    count, taken = 0, 0
    for i in range(n):
        if taken >= k:
            break
        found = -1
        for j in range(count):
            leader = leaders[j]
            dot = np.float32(0.0)
            for d in range(dims):
                dot += sketched[i, d] * sketched[leader, d]
            if dot >= cosine:
                found = leader
                break
        if found < 0:
            leaders[count] = i
            count += 1
            found = i
        if members[found] < slots:
            keep[i] = True
            taken += 1
        members[found] += 1
    return keep


def spread(vectors: np.ndarray, k: int, cosine: float = COSINE, slots: int = SLOTS) -> np.ndarray:
    """Positions into a ranking (``vectors``, (n, D) unit rows, nearest first: the images' sketches
    or their vectors) to keep as its first ``k``: the ranking's order, except that a group's images
    past its first ``slots`` come after all the others (see the module's docstring)."""
    k = min(int(k), len(vectors))
    keep = _keep(np.ascontiguousarray(vectors, np.float32), k, np.float32(cosine), int(slots))
    kept = np.flatnonzero(keep)
    if len(kept) >= k:
        return kept[:k]
    return np.concatenate([kept, np.flatnonzero(~keep)[:k - len(kept)]])
