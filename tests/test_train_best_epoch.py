"""Validation by retrieval on a tiny real backbone: the history and run.json figures, the
best-epoch weights being the ones saved and exported, and each loss through `fine_tune`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")

from train.backbones import Backbone, pooling_layer
from train.dataset import decode_folders, list_class_folders, stratified_split
from train.finetune import fine_tune, leaf_layers
from train.retrieval import retrieval_metrics

SIZE = 32


def _tiny_build(weights, pool: keras.layers.Layer) -> keras.Model:
    """Two conv blocks with BatchNorm, then the given pooling: what unfreezing works on."""
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, width in enumerate((8, 16)):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, pool(x), name="tiny")


TINY = Backbone("tiny", SIZE, 16, "raw", "random init", _tiny_build)


def _noisy_corpus(root: Path, classes: int = 4, per_class: int = 10, seed: int = 0) -> Path:
    """Per-class colour patterns under heavy noise: retrieval is imperfect and can improve."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        base = rng.integers(40, 216, (4, 4, 3)).astype(float)
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            arr = np.kron(base, np.ones((SIZE // 4, SIZE // 4, 1))) + rng.normal(0, 70, (SIZE, SIZE, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _noisy_corpus(tmp_path_factory.mktemp("noisy") / "images")


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    meta = fine_tune(
        corpus,
        out,
        backbone=TINY,
        weights=None,
        loss="cosface",
        epochs=6,
        warmup_epochs=2,
        fine_tune_layers=4,
        batch_size=8,
        embedding_dim=8,
        learning_rate=3e-2,
        fine_tune_learning_rate=3e-2,
        validation_split=0.3,
        seed=0,
        verbose=0,
    )
    return out, meta


def _split_pixels(corpus: Path, seed: int = 0, fraction: float = 0.3):
    data = decode_folders(list_class_folders(corpus), SIZE, progress=False)
    train_idx, val_idx = stratified_split(data.labels, fraction, seed)
    return data, train_idx, val_idx


def _val_map(vectors: np.ndarray, data, train_idx, val_idx) -> float:
    found = retrieval_metrics(vectors[val_idx], data.labels[val_idx], vectors[train_idx], data.labels[train_idx])
    return found["map"]


def test_history_and_run_json_hold_retrieval_figures(run):
    out, meta = run
    rows = _history(out)
    assert [r["phase"] for r in rows] == ["pretrained"] + ["head"] * 2 + ["fine-tune"] * 4
    assert [int(r["epoch"]) for r in rows] == list(range(7))
    for r in rows:
        assert 0.0 <= float(r["val_map"]) <= 1.0 and 0.0 <= float(r["val_recall_at_1"]) <= 1.0
    assert rows[0]["loss"] == ""  # epoch 0 is a measurement, not training
    val = meta["validation"]
    assert val["pretrained"]["map"] == pytest.approx(float(rows[0]["val_map"]))
    maps = [float(r["val_map"]) for r in rows[1:]]
    assert val["best_epoch"] == 1 + int(np.argmax(maps))  # the first epoch with the best mAP
    assert val["fine_tuned"]["map"] == pytest.approx(max(maps))
    assert json.loads((out / "run.json").read_text())["validation"] == val
    # The fine-tune phase decays its learning rate.
    lrs = [float(r["lr"]) for r in rows if r["phase"] == "fine-tune"]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]


def test_tensorboard_has_retrieval_scalars(run):
    import tensorflow as tf

    out, _ = run
    files = sorted((out / "logs" / "validation").glob("events.out.tfevents.*"))
    steps: dict[str, set[int]] = {}
    for record in tf.data.TFRecordDataset([str(f) for f in files]):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for v in event.summary.value:
            steps.setdefault(v.tag, set()).add(int(event.step))
    assert steps["epoch_map"] == set(range(7)) and steps["epoch_recall_at_1"] == set(range(7))


def test_saved_model_holds_the_best_epochs_weights(run, corpus):
    import train.losses  # noqa: F401  registers the loss the model was compiled with

    out, meta = run
    model = keras.models.load_model(out / "model.keras")
    embedder = keras.Model(model.input, model.get_layer("embedding_norm").output)
    data, train_idx, val_idx = _split_pixels(corpus)
    vectors = embedder.predict(data.images.astype("float32"), verbose=0)
    saved = _val_map(vectors, data, train_idx, val_idx)
    rows = _history(out)
    best = meta["validation"]["best_epoch"]
    assert saved == pytest.approx(float(rows[best]["val_map"]), abs=1e-6)
    if float(rows[-1]["val_map"]) != float(rows[best]["val_map"]):
        assert saved != pytest.approx(float(rows[-1]["val_map"]), abs=1e-6)
    # BatchNorm stayed frozen; only the unfrozen top layers and the head changed.
    backbone = model.get_layer(meta["layers"]["backbone"])
    assert not any(
        layer.trainable for layer in leaf_layers(backbone) if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_export_of_the_run_is_the_best_epoch(run, corpus, tmp_path):
    import onnxruntime as ort

    from export.models import from_run
    from export.onnx_export import export_embedding_model

    out, meta = run
    data, train_idx, val_idx = _split_pixels(corpus)
    source = from_run(out)
    assert isinstance(source.model, keras.Model)
    export_embedding_model(
        source.model, tmp_path, backbone="tiny", source="fine-tuned", input_size=SIZE, check_images=data.images[:8]
    )
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    vectors = session.run(None, {"images": data.images})[0]
    expected = source.model.predict(data.images.astype("float32"), verbose=0)
    np.testing.assert_allclose(np.sum(vectors * expected, axis=1), 1.0, atol=1e-4)
    # Same vectors up to float noise, so the same mAP up to a near-tie swapping places.
    best = meta["validation"]["fine_tuned"]["map"]
    assert _val_map(vectors, data, train_idx, val_idx) == pytest.approx(best, abs=0.01)


def test_patience_stops_a_phase_early(corpus, tmp_path):
    meta = fine_tune(
        corpus,
        tmp_path,
        backbone=TINY,
        weights=None,
        loss="softmax",
        epochs=12,
        fine_tune_layers=0,
        batch_size=8,
        embedding_dim=8,
        learning_rate=0.3,
        patience=1,
        validation_split=0.3,
        seed=0,
        verbose=0,
    )
    assert meta["validation"]["stopped_early"] and meta["epochs_run"] < 12


@pytest.mark.parametrize("loss", ["softmax", "arcface", "multisimilarity"])
def test_other_losses_run_end_to_end(loss, corpus, tmp_path):
    meta = fine_tune(
        corpus,
        tmp_path,
        backbone=TINY,
        weights=None,
        loss=loss,
        epochs=2,
        warmup_epochs=1,
        fine_tune_layers=4,
        batch_size=8,
        classes_per_batch=2,
        images_per_class=4,
        embedding_dim=8,
        validation_split=0.3,
        seed=0,
        verbose=0,
    )
    assert meta["loss"] == loss and meta["unfrozen_layers"]
    rows = _history(tmp_path)
    assert [r["phase"] for r in rows] == ["pretrained", "head", "fine-tune"]
    assert all(np.isfinite(float(r["loss"])) for r in rows[1:])
    if loss == "multisimilarity":
        assert meta["batch_size"] == 8 and meta["layers"]["classifier"] is None
    assert (tmp_path / "model.keras").is_file()


def test_gem_pooling_matches_its_definition():
    from train.layers import GeMPooling2D

    x = np.random.default_rng(0).uniform(0, 2, (2, 3, 3, 4)).astype("float32")
    got = keras.ops.convert_to_numpy(GeMPooling2D(3.0)(x))
    np.testing.assert_allclose(got, np.mean(x**3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)
    one = keras.ops.convert_to_numpy(GeMPooling2D(1.0)(x))
    np.testing.assert_allclose(one, x.mean(axis=(1, 2)), rtol=1e-5)
    with pytest.raises(ValueError):
        pooling_layer("max")
