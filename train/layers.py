"""Custom Keras layers that must survive `model.keras` save/load and ONNX export."""

from __future__ import annotations

import keras
from keras import ops

# Per-channel constants of each preprocessing convention, applied to RGB pixels in [0, 255].
# "torch": scale to [0,1] then ImageNet mean/std; "tf": scale to [-1,1]; "caffe": RGB->BGR and
# subtract the ImageNet BGR mean; "raw": the backbone normalises by itself.
_MODES = ("torch", "tf", "caffe", "raw")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="imgsearch")
class ImagePreprocess(keras.layers.Layer):
    """Maps RGB pixels (any dtype, 0..255) to what a backbone expects, inside the graph.

    Keeping this in the graph means the exported ONNX model takes raw uint8 pixels and no caller
    ever repeats the normalisation constants.
    """

    def __init__(self, mode: str = "torch", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; choose from {_MODES}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.mode == "torch":
            mean = ops.convert_to_tensor([m * 255.0 for m in _IMAGENET_MEAN])
            std = ops.convert_to_tensor([s * 255.0 for s in _IMAGENET_STD])
            return (x - mean) / std
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR)
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="imgsearch")
class L2Normalize(keras.layers.Layer):
    """Unit-length rows, so that inner product = cosine similarity."""

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        return x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))
