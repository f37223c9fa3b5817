"""The DELF network: a backbone cut at its stride-16/32 stage plus the attention head, with its
configuration (weights, pixel normalisation, keypoint score, threshold) saved beside its weights."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from delf_retrieval.extraction.receptive_field import ReceptiveField
from delf_retrieval.extraction.receptive_field import compute as compute_receptive_field
from delf_retrieval.model import attention as attention_head
from delf_retrieval.model import efficientnet_lite, resnet50
from delf_retrieval.model import weights as weight_files

MODEL_CONFIG_FILE = "model.json"
MODEL_WEIGHTS_FILE = "model.weights.h5"
HEAD_WEIGHTS_FILE = "attention.weights.h5"  # a head-only model folder: the trained attention head alone
# Model folders shipped with the project (models/ beside the packages, in a checkout and installed).
SHIPPED_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "models")
MODEL_FORMAT_VERSION = 1
BACKBONES = ("resnet50", *efficientnet_lite.VARIANTS)
KEYPOINT_SCORES = ("attention", "l2norm")

# Pixel normalisation each weight source was trained with: (x[channels] - mean) / std.
NORMALISATION = {
    "keras-imagenet": {"mean": [103.939, 116.779, 123.68], "std": [1.0, 1.0, 1.0], "bgr": True},
    "delf-v1": {"mean": [128.0] * 3, "std": [128.0] * 3, "bgr": False},
    "tf-lite": {"mean": [127.0] * 3, "std": [128.0] * 3, "bgr": False},
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a DELF network; stored as ``model.json`` in a model directory."""

    backbone: str = "efficientnet_lite0"
    layout: str = "keras"  # resnet50 only: "keras" (Keras ImageNet file) or "slim" (official DELF v1)
    # "imagenet", "random", or a path/URL: Keras .h5, torch .pth, TF1 checkpoint prefix, model dir.
    weights: str = "imagenet"
    # Keras weights of a trained attention head: a path, or the name of a shipped model folder.
    attention_weights: str | None = None
    keypoint_score: str = "attention"  # rank features by "attention" or by descriptor "l2norm"
    score_threshold: float = 0.0  # features need score >= this (official DELF model: 100.0)
    normalisation: dict = field(default_factory=lambda: dict(NORMALISATION["tf-lite"]))
    seed: int = 0  # initialises untrained layers deterministically

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


def default_config(backbone: str, weights: str = "imagenet") -> ModelConfig:
    """The configuration matching a backbone and weight source, with the right normalisation."""
    if backbone in efficientnet_lite.VARIANTS:
        return ModelConfig(backbone, "keras", weights, normalisation=dict(NORMALISATION["tf-lite"]))
    if backbone == "resnet50":
        if weights not in ("imagenet", "random") and weight_files.is_tf_checkpoint(weights):
            return ModelConfig(backbone, "slim", weights, score_threshold=100.0,
                               normalisation=dict(NORMALISATION["delf-v1"]))
        return ModelConfig(backbone, "keras", weights, normalisation=dict(NORMALISATION["keras-imagenet"]))
    raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")


class DelfNet:
    """A built DELF network: ``keras_model(images) -> (features, scores)`` on normalised images.

    ``features`` is (B, h, w, C) float32 and ``scores`` (B, h, w) the attention (softplus) map.
    """

    def __init__(self, config: ModelConfig, backbone, attention):
        import keras  # heavy: imported on first use

        self.config = config
        self.backbone = backbone
        self.attention = attention
        image = keras.Input(shape=(None, None, 3), name="image")
        features = backbone(image)
        scores = keras.ops.squeeze(attention(features), axis=-1)
        self.keras_model = keras.Model(image, [features, scores], name=f"delf_{config.backbone}")
        self.receptive_field: ReceptiveField = compute_receptive_field(backbone)
        self.feature_channels = int(backbone.outputs[0].shape[-1])

    @property
    def stride(self) -> int:
        return self.receptive_field.stride

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """Map RGB pixel values (any float array ending in 3 channels) to the network's input."""
        norm = self.config.normalisation
        x = rgb[..., ::-1] if norm["bgr"] else rgb
        return ((x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)).astype(np.float32)

    def save(self, directory: str) -> None:
        """Write ``model.json`` and ``model.weights.h5``: a directory :func:`load` reads back."""
        os.makedirs(directory, exist_ok=True)
        self.keras_model.save_weights(os.path.join(directory, MODEL_WEIGHTS_FILE))
        write_model_config(directory, self.config)


def save_head(net: "DelfNet", directory: str, backbone_weights: str = "imagenet") -> ModelConfig:
    """Write a head-only model folder: the attention head's weights and a ``model.json`` naming
    ``backbone_weights``, the source the backbone's weights equal (e.g. "imagenet" after the
    attention step, which freezes the descriptor). A few hundred kB instead of the whole network;
    :func:`load` reads it back. Returns the config written."""
    os.makedirs(directory, exist_ok=True)
    net.attention.save_weights(os.path.join(directory, HEAD_WEIGHTS_FILE))
    config = dataclasses.replace(net.config, weights=backbone_weights, attention_weights=HEAD_WEIGHTS_FILE)
    tmp = os.path.join(directory, MODEL_CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format_version": MODEL_FORMAT_VERSION, **config.to_json()}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MODEL_CONFIG_FILE))
    return config


def shipped_model(name: str) -> ModelConfig:
    """The config of the model shipped in ``models/NAME``, with the head named by ``NAME`` rather
    than by a path, so that it resolves wherever the project is installed (launcher and workers)."""
    directory = os.path.join(SHIPPED_MODELS_DIR, name)
    if not is_model_dir(directory):
        raise ValueError(f"no shipped model {name!r} in {SHIPPED_MODELS_DIR}")
    return dataclasses.replace(read_model_config(directory), attention_weights=name)


def head_weights_path(attention_weights: str) -> str:
    """The file of a config's ``attention_weights``: a shipped model's name, or a path."""
    if "/" not in attention_weights and os.sep not in attention_weights:
        shipped = os.path.join(SHIPPED_MODELS_DIR, attention_weights)
        if os.path.isdir(shipped):
            return os.path.join(shipped, HEAD_WEIGHTS_FILE)
    return attention_weights


def write_model_config(directory: str, config: ModelConfig) -> None:
    """Write (or replace) a model directory's ``model.json``, e.g. with a calibrated threshold."""
    config = dataclasses.replace(config, weights=directory, attention_weights=None)
    tmp = os.path.join(directory, MODEL_CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format_version": MODEL_FORMAT_VERSION, **config.to_json()}, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, MODEL_CONFIG_FILE))


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def read_model_config(directory: str) -> ModelConfig:
    with open(os.path.join(directory, MODEL_CONFIG_FILE)) as f:
        data = json.load(f)
    version = data.pop("format_version", None)
    if version != MODEL_FORMAT_VERSION:
        raise ValueError(f"{directory}: model format version {version}, expected {MODEL_FORMAT_VERSION}")
    if data.get("attention_weights"):
        # A head-only folder: the backbone's named weights (e.g. "imagenet") and the head's file here.
        data["attention_weights"] = os.path.join(directory, data["attention_weights"])
    else:
        data["weights"] = directory
    return ModelConfig.from_json(data)


def _build_backbone(config: ModelConfig):
    if config.backbone == "resnet50":
        return resnet50.build(config.layout)
    if config.backbone in efficientnet_lite.VARIANTS:
        return efficientnet_lite.build(config.backbone)
    raise ValueError(f"unknown backbone {config.backbone!r}; choose from {BACKBONES}")


def _load_backbone_weights(config: ModelConfig, backbone, attention, cache_dir: str) -> None:
    source = config.weights
    if source == "random":
        return
    if config.backbone in efficientnet_lite.VARIANTS:
        if source == "imagenet":
            efficientnet_lite.load_imagenet(config.backbone, backbone, cache_dir)
        elif source.endswith(".pth"):
            efficientnet_lite.load_imagenet(config.backbone, backbone, cache_dir, torch_path=source)
        else:
            backbone.load_weights(source)
        return
    if source == "imagenet":
        source = weight_files.fetch(weight_files.KERAS_RESNET50_NOTOP_URL, cache_dir, md5=weight_files.KERAS_RESNET50_NOTOP_MD5)
    elif weight_files.is_url(source):
        source = weight_files.fetch(source, cache_dir)
    if weight_files.is_tf_checkpoint(source):
        if config.layout != "slim":
            raise ValueError("the official DELF v1 checkpoint needs layout='slim'")
        weight_files.load_delf_v1_checkpoint(backbone, attention, source)
    elif source.endswith(".weights.h5"):
        backbone.load_weights(source)
    else:
        weight_files.load_keras_h5_by_name(backbone, source)


def load(config: ModelConfig | str, cache_dir: str | None = None) -> DelfNet:
    """Build a DELF network from a config, or from a model directory written by :meth:`DelfNet.save`."""
    if isinstance(config, str):
        config = read_model_config(config)
    if config.keypoint_score not in KEYPOINT_SCORES:
        raise ValueError(f"unknown keypoint score {config.keypoint_score!r}; choose from {KEYPOINT_SCORES}")
    cache_dir = cache_dir or weight_files.default_cache_dir()
    backbone = _build_backbone(config)
    channels = int(backbone.outputs[0].shape[-1])
    attention = attention_head.build(channels, seed=config.seed)
    if is_model_dir(config.weights):
        net = DelfNet(config, backbone, attention)
        net.keras_model.load_weights(os.path.join(config.weights, MODEL_WEIGHTS_FILE))
        return net
    _load_backbone_weights(config, backbone, attention, cache_dir)
    if config.attention_weights:
        attention.load_weights(head_weights_path(config.attention_weights))
    return DelfNet(config, backbone, attention)
