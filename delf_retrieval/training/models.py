"""The classifiers the two training steps optimise: global pooling + classifier over the descriptor
(step 1) and attention-weighted pooling y = W sum_n alpha(f_n) f_n over the frozen descriptor (step 2)."""

from __future__ import annotations

import keras
import tensorflow as tf


def freeze_below(backbone, trainable_from: str | None) -> list[str]:
    """Freeze the layers of ``backbone`` (a functional Keras model, layers in the order they run)
    that come before ``trainable_from``: the first layer named ``trainable_from`` or whose name
    starts with ``trainable_from + "_"`` (a block or stage prefix: ``block9`` of EfficientNet-Lite,
    ``conv4_block5`` or ``conv4`` of ResNet50). That layer and every later one stay trainable.
    ``None`` freezes nothing. Returns the names of the layers frozen."""
    if trainable_from is None:
        return []
    names = [layer.name for layer in backbone.layers]
    first = next((i for i, name in enumerate(names)
                  if name == trainable_from or name.startswith(trainable_from + "_")), None)
    if first is None:
        blocks = list(dict.fromkeys(name.split("_")[0] for name in names))
        raise ValueError(f"no layer of {backbone.name} is named {trainable_from!r} or starts with "
                         f"{trainable_from + '_'!r}; its layers start with: {', '.join(blocks)}")
    for layer in backbone.layers[:first]:
        layer.trainable = False
    return names[:first]


class DescriptorClassifier(keras.Model):
    """Step 1: logits = W mean_n f_n (global average pooling of the feature map, then a linear
    classifier). The backbone's BatchNorm statistics stay frozen (inference mode): training batches
    on one machine are far too small to re-estimate them; its scales and offsets do train.
    ``trainable_from`` (see :func:`freeze_below`) freezes the backbone's lower layers: only that
    layer or block and the ones after it train."""

    def __init__(self, backbone, num_classes: int, seed: int = 0, trainable_from: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.frozen_layers = freeze_below(backbone, trainable_from)
        self.pool = keras.layers.GlobalAveragePooling2D(name="descriptor_pool")
        # float32 logits under mixed precision: the softmax cross-entropy stays exact.
        self.classifier = keras.layers.Dense(num_classes, dtype="float32", name="descriptor_classifier",
                                             kernel_initializer=keras.initializers.GlorotUniform(seed))

    def call(self, images, training=False):
        features = self.backbone(images, training=False)
        return self.classifier(self.pool(features))


class AttentionClassifier(keras.Model):
    """Step 2 (paper eq. 1): logits = W mean_n alpha(f_n) f_n / |f_n|, with the descriptor f frozen
    (no gradient reaches the backbone). Features are L2-normalised before pooling as in the official
    release, so the attention, not the descriptor's norm, decides what each location contributes."""

    def __init__(self, backbone, attention, num_classes: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.backbone.trainable = False
        self.attention = attention
        self.classifier = keras.layers.Dense(num_classes, dtype="float32", name="attention_classifier",
                                             kernel_initializer=keras.initializers.GlorotUniform(seed))

    def features_and_scores(self, images):
        features = tf.stop_gradient(self.backbone(images, training=False))
        return features, self.attention(features)

    def call(self, images, training=False):
        features, scores = self.features_and_scores(images)
        unit = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)
        pooled = tf.reduce_mean(tf.cast(scores, tf.float32) * unit, axis=[1, 2])
        return self.classifier(pooled)
