"""GeM pooling as an export option: the ONNX model passes parity and model.json records it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")

from indexer.model_card import read_card


def _tiny_backbone(pooling: str) -> keras.Model:
    from train.backbones import pooling_layer
    from train.layers import L2Normalize

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, L2Normalize()(pooling_layer(pooling, 3.0)(x)))


def test_gem_export_passes_parity_and_is_recorded(tmp_path):
    from export.onnx_export import export_embedding_model

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    gem, gap = _tiny_backbone("gem"), _tiny_backbone("gap")
    card = export_embedding_model(
        gem,
        tmp_path / "gem",
        backbone="tiny",
        source="pretrained",
        input_size=32,
        check_images=images,
        pooling="gem",
        gem_p=3.0,
    )
    assert card.parity["min_cosine"] >= 0.9999
    gem_card = read_card(tmp_path / "gem")
    assert gem_card.pooling == "gem" and gem_card.gem_p == 3.0
    gap_card = export_embedding_model(
        gap, tmp_path / "gap", backbone="tiny", source="pretrained", input_size=32, check_images=images
    )
    assert read_card(tmp_path / "gap").pooling == "gap" and read_card(tmp_path / "gap").gem_p is None
    assert gap_card.dim == card.dim == 8
    # Same convolution weights (same seed), different pooling: different vectors.
    assert not np.allclose(gem.predict(images, verbose=0), gap.predict(images, verbose=0), atol=1e-3)


def test_pooling_flag_is_for_backbones_only(tmp_path, capsys):
    from export.__main__ import main

    rc = main(["--model", str(tmp_path), "--pooling", "gem", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--pooling applies to --backbone only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--backbone", "efficientnet_lite0", "--pooling", "max", "--out", str(tmp_path)])
