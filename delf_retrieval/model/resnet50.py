"""ResNet50 up to conv4_x (1024 channels) in Keras, in two layouts: ``keras`` (keras.applications
layer names and strides, for the Keras ImageNet file; output stride 16) and ``slim`` (the TF-slim
``resnet_v1_50`` of the official DELF release: stride in the 3x3 conv of each block's last unit,
no conv biases; output stride 32)."""

from __future__ import annotations

FEATURE_LAYER = "conv4_block6_out"
FEATURE_CHANNELS = 1024
LAYOUTS = ("keras", "slim")
# (stage name, bottleneck width, units) for conv2_x .. conv4_x.
STAGES = (("conv2", 64, 3), ("conv3", 128, 4), ("conv4", 256, 6))


def build(layout: str = "keras", name: str = "resnet50"):
    """Build ResNet50 up to conv4_x; the output is layer :data:`FEATURE_LAYER`."""
    import keras  # heavy: imported on first use
    from keras import layers  # heavy: imported on first use

    if layout not in LAYOUTS:
        raise ValueError(f"unknown ResNet50 layout {layout!r}; choose from {LAYOUTS}")
    keras_layout = layout == "keras"
    eps = 1.001e-5 if keras_layout else 1e-5

    def conv_bn(x, filters, kernel, stride, prefix, relu, padding="same"):
        x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=keras_layout, name=prefix + "_conv")(x)
        x = layers.BatchNormalization(epsilon=eps, name=prefix + "_bn")(x)
        return layers.Activation("relu", name=prefix + "_relu")(x) if relu else x

    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = conv_bn(x, 64, 7, 2, "conv1", relu=True, padding="valid")
    if keras_layout:
        x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    else:  # slim: max_pool2d 3x3 stride 2 with SAME padding.
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(x)

    for stage_index, (stage, width, units) in enumerate(STAGES):
        for unit in range(1, units + 1):
            p = f"{stage}_block{unit}"
            if keras_layout:
                # Stride in the first unit's first 1x1 conv (not for conv2, which follows the pool).
                stride = 2 if (unit == 1 and stage_index > 0) else 1
                first_stride, mid_stride = stride, 1
            else:
                # slim: stride in the 3x3 conv of the last unit of every block.
                stride = 2 if unit == units else 1
                first_stride, mid_stride = 1, stride
            if unit == 1:
                shortcut = conv_bn(x, 4 * width, 1, first_stride, p + "_0", relu=False)
            elif stride > 1:
                shortcut = layers.MaxPooling2D(1, strides=stride, padding="same", name=p + "_0_pool")(x)
            else:
                shortcut = x
            h = conv_bn(x, width, 1, first_stride, p + "_1", relu=True)
            if mid_stride > 1:  # slim conv2d_same: explicit symmetric padding, then VALID.
                h = layers.ZeroPadding2D(1, name=p + "_2_pad")(h)
                h = conv_bn(h, width, 3, mid_stride, p + "_2", relu=True, padding="valid")
            else:
                h = conv_bn(h, width, 3, 1, p + "_2", relu=True)
            h = conv_bn(h, 4 * width, 1, 1, p + "_3", relu=False)
            h = layers.Add(name=p + "_add")([shortcut, h])
            x = layers.Activation("relu", name=p + "_out")(h)
    return keras.Model(inputs, x, name=name)


def slim_variable_prefix(keras_layer: str) -> str | None:
    """The ``resnet_v1_50/...`` scope of a Keras conv/bn layer in the slim layout (None if none)."""
    if keras_layer in ("conv1_conv", "conv1_bn"):
        return "resnet_v1_50/conv1"
    parts = keras_layer.split("_")  # conv3_block2_1_conv
    if len(parts) != 4 or not parts[1].startswith("block"):
        return None
    block = int(parts[0][len("conv") :]) - 1
    unit = int(parts[1][len("block") :])
    branch = {"0": "shortcut", "1": "conv1", "2": "conv2", "3": "conv3"}[parts[2]]
    return f"resnet_v1_50/block{block}/unit_{unit}/bottleneck_v1/{branch}"
