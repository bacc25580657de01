"""`python -m train` on bad input: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _classes(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _jpeg(root / name / f"{i}.jpg", seed=100 * c + i)
    return root


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_folder(tmp_path):
    proc = _train("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    _assert_one_line_error(proc, "data folder not found", "nope")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_single_class(tmp_path):
    data = _classes(tmp_path / "data", {"only": 3})
    proc = _train("--data", str(data), "--out", str(tmp_path / "run"))
    _assert_one_line_error(proc, "at least 2 class subfolders", "found 1")


def test_empty_class(tmp_path):
    data = _classes(tmp_path / "data", {"cats": 3, "dogs": 3, "owls": 0})
    (data / "owls" / "readme.txt").write_text("no images here")
    proc = _train("--data", str(data), "--out", str(tmp_path / "run"))
    _assert_one_line_error(proc, "no image files", "owls")


def test_class_whose_files_are_all_unreadable(tmp_path):
    data = _classes(tmp_path / "data", {"cats": 3, "dogs": 0})
    (data / "dogs" / "empty.jpg").write_bytes(b"")
    (data / "dogs" / "text.jpg").write_text("not a jpeg")
    proc = _train("--data", str(data), "--out", str(tmp_path / "run"))
    _assert_one_line_error(proc, "no readable images", "dogs")


def test_unknown_backbone(tmp_path):
    data = _classes(tmp_path / "data", {"cats": 2, "dogs": 2})
    proc = _train("--data", str(data), "--out", str(tmp_path / "run"), "--backbone", "alexnet")
    _assert_one_line_error(proc, "unknown backbone", "alexnet", "efficientnet_lite0")


def test_missing_weights_file(tmp_path):
    data = _classes(tmp_path / "data", {"cats": 2, "dogs": 2})
    proc = _train(
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--backbone",
        "mobilenet_v2",
        "--weights",
        str(tmp_path / "missing.weights.h5"),
    )
    _assert_one_line_error(proc, "weights file not found", "missing.weights.h5")


def test_bad_number_is_a_one_line_usage_error(tmp_path):
    data = _classes(tmp_path / "data", {"cats": 2, "dogs": 2})
    proc = _train("--data", str(data), "--out", str(tmp_path / "run"), "--validation-split", "1.5")
    _assert_one_line_error(proc, "--validation-split", "[0, 1)")
