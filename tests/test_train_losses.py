"""The retrieval losses and the P x K sampler, on tiny real Keras models (a few seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")

from train.dataset import ClassBalancedBatches, DecodedSet
from train.layers import CosineClassifier, L2Normalize
from train.losses import LOSSES, ArcFaceLoss, CosFaceLoss, make_loss

N_CLASSES, DIM, PER_CLASS = 4, 8, 16


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four overlapping Gaussian blobs: learnable, but not separated from the start."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (N_CLASSES, DIM))
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    x = centres[labels] + rng.normal(0, 1.0, (len(labels), DIM))
    order = rng.permutation(len(labels))
    return x[order].astype("float32"), labels[order].astype("int32")


def _tiny_model(loss: str) -> keras.Model:
    inputs = keras.Input((DIM,))
    x = L2Normalize(name="embedding_norm")(keras.layers.Dense(16, name="embedding")(inputs))
    if loss == "softmax":
        x = keras.layers.Dense(N_CLASSES, activation="softmax")(keras.layers.Rescaling(16.0)(x))
    elif loss in ("cosface", "arcface"):
        x = CosineClassifier(N_CLASSES)(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains_a_tiny_model_and_lowers_its_loss(loss):
    keras.utils.set_random_seed(0)
    x, y = _blobs()
    model = _tiny_model(loss)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=make_loss(loss))
    before = model.evaluate(x, y, batch_size=len(x), verbose=0)
    model.fit(x, y, batch_size=32, epochs=10, shuffle=False, verbose=0)  # 20 steps
    after = model.evaluate(x, y, batch_size=len(x), verbose=0)
    assert np.isfinite(before) and np.isfinite(after)
    assert after < 0.9 * before, (loss, before, after)


def test_margin_losses_reduce_to_scaled_softmax_without_margin():
    rng = np.random.default_rng(1)
    cos = np.clip(rng.normal(0, 0.4, (6, 5)), -0.99, 0.99).astype("float32")
    y = np.array([0, 1, 2, 3, 4, 0])
    logits = 30.0 * cos
    expected = -(logits[np.arange(6), y] - np.log(np.exp(logits).sum(1)))
    for loss in (CosFaceLoss(30.0, 0.0), ArcFaceLoss(30.0, 0.0)):
        got = keras.ops.convert_to_numpy(loss.call(y, cos))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # A margin makes the true class harder, so the loss can only grow.
    for loss in (CosFaceLoss(30.0, 0.2), ArcFaceLoss(30.0, 0.3)):
        assert np.all(keras.ops.convert_to_numpy(loss.call(y, cos)) > expected)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("triplet")


def _decoded(counts: list[int]) -> DecodedSet:
    labels = np.repeat(np.arange(len(counts)), counts).astype("int32")
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    images[..., 0] = np.arange(len(labels)).reshape(-1, 1, 1) % 256  # row id in the pixels
    return DecodedSet(
        [f"c{i}" for i in range(len(counts))], [Path(f"{i}.png") for i in range(len(labels))], labels, 4, images
    )


def test_pk_sampler_yields_p_classes_of_k_images():
    data = _decoded([9, 6, 5, 12, 3, 8])  # class 4 has fewer than K images
    train = np.arange(len(data.labels))
    batches = ClassBalancedBatches(data, train, classes_per_batch=3, images_per_class=4, seed=0)
    assert len(batches) == -(-len(train) // 12)
    seen: set[int] = set()
    for _epoch in range(3):
        for i in range(len(batches)):
            pixels, labels = batches[i]
            assert pixels.shape == (12, 4, 4, 3) and pixels.dtype == np.float32
            classes, per_class = np.unique(labels, return_counts=True)
            assert len(classes) == 3 and per_class.tolist() == [4, 4, 4]
            rows = pixels[:, 0, 0, 0].astype(int)
            assert np.array_equal(data.labels[rows], labels)  # pixels and labels agree
            seen |= set(classes.tolist())
        batches.on_epoch_end()
    assert seen == set(range(6))  # every class is drawn


def test_pk_sampler_is_seeded_and_checks_its_arguments():
    data = _decoded([5, 5, 5])
    idx = np.arange(15)
    a = ClassBalancedBatches(data, idx, 2, 2, seed=3)
    b = ClassBalancedBatches(data, idx, 2, 2, seed=3)
    assert all(np.array_equal(a[i][1], b[i][1]) for i in range(len(a)))
    with pytest.raises(ValueError, match="only 3 classes"):
        ClassBalancedBatches(data, idx, 4, 2)
    with pytest.raises(ValueError, match="K >= 2"):
        ClassBalancedBatches(data, idx, 2, 1)
