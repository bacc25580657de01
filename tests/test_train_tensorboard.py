"""TensorBoard logs of a training run, read back the way `tensorboard --logdir RUN/logs` reads
them: tensorboard's own event multiplexer finds the runs under logs/ and loads their events.

A tiny random-init backbone on a few colour classes, 2 epochs (1 warm-up + 1 fine-tune, so both
phases and their two `fit` calls are covered), in a few seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.util import tensor_util

from train.backbones import Backbone
from train.finetune import fine_tune

SIZE = 16
EPOCHS = 2


def _one_conv(weights, pool: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(x)
    return keras.Model(inputs, pool(x), name="one_conv")


ONE_CONV = Backbone("one_conv", SIZE, 8, "raw", "random init", _one_conv)


def _colour_classes(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    images = _colour_classes(tmp_path_factory.mktemp("colours") / "images")
    out = tmp_path_factory.mktemp("run")
    fine_tune(
        images,
        out,
        backbone=ONE_CONV,
        weights=None,
        loss="softmax",
        epochs=EPOCHS,
        warmup_epochs=1,
        fine_tune_layers=2,
        batch_size=4,
        embedding_dim=4,
        validation_split=0.34,
        seed=0,
        verbose=0,
    )
    return out


@pytest.fixture(scope="module")
def board(run_dir) -> EventMultiplexer:
    # Keep every event (TensorBoard itself samples long runs).
    mux = EventMultiplexer(size_guidance={event_accumulator.TENSORS: 0})
    mux.AddRunsFromDirectory(str(run_dir / "logs"))
    mux.Reload()
    return mux


def _curve(board: EventMultiplexer, run: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar: tf.summary.scalar writes it as a scalar tensor."""
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in board.Tensors(run, tag)]


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tensorboard_finds_a_train_and_a_validation_run(board):
    runs = board.Runs()
    assert set(runs) == {"train", "validation"}
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(runs["train"]["tensors"])
    assert {"epoch_loss", "epoch_accuracy", "epoch_map", "epoch_recall_at_1"} <= set(runs["validation"]["tensors"])


def test_one_loss_value_per_epoch_as_in_history_csv(board, run_dir):
    epochs = [row for row in _history(run_dir) if row["phase"] != "pretrained"]
    assert [int(row["epoch"]) for row in epochs] == list(range(1, EPOCHS + 1))
    for run, column in (("train", "loss"), ("validation", "val_loss")):
        curve = _curve(board, run, "epoch_loss")
        assert [step for step, _ in curve] == list(range(1, EPOCHS + 1)), run
        assert [value for _, value in curve] == pytest.approx([float(row[column]) for row in epochs], rel=1e-5)


def test_validation_map_per_epoch_starts_from_the_pretrained_backbone(board, run_dir):
    rows = _history(run_dir)
    assert rows[0]["phase"] == "pretrained"
    for tag, column in (("epoch_map", "val_map"), ("epoch_recall_at_1", "val_recall_at_1")):
        curve = _curve(board, "validation", tag)
        # Step 0: before training; then one value per epoch, across both phases.
        assert [step for step, _ in curve] == list(range(EPOCHS + 1)), tag
        assert [value for _, value in curve] == pytest.approx([float(row[column]) for row in rows], rel=1e-5)
