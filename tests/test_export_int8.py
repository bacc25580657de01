"""int8 export: quantised and recorded, refused when it drifts too far, and served from a bundle.

Tiny Keras models (a few convolutions at 32x32) keep this fast; the real EfficientNet-Lite0
figures are in bench/results/int8.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")

from indexer.model_card import read_card
from service_helpers import LiveServer, class_image, settings_for
from tiny_model import make_corpus, make_tiny_model, pattern_image

SIZE = 32


def tiny_convnet(outlier: float = 1.0) -> keras.Model:
    """A MobileNet-like stack (stem, depthwise, 1x1 convs, ReLU6), GAP, L2 norm.

    `outlier` > 1 multiplies one channel of the first quantised conv's output and drops it
    from the next conv: the float model ignores it, but int8 activations share one range per
    tensor, so every other channel is rounded away: an int8 model that drifts too far.
    """
    from train.layers import L2Normalize

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
    wide = layers.Conv2D(16, 1, activation="relu" if outlier > 1 else "relu6", name="wide")
    x = wide(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
    mix = layers.Conv2D(32, 1, activation="relu6", name="mix")
    x = mix(x)
    model = keras.Model(inputs, L2Normalize(name="embedding_norm")(layers.GlobalAveragePooling2D()(x)))
    if outlier > 1:
        w, b = wide.get_weights()
        w[..., 0], b[0] = np.abs(w[..., 0]) * outlier, outlier
        wide.set_weights([w, b])
        w, b = mix.get_weights()
        w[:, :, 0, :] = 0.0
        mix.set_weights([w, b])
    return model


def pattern_images(classes: int = 16, per_class: int = 6) -> np.ndarray:
    return np.stack(
        [np.asarray(pattern_image(c, SIZE, noise=12.0, noise_seed=i)) for c in range(classes) for i in range(per_class)]
    )


def export(model, out: Path, **kwargs):
    from export.onnx_export import export_embedding_model

    images = pattern_images()
    return export_embedding_model(
        model,
        out,
        backbone="tiny",
        source="pretrained",
        input_size=SIZE,
        check_images=images[::2],
        calibration_images=images[1::2],
        **kwargs,
    )


def save_run(model, run: Path) -> Path:
    """A folder `python -m export --model` reads (model.keras with an `embedding_norm` layer)."""
    run.mkdir(parents=True)
    model.save(run / "model.keras")
    return run


def write_images(folder: Path) -> Path:
    for i, img in enumerate(pattern_images()):
        (folder / f"c{i // 6}").mkdir(parents=True, exist_ok=True)
        keras.utils.save_img(folder / f"c{i // 6}" / f"{i}.png", img, scale=False)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model"
    export(tiny_convnet(), out, precision="int8")
    return out


def test_int8_export_is_quantised_checked_and_recorded(int8_model, tmp_path):
    from export.drift import MIN_MEAN_COSINE, MIN_TOP10_OVERLAP
    from indexer.embedder import Embedder

    card = read_card(int8_model)
    assert card.precision == "int8"
    assert card.parity["min_cosine"] >= 0.9999  # the fp32 model it came from matched Keras
    assert card.parity["int8_images"] == 48 and card.parity["int8_calibration_images"] == 48
    assert card.parity["int8_weight_bits"] == 7  # safe on CPUs without VNNI (export/quantize.py)
    assert card.parity["int8_mean_cosine"] >= MIN_MEAN_COSINE
    assert card.parity["int8_top10_overlap"] >= MIN_TOP10_OVERLAP
    ops = [n.op_type for n in onnx.load(str(int8_model / "model.onnx")).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert ops[-1] != "DequantizeLinear"  # the L2 norm stays float: unit vectors out
    vectors = Embedder(int8_model, device="cpu").embed(pattern_images(4, 2))
    assert vectors.shape == (8, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # fp32 stays the default, and a card without the field reads as fp32
    assert export(tiny_convnet(), tmp_path / "fp32").precision == "fp32"
    assert read_card(make_tiny_model(tmp_path / "tiny")).precision == "fp32"


def test_an_int8_model_that_drifts_too_far_is_refused(tmp_path):
    from export.drift import DriftError

    out = tmp_path / "out"
    with pytest.raises(DriftError, match="drifts too far"):
        export(tiny_convnet(outlier=1000.0), out, precision="int8")
    assert not out.exists()
    # the same model in fp32 is fine: it is the quantisation that is refused
    assert export(tiny_convnet(outlier=1000.0), out).precision == "fp32"


def test_cli_refuses_past_its_thresholds_and_leaves_out_untouched(tmp_path, capsys):
    from export.__main__ import main

    run = save_run(tiny_convnet(), tmp_path / "run")
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    common = ["--model", str(run), "--out", str(out), "--check-images", str(images)]
    assert main(common) == 0
    before = snapshot(out)
    assert read_card(out).precision == "fp32"
    # a cosine or an overlap of 1.0 would need int8 to be lossless: refused
    rc = main(common + ["--precision", "int8", "--check-count", "48", "--min-cosine", "1.0", "--min-overlap", "1.0"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "drifts too far" in err and "mean cosine" in err and "nothing was written" in err
    assert snapshot(out) == before
    # with its default thresholds the same model passes, calibrated on images it is not checked on
    assert main(common + ["--precision", "int8", "--check-count", "48"]) == 0
    card = read_card(out)
    assert card.precision == "int8" and card.source == "fine-tuned"
    assert card.parity["int8_images"] == 48 and card.parity["int8_calibration_images"] == 48


def test_cli_int8_argument_errors(tmp_path, capsys):
    from export.__main__ import main

    run = save_run(tiny_convnet(), tmp_path / "run")
    images = write_images(tmp_path / "images")
    common = ["--model", str(run), "--out", str(tmp_path / "out"), "--check-images", str(images)]
    assert main(common + ["--precision", "int8", "--check-count", "8"]) == 2
    assert "at least 32 check images" in capsys.readouterr().err
    assert main(common + ["--calibration-images", str(images)]) == 2
    assert "applies to --precision int8 only" in capsys.readouterr().err
    assert main(common + ["--precision", "int8", "--min-cosine", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_int8_bundle_serves_and_reloads(int8_model, tmp_path):
    import httpx

    from indexer.build import build_index
    from indexer.bundle import open_bundle

    images = make_corpus(tmp_path / "images", classes=3, per_class=5)
    index = tmp_path / "index"
    build_index(int8_model, images, index, progress=False, device="cpu", workers=1)
    assert open_bundle(index).card.precision == "int8"

    def search(client: httpx.Client) -> list[list[tuple[str, str, float]]]:
        answers = []
        for c in range(3):
            r = client.post("/search", files={"file": ("q.jpg", class_image(c), "image/jpeg")}, params={"k": 5})
            assert r.status_code == 200, r.text
            answers.append([(h["id"], h["label"], round(h["score"], 5)) for h in r.json()["results"]])
        return answers

    with LiveServer(settings_for(index)) as server, server.client() as client:
        first = search(client)
        assert [hits[0][1] for hits in first] == ["class_0", "class_1", "class_2"]
        assert client.post("/admin/reload").status_code == 200
        assert search(client) == first
    with LiveServer(settings_for(index)) as server, server.client() as client:  # opened again
        assert search(client) == first


def test_bias_correction_cancels_the_mean_shift_of_rounded_weights():
    """The corrected bias brings each output channel's mean back to the float model's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.bias_correction import correct_biases

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 6, 17, 17)) + rng.uniform(0.5, 2.0, (1, 6, 1, 1))).astype(np.float32)
    for groups, shape in ((1, (5, 6, 3, 3)), (6, (6, 1, 3, 3))):  # plain and depthwise
        w = rng.standard_normal(shape).astype(np.float32)
        b = rng.standard_normal(shape[0]).astype(np.float32)
        rounded = (w + rng.normal(0.02, 0.05, shape)).astype(np.float32)  # biased rounding error

        def model(weight: np.ndarray, bias: np.ndarray, groups: int = groups) -> onnx.ModelProto:
            node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=groups)
            graph = helper.make_graph(
                [node],
                "g",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
            )
            return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

        def output_mean(proto: onnx.ModelProto) -> np.ndarray:
            y = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
            return y.mean(axis=(0, 2, 3))

        corrected = model(w, b)
        assert correct_biases(corrected, {"conv": rounded}, {"conv": x.mean(axis=(0, 2, 3))}) == 1
        # run it with the rounded weights, as the int8 model would
        corrected.graph.initializer[0].CopyFrom(numpy_helper.from_array(rounded, "w"))
        target = output_mean(model(w, b))
        shifted = np.abs(output_mean(model(rounded, b)) - target)
        left = np.abs(output_mean(corrected) - target)
        # not exactly 0: border pixels fall in fewer windows than the mean input counts them
        assert shifted.mean() > 0.1 and left.max() < 0.1 * shifted.mean(), (shifted, left)
