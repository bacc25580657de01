"""Tests for the demo corpus builder: real files in tmp_path, small copy counts for speed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from train import demo_data  # noqa: E402
from train.demo_data import DemoDataError, build_demo_corpus  # noqa: E402

COPIES, QUERIES, SEED = 2, 1, 7
EXPECTED_CLASSES = {name for name, _ in demo_data.SOURCES}
EXCLUDED = {
    "chessboard_GRAY",
    "chessboard_RGB",
    "color",
    "logo",
    "phantom",
    "horse",
    "motorcycle_right",
    "motorcycle_left",
    "no_time_for_that_tiny",
    "multipage",
    "multipage_rgb",
    "lfw_subset",
    "motorcycle_disp",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jpgs(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*.jpg"))}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "train.demo_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    return out, build_demo_corpus(out, copies=COPIES, queries=QUERIES, seed=SEED)


def test_layout_and_counts(corpus: tuple[Path, dict]) -> None:
    out, manifest = corpus
    classes = manifest["classes"]
    assert set(classes) == EXPECTED_CLASSES and len(classes) >= demo_data.MIN_CLASSES
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(classes)
    assert sorted(p.name for p in (out / "queries").iterdir()) == sorted(classes)
    for name in classes:
        gallery = sorted(p.name for p in (out / "images" / name).iterdir())
        queries = sorted(p.name for p in (out / "queries" / name).iterdir())
        assert gallery == [f"{name}_{i:03d}.jpg" for i in range(COPIES)]
        assert queries == [f"{name}_q{i:02d}.jpg" for i in range(QUERIES)]
    assert manifest["counts"] == {
        "classes": len(classes),
        "images": len(classes) * COPIES,
        "queries": len(classes) * QUERIES,
        "images_per_class": COPIES,
        "queries_per_class": QUERIES,
    }
    assert manifest["seed"] == SEED
    assert manifest["sources"]["motorcycle"]["file"] == "motorcycle_left.png"
    # No temporary or old folders left next to the corpus.
    assert [p.name for p in out.parent.iterdir()] == ["corpus"]


def test_manifest_on_disk_lists_every_file_with_its_hash(corpus: tuple[Path, dict]) -> None:
    out, manifest = corpus
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["files"] == jpgs(out)


def test_every_file_is_an_rgb_jpeg_of_the_right_size(corpus: tuple[Path, dict]) -> None:
    out, manifest = corpus
    for rel in manifest["files"]:
        with Image.open(out / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()  # decodes fully: not truncated
            assert 256 <= max(im.size) <= 320


def test_excluded_sources_are_absent(corpus: tuple[Path, dict]) -> None:
    out, manifest = corpus
    present = {p.name for p in (out / "images").iterdir()}
    assert not present & EXCLUDED
    used = {entry["file"] for entry in manifest["sources"].values()}
    assert not {Path(f).stem for f in used} & (EXCLUDED - {"motorcycle_left"})


def test_queries_differ_from_gallery(corpus: tuple[Path, dict]) -> None:
    _, manifest = corpus
    gallery = {h for rel, h in manifest["files"].items() if rel.startswith("images/")}
    queries = {h for rel, h in manifest["files"].items() if rel.startswith("queries/")}
    assert len(gallery) == len(EXPECTED_CLASSES) * COPIES  # copies differ from each other too
    assert len(queries) == len(EXPECTED_CLASSES) * QUERIES
    assert not gallery & queries


def test_same_arguments_give_identical_bytes(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = corpus
    other = build_demo_corpus(tmp_path / "again", copies=COPIES, queries=QUERIES, seed=SEED)
    assert other["files"] == manifest["files"]
    assert jpgs(tmp_path / "again") == jpgs(out)
    again_manifest = (tmp_path / "again" / "manifest.json").read_bytes()
    assert again_manifest == (out / "manifest.json").read_bytes()


def test_another_seed_gives_other_images(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    _, manifest = corpus
    other = build_demo_corpus(tmp_path / "seeded", copies=COPIES, queries=QUERIES, seed=SEED + 1)
    assert set(other["files"]) == set(manifest["files"])
    assert not set(other["files"].values()) & set(manifest["files"].values())


def test_second_call_does_not_rebuild_unless_forced(tmp_path: Path, caplog) -> None:
    out = tmp_path / "demo"
    first = build_demo_corpus(out, copies=1, queries=1)
    probe = out / "images" / "chelsea" / "chelsea_000.jpg"
    mtime = probe.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="train.demo_data"):
        again = build_demo_corpus(out, copies=1, queries=1)
    assert again == first
    assert probe.stat().st_mtime_ns == mtime
    assert "already holds a complete demo corpus" in caplog.text

    os.utime(probe, ns=(0, 0))  # a rebuild writes a fresh file; this old stamp would go
    forced = build_demo_corpus(out, copies=1, queries=1, force=True)
    assert forced == first
    assert probe.stat().st_mtime_ns != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_other_parameters_replace_the_corpus(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    build_demo_corpus(out, copies=2, queries=1)
    manifest = build_demo_corpus(out, copies=1, queries=0)
    assert manifest["counts"]["images"] == len(EXPECTED_CLASSES)
    assert set(jpgs(out)) == set(manifest["files"])
    assert not list((out / "queries").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_incomplete_corpus_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    manifest = build_demo_corpus(out, copies=1, queries=0)
    victim = out / next(iter(manifest["files"]))
    victim.unlink()
    build_demo_corpus(out, copies=1, queries=0)
    assert victim.is_file()


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(DemoDataError, match="refusing to replace"):
        build_demo_corpus(out, copies=1, queries=0)
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_interrupted_build_leaves_previous_corpus(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "demo"
    before = build_demo_corpus(out, copies=1, queries=0)
    calls = 0
    real_make_copy = demo_data.make_copy

    def failing_make_copy(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt
        return real_make_copy(*args, **kwargs)

    monkeypatch.setattr(demo_data, "make_copy", failing_make_copy)
    with pytest.raises(KeyboardInterrupt):
        build_demo_corpus(out, copies=3, queries=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folder left
    assert demo_data.read_manifest(out) == before
    assert set(jpgs(out)) == set(before["files"])


def test_missing_sources_are_skipped_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    real = demo_data.skimage_data_dir()
    fake = tmp_path / "data"
    fake.mkdir()
    kept = demo_data.SOURCES[:12]
    for _, filename in kept:
        (fake / filename).symlink_to(real / filename)
    monkeypatch.setattr(demo_data, "skimage_data_dir", lambda: fake)
    with caplog.at_level(logging.WARNING, logger="train.demo_data"):
        manifest = build_demo_corpus(tmp_path / "demo", copies=1, queries=0)
    assert manifest["classes"] == [name for name, _ in kept]
    assert len(manifest["skipped_sources"]) == len(demo_data.SOURCES) - len(kept)
    assert "rocket.jpg" in caplog.text and "missing" in caplog.text

    for _, filename in kept[demo_data.MIN_CLASSES - 1 :]:
        (fake / filename).unlink()
    with pytest.raises(DemoDataError, match="at least 10"):
        build_demo_corpus(tmp_path / "too_few", copies=1, queries=0)
    assert not (tmp_path / "too_few").exists()


def test_missing_scikit_image_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    real_find_spec = demo_data.importlib.util.find_spec
    monkeypatch.setattr(
        demo_data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "skimage" else real_find_spec(name, *a),
    )
    with pytest.raises(DemoDataError, match=r"pip install -e \.\[train\]"):
        build_demo_corpus(tmp_path / "demo", copies=1, queries=0)


@pytest.mark.parametrize("kwargs", [{"copies": 0}, {"copies": 1000}, {"queries": -1}, {"queries": 100}, {"seed": -1}])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_demo_corpus(tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()


def test_cli_builds_and_reuses(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    first = run_cli("--out", str(out), "--copies", "1", "--queries", "1", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert "19 classes" in first.stdout and len(first.stdout.strip().splitlines()) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 3 and manifest["counts"]["queries"] == 19
    second = run_cli("--out", str(out), "--copies", "1", "--queries", "1", "--seed", "3")
    assert second.returncode == 0 and "not rebuilding" in second.stderr


def test_cli_rejects_zero_copies(tmp_path: Path) -> None:
    result = run_cli("--out", str(tmp_path / "x"), "--copies", "0")
    assert result.returncode != 0
    assert "--copies" in result.stderr and "must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_reports_unwritable_out(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("--out", str(blocker / "demo"), "--copies", "1", "--queries", "0")
    assert result.returncode != 0
    assert result.stderr.startswith("error: cannot write") and "Traceback" not in result.stderr


def test_cli_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--out", "--copies", "--queries", "--seed", "--force"):
        assert flag in result.stdout


def test_module_imports_no_tensorflow_or_skimage() -> None:
    code = (
        "import sys, train.demo_data, train; "
        "heavy = [m for m in ('tensorflow', 'keras', 'skimage', 'torch') if m in sys.modules]; "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
