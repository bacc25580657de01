"""build_index and `python -m indexer build`: formats, bad files, incremental builds, model checks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import BuildError, build_index
from indexer.bundle import open_bundle
from indexer.embedder import Embedder
from indexer.images import load_for_model
from indexer.metadata import stable_id
from test_indexer_images import png_16bit_rgb
from tiny_model import make_corpus, make_tiny_model, pattern_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _build(model: Path, images: Path, index: Path, **kw):
    return build_index(model, images, index, progress=False, workers=2, **kw)


def _query(model: Path, path: Path) -> np.ndarray:
    embedder = Embedder(model, device="cpu")
    return embedder.embed(load_for_model(path, embedder.card)[None])


def test_every_format_and_mode_is_indexed(tiny: Path, tmp_path: Path):
    images = tmp_path / "images"
    (images / "formats").mkdir(parents=True)
    (images / "modes").mkdir()
    base = pattern_image(1)
    for ext, fmt in [
        ("jpg", "JPEG"),
        ("png", "PNG"),
        ("webp", "WEBP"),
        ("bmp", "BMP"),
        ("gif", "GIF"),
        ("tiff", "TIFF"),
    ]:
        base.save(images / "formats" / f"pic.{ext}", fmt)
    base.convert("L").save(images / "modes" / "gray.png")
    base.convert("P").save(images / "modes" / "palette.png")
    base.convert("CMYK").save(images / "modes" / "cmyk.jpg")
    base.convert("RGBA").save(images / "modes" / "rgba.png")
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(images / "modes" / "gray16.png")
    (images / "modes" / "rgb16.png").write_bytes(png_16bit_rgb(20, 10, 40000))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 30), (9, 99, 199)).save(images / "modes" / "rotated.jpg", exif=exif.tobytes())
    frames = [pattern_image(2).convert("P"), pattern_image(3).convert("P")]
    frames[0].save(images / "modes" / "anim.gif", save_all=True, append_images=frames[1:])
    base.save(images / "root.PNG")  # upper-case extension, at the root: no label

    report = _build(tiny, images, tmp_path / "index")
    assert report.skipped == 0, report.skipped_files
    assert report.added == 15 and report.images == 15
    bundle = open_bundle(tmp_path / "index")
    by_path = {r.path: r for r in bundle.records()}
    assert by_path["root.PNG"].label is None
    assert by_path["formats/pic.webp"].label == "formats"
    assert (by_path["modes/rotated.jpg"].width, by_path["modes/rotated.jpg"].height) == (30, 60)
    assert (by_path["modes/rgb16.png"].width, by_path["modes/rgb16.png"].height) == (20, 10)
    rec = by_path["formats/pic.png"]
    path = images / "formats" / "pic.png"
    assert rec.id == stable_id("formats/pic.png") and rec.size == path.stat().st_size
    assert rec.mtime == pytest.approx(path.stat().st_mtime) and len(rec.sha256) == 64
    assert bundle.labels() == ["formats", "modes"]
    # the lossless copies of one picture find each other first
    (hits,) = bundle.search(_query(tiny, path), 4)
    assert hits[0].path == "formats/pic.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_bad_files_are_skipped_and_reported(tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=2, per_class=3)
    good = (images / "class_0" / "img_0.jpg").read_bytes()
    (images / "class_0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "class_0" / "empty.png").write_bytes(b"")
    (images / "class_1" / "text.jpg").write_text("not really a jpeg")
    (images / "class_1" / "notes.txt").write_text("hello")
    (images / "class_1" / "fake.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 broken")
    (images / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored silently
    report = _build(tiny, images, tmp_path / "index")
    assert report.added == 6
    assert report.skipped == 5
    reasons = {s.path: s.reason for s in report.skipped_files}
    assert set(reasons) == {
        "class_0/truncated.jpg",
        "class_0/empty.png",
        "class_1/text.jpg",
        "class_1/notes.txt",
        "class_1/fake.webp",
    }
    assert "truncated" in reasons["class_0/truncated.jpg"] or "corrupt" in reasons["class_0/truncated.jpg"]
    assert "empty" in reasons["class_0/empty.png"]
    assert "not an image" in reasons["class_1/notes.txt"]
    assert "skipped 5" in report.summary()
    assert len(open_bundle(tmp_path / "index")) == 6


def test_incremental_builds(tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=3, per_class=4)
    index = tmp_path / "index"
    first = _build(tiny, images, index)
    assert (first.added, first.embedded, first.images) == (12, 12, 12)

    again = _build(tiny, images, index)  # nothing changed: nothing read, embedded or written
    assert (again.added, again.updated, again.removed, again.unchanged, again.embedded) == (0, 0, 0, 12, 0)
    assert not again.saved and again.version == first.version

    touched = images / "class_0" / "img_1.jpg"
    os.utime(touched, (1_000_000_000, 1_000_000_000))  # new mtime, same bytes
    changed = images / "class_1" / "img_2.jpg"
    pattern_image(4242).save(changed, quality=92)  # new content under the same name
    deleted = images / "class_2" / "img_3.jpg"
    deleted.unlink()
    new = images / "class_2" / "new.png"
    pattern_image(2000, noise=12, noise_seed=7).save(new)
    report = _build(tiny, images, index)
    assert (report.added, report.updated, report.removed, report.unchanged, report.skipped) == (1, 1, 1, 10, 0)
    assert report.embedded == 2 and report.saved and report.images == 12

    bundle = open_bundle(index)
    assert bundle.version == report.version != first.version
    assert bundle.get(stable_id("class_0/img_1.jpg")).mtime == pytest.approx(1_000_000_000)
    with pytest.raises(KeyError):
        bundle.get(stable_id("class_2/img_3.jpg"))
    # the changed file is found by its new content, under its old id
    (hits,) = bundle.search(_query(tiny, changed), 1)
    assert hits[0].path == "class_1/img_2.jpg" and hits[0].id == stable_id("class_1/img_2.jpg")
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    (hits,) = bundle.search(_query(tiny, new), 1)
    assert hits[0].path == "class_2/new.png"
    all_hits = bundle.search(_query(tiny, images / "class_2" / "img_0.jpg"), 50)[0]
    assert "class_2/img_3.jpg" not in {h.path for h in all_hits}

    # a file that became corrupt is skipped, and its stale vector removed
    (images / "class_0" / "img_2.jpg").write_bytes(b"broken now")
    report = _build(tiny, images, index)
    assert (report.removed, report.skipped, report.images) == (1, 1, 11)

    full = _build(tiny, images, index, rebuild=True)
    assert (full.added, full.updated, full.unchanged, full.embedded, full.images) == (11, 0, 0, 11, 11)


def test_index_inside_the_corpus_is_not_indexed(tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=1, per_class=2)
    _build(tiny, images, images / "index")
    report = _build(tiny, images, images / "index")
    assert report.images == 2 and report.skipped == 0 and report.unchanged == 2


def test_a_different_model_is_refused_unless_rebuild(tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=2, per_class=2)
    index = tmp_path / "index"
    _build(tiny, images, index)
    other_weights = make_tiny_model(tmp_path / "other", seed=7)
    other_dim = make_tiny_model(tmp_path / "wide", dim=24)
    with pytest.raises(BuildError, match=r"differs.*--rebuild"):
        _build(other_weights, images, index)
    with pytest.raises(BuildError, match=r"dimension.*--rebuild"):
        _build(other_dim, images, index)
    assert open_bundle(index).card.onnx_sha256 != json.loads((other_weights / "model.json").read_text())["onnx_sha256"]
    report = _build(other_dim, images, index, rebuild=True)
    assert report.added == 4 and open_bundle(index).dim == 24


def test_cli_build_and_one_line_errors(tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=2, per_class=2)
    index = tmp_path / "index"
    cmd = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        "--model",
        str(tiny),
        "--images",
        str(images),
        "--index",
        str(index),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*cmd, "--json", "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (
        data["added"] == 4
        and data["index_type"] == "flat"
        and set(data["timings"]) >= {"list", "decode", "embed", "add", "save"}
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "unchanged 4" in proc.stdout and "images/s" in proc.stdout
    other = make_tiny_model(tmp_path / "other", seed=3)
    bad = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        "--model",
        str(other),
        "--images",
        str(images),
        "--index",
        str(index),
    ]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "--rebuild" in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run(
        [*cmd[:6], "--images", str(tmp_path / "nope"), "--index", str(index)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "no such image folder" in proc.stderr
    for sub in ("build", "eval", "cluster", "duplicates"):
        proc = subprocess.run(
            [sys.executable, "-m", "indexer", sub, "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == 0 and "--index" in proc.stdout


def test_uploads_survive_a_rebuild(tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=2, per_class=2)
    index = tmp_path / "index"
    _build(tiny, images, index)
    bundle = open_bundle(index)
    buf = io.BytesIO()
    pattern_image(555).save(buf, "PNG")
    embedder = Embedder(bundle.model_dir, device="cpu")
    rec = bundle.add_upload(buf.getvalue(), embedder.embed_images([pattern_image(555)])[0], label="uploaded")
    bundle.save()
    assert _build(tiny, images, index).unchanged == 4  # an incremental build keeps uploads
    assert rec.id in open_bundle(index)
    report = _build(make_tiny_model(tmp_path / "m2", seed=5), images, index, rebuild=True)
    assert report.images == 5
    after = open_bundle(index)
    assert after.get(rec.id).origin == "upload" and after.absolute_path(rec.id).read_bytes() == buf.getvalue()
