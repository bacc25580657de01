"""A Keras-application backbone from a local weights file (the offline path), and the
freeze/unfreeze rules on a backbone whose network is a nested model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")

from train.backbones import get_backbone
from train.finetune import (
    TrainError,
    build_classifier,
    leaf_layers,
    resolve_weights,
    unfreeze_top_layers,
)


def _inner_model(backbone: keras.Model) -> keras.Model:
    nested = [layer for layer in backbone.layers if isinstance(layer, keras.Model)]
    assert len(nested) == 1
    return nested[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """mobilenet_v2 with random weights; its inner network's weights saved to a local file."""
    keras.utils.set_random_seed(1)
    source = get_backbone("mobilenet_v2").build(None)
    inner = _inner_model(source)
    # Random init leaves BatchNorm statistics at 0/1; perturb them so they are checked too.
    for w in inner.non_trainable_weights:
        w.assign(np.random.default_rng(0).uniform(0.5, 1.5, w.shape).astype("float32"))
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    inner.save_weights(path)
    return path, [w.numpy() for w in inner.weights]


def test_local_weights_file_is_loaded(saved):
    path, expected = saved
    loaded = get_backbone("mobilenet_v2").build(path)
    actual = [w.numpy() for w in _inner_model(loaded).weights]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)
    # Not trivially equal: a fresh random build differs.
    keras.utils.set_random_seed(2)
    fresh = [w.numpy() for w in _inner_model(get_backbone("mobilenet_v2").build(None)).weights]
    assert any(not np.array_equal(f, e) for f, e in zip(fresh, expected))


def test_resolve_weights():
    assert resolve_weights("imagenet") == "imagenet"
    assert resolve_weights("none") is None and resolve_weights(None) is None
    with pytest.raises(TrainError, match="weights file not found"):
        resolve_weights("/nonexistent/file.weights.h5")


def test_classifier_contract_and_unfreezing_a_nested_backbone(saved):
    path, _ = saved
    backbone = get_backbone("mobilenet_v2").build(path)
    model = build_classifier(backbone, 224, n_classes=3, embedding_dim=32)
    assert model.input.shape == (None, 224, 224, 3) and model.input.dtype == "float32"
    assert model.get_layer("embedding").output.shape == (None, 32)
    assert model.get_layer("embedding_norm").output.shape == (None, 32)
    assert model.get_layer("classifier").output.shape == (None, 3)
    # Phase 1: only the head trains.
    head = {"embedding", "classifier"}
    assert {w.path.split("/")[0] for w in model.trainable_weights} == head

    unfrozen = unfreeze_top_layers(backbone, 12)
    leaves = leaf_layers(backbone)
    assert all(not isinstance(leaf, keras.Model) for leaf in leaves)
    top = leaves[-12:]
    assert unfrozen == [
        leaf.name for leaf in top if leaf.weights and not isinstance(leaf, keras.layers.BatchNormalization)
    ]
    assert unfrozen  # conv layers near the top
    for leaf in leaves:
        if isinstance(leaf, keras.layers.BatchNormalization):
            assert not leaf.trainable
        elif id(leaf) not in {id(t) for t in top}:
            assert not leaf.trainable, leaf.name
    trainable_ids = {id(w) for w in model.trainable_weights}
    for leaf in top:
        for w in leaf.trainable_weights:
            assert id(w) in trainable_ids
