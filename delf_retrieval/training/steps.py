"""The paper's two training steps end to end: build the classifier, train it, export the network
as a model directory (``model.json`` + weights) that extraction and the Beam pipeline load; the
attention step also calibrates the keypoint score threshold on a sample of training images."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from delf_retrieval.extraction.extractor import ExtractionConfig
from delf_retrieval.model import delf
from delf_retrieval.training import calibrate as calibration
from delf_retrieval.training import data, loop
from delf_retrieval.training.models import AttentionClassifier, DescriptorClassifier

MODEL_DIR = "model"
LABELS_FILE = "labels.json"
TRAINING_FILE = "training.json"


@dataclass
class StepResult:
    model_dir: str
    loop: loop.LoopResult
    calibration: calibration.Calibration | None = None


@dataclass(frozen=True)
class CalibrationConfig:
    """How the attention threshold is chosen after training (see :mod:`.calibrate`)."""

    target_features: int = calibration.DEFAULT_TARGET_FEATURES
    images: int = calibration.DEFAULT_CALIBRATION_IMAGES
    extraction: ExtractionConfig = ExtractionConfig(max_image_size=1024)  # as the presets extract


def _check_labels(images: data.LabelledImages, output: str) -> None:
    """A resumed run must see the same classes as the run that wrote the checkpoints."""
    path = os.path.join(output, LABELS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != images.class_names:
            raise ValueError(f"{output} holds a run over other classes ({len(saved)} vs {images.num_classes}); "
                             "use another --output or --restart")
    else:
        os.makedirs(output, exist_ok=True)
        with open(path, "w") as f:
            json.dump(images.class_names, f)


def _write_training_info(model_dir: str, step: str, images, preprocessing, loop_config, result, source, extra=None):
    info = {"step": step, "source": source, "classes": images.num_classes,
            "images": len(images) if not images.tfrecord_files else None,
            "preprocessing": dataclasses.asdict(preprocessing), "loop": dataclasses.asdict(loop_config),
            "steps_done": result.step, "final_loss": result.losses[-1] if result.losses else None,
            "strategy": result.strategy, "mixed_precision": result.mixed_precision, **(extra or {})}
    with open(os.path.join(model_dir, TRAINING_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)


def _dataset_factory(images, preprocessing, loop_config, net_holder, seed):
    def make(start_step, start_position=None):
        return data.make_dataset(images, preprocessing, loop_config.batch_size,
                                 net_holder["net"].config.normalisation, seed=seed, start_step=start_step,
                                 start_position=start_position)

    return make


def train_descriptor(images: data.LabelledImages, model_config: delf.ModelConfig, output: str,
                     loop_config: loop.LoopConfig = loop.LoopConfig(),
                     preprocessing: data.Preprocessing = data.DESCRIPTOR_PREPROCESSING, seed: int = 0,
                     resume: bool = True, cache_dir: str | None = None, source: str = "",
                     trainable_from: str | None = None) -> StepResult:
    """Step 1: fine-tune the descriptor (backbone) as a classifier of the landmark labels; with
    ``trainable_from`` (a backbone layer or block name) only that layer and the ones after it train,
    the lower layers keep their starting weights. The exported model ranks keypoints by descriptor
    L2 norm: its attention head is not trained yet."""
    _check_labels(images, output)
    holder = {}

    def build():
        holder["net"] = delf.load(model_config, cache_dir=cache_dir)
        return DescriptorClassifier(holder["net"].backbone, images.num_classes, seed=seed,
                                    trainable_from=trainable_from)

    result = loop.train(build, _dataset_factory(images, preprocessing, loop_config, holder, seed), loop_config,
                        output, resume=resume)
    model_dir, _ = _export(holder["net"], "l2norm", output)
    _write_training_info(model_dir, "descriptor", images, preprocessing, loop_config, result, source,
                         {"trainable_from": trainable_from, "frozen_layers": len(result.model.frozen_layers)})
    return StepResult(model_dir, result)


def _export(net, keypoint_score: str, output: str) -> tuple[str, delf.ModelConfig]:
    """Save the trained network as the run's model directory, features ranked by ``keypoint_score``
    (threshold 0 until calibrated); returns the directory and the config written."""
    config = dataclasses.replace(net.config, keypoint_score=keypoint_score, score_threshold=0.0)
    model_dir = os.path.join(output, MODEL_DIR)
    delf.DelfNet(config, net.backbone, net.attention).save(model_dir)
    return model_dir, config


def train_attention(images: data.LabelledImages, model_config: delf.ModelConfig, output: str,
                    loop_config: loop.LoopConfig = loop.LoopConfig(),
                    preprocessing: data.Preprocessing = data.ATTENTION_PREPROCESSING,
                    calibration_config: CalibrationConfig = CalibrationConfig(), seed: int = 0,
                    resume: bool = True, cache_dir: str | None = None, source: str = "") -> StepResult:
    """Step 2: train the attention head (and a classifier over its pooled features) with the
    descriptor frozen, then export with keypoints ranked by attention and a calibrated threshold."""
    _check_labels(images, output)
    holder = {}

    def build():
        holder["net"] = delf.load(model_config, cache_dir=cache_dir)
        net = holder["net"]
        return AttentionClassifier(net.backbone, net.attention, images.num_classes, seed=seed)

    result = loop.train(build, _dataset_factory(images, preprocessing, loop_config, holder, seed), loop_config,
                        output, resume=resume)
    model_dir, config = _export(holder["net"], "attention", output)
    # Calibrate on the exported model, rebuilt in float32 exactly as extraction will load it.
    sample = data.load_images(images, calibration_config.images, seed=seed)
    calibrated = calibration.calibrate(delf.load(model_dir, cache_dir=cache_dir), sample,
                                       calibration_config.extraction, calibration_config.target_features)
    delf.write_model_config(model_dir, dataclasses.replace(config, score_threshold=calibrated.threshold))
    _write_training_info(model_dir, "attention", images, preprocessing, loop_config, result, source,
                         {"calibration": {**calibrated.to_json(),
                                          "extraction": dataclasses.asdict(calibration_config.extraction)}})
    return StepResult(model_dir, result, calibrated)
