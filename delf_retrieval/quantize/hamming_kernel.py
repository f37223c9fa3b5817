"""The compiled ASMK scan (numba): Hamming distances of packed binary signatures along the inverted
lists of a query's words, turned into the selective similarity and summed per image. Same inputs
and results as ``delf_retrieval.first_stage.asmk.scan_numpy``."""

from __future__ import annotations

import numba
import numpy as np

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


@numba.njit(cache=True, nogil=True)
def _scan(query_words, query_signatures, offsets, images, signatures, weights, table, popcount, out):
    nbytes = signatures.shape[1]
    for i in range(query_words.shape[0]):
        word = query_words[i]
        weight = weights[word]
        if weight == 0.0:
            continue
        for e in range(offsets[word], offsets[word + 1]):
            h = 0
            for b in range(nbytes):
                h += popcount[query_signatures[i, b] ^ signatures[e, b]]
            s = table[h]
            if s != 0.0:
                out[images[e]] += weight * s


def scan(query_words, query_signatures, offsets, images, signatures, weights, table, out):
    """``out[image] += weights[word] * table[hamming(query signature, entry signature)]`` for every
    entry of every query word's list; ``out`` float32, updated in place and returned."""
    _scan(np.ascontiguousarray(query_words, np.int64), np.ascontiguousarray(query_signatures, np.uint8),
          np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(images, np.int32),
          np.ascontiguousarray(signatures, np.uint8), np.ascontiguousarray(weights, np.float32),
          np.ascontiguousarray(table, np.float32), _POPCOUNT, out)
    return out
