"""The reader API the service uses: open, search, get, add, remove, save, and its refusals."""

from __future__ import annotations

import io
import json
import shutil
import threading
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from indexer import versions as versions_mod
from indexer.build import build_index
from indexer.bundle import CURRENT_FILE, VERSIONS_DIR, BundleError, Hit, open_bundle
from indexer.embedder import Embedder, EmbedderError
from indexer.images import load_for_model
from indexer.metadata import ImageRecord, stable_id
from tiny_model import make_corpus, make_tiny_model, pattern_image


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("bundle")
    model = make_tiny_model(root / "model")
    images = make_corpus(root / "images", classes=3, per_class=4)
    build_index(model, images, root / "index", progress=False, workers=2)
    return model, images, root / "index"


@pytest.fixture()
def index(built, tmp_path: Path) -> Path:
    """A private copy of the built bundle (tests below change it)."""
    copy = tmp_path / "index"
    shutil.copytree(built[2], copy)
    return copy


def _vec(bundle, images: Path, rel: str) -> np.ndarray:
    embedder = Embedder(bundle.model_dir, device="cpu")
    return embedder.embed(load_for_model(images / rel, embedder.card)[None])


def test_open_and_search(built):
    _, images, index = built
    b = open_bundle(index)
    assert len(b) == 12 and b.dim == 16 and b.index_type == "flat" and b.labels() == ["class_0", "class_1", "class_2"]
    assert b.manifest["counts"]["images"] == 12 and b.manifest["model"]["sha256"] == b.card.onnx_sha256
    assert b.version and (b.model_dir / "model.onnx").is_file() and b.model_dir == b.version_dir
    q = _vec(b, images, "class_1/img_0.jpg")
    (hits,) = b.search(q, 5)
    assert isinstance(hits[0], Hit) and hits[0].path == "class_1/img_0.jpg" and hits[0].label == "class_1"
    assert [h.label for h in hits[:4]] == ["class_1"] * 4
    assert all(a.score >= c.score for a, c in pairwise(hits))
    (filtered,) = b.search(q, 5, label="class_2")
    assert len(filtered) == 4 and {h.label for h in filtered} == {"class_2"}
    (strict,) = b.search(q, 10, min_score=0.9)
    assert 1 <= len(strict) <= 4 and all(h.score >= 0.9 for h in strict)
    (excl,) = b.search(q, 3, exclude_ids=[hits[0].id])
    assert hits[0].id not in {h.id for h in excl}
    assert b.search(q, 100)[0][-1].score <= hits[-1].score and len(b.search(q, 100)[0]) == 12
    assert b.search(np.vstack([q, q]), 2)[1][0].id == hits[0].id
    assert b.search(q, 3, label="no-such-class") == [[]]
    rec = b.get(hits[0].id)
    assert isinstance(rec, ImageRecord) and rec.path == "class_1/img_0.jpg" and rec.width == 64
    assert np.allclose(b.vector(rec.id), q[0], atol=1e-5)
    with pytest.raises(KeyError):
        b.get(12345)
    with pytest.raises(KeyError):
        b.vector(12345)
    with pytest.raises(ValueError):
        b.search(np.zeros((1, 5), np.float32), 3)
    assert b.absolute_path(rec.id) == (images / rec.path).resolve()


def test_add_remove_save_and_reopen(index: Path, built):
    b = open_bundle(index)
    first = b.version
    embedder = Embedder(b.model_dir, device="cpu")
    vec = embedder.embed_images([pattern_image(777)])[0]
    rec = ImageRecord(
        id=stable_id("extra/x.jpg"),
        path="extra/x.jpg",
        label="extra",
        size=1,
        mtime=1.0,
        sha256="0" * 64,
        width=64,
        height=64,
    )
    assert b.add([(rec, vec)]) == 1
    gone = stable_id("class_0/img_0.jpg")
    assert b.remove([gone, 999]) == 1
    assert b.search(vec[None], 1)[0][0].id == rec.id  # visible before save
    assert b.dirty
    new_version = b.save()
    assert new_version != first and b.version == new_version and not b.dirty
    again = open_bundle(index)
    assert len(again) == 12 and again.get(rec.id) == rec and gone not in again
    assert again.search(vec[None], 1)[0][0].id == rec.id
    # records + vectors form also works, and re-adding an id replaces it
    again.add([rec], vec[None] * -1)
    assert len(again) == 12 and again.search(-vec[None], 1)[0][0].id == rec.id


def test_uploads_are_stored_in_the_bundle(index: Path):
    b = open_bundle(index)
    buf = io.BytesIO()
    pattern_image(31).save(buf, "PNG")
    vec = Embedder(b.model_dir, device="cpu").embed_images([pattern_image(31)])[0]
    rec = b.add_upload(buf.getvalue(), vec, label="mine")
    assert rec.origin == "upload" and rec.path.startswith("uploads/") and rec.path.endswith(".png")
    assert b.add_upload(buf.getvalue(), vec).id == rec.id  # same bytes: same id, no duplicate
    b.save()
    reopened = open_bundle(index)
    assert reopened.absolute_path(rec.id).read_bytes() == buf.getvalue()
    assert reopened.manifest["counts"]["uploads"] == 1


def test_paths_that_escape_the_root_are_refused(index: Path):
    b = open_bundle(index)
    vec = np.ones(16, np.float32) / 4
    evil = ImageRecord(
        id=42, path="../../etc/passwd", label=None, size=1, mtime=0.0, sha256="0" * 64, width=1, height=1
    )
    b.add([(evil, vec)])
    with pytest.raises(BundleError, match="escapes"):
        b.absolute_path(42)


def test_a_crash_during_save_leaves_the_previous_version(index: Path, monkeypatch):
    before = open_bundle(index)
    manifest = dict(before.manifest)
    b = open_bundle(index)
    b.remove(b.ids()[:5])

    def crash(*args, **kwargs):
        raise OSError("simulated power cut")

    monkeypatch.setattr(versions_mod, "write_atomic", crash)  # dies just before CURRENT is switched
    with pytest.raises(OSError):
        b.save()
    monkeypatch.undo()
    after = open_bundle(index)
    assert after.version == before.version and after.manifest == manifest and len(after) == 12


def test_a_stale_bundle_cannot_overwrite_a_newer_version(index: Path):
    a, b = open_bundle(index), open_bundle(index)
    a.remove(a.ids()[:1])
    a.save()
    b.remove(b.ids()[-1:])
    with pytest.raises(BundleError, match="reload"):
        b.save()


def test_old_versions_are_pruned(index: Path):
    b = open_bundle(index)
    for _ in range(4):
        b.remove(b.ids()[:1])
        b.save()
    versions = sorted(p.name for p in (index / VERSIONS_DIR).iterdir())
    assert len(versions) == 2 and versions[-1] == b.version
    assert (index / CURRENT_FILE).read_text().strip() == b.version


def test_concurrent_searches_and_adds(index: Path):
    b = open_bundle(index)
    rng = np.random.default_rng(0)
    errors: list[BaseException] = []

    def searcher():
        try:
            for _ in range(200):
                q = rng.standard_normal((1, 16)).astype(np.float32)
                assert len(b.search(q / np.linalg.norm(q), 5)[0]) == 5
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(50):
        v = rng.standard_normal(16).astype(np.float32)
        b.add([(ImageRecord(1000 + i, f"x/{i}.jpg", "x", 1, 0.0, "0" * 64, 1, 1), v / np.linalg.norm(v))])
    for t in threads:
        t.join()
    assert not errors and len(b) == 62


def test_broken_bundles_are_refused_clearly(index: Path, tmp_path: Path, built):
    with pytest.raises(BundleError, match="no index bundle"):
        open_bundle(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not an index bundle"):
        open_bundle(tmp_path / "empty")
    version_dir = open_bundle(index).version_dir
    # a different model dropped into the bundle: its hash no longer matches the vectors'
    other = make_tiny_model(tmp_path / "other", seed=9)
    shutil.copy(other / "model.onnx", version_dir / "model.onnx")
    shutil.copy(other / "model.json", version_dir / "model.json")
    with pytest.raises(BundleError, match="not the model that made its vectors"):
        open_bundle(index)
    # same hash, but vectors of another dimension
    wide = make_tiny_model(tmp_path / "wide", dim=24)
    shutil.copy(wide / "model.onnx", version_dir / "model.onnx")
    shutil.copy(wide / "model.json", version_dir / "model.json")
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["model"]["sha256"] = json.loads((wide / "model.json").read_text())["onnx_sha256"]
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="dimension"):
        open_bundle(index)
    (version_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        open_bundle(index)
    (index / CURRENT_FILE).write_text("../../etc")
    with pytest.raises(BundleError):
        open_bundle(index)


def test_embedder_checks(built):
    model, _, _ = built
    e = Embedder(model, device="cpu")
    assert e.providers == ["CPUExecutionProvider"] and e.dim == 16
    out = e.embed(np.zeros((3, 32, 32, 3), np.uint8) + np.arange(32, dtype=np.uint8)[None, :, None, None])
    assert out.shape == (3, 16) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with pytest.raises(EmbedderError):
        e.embed(np.zeros((1, 10, 10, 3), np.uint8))
    assert e.embed(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 16)
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(EmbedderError, match="CUDA"):
            Embedder(model, device="cuda")
    assert Embedder(model, device="auto").providers[-1] == "CPUExecutionProvider"
