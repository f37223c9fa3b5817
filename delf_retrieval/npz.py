"""Versioned ``.npz`` artifacts (features, PCA, quantizer): written with a format version, read back
without ever unpickling."""

from __future__ import annotations

import io

import numpy as np


def to_bytes(version: int, **arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, format_version=np.int32(version), **arrays)
    return buf.getvalue()


def read(source, version: int, kind: str) -> dict:
    """All arrays of a file written by :func:`to_bytes` (a path, file object or bytes), after
    checking its format version; ``allow_pickle=False`` always."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with np.load(source, allow_pickle=False) as data:
        found = int(data["format_version"])
        if found != version:
            raise ValueError(f"{kind} format version {found}, expected {version}")
        return {name: data[name] for name in data.files}
