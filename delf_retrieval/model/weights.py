"""Weight files: download with cache and checksum, legacy Keras HDF5 by layer name, and the official
DELF v1 TF1 checkpoint (``resnet_v1_50/...`` and ``attention_block/...`` names) -> our layers."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

from delf_retrieval.model import attention as attention_head
from delf_retrieval.model.resnet50 import slim_variable_prefix

# The Keras ImageNet ResNet50 weights without the classifier (keras.applications publishes the md5).
KERAS_RESNET50_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
KERAS_RESNET50_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
SLIM_BN_EPSILON = 1e-5


class ChecksumError(ValueError):
    """A downloaded or cached file does not have the expected digest."""


def default_cache_dir() -> str:
    """``$DELF_CACHE_DIR``, else ``~/.cache/delf_retrieval``."""
    return os.environ.get("DELF_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "delf_retrieval")


def _digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: str, sha256: str | None, md5: str | None) -> None:
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected and _digest(path, algorithm) != expected.lower():
            raise ChecksumError(f"{path}: {algorithm} is not {expected}")


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def fetch(url: str, cache_dir: str | None = None, sha256: str | None = None, md5: str | None = None,
          timeout: float = 60.0, retries: int = 3) -> str:
    """Download ``url`` into the cache once and return the local path, verifying the checksum.

    A cached file with a wrong digest is downloaded again; a download whose digest is wrong raises
    :class:`ChecksumError` and leaves nothing in the cache.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(urllib.parse.urlparse(url).path) or hashlib.sha256(url.encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, name)
    if os.path.exists(target):
        try:
            _check(target, sha256, md5)
            return target
        except ChecksumError:
            os.remove(target)
    last_error: Exception | None = None
    for attempt in range(retries):
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=name + ".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            _check(tmp, sha256, md5)
            os.replace(tmp, target)
            return target
        except ChecksumError:
            os.remove(tmp)
            raise
        except OSError as e:  # network errors: retry with backoff
            last_error = e
            if os.path.exists(tmp):
                os.remove(tmp)
            time.sleep(min(2.0**attempt, 10.0) * 0.1)
    raise OSError(f"cannot download {url} after {retries} attempts: {last_error}")


def load_keras_h5_by_name(model, path: str) -> int:
    """Set ``model``'s layers from a legacy Keras HDF5 weights file (e.g. the ImageNet file), by layer
    name. Layers of the file absent from the model are ignored; a layer of the model with weights
    but absent from the file raises ``KeyError``. Returns the number of layers set."""
    import h5py  # heavy: imported on first use

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["layer_names"]]
        stored = {}
        for layer_name in names:
            g = group[layer_name]
            weight_names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["weight_names"]]
            if weight_names:
                stored[layer_name] = [np.asarray(g[w]) for w in weight_names]

    def weights_of(layer):
        if layer.name not in stored:
            raise KeyError(f"{path}: no weights for layer {layer.name}")
        return stored[layer.name]

    return set_layer_weights(model, weights_of, source="file")


def set_layer_weights(model, weights_of, source: str) -> int:
    """Set every layer of ``model`` that has weights to ``weights_of(layer)`` (its arrays in Keras
    order, already in Keras layout), refusing any whose shapes differ from the layer's (``source``
    names where they came from in that error). Returns the number of layers set."""
    count = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        values = [np.asarray(v, dtype=np.float32) for v in weights_of(layer)]
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [v.shape for v in values]
        if want != got:
            raise ValueError(f"{layer.name}: {source} shapes {got} do not fit the model's {want}")
        layer.set_weights(values)
        count += 1
    return count


def is_tf_checkpoint(path: str) -> bool:
    return os.path.exists(path + ".index")


def _fold_batch_norm(kernel, gamma, beta, mean, variance, eps=SLIM_BN_EPSILON):
    scale = gamma / np.sqrt(variance + eps)
    return kernel * scale, beta - mean * scale


def load_delf_v1_checkpoint(backbone, attention, prefix: str) -> None:
    """Convert the official DELF v1 (TF1, tf-slim) checkpoint at ``prefix`` into our Keras layers.

    ``backbone`` must be ResNet50 in the ``slim`` layout; ``attention`` our attention head. The
    attention's conv1 + BatchNorm is folded into one conv with bias (exact at inference).
    """
    import tensorflow as tf  # heavy: imported on first use

    reader = tf.train.load_checkpoint(prefix)
    available = reader.get_variable_to_shape_map()

    def get(name):
        if name not in available:
            raise KeyError(f"{prefix}: checkpoint has no variable {name}")
        return reader.get_tensor(name)

    for layer in backbone.layers:
        if not layer.weights:
            continue
        scope = slim_variable_prefix(layer.name)
        if scope is None:
            raise KeyError(f"no checkpoint scope for layer {layer.name}")
        if layer.name.endswith("_bn"):
            bn = scope + "/BatchNorm/"
            layer.set_weights([get(bn + "gamma"), get(bn + "beta"), get(bn + "moving_mean"), get(bn + "moving_variance")])
        else:
            layer.set_weights([get(scope + "/weights")])

    base = "attention_block/attention/compute/"
    kernel1 = get(base + "conv1/weights")
    if base + "conv1/BatchNorm/moving_mean" in available:
        bn = base + "conv1/BatchNorm/"
        gamma = get(bn + "gamma") if bn + "gamma" in available else np.ones(kernel1.shape[-1], np.float32)
        kernel1, bias1 = _fold_batch_norm(kernel1, gamma, get(bn + "beta"), get(bn + "moving_mean"), get(bn + "moving_variance"))
    else:
        bias1 = get(base + "conv1/biases")
    attention.get_layer(attention_head.CONV1).set_weights([kernel1.astype(np.float32), bias1.astype(np.float32)])
    attention.get_layer(attention_head.CONV2).set_weights([get(base + "conv2/weights"), get(base + "conv2/biases")])
