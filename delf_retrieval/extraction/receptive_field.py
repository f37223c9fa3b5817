"""Receptive field of a convolutional Keras model, derived from its layers: size, stride and the
input-pixel centre of output position 0, so a feature's location is ``start + i * stride``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReceptiveField:
    size: float  # receptive field size in input pixels (along one axis)
    stride: int  # input pixels between neighbouring output positions
    start: float  # input pixel index (row or column) of the centre of output position 0

    def centres(self, n: int):
        """Input pixel index of the centre of output positions 0..n-1."""

        return self.start + self.stride * np.arange(n, dtype=np.float64)


def _geometry(layer):
    """(kernel, stride, pad_before) along one axis for a spatial layer, or None if it keeps geometry.

    ``same`` padding follows TensorFlow: for an input length divisible by the stride, the padding
    before is ``max(k - s, 0) // 2``. Inputs go through the network at sizes that are multiples of
    its total stride (see ``extract.bucket_size``), which makes this exact.
    """
    from keras import layers  # heavy: imported on first use

    if isinstance(layer, layers.ZeroPadding2D):
        (top, _), (left, _) = layer.padding
        if top != left:
            raise ValueError(f"{layer.name}: asymmetric padding between axes is not supported")
        return 1, 1, top  # padding shifts the origin: output 0 is input pixel -top.
    if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.MaxPooling2D, layers.AveragePooling2D)):
        if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
            kernel, strides, dilation = layer.pool_size, layer.strides, (1, 1)
        else:
            kernel, strides, dilation = layer.kernel_size, layer.strides, layer.dilation_rate
        if kernel[0] != kernel[1] or strides[0] != strides[1] or dilation[0] != dilation[1]:
            raise ValueError(f"{layer.name}: non-square kernels are not supported")
        k = (kernel[0] - 1) * dilation[0] + 1
        s = strides[0]
        pad = max(k - s, 0) // 2 if layer.padding == "same" else 0
        return k, s, pad
    if isinstance(layer, (layers.GlobalAveragePooling2D, layers.GlobalMaxPooling2D, layers.Dense, layers.Flatten)):
        raise ValueError(f"{layer.name}: a global layer has no local receptive field")
    return None


def _parents(layer):
    node = layer._inbound_nodes[0]
    return [t._keras_history.operation for t in node.input_tensors]


def compute(model, output_layer: str | None = None) -> ReceptiveField:
    """Receptive field of ``model``'s output (or of layer ``output_layer``) w.r.t. its input."""
    import keras  # heavy: imported on first use

    fields: dict[str, ReceptiveField] = {}

    def field_of(layer) -> ReceptiveField:
        if layer.name in fields:
            return fields[layer.name]
        if isinstance(layer, keras.layers.InputLayer):
            result = ReceptiveField(size=1.0, stride=1, start=0.0)
        else:
            inputs = [field_of(p) for p in _parents(layer)]
            first = inputs[0]
            for other in inputs[1:]:
                if other.stride != first.stride or abs(other.start - first.start) > 1e-9:
                    raise ValueError(f"{layer.name}: merged branches are not aligned ({first} vs {other})")
            size = max(f.size for f in inputs)
            geometry = _geometry(layer)
            if geometry is None:
                result = ReceptiveField(size, first.stride, first.start)
            else:
                k, s, pad = geometry
                result = ReceptiveField(
                    size=size + (k - 1) * first.stride,
                    stride=first.stride * s,
                    start=first.start + ((k - 1) / 2.0 - pad) * first.stride,
                )
        fields[layer.name] = result
        return result

    if output_layer is None:
        target = model.outputs[0]._keras_history.operation
    else:
        target = model.get_layer(output_layer)
    return field_of(target)
