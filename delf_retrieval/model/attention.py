"""The DELF attention head: 1x1 conv to 512 + ReLU, 1x1 conv to 1, softplus (paper, section 3.3)."""

from __future__ import annotations

HIDDEN_CHANNELS = 512
CONV1 = "attention_conv1"
CONV2 = "attention_conv2"


def build(channels: int, seed: int = 0, name: str = "attention"):
    """Attention score function alpha(f) over a (B, H, W, channels) map -> (B, H, W, 1), >= 0.

    Initialised deterministically from ``seed``, so an untrained head is the same every run.
    """
    import keras  # heavy: imported on first use
    from keras import layers  # heavy: imported on first use

    init = keras.initializers.GlorotUniform
    features = keras.Input(shape=(None, None, channels), name="features")
    x = layers.Conv2D(HIDDEN_CHANNELS, 1, activation="relu", kernel_initializer=init(seed), name=CONV1)(features)
    x = layers.Conv2D(1, 1, kernel_initializer=init(seed + 1), name=CONV2)(x)
    scores = layers.Activation("softplus", name="attention_softplus")(x)
    return keras.Model(features, scores, name=name)
