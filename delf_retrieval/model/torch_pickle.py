"""Reads PyTorch ``.pth`` state dicts (legacy and zip formats) without torch and without unpickling
arbitrary objects: a restricted unpickler accepts only the tensor-rebuild and storage names."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks to build an object the restricted unpickler does not allow."""


class TorchFormatError(ValueError):
    """The file is not a PyTorch state dict this reader understands."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


def _ordered_dict(*args):
    if args:
        raise UnsafePickleError("OrderedDict built with arguments")
    return collections.OrderedDict()


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names a tensor state dict needs and refuses all others."""

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name}: not a tensor or storage") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(key, storage_type.dtype, numel)
        return ref


def _restricted_load(data: bytes | io.BufferedIOBase, storages: dict):
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return _RestrictedUnpickler(stream, storages).load()


def _materialise(tensor: _TensorRef, buffers: dict) -> np.ndarray:
    flat = buffers[tensor.storage.key]
    if not tensor.size:
        return flat[tensor.offset].copy()
    itemsize = flat.dtype.itemsize
    needed = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride)) + 1
    if needed > flat.size:
        raise TorchFormatError(f"tensor of shape {tensor.size} runs past its storage {tensor.storage.key}")
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :], shape=tensor.size, strides=tuple(s * itemsize for s in tensor.stride)
    )
    return np.ascontiguousarray(view)


def _to_arrays(state, buffers: dict) -> "collections.OrderedDict[str, np.ndarray]":
    if not isinstance(state, dict):
        raise TorchFormatError(f"expected a state dict, found {type(state).__name__}")
    out = collections.OrderedDict()
    for name, value in state.items():
        if isinstance(value, _TensorRef):
            out[str(name)] = _materialise(value, buffers)
    return out


def _load_legacy(stream: io.BytesIO) -> "collections.OrderedDict[str, np.ndarray]":
    storages: dict = {}
    magic = _restricted_load(stream, storages)
    if magic != LEGACY_MAGIC_NUMBER:
        raise TorchFormatError("not a PyTorch file: bad magic number")
    protocol = _restricted_load(stream, storages)
    if protocol != 1001:
        raise TorchFormatError(f"unsupported legacy protocol {protocol}")
    sys_info = _restricted_load(stream, storages)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchFormatError("big-endian PyTorch files are not supported")
    state = _restricted_load(stream, storages)
    keys = _restricted_load(stream, storages)
    buffers = {}
    for key in keys:
        key = str(key)
        ref = storages.get(key)
        if ref is None:
            raise TorchFormatError(f"storage {key} listed but never referenced")
        header = stream.read(8)
        if len(header) != 8:
            raise TorchFormatError(f"file ends before storage {key}")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * ref.dtype.itemsize
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise TorchFormatError(f"file ends inside storage {key}")
        buffers[key] = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))
    return _to_arrays(state, buffers)


def _load_zip(path_or_bytes) -> "collections.OrderedDict[str, np.ndarray]":
    with zipfile.ZipFile(path_or_bytes) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise TorchFormatError("zip file without exactly one data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict = {}
        state = _restricted_load(zf.read(pickles[0]), storages)
        buffers = {}
        for key, ref in storages.items():
            raw = zf.read(f"{prefix}data/{key}")
            buffers[key] = np.frombuffer(raw, dtype=ref.dtype.newbyteorder("<"))[: ref.numel]
    return _to_arrays(state, buffers)


def load_torch_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Load a PyTorch state dict as name -> numpy array, refusing anything but tensors.

    Raises :class:`UnsafePickleError` (before anything is constructed) if the file names any global
    outside the tensor-rebuild and storage allow-list, and :class:`TorchFormatError` if it is not a
    state dict in the legacy or zip serialisation format.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == b"PK\x03\x04":
        return _load_zip(io.BytesIO(data))
    return _load_legacy(io.BytesIO(data))
