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


@keras.saving.register_keras_serializable(package="imgsearch")
class GeMPooling2D(keras.layers.Layer):
    """Generalised-mean pooling over H and W: (mean(x^p))^(1/p) per channel (Radenovic et al.).

    p = 1 is average pooling and p -> inf max pooling; p = 3 weighs the strong activations of
    an object more than the background, which usually helps retrieval. `p` is fixed, not learned.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        if not p > 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        self.p, self.eps = float(p), float(eps)

    def call(self, inputs):
        # Clamp: the power of a negative activation is undefined for non-integer p.
        x = ops.maximum(ops.cast(inputs, "float32"), self.eps)
        return ops.power(ops.mean(ops.power(x, self.p), axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "p": self.p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="imgsearch")
class CosineClassifier(keras.layers.Layer):
    """Cosine of the embedding with one learned unit-length centre per class (no bias).

    The output is in [-1, 1]; the margin losses in `train.losses` scale it and add the margin.
    """

    def __init__(self, n_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_classes = int(n_classes)

    def build(self, input_shape) -> None:
        self.centres = self.add_weight(
            name="centres", shape=(int(input_shape[-1]), self.n_classes), initializer="glorot_uniform", trainable=True
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        x = x / ops.sqrt(ops.maximum(ops.sum(x * x, axis=-1, keepdims=True), 1e-12))
        w = self.centres
        w = w / ops.sqrt(ops.maximum(ops.sum(w * w, axis=0, keepdims=True), 1e-12))
        return ops.matmul(x, w)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_classes)

    def get_config(self) -> dict:
        return {**super().get_config(), "n_classes": self.n_classes}
