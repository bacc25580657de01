"""`python -m train improve`: the whole loop on a tiny real backbone, against a served bundle
that a running service is watching.

The corpus is fine stripes (horizontal, vertical, checkerboard) on a random colour per image.
The served model (tests/tiny_model.py) averages 4x4 blocks first, which erases period-2 stripes:
it sees only the colour, so retrieval is at chance. A small conv net trained on the folder sees
the stripes, so the first loop (queries: a split of the served corpus) publishes; a second one
(queries: a folder, one a copy of a corpus image) with --min-gain 1.0 cannot, and keeps.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    import keras
else:
    keras = pytest.importorskip("keras")

from indexer.build import build_index
from indexer.model_card import file_sha256, read_card
from service_helpers import LiveServer, png, settings_for
from tiny_model import make_tiny_model
from train.backbones import Backbone
from train.improve import format_report, improve

SIZE = 32
PER_CLASS = 10
RECIPE = {
    "loss": "cosface",
    "epochs": 6,
    "warmup_epochs": 2,
    "fine_tune_layers": 4,
    "batch_size": 8,
    "embedding_dim": 8,
    "learning_rate": 3e-2,
    "fine_tune_learning_rate": 3e-2,
    "validation_split": 0.25,
    "seed": 0,
}


def _tiny_build(weights, pool: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, width in enumerate((8, 16)):
        x = keras.layers.Conv2D(width, 3, strides=2 if i else 1, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, pool(x), name="tiny")


TINY = Backbone("tiny", SIZE, 16, "raw", "random init", _tiny_build)


def _stripes(kind: int, rng: np.random.Generator) -> Image.Image:
    """Period-2 stripes of one orientation on a random colour; 4x4 block means lose them."""
    y, x = np.mgrid[:SIZE, :SIZE]
    sign = {0: (-1.0) ** y, 1: (-1.0) ** x, 2: (-1.0) ** (x + y)}[kind]
    arr = rng.integers(70, 186, 3)[None, None, :] + 50.0 * sign[..., None] + rng.normal(0, 6, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _corpus(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind, name in enumerate(("horizontal", "vertical", "checker")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _stripes(kind, rng).save(root / name / f"{i}.png")  # PNG: JPEG blurs the stripes
    return root


def _current(index: Path) -> str:
    return (index / "CURRENT").read_text().strip()


def _manifest(index: Path) -> dict:
    return json.loads((index / "versions" / _current(index) / "manifest.json").read_text())


@pytest.fixture()
def served(tmp_path) -> dict[str, Path]:
    images = _corpus(tmp_path / "images")
    poor = make_tiny_model(tmp_path / "poor", dim=16, size=SIZE)
    index = tmp_path / "index"
    build_index(poor, images, index, device="cpu", workers=1, progress=False, whiten=0)
    return {"images": images, "index": index, "work": tmp_path / "work"}


def _wait_for_model(client, sha: str) -> dict:
    deadline = time.monotonic() + 20
    while True:
        stats = client.get("/stats").json()
        if sha.startswith(stats["model"]["sha256"][:12]):
            return stats
        assert time.monotonic() < deadline, f"the service still serves {stats['model']}"
        time.sleep(0.1)


def test_improve_publishes_a_better_model_and_keeps_a_not_better_one(served):
    images, index, work = served["images"], served["index"], served["work"]
    common = {"work": work, "backbone": TINY, "weights": None, "device": "cpu", "whiten": 0, "verbose": 0}
    with LiveServer(settings_for(index, watch_interval=0.2)) as server, server.client() as c:
        # an upload through the API: publishing must keep it (re-embedded with the new model)
        r = c.post(
            "/images",
            files={"file": ("up.png", png(_stripes(0, np.random.default_rng(9))), "image/png")},
            data={"label": "horizontal"},
        )
        assert r.status_code == 201, r.text
        before = _current(index)

        first = improve(images, index, recipe=RECIPE, **common)
        text = format_report(first)
        assert first.decision == "published", text
        assert first.gain > 0.1 and first.held_out > 0, text
        # the held-out queries were not trained on: none of their bytes is in the training copy
        trained = {file_sha256(p) for p in (work / "train-images").rglob("*.png")}
        assert len(trained) == 3 * PER_CLASS - first.held_out
        new_sha = read_card(Path(first.model_dir)).onnx_sha256
        assert _current(index) != before and _manifest(index)["model"]["sha256"] == new_sha
        assert _manifest(index)["counts"]["uploads"] == 1
        assert "published: mAP@10" in text and "rebuilt the served bundle in place" in text
        stats = _wait_for_model(c, new_sha)  # the watcher swapped the model in
        assert stats["count"] == 3 * PER_CLASS + 1

        # a folder of queries this time, one of them a copy of a corpus image: not trained on
        queries = _corpus(work.parent / "queries", per_class=2, seed=1)
        shutil.copy(images / "vertical" / "0.png", queries / "vertical" / "copy.png")
        published = _current(index)
        second = improve(images, index, queries=queries, recipe={**RECIPE, "epochs": 2}, min_gain=1.0, **common)
        text = format_report(second)
        assert second.decision == "kept" and second.held_out == 1, text
        assert second.staged["queries"] == second.served["queries"] == 7
        assert _current(index) == published and _manifest(index)["model"]["sha256"] == new_sha
        assert "kept the served bundle: mAP@10" in text
        assert c.get("/stats").json()["bundle_version"] == published


def test_improve_cli_errors_are_one_line(tmp_path, capsys):
    from train.__main__ import main

    images = _corpus(tmp_path / "images")
    rc = main(["improve", "--images", str(images), "--index", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: served bundle: no index bundle at") and err.count("\n") == 1
    rc = main(["improve", "--images", str(tmp_path / "missing"), "--index", str(tmp_path / "none")])
    assert rc == 2 and "training images: no such folder" in capsys.readouterr().err
