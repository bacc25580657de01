"""A build killed with SIGKILL leaves the previous bundle complete, loadable and unchanged."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.build import build_index
from indexer.bundle import VERSIONS_DIR, open_bundle
from tiny_model import make_corpus, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _slow_images(folder: Path, n: int, size: int = 900) -> None:
    """Large noisy JPEGs: a few ms each to decode, so a build of them lasts long enough to kill."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
    for i in range(n):
        tiles[i % 4].rotate(90 * (i // 4 % 4)).save(folder / f"big_{i:04d}.jpg", quality=90)


def _snapshot(index: Path, query: np.ndarray):
    b = open_bundle(index)
    return b.version, b.manifest, [(h.id, round(h.score, 6)) for h in b.search(query, 10)[0]], len(b)


def test_sigkill_mid_build_keeps_the_previous_version(tmp_path: Path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=3, per_class=4)
    index = tmp_path / "index"
    build_index(model, images, index, progress=False, workers=2)
    query = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    before = _snapshot(index, query)
    _slow_images(images / "big", 400)

    cmd = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        "--model",
        str(model),
        "--images",
        str(images),
        "--index",
        str(index),
        "--workers",
        "1",
        "--batch-size",
        "4",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed_at = []
    for attempt in range(2):
        log = tmp_path / f"stderr{attempt}.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        done = 0
        want = 20 + 60 * attempt  # a different point in the build each time
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.findall(r"(\d+)/400", log.read_text())
            done = int(found[-1]) if found else 0
            if done >= want:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the build finished before it could be killed; make the corpus slower"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at.append(done)
        assert _snapshot(index, query) == before  # same version, manifest, results
    assert killed_at[0] < killed_at[1] < 400

    report = build_index(model, images, index, progress=False, workers=2)
    assert report.added == 400 and report.unchanged == 12 and report.images == 412
    assert open_bundle(index).version != before[0]
    leftovers = [p.name for p in (index / VERSIONS_DIR).iterdir() if p.name.startswith(".")]
    assert leftovers == []
