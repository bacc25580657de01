"""Whitening learned at build time, alpha query expansion, and the label threshold.

Real parts: a tiny ONNX model, FAISS's PCAMatrix, bundles on disk, the service over HTTP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.build import build_index
from indexer.bundle import open_bundle
from indexer.embed_stage import BuildError
from indexer.embedder import Embedder, EmbedderError
from indexer.images import load_for_model
from indexer.labels import calibrate, predict, vote
from indexer.live_index import Hit
from indexer.query_expansion import QueryExpansion, expand
from indexer.whitening import WHITENING_FILE
from service_helpers import LiveServer, jpeg, settings_for
from tiny_model import make_corpus, make_tiny_model, pattern_image

WHITEN_DIM = 8


@pytest.fixture(scope="module")
def whitened(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whitened")
    model = make_tiny_model(root / "model")  # 16-d
    images = make_corpus(root / "images", classes=4, per_class=6)  # 24 images > 8 dimensions
    index = root / "index"
    report = build_index(model, images, index, progress=False, device="cpu", workers=1, whiten=WHITEN_DIM)
    assert report.whitening.startswith(f"pca 16->{WHITEN_DIM}")
    return {"model": model, "images": images, "index": index}


def embed_file(model_dir: Path, path: Path) -> np.ndarray:
    emb = Embedder(model_dir, device="cpu")
    return emb.embed(load_for_model(path, emb.card)[None])[0]


def test_a_whitened_bundle_stores_the_projection_and_its_vectors_are_the_embedders(whitened):
    bundle = open_bundle(whitened["index"])
    assert bundle.dim == WHITEN_DIM and bundle.card.output.dim == 16
    assert (bundle.version_dir / WHITENING_FILE).is_file()
    assert bundle.manifest["model"]["whitening"]["dim"] == WHITEN_DIM
    rec = next(r for r in bundle.records() if r.label == "class_2")
    stored = bundle.vector(rec.id)
    # the bundle's own model folder (what the service loads) gives the stored vector for the same file
    again = embed_file(bundle.model_dir, whitened["images"] / rec.path)
    assert again.shape == (WHITEN_DIM,) and np.linalg.norm(again) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(again, stored, atol=1e-5)
    # a batch is embedded bit for bit like its images one by one (micro-batching relies on it)
    emb = Embedder(bundle.model_dir, device="cpu")
    files = [whitened["images"] / r.path for r in bundle.records()[:7]]
    pixels = np.stack([load_for_model(f, emb.card) for f in files])
    singles = np.concatenate([emb.embed(pixels[i : i + 1]) for i in range(len(pixels))])
    assert np.array_equal(emb.embed(pixels), singles)
    # and the exported model alone gives another (16-d, unwhitened) vector
    assert embed_file(whitened["model"], whitened["images"] / rec.path).shape == (16,)


def test_the_service_applies_the_same_whitening_to_queries(whitened):
    bundle = open_bundle(whitened["index"])
    query = jpeg(pattern_image(1, 64, noise=12.0, noise_seed=77))
    emb = Embedder(bundle.model_dir, device="cpu")
    vector = emb.embed(load_for_model(query, emb.card)[None])
    (expected,) = bundle.search(vector, 5)
    with LiveServer(settings_for(whitened["index"])) as server, server.client() as client:
        r = client.post("/search", files={"file": ("q.jpg", query, "image/jpeg")}, params={"k": 5})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [h["id"] for h in got] == [h.id for h in expected]
        assert [h["score"] for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
        # a corpus file finds itself at cosine 1: the query went through the same transform
        rec = next(r for r in bundle.records() if r.label == "class_3")
        data = (whitened["images"] / rec.path).read_bytes()
        top = client.post("/search", files={"file": ("c.jpg", data, "image/jpeg")}, params={"k": 1}).json()["results"][
            0
        ]
        assert top["id"] == rec.id and top["score"] == pytest.approx(1.0, abs=1e-5)
        # an upload is whitened too: it is found by itself
        new = jpeg(pattern_image(3, 64, noise=30.0, noise_seed=5))
        added = client.post("/images", files={"file": ("n.jpg", new, "image/jpeg")}, data={"label": "class_3"})
        assert added.status_code == 201, added.text
        top = client.post("/search", files={"file": ("n.jpg", new, "image/jpeg")}, params={"k": 1}).json()["results"][0]
        assert top["id"] == added.json()["id"] and top["score"] == pytest.approx(1.0, abs=1e-5)
    # reloaded from disk (the journal replays the upload): the same answers
    reloaded = open_bundle(whitened["index"])
    (again,) = reloaded.search(vector, 5)
    assert [(h.id, round(h.score, 5)) for h in again] == [(h.id, round(h.score, 5)) for h in expected]


def test_incremental_builds_keep_the_whitening_and_refuse_another(whitened, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(whitened["index"], index)
    images = tmp_path / "images"
    shutil.copytree(whitened["images"], images)
    extra = images / "class_0" / "extra.jpg"
    extra.write_bytes(jpeg(pattern_image(0, 64, noise=20.0, noise_seed=9)))
    report = build_index(whitened["model"], images, index, progress=False, device="cpu", workers=1)
    assert report.added == 1 and report.whitening.startswith(f"pca 16->{WHITEN_DIM}")
    bundle = open_bundle(index)
    rec = next(r for r in bundle.records() if r.path.endswith("extra.jpg"))
    np.testing.assert_allclose(bundle.vector(rec.id), embed_file(bundle.model_dir, extra), atol=1e-5)
    with pytest.raises(BuildError, match="whitening"):
        build_index(whitened["model"], images, index, progress=False, device="cpu", workers=1, whiten=0)
    with pytest.raises(BuildError, match="bundle's model folder"):
        build_index(bundle.model_dir, images, index, progress=False, device="cpu", workers=1)
    report = build_index(
        whitened["model"], images, index, progress=False, device="cpu", workers=1, whiten=0, rebuild=True
    )
    assert report.whitening == "none" and open_bundle(index).dim == 16


def test_too_few_images_for_the_whitening_is_a_clear_error(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=2, per_class=3)
    with pytest.raises(BuildError, match="needs more than 8 images"):
        build_index(model, images, tmp_path / "index", progress=False, device="cpu", workers=1, whiten=8)
    assert not (tmp_path / "index" / "CURRENT").exists()


def test_a_changed_whitening_file_is_refused(whitened, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(open_bundle(whitened["index"]).model_dir, folder)
    raw = bytearray((folder / WHITENING_FILE).read_bytes())
    raw[-5] ^= 0xFF
    (folder / WHITENING_FILE).write_bytes(bytes(raw))
    with pytest.raises(EmbedderError, match=r"does not match model\.json"):
        Embedder(folder, device="cpu")


def test_query_expansion_adds_the_top_hits_weighted_by_score():
    q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    table = {1: np.array([0.0, 1.0, 0.0], np.float32), 2: np.array([0.0, 0.0, 1.0], np.float32)}
    hits = [[Hit(1, 0.5, "a", None), Hit(2, -0.2, "b", None)]]
    out = expand(q, hits, lambda ids: np.stack([table[i] for i in ids]), alpha=1.0)
    want = np.array([1.0, 0.5, 0.0]) / np.linalg.norm([1.0, 0.5, 0.0])  # a negative score adds nothing
    np.testing.assert_allclose(out[0], want, atol=1e-6)
    out = expand(q, hits, lambda ids: np.stack([table[i] for i in ids]), alpha=2.0)
    np.testing.assert_allclose(out[0], np.array([1.0, 0.25, 0.0]) / np.linalg.norm([1.0, 0.25, 0.0]), atol=1e-6)


def test_query_expansion_through_the_bundle(whitened):
    bundle = open_bundle(whitened["index"])
    _ids, vecs = bundle.vectors()
    q = vecs[:1]
    plain = bundle.search(q, 5)
    assert bundle.search(q, 5, expansion=QueryExpansion(top=0)) == plain
    (expanded,) = bundle.search(q, 5, expansion=QueryExpansion(top=2))
    first = plain[0][:2]
    want = q[0] + sum(h.score * bundle.vector(h.id) for h in first)
    want /= np.linalg.norm(want)
    (direct,) = bundle.search(want[None].astype(np.float32), 5)
    assert [h.id for h in expanded] == [h.id for h in direct]
    assert [h.score for h in expanded] == pytest.approx([h.score for h in direct], abs=1e-5)


def test_vote_gives_share_and_mean_score():
    hits = [Hit(1, 0.9, "a", "x"), Hit(2, 0.7, "b", "x"), Hit(3, 0.4, "c", "y"), Hit(4, 0.5, "d", None)]
    result = vote(hits)
    assert result is not None and result.label == "x"
    assert result.share == pytest.approx(1.6 / 2.0, abs=1e-6) and result.mean_score == pytest.approx(0.8)
    assert predict(result, 0.85) is None and predict(result, 0.8) == "x" and predict(result, None) == "x"
    assert vote([Hit(1, 0.9, "a", None)]) is None


def test_calibrated_threshold_leaves_an_unseen_kind_unlabelled(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=7, per_class=6)
    held_out = tmp_path / "unseen"
    shutil.move(images / "class_6", held_out)  # a kind the index never sees
    report = build_index(model, images, tmp_path / "index", progress=False, device="cpu", workers=1)
    cal = report.label_calibration
    assert cal is not None and cal["known"] >= 0.9 and cal["queries"] == 36
    bundle = open_bundle(tmp_path / "index")
    ids, vecs = bundle.vectors()
    again = calibrate(vecs, [bundle.get(int(i)).label for i in ids])
    assert again is not None and again.min_score == pytest.approx(cal["min_score"])
    with LiveServer(settings_for(tmp_path / "index")) as server, server.client() as client:
        known = jpeg(pattern_image(2, 64, noise=12.0, noise_seed=31))
        body = client.post("/search", files={"file": ("k.jpg", known, "image/jpeg")}).json()
        assert body["predicted_label"] == "class_2" and body["label_vote"]["mean_score"] >= cal["min_score"]
        unseen = (held_out / sorted(p.name for p in held_out.iterdir())[0]).read_bytes()
        body = client.post("/search", files={"file": ("u.jpg", unseen, "image/jpeg")}).json()
        assert body["predicted_label"] is None, body["label_vote"]
        assert body["label_vote"]["mean_score"] < cal["min_score"] and body["results"]  # neighbours, no label
    with LiveServer(settings_for(tmp_path / "index", label_min_score=-1)) as server, server.client() as client:
        body = client.post("/search", files={"file": ("u.jpg", unseen, "image/jpeg")}).json()
        assert body["predicted_label"] is not None  # the setting overrides the calibration
