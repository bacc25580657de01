"""`build_index(engine="ray")` / `--engine ray`: the same bundle as a local build, on a local Ray cluster.

One Ray cluster of 2 CPUs (and one declared GPU) for the module, as Ray takes seconds to start;
the builds join it and leave it running, as they do with any Ray session their caller opened.
The CLI test runs the build in a subprocess that joins the same cluster by its address. The
first test runs before that cluster exists and checks that a build stops the Ray it started.

The declared GPU is a Ray resource only: `--device auto` schedules one embedder actor on it (decode
tasks apart, on the CPUs), and onnxruntime, a CPU build here, embeds on the CPU. No real GPU is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

# Before Ray is imported: no usage report, and a single-machine cluster on the loopback interface.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra: pip install -e '.[ray]'")

from indexer import __main__ as cli  # noqa: E402
from indexer.build import BuildError, BuildReport, build_index  # noqa: E402
from indexer.bundle import bundle_exists, open_bundle  # noqa: E402
from tiny_model import make_corpus, make_tiny_model, pattern_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs and 1 (declared) GPU, for the whole module; yields its address."""
    environ = dict(os.environ)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key in set(os.environ) - set(environ):  # ray.init leaves PYTHONBREAKPOINT, RAY_* behind
            del os.environ[key]
        os.environ.update(environ)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _corpus(root: Path) -> Path:
    """Three classes of JPEGs, a class of PNGs of other sizes, and bad files of each kind."""
    images = make_corpus(root, classes=3, per_class=5)
    (images / "pngs").mkdir()
    for i in range(4):
        pattern_image(300 + i, size=48 + 16 * i).save(images / "pngs" / f"p{i}.png")
    Image.new("RGB", (90, 30), (10, 200, 30)).save(images / "wide.png")  # at the root: no label
    good = (images / "class_0" / "img_0.jpg").read_bytes()
    (images / "class_0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "class_1" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "class_2" / "empty.png").write_bytes(b"")
    (images / "pngs" / "notes.txt").write_text("hello")
    return images


def _build(model: Path, images: Path, index: Path, engine: Literal["local", "ray"], **kw) -> BuildReport:
    if engine == "ray":
        # A small batch, so that the files travel in several blocks and come back out of order.
        kw.setdefault("batch_size", 4)
    kw.setdefault("device", "cpu")
    return build_index(model, images, index, progress=False, workers=2, engine=engine, **kw)


def _assert_same_bundle(local_dir: Path, ray_dir: Path) -> None:
    local, other = open_bundle(local_dir), open_bundle(ray_dir)
    assert sorted(local.ids()) == sorted(other.ids())
    assert [r.path for r in local.records()] == [r.path for r in other.records()]  # same order too
    for rec in local.records():
        assert other.get(rec.id) == rec  # id, path, label, size, mtime, sha256, width, height, origin
    ids = np.array(sorted(local.ids()), dtype=np.int64)
    _, want = local.vectors(ids)
    _, got = other.vectors(ids)
    assert want.shape == (len(ids), local.dim)
    assert np.abs(want - got).max() <= 1e-5


def _counts(r: BuildReport) -> tuple[int, ...]:
    return (r.added, r.updated, r.removed, r.unchanged, r.skipped, r.embedded, r.images)


def test_a_build_stops_the_ray_it_started(tiny: Path, tmp_path: Path):
    """First in the module, before the shared cluster: no Ray session yet, so the build starts one."""
    assert not ray.is_initialized()
    environ = dict(os.environ)
    images = make_corpus(tmp_path / "images", classes=2, per_class=2)
    if shutil.which("nvidia-smi") is None:  # Ray finds no GPU here
        with pytest.raises(BuildError, match="no GPUs"):  # checked before anything runs; Ray is stopped again
            _build(tiny, images, tmp_path / "index", "ray", device="cuda")
        assert not ray.is_initialized() and not bundle_exists(tmp_path / "index")
    report = _build(tiny, images, tmp_path / "index", "ray")
    assert report.added == 4 and report.engine == "ray" and report.timings["ray_shutdown"] >= 0
    assert not ray.is_initialized() and dict(os.environ) == environ  # stopped, environment as it was


def test_ray_build_matches_local_build_then_incremental(ray_cluster, tiny: Path, tmp_path: Path):
    images = _corpus(tmp_path / "images")
    local = _build(tiny, images, tmp_path / "local", "local")
    remote = _build(tiny, images, tmp_path / "ray", "ray")

    assert local.engine == "local" and remote.engine == "ray"
    assert _counts(local) == _counts(remote) == (20, 0, 0, 0, 4, 20, 20)
    assert [(s.path, s.reason) for s in remote.skipped_files] == [(s.path, s.reason) for s in local.skipped_files]
    assert {s.path for s in remote.skipped_files} == {
        "class_0/truncated.jpg",
        "class_1/corrupt.jpg",
        "class_2/empty.png",
        "pngs/notes.txt",
    }
    _assert_same_bundle(tmp_path / "local", tmp_path / "ray")
    assert remote.device == "cpu" and remote.providers == ["CPUExecutionProvider"] and remote.workers == 1
    assert set(remote.timings) >= {"list", "decode", "embed", "add", "save", "ray_init"}
    assert "ray: 1 embedder actors" in remote.summary()
    assert open_bundle(tmp_path / "ray").manifest["build"]["engine"] == "ray"
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2  # the caller's session is left alone

    again = _build(tiny, images, tmp_path / "ray", "ray")  # nothing changed: only the two bad files are read again
    assert _counts(again) == (0, 0, 0, 20, 4, 0, 20) and not again.saved

    os.utime(images / "class_0" / "img_1.jpg", (1_000_000_000, 1_000_000_000))  # new mtime, same bytes
    pattern_image(4242).save(images / "class_1" / "img_2.jpg", quality=92)  # new content, same name
    (images / "class_2" / "img_3.jpg").unlink()
    pattern_image(2000, noise=12, noise_seed=7).save(images / "class_2" / "new.png")
    (images / "pngs" / "p1.png").write_bytes(b"broken now")  # became corrupt: its vector goes
    (images / "class_1" / "corrupt.jpg").unlink()
    local = _build(tiny, images, tmp_path / "local", "local")
    remote = _build(tiny, images, tmp_path / "ray", "ray")
    assert _counts(local) == _counts(remote) == (1, 1, 2, 17, 4, 2, 19)
    assert [(s.path, s.reason) for s in remote.skipped_files] == [(s.path, s.reason) for s in local.skipped_files]
    _assert_same_bundle(tmp_path / "local", tmp_path / "ray")


def test_gpu_actors_give_the_same_bundle(ray_cluster, tiny: Path, tmp_path: Path):
    images = _corpus(tmp_path / "images")
    _build(tiny, images, tmp_path / "local", "local")
    report = _build(tiny, images, tmp_path / "ray", "ray", device="auto")
    assert report.workers == 1 and report.added == 20 and report.skipped == 4
    _assert_same_bundle(tmp_path / "local", tmp_path / "ray")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert report.device == "cpu" and report.providers == ["CPUExecutionProvider"]  # what the actor had


def test_cli_engine_ray_joins_a_cluster_by_address(ray_cluster, tiny: Path, tmp_path: Path):
    images = make_corpus(tmp_path / "images", classes=2, per_class=3)
    (images / "class_1" / "bad.jpg").write_bytes(b"not an image")
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
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster,
        "--device",
        "cpu",
    ]
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*cmd, "--json", "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert (data["engine"], data["added"], data["skipped"], data["device"]) == ("ray", 6, 1, "cpu")
    assert data["skipped_files"][0]["path"] == "class_1/bad.jpg"
    assert open_bundle(index).manifest["build"]["engine"] == "ray"
    # the subprocess left the cluster, which still runs
    assert ray.cluster_resources()["CPU"] == 2

    proc = subprocess.run([*cmd, "--ray-actors", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--ray-actors" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_errors_are_build_errors(ray_cluster, tiny: Path, tmp_path: Path, monkeypatch, capsys):
    images = make_corpus(tmp_path / "images", classes=1, per_class=2)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # the actor fails in its constructor: the worker's own message comes back, on one line
        with pytest.raises(
            BuildError, match=r"^the Ray build failed: \S*EmbedderError: --device cuda: onnxruntime has no CUDA"
        ):
            _build(tiny, images, tmp_path / "index", "ray", device="cuda")
        assert not bundle_exists(tmp_path / "index") and ray.cluster_resources()["CPU"] == 2
    with pytest.raises(BuildError, match="unknown engine"):
        build_index(tiny, images, tmp_path / "index", progress=False, engine="spark")  # type: ignore[arg-type]  # on purpose

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a)
    )
    rc = cli.main(
        [
            "build",
            "--model",
            str(tiny),
            "--images",
            str(images),
            "--index",
            str(tmp_path / "index"),
            "--engine",
            "ray",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "pip install -e '.[ray]'" in err
