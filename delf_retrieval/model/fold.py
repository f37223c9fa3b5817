"""Inference-time folding of BatchNormalization into the convolution before it (exact, faster)."""

from __future__ import annotations

import numpy as np


def _pass_through_layer(name):
    """A layer that returns its input and accepts BatchNormalization's call arguments."""
    from keras import layers  # heavy: imported on first use

    class FoldedBatchNorm(layers.Layer):
        def call(self, inputs, training=None, mask=None):
            return inputs

    return FoldedBatchNorm(name=name)


def _parent(layer):
    node = layer._inbound_nodes[0]
    return node.input_tensors[0]._keras_history.operation


def fold_batch_norm(model):
    """A copy of ``model`` where each BatchNormalization that directly follows a Conv2D or
    DepthwiseConv2D is merged into it (kernel scaled per output channel, bias added).

    Layer names are kept, so the folded model computes the same function with fewer ops.
    """
    import keras  # heavy: imported on first use
    from keras import layers  # heavy: imported on first use

    convs = (layers.Conv2D, layers.DepthwiseConv2D)
    folded_bn = {l.name: _parent(l) for l in model.layers
                 if isinstance(l, layers.BatchNormalization) and isinstance(_parent(l), convs)}
    conv_with_bn = {conv.name: bn for bn, conv in folded_bn.items()}

    def clone(layer):
        if layer.name in folded_bn:
            return _pass_through_layer(layer.name)
        config = layer.get_config()
        if layer.name in conv_with_bn:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in folded_bn or not layer.weights:
            continue
        target = folded.get_layer(layer.name)
        if layer.name not in conv_with_bn:
            target.set_weights(layer.get_weights())
            continue
        bn = model.get_layer(conv_with_bn[layer.name])
        gamma, beta, mean, variance = (w.astype(np.float64) for w in bn.get_weights())
        scale = gamma / np.sqrt(variance + bn.epsilon)
        kernel = layer.get_weights()[0].astype(np.float64)
        bias = layer.get_weights()[1].astype(np.float64) if layer.use_bias else np.zeros_like(beta)
        if isinstance(layer, layers.DepthwiseConv2D):
            kernel = kernel * scale.reshape(1, 1, -1, kernel.shape[-1])  # (kh, kw, C, multiplier)
        else:
            kernel = kernel * scale
        target.set_weights([kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)])
    return folded
