"""The training data layer and the learning-curve plot, without training anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.dataset import (
    ImageBatches,
    TrainDataError,
    decode_folders,
    list_class_folders,
    load_image,
    stratified_split,
)
from train.plots import plot_learning_curve


def _jpeg(path: Path, colour: tuple[int, int, int], size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=95)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """b/ has 3 images (one nested), a/ 2 plus a zero-byte .jpg, c/ 1; noise files around."""
    root = tmp_path / "data"
    _jpeg(root / "b" / "1.jpg", (0, 0, 255))
    _jpeg(root / "b" / "2.JPG", (0, 0, 250))
    _jpeg(root / "b" / "sub" / "3.jpeg", (0, 0, 245))
    _jpeg(root / "a" / "1.jpg", (255, 0, 0), size=(64, 20))
    _jpeg(root / "a" / "2.png", (250, 0, 0))
    (root / "a" / "broken.jpg").write_bytes(b"")
    _jpeg(root / "c" / "only.jpg", (0, 255, 0))
    (root / "a" / "notes.txt").write_text("not listed")
    (root / ".hidden").mkdir()
    _jpeg(root / ".hidden" / "x.jpg", (1, 1, 1))
    _jpeg(root / "stray.jpg", (9, 9, 9))  # not in a class folder: ignored
    return root


def test_class_folders_are_listed_sorted(folder):
    listing = list_class_folders(folder)
    assert listing.class_names == ["a", "b", "c"]
    names = [(p.name, int(label)) for p, label in zip(listing.paths, listing.labels)]
    assert names == [
        ("1.jpg", 0),
        ("2.png", 0),
        ("broken.jpg", 0),
        ("1.jpg", 1),
        ("2.JPG", 1),
        ("3.jpeg", 1),
        ("only.jpg", 2),
    ]


def test_unreadable_files_are_skipped_and_pixels_match_load_image(folder):
    data = decode_folders(list_class_folders(folder), 16, progress=False)
    assert [p.name for p, _ in data.skipped] == ["broken.jpg"]
    assert len(data.paths) == 6 and data.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert data.images is not None
    assert data.images.shape == (6, 16, 16, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[0], load_image(folder / "a" / "1.jpg", 16))
    assert tuple(data.images[0, 8, 8]) == pytest.approx((255, 0, 0), abs=6)


def test_streaming_batches_equal_cached_batches(folder):
    listing = list_class_folders(folder)
    cached = decode_folders(listing, 16, progress=False)
    streamed = decode_folders(listing, 16, cache_limit=0, progress=False)
    assert streamed.images is None
    a = ImageBatches(cached, range(6), batch_size=4)
    b = ImageBatches(streamed, range(6), batch_size=4)
    assert len(a) == len(b) == 2
    for i in range(2):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_shuffled_batches_cover_every_index_each_epoch(folder):
    data = decode_folders(list_class_folders(folder), 8, progress=False)
    batches = ImageBatches(data, [0, 2, 3, 5], batch_size=3, shuffle=True, seed=1)
    orders = []
    for _ in range(3):
        labels = np.concatenate([batches[i][1] for i in range(len(batches))])
        assert sorted(labels.tolist()) == sorted(data.labels[[0, 2, 3, 5]].tolist())
        orders.append(batches._order.copy())
        batches.on_epoch_end()
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])


def test_errors_are_clear(tmp_path):
    with pytest.raises(TrainDataError, match="not found"):
        list_class_folders(tmp_path / "missing")
    _jpeg(tmp_path / "one" / "x.jpg", (1, 2, 3))
    with pytest.raises(TrainDataError, match="at least 2 class subfolders"):
        list_class_folders(tmp_path)
    (tmp_path / "two").mkdir()
    with pytest.raises(TrainDataError, match=r"no image files.*two"):
        list_class_folders(tmp_path)
    (tmp_path / "two" / "bad.jpg").write_text("text")
    with pytest.raises(TrainDataError, match=r"no readable images.*two"):
        decode_folders(list_class_folders(tmp_path), 8, progress=False)


def test_stratified_split_is_seeded_and_covers_every_class():
    labels = np.repeat(np.arange(5), [1, 2, 5, 10, 40])
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    val_counts = np.bincount(labels[val], minlength=5)
    assert val_counts.tolist() == [0, 1, 1, 2, 8]  # >= 1 for every class with >= 2 images
    assert np.bincount(labels[train], minlength=5).min() >= 1
    again = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4)[1], val)
    assert len(stratified_split(labels, 0.0, seed=3)[1]) == 0
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, seed=0)


def test_learning_curve_png(tmp_path):
    rows = [
        {"epoch": 1, "phase": "head", "loss": 1.2, "accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6, "lr": 1e-3},
        {"epoch": 2, "phase": "head", "loss": 0.6, "accuracy": 0.8, "val_loss": 0.5, "val_accuracy": 0.8, "lr": 1e-3},
        {
            "epoch": 3,
            "phase": "fine-tune",
            "loss": 0.3,
            "accuracy": 0.9,
            "val_loss": None,
            "val_accuracy": None,
            "lr": 1e-4,
        },
    ]
    path = plot_learning_curve(rows, tmp_path / "curve.png", title="test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300
