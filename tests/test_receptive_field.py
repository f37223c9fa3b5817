"""The receptive field derived from the layers agrees with the input-gradient of one feature."""

import numpy as np
import pytest
import tensorflow as tf

from delf_retrieval.extraction import receptive_field
from delf_retrieval.model import efficientnet_lite, resnet50
from tests.test_models import randomise


def gradient_support(model, size, index):
    """Rows and columns of input pixels on which output position (index, index) depends."""
    x = tf.Variable(np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        y = model(x, training=False)
        target = tf.reduce_sum(y[0, index, index])
    grad = np.abs(tape.gradient(target, x).numpy()[0]).sum(axis=-1)
    rows = np.flatnonzero(grad.sum(axis=1) > 0)
    cols = np.flatnonzero(grad.sum(axis=0) > 0)
    return rows, cols


@pytest.mark.parametrize("name,build,expected", [
    ("resnet50-keras", lambda: resnet50.build("keras"), (291, 16, 0.0)),
    ("resnet50-slim", lambda: resnet50.build("slim"), (291, 32, 2.0)),
    ("efficientnet_lite0", lambda: efficientnet_lite.build("efficientnet_lite0"), (339, 16, 15.0)),
    ("efficientnet_lite2", lambda: efficientnet_lite.build("efficientnet_lite2"), (475, 16, 15.0)),
])
def test_receptive_field_matches_input_gradient(name, build, expected):
    model = build()
    randomise(model, seed=3)
    rf = receptive_field.compute(model)
    assert (rf.size, rf.stride, rf.start) == expected  # the official release's rf=291 for ResNet50 conv4
    size = 512
    index = int(round((size / 2 - rf.start) / rf.stride))
    centre = rf.start + index * rf.stride
    assert centre - rf.size / 2 > 0 and centre + rf.size / 2 < size  # the field lies inside the input
    rows, cols = gradient_support(model, size, index)
    for support in (rows, cols):
        # The pixels the feature depends on span exactly the receptive field, centred where we say.
        assert support[0] == centre - (rf.size - 1) / 2
        assert support[-1] == centre + (rf.size - 1) / 2


def test_padding_layers_shift_the_origin():
    import keras

    inp = keras.Input((None, None, 3))
    x = keras.layers.ZeroPadding2D(2)(inp)
    x = keras.layers.Conv2D(1, 5, strides=1, padding="valid")(x)  # same size, centred on each pixel
    x = keras.layers.Conv2D(1, 3, strides=2, padding="same")(x)  # TF SAME: pads 0 before, 1 after
    rf = receptive_field.compute(keras.Model(inp, x))
    assert rf == receptive_field.ReceptiveField(size=7.0, stride=2, start=1.0)
