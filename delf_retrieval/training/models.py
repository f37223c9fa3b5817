"""The classifiers the two training steps optimise: global pooling + classifier over the descriptor
(step 1) and attention-weighted pooling y = W sum_n alpha(f_n) f_n over the frozen descriptor (step 2)."""

from __future__ import annotations

import keras
import tensorflow as tf


class DescriptorClassifier(keras.Model):
    """Step 1: logits = W mean_n f_n (global average pooling of the feature map, then a linear
    classifier). The backbone's BatchNorm statistics stay frozen (inference mode): training batches
    on one machine are far too small to re-estimate them; its scales and offsets do train."""

    def __init__(self, backbone, num_classes: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
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
