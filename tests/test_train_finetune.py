"""One real fine-tuning run through the CLI, shared by every test here.

Small demo corpus (19 classes x 8 images, 2 held-out queries each) plus two unreadable files,
efficientnet_lite0 with its embedded ImageNet weights, the default loss (arcface), 2 warm-up
epochs + 1 fine-tune epoch.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
HEAD_EPOCHS = 2
FINE_TUNE_EPOCHS = 1
FINE_TUNE_LAYERS = 10
LEARNING_RATE = 1e-3
FINE_TUNE_LEARNING_RATE = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from train.demo_data import build_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(root, copies=8, queries=2, seed=0)
    # Unreadable files among valid ones: skipped and counted, never fatal.
    (root / "images" / "coins" / "zero_bytes.jpg").write_bytes(b"")
    (root / "images" / "moon" / "notes.jpg").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--data",
        str(corpus / "images"),
        "--out",
        str(out),
        "--backbone",
        BACKBONE,
        "--epochs",
        str(HEAD_EPOCHS + FINE_TUNE_EPOCHS),
        "--warmup-epochs",
        str(HEAD_EPOCHS),
        "--fine-tune-layers",
        str(FINE_TUNE_LAYERS),
        "--batch-size",
        "16",
        "--learning-rate",
        str(LEARNING_RATE),
        "--fine-tune-learning-rate",
        str(FINE_TUNE_LEARNING_RATE),
        "--seed",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "out": out,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "json": json.loads((out / "run.json").read_text()),
    }


@pytest.fixture(scope="module")
def model(run):
    import keras

    import train.layers
    import train.losses  # noqa: F401  and the loss model.keras was compiled with

    return keras.models.load_model(run["out"] / "model.keras")


def _read_history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_every_artifact(run, corpus):
    out = run["out"]
    for name in ("model.keras", "classes.json", "run.json", "history.csv", "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    classes = json.loads((out / "classes.json").read_text())
    assert classes == sorted(p.name for p in (corpus / "images").iterdir() if p.is_dir())
    meta = run["json"]
    for key in (
        "backbone",
        "input_size",
        "embedding_dim",
        "weights",
        "epochs",
        "fine_tune_layers",
        "batch_size",
        "seed",
        "validation_split",
        "counts",
        "skipped",
        "final",
        "versions",
        "loss",
        "warmup_epochs",
        "validation",
    ):
        assert key in meta, key
    assert meta["backbone"] == BACKBONE and meta["input_size"] == 224
    assert meta["embedding_dim"] == 256 and meta["weights"] == "imagenet"
    assert meta["counts"]["train"] + meta["counts"]["val"] == 8 * len(classes)
    assert 0.0 <= meta["final"]["val_accuracy"] <= 1.0
    assert {"keras", "numpy"} <= set(meta["versions"])
    assert meta["loss"] == "arcface" and meta["margin"] == 0.3 and meta["scale"] == 30.0
    for figures in (meta["validation"]["pretrained"], meta["validation"]["fine_tuned"]):
        assert 0.0 <= figures["map"] <= 1.0 and 0.0 <= figures["recall@1"] <= 1.0


def test_learning_curve_is_a_valid_png(run):
    with Image.open(run["out"] / "learning_curve.png") as im:
        assert im.format == "PNG"
        im.load()
        assert im.width > 300 and im.height > 200


def test_tensorboard_event_files_hold_epoch_scalars(run):
    import tensorflow as tf

    tags: dict[str, set[str]] = {}
    for split in ("train", "validation"):
        files = sorted((run["out"] / "logs" / split).glob("events.out.tfevents.*"))
        assert files, f"no TensorBoard events in logs/{split}"
        tags[split] = set()
        for record in tf.data.TFRecordDataset([str(f) for f in files]):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags[split] |= {v.tag for v in event.summary.value}
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= tags["train"]
    assert {"epoch_loss", "epoch_accuracy", "epoch_map", "epoch_recall_at_1"} <= tags["validation"]


def test_history_has_rows_for_both_phases(run):
    rows = _read_history(run["out"])
    assert [int(r["epoch"]) for r in rows] == list(range(HEAD_EPOCHS + FINE_TUNE_EPOCHS + 1))
    assert [r["phase"] for r in rows] == (["pretrained"] + ["head"] * HEAD_EPOCHS + ["fine-tune"] * FINE_TUNE_EPOCHS)
    assert np.isfinite(float(rows[0]["val_map"])) and rows[0]["loss"] == ""
    for r in rows[1:]:
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_map", "val_recall_at_1"):
            assert np.isfinite(float(r[key])), (key, r)
    assert float(rows[1]["lr"]) == pytest.approx(LEARNING_RATE)
    # Lower rate in phase 2, cosine-decayed from FINE_TUNE_LEARNING_RATE.
    assert float(rows[-1]["lr"]) < FINE_TUNE_LEARNING_RATE
    # Progress was shown, in the epoch numbering the CSV uses.
    assert f"Epoch {HEAD_EPOCHS + FINE_TUNE_EPOCHS}/{HEAD_EPOCHS + FINE_TUNE_EPOCHS}" in run["stdout"]


def test_unreadable_files_are_skipped_and_counted(run):
    meta = run["json"]
    assert meta["counts"]["skipped"] == 2
    skipped = {Path(s["path"]).name: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {"zero_bytes.jpg", "notes.jpg"}
    assert all(skipped.values())
    assert "2 skipped" in run["stdout"] and "zero_bytes.jpg" in run["stdout"]


def test_summary_says_where_things_were_written(run):
    assert "val accuracy" in run["stdout"]
    assert str(run["out"]) in run["stdout"]
    assert "Traceback" not in run["stderr"]


def test_model_reloads_and_embedding_norm_is_unit_length(run, model, corpus):
    import keras

    from train.dataset import load_image

    classes = json.loads((run["out"] / "classes.json").read_text())
    assert model.get_layer("classifier").output.shape[-1] == len(classes)
    embedder = keras.Model(model.input, model.get_layer("embedding_norm").output)
    paths = sorted((corpus / "queries").glob("*/*.jpg"))[:6]
    pixels = np.stack([load_image(p, 224) for p in paths]).astype("float32")
    vectors = embedder.predict(pixels, verbose=0)
    assert vectors.shape == (len(paths), 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_fine_tune_phase_left_batchnorm_frozen(run, model):
    import keras

    from train.finetune import leaf_layers

    unfrozen = run["json"]["unfrozen_layers"]
    assert unfrozen, "the fine-tune phase unfroze nothing"
    backbone = model.get_layer(run["json"]["layers"]["backbone"])
    leaves = leaf_layers(backbone)
    for layer in leaves:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
    trainable = [layer.name for layer in leaves if layer.trainable and layer.weights]
    assert trainable == unfrozen
    assert set(unfrozen) <= {layer.name for layer in leaves[-FINE_TUNE_LAYERS:]}


# --------------------------------------------------------------------------- retrieval


def _retrieval_metrics(
    queries: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray
) -> dict[str, float]:
    """Cosine retrieval of each query against the gallery: nearest-neighbour accuracy, mAP, and
    the mean gap between same-class and other-class similarity (how far apart classes sit)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")
    relevant = g_labels[order] == q_labels[:, None]
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    ap = (precision * relevant).sum(axis=1) / relevant.sum(axis=1)
    same = g_labels[None, :] == q_labels[:, None]
    gap = (sims * same).sum(1) / same.sum(1) - (sims * ~same).sum(1) / (~same).sum(1)
    return {
        "nn_accuracy": float(relevant[:, 0].mean()),
        "map": float(ap.mean()),
        "gap": float(gap.mean()),
        "sims": sims,
    }


def _load_split(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from indexer.images import ImageDecodeError
    from train.dataset import load_image

    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.jpg")):
            try:
                images.append(load_image(path, 224))
            except ImageDecodeError:
                continue  # the two planted unreadable files
            labels.append(index)
    return np.stack(images).astype("float32"), np.asarray(labels)


def test_fine_tuned_embedding_retrieves_better_than_pretrained(run, model, corpus):
    import keras

    from train.backbones import get_backbone

    classes = json.loads((run["out"] / "classes.json").read_text())
    gallery, g_labels = _load_split(corpus / "images", classes)
    queries, q_labels = _load_split(corpus / "queries", classes)
    assert len(queries) == 2 * len(classes)

    pixels = np.concatenate([queries, gallery])  # one predict per model: the forward pass
    n = len(queries)  # is most of this test's time

    def metrics(net: keras.Model) -> dict:
        vectors = net.predict(pixels, batch_size=32, verbose=0)
        return _retrieval_metrics(vectors[:n], q_labels, vectors[n:], g_labels)

    tuned = metrics(keras.Model(model.input, model.get_layer("embedding_norm").output))
    pretrained = metrics(get_backbone(BACKBONE).build("imagenet"))

    # A different embedding, not the backbone's features passed through...
    assert not np.allclose(tuned["sims"], pretrained["sims"], atol=1e-2)
    # ...that retrieves held-out copies at least as well, and pulls classes further apart
    # (ImageNet features already rank these copies almost perfectly, so the gap is the
    # sensitive measure of what the head learned; 3 short epochs of the arcface head widen
    # it by about 0.045 here).
    assert tuned["nn_accuracy"] >= pretrained["nn_accuracy"]
    assert tuned["map"] >= pretrained["map"] - 1e-9
    assert tuned["gap"] > pretrained["gap"] + 0.02, (tuned["gap"], pretrained["gap"])
