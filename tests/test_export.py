"""ONNX export: parity with Keras, the model card, and refusal to write a bad conversion."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from indexer.model_card import file_sha256, read_card


def test_default_model_card_and_parity(default_model):
    card = read_card(default_model)
    assert card.backbone == "efficientnet_lite0" and card.source == "pretrained"
    assert card.dim == 1280 and card.size == (224, 224)
    assert card.onnx_sha256 == file_sha256(default_model / "model.onnx")
    assert card.parity["min_cosine"] >= 0.9999 and card.parity["images"] >= 8
    for lib in ("tensorflow", "keras", "tf2onnx", "onnxruntime"):
        assert card.versions[lib]


def test_onnx_takes_uint8_and_returns_unit_vectors(default_model, demo_corpus):
    from export.__main__ import load_check_images

    session = ort.InferenceSession(str(default_model / "model.onnx"))
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("images", "tensor(uint8)", "embedding")
    images = load_check_images(demo_corpus / "queries", 224, 5)
    vectors = session.run(None, {"images": images})[0]  # dynamic batch of 5
    assert vectors.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one = session.run(None, {"images": images[:1]})[0]
    np.testing.assert_allclose(one[0], vectors[0], atol=1e-5)


def test_parity_failure_writes_nothing(tmp_path, demo_corpus):
    """A model whose ONNX output differs from Keras is refused before any file is written."""
    import keras
    import tensorflow as tf

    from export.__main__ import load_check_images
    from export.onnx_export import ParityError, export_embedding_model
    from train.layers import L2Normalize

    class Drifting(keras.layers.Layer):
        """Flips half the dimensions in the traced (exported) graph only: a broken conversion."""

        def call(self, x):
            if tf.executing_eagerly():
                return x
            return x * tf.constant([1.0, -1.0] * 4)

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dense(8)(x)
    model = keras.Model(inputs, L2Normalize()(Drifting()(x)))
    images = load_check_images(demo_corpus / "images", 32, 4)
    out = tmp_path / "bad"
    with pytest.raises(ParityError):
        export_embedding_model(model, out, backbone="tiny", source="pretrained", input_size=32, check_images=images)
    assert not (out / "model.onnx").exists() and not (out / "model.json").exists()


def test_export_cli_errors(tmp_path, capsys):
    from export.__main__ import main

    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no Keras model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--backbone", "not_a_net", "--out", str(tmp_path / "o")])
