"""Faults: SIGKILL of a build and of the service at chosen points, corrupt bundle files, failed writes.

Each kill happens at a known point: the build or the service runs in a subprocess through a small
driver (`DRIVER` below) that wraps one function of the real code so that it stops at that point
and says so; the test then sends SIGKILL. No test hook lives in the production code.
docs/reliability.md lists every case with its test.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.build import build_index
from indexer.bundle import (
    CURRENT_FILE,
    INDEX_FILE,
    META_FILE,
    VERSIONS_DIR,
    BundleConflict,
    BundleError,
    BundleWriteError,
    open_bundle,
)
from service.process import ServiceExited
from service_helpers import REPO, LiveServer, ServiceProcess, class_image, jpeg, settings_for, tiny_bundle
from tiny_model import make_corpus, make_tiny_model, pattern_image

# Runs `python -m indexer ...` or `python -m service ...` with one function wrapped so that the
# process prints "PAUSED <point>" and sleeps when it gets there (argv: point, package, args...).
DRIVER = r"""
import os, sys, time
import indexer.bundle as bundle, indexer.build as build, indexer.versions as versions
import indexer.journal as journal, indexer.compaction as compaction
point, package, args = sys.argv[1], sys.argv[2], sys.argv[3:]

def pause():
    print(f"PAUSED {point}", flush=True)
    time.sleep(600)

def wrap(module, name, before=None, after=None):
    original = getattr(module, name)
    def wrapper(*a, **k):
        if before is not None and before(*a, **k):
            pause()
        out = original(*a, **k)
        if after is not None and after(*a, **k):
            pause()
        return out
    setattr(module, name, wrapper)

if point == "listed":            # the corpus is listed, nothing embedded yet
    wrap(build, "list_images", after=lambda *a, **k: True)
elif point == "index-half":      # index.faiss of the new version half written in its staging folder
    original_write = versions.faiss_index.write
    def write(index, path):
        original_write(index, path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        pause()
    versions.faiss_index.write = write
elif point == "staged":          # the staging folder is complete, not yet renamed
    wrap(versions.os, "rename", before=lambda src, dst: ".staging-" in str(src))
elif point == "renamed":         # the new version folder exists, CURRENT still names the old one
    wrap(versions, "write_atomic", before=lambda path, data: os.path.basename(str(path)) == "CURRENT")
elif point == "switched":        # CURRENT names the new version, old versions not yet pruned
    wrap(versions, "prune", before=lambda *a, **k: True)
elif point == "upload-written":  # an upload's bytes are on disk, nothing journalled yet
    wrap(bundle, "write_atomic", after=lambda path, data: "/uploads/" in str(path))
elif point == "journal-written": # the journal record is written, not yet flushed (fdatasync)
    wrap(journal.os, "fdatasync", before=lambda fd: True)
elif point == "journal-flushed": # flushed, not yet applied in memory nor answered
    wrap(journal.os, "fdatasync", after=lambda fd: True)
elif point == "compaction-published":  # the new version is live on disk, not yet swapped in memory
    wrap(compaction, "LiveIndex", before=lambda *a, **k: True)
elif point == "compaction-untrimmed":  # swapped in memory, journal segments not yet deleted
    wrap(journal.Journal, "trim", before=lambda *a, **k: True)
else:
    raise SystemExit(f"unknown point {point}")

if package == "indexer":
    from indexer.__main__ import main
else:
    from service.__main__ import main
sys.exit(main(args))
"""


SERVICE_ENV = {"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_LOG_LEVEL": "warning"}


def driver(point: str, package: str, *args: str) -> subprocess.Popen[str]:
    """`python -m indexer ...` through DRIVER, its output read with wait_for_line (a service: service_driver)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SERVICE_ENV}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, point, package, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def service_driver(point: str, index: Path) -> ServiceProcess:
    """`python -m service --index INDEX` through DRIVER: ready from /readyz, paused at `point`."""
    return ServiceProcess(
        ["--index", str(index)], env=SERVICE_ENV, command=[sys.executable, "-c", DRIVER, point, "service"]
    )


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> tuple[re.Match[str], list[str]]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the process exited (rc {proc.wait()}) before {pattern!r}:\n" + "".join(lines))
        lines.append(line)
        if m := re.search(pattern, line):
            return m, lines
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + "".join(lines))


def sigkill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def snapshot(index: Path) -> tuple:
    """Everything a reader sees of the live version: name, manifest, records and search results."""
    b = open_bundle(index)
    q = np.random.default_rng(1).standard_normal((3, b.dim)).astype(np.float32)
    hits = [[(h.id, round(h.score, 5)) for h in row] for row in b.search(q, 10)]
    return b.version, b.manifest, sorted(b.ids()), hits


def leftovers(index: Path) -> list[str]:
    found = [p.name for p in (index / VERSIONS_DIR).iterdir() if p.name.startswith(".")]
    return found + [p.name for p in index.glob(".*.tmp")]


@pytest.fixture()
def built(tmp_path: Path) -> dict[str, Path]:
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=3, per_class=4)
    index = tmp_path / "index"
    build_index(model, images, index, progress=False, workers=1, device="cpu")
    return {"model": model, "images": images, "index": index}


# ------------------------------------------------------------------- SIGKILL of a build


@pytest.mark.parametrize("point", ["listed", "index-half", "staged", "renamed", "switched"])
def test_sigkill_of_a_build_at_each_point_keeps_a_complete_bundle(built, point):
    """Killed at any point, the live version is the previous one unchanged (or, once CURRENT was
    switched, the complete new one); the next build finishes and cleans up. The kill during
    embedding is tests/test_indexer_sigkill.py."""
    index = built["index"]
    before = snapshot(index)
    make_corpus(built["images"], classes=4, per_class=4)  # a new class: 4 more images to add
    proc = driver(
        point,
        "indexer",
        "build",
        "--model",
        str(built["model"]),
        "--images",
        str(built["images"]),
        "--index",
        str(index),
        "--no-progress",
        "--workers",
        "1",
        "--device",
        "cpu",
    )
    try:
        wait_for_line(proc, rf"PAUSED {point}")
    finally:
        sigkill(proc)
    after = snapshot(index)  # loads: complete and consistent
    if point == "switched":
        assert after[0] != before[0] and len(after[2]) == 16  # the new version, complete
        assert set(before[2]) <= set(after[2])
    else:
        assert after == before
    report = build_index(built["model"], built["images"], index, progress=False, workers=1, device="cpu")
    assert report.images == 16
    assert report.added == (0 if point == "switched" else 4)
    assert leftovers(index) == []
    assert len(open_bundle(index).ids()) == 16


def test_a_killed_build_leaves_the_service_serving(built):
    """A service keeps answering from the previous version while a build is killed mid-save."""
    index = built["index"]
    with LiveServer(settings_for(index, watch_interval=0.2)) as server, server.client() as c:
        first = c.post("/search", files={"file": ("q.jpg", class_image(1), "image/jpeg")}).json()
        make_corpus(built["images"], classes=4, per_class=4)
        proc = driver(
            "staged",
            "indexer",
            "build",
            "--model",
            str(built["model"]),
            "--images",
            str(built["images"]),
            "--index",
            str(index),
            "--no-progress",
            "--workers",
            "1",
        )
        try:
            wait_for_line(proc, "PAUSED staged")
        finally:
            sigkill(proc)
        time.sleep(0.5)  # a few watch intervals: nothing new was published
        again = c.post("/search", files={"file": ("q.jpg", class_image(1), "image/jpeg")}).json()
        assert again["results"] == first["results"]
        assert c.post("/admin/reload").status_code == 200


# --------------------------------------------------------------- SIGKILL of the service


def _adder(url: str, seed: int, acked: dict[int, str], stop: threading.Event, lock: threading.Lock) -> None:
    import hashlib

    i = 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set() and i < 500:
            data = jpeg(pattern_image(seed * 10_000 + i, 64, noise=8.0, noise_seed=i))
            i += 1
            try:
                r = c.post("/images", files={"file": ("a.jpg", data, "image/jpeg")}, data={"label": "stream"})
            except httpx.HTTPError:
                return  # the server is gone: this add was never acknowledged
            if r.status_code == 201:
                with lock:
                    acked[r.json()["id"]] = hashlib.sha256(data).hexdigest()


def test_sigkill_of_the_service_during_a_stream_of_adds_loses_no_acknowledged_add(tmp_path):
    b = tiny_bundle(tmp_path)
    acked: dict[int, str] = {}
    deleted: list[int] = []
    lock = threading.Lock()
    args = ["--index", str(b["index"]), "--log-level", "warning"]
    env = {"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_THREADS": "1"}
    for round_ in range(3):  # three kills, at different moments of the stream
        proc = ServiceProcess(args, env=env)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        start = len(acked)
        try:
            url = proc.wait_ready()
            with httpx.Client(base_url=url, timeout=30) as c:
                for image_id, digest in acked.items():  # everything acknowledged before is here
                    r = c.get(f"/images/{image_id}")
                    assert r.status_code == 200 and r.json()["sha256"] == digest, (round_, image_id)
                for image_id in deleted:
                    assert c.get(f"/images/{image_id}").status_code == 404
                if acked:
                    victim = next(iter(acked))
                    assert c.delete(f"/images/{victim}").status_code == 200
                    deleted.append(victim)
                    del acked[victim]
            threads = [
                threading.Thread(target=_adder, args=(url, round_ * 10 + t, acked, stop, lock)) for t in range(3)
            ]
            start = len(acked)
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while len(acked) < start + 6 + 3 * round_ and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            proc.kill()
            stop.set()
            for t in threads:
                t.join(timeout=30)
        assert len(acked) > start, "no add was acknowledged before the kill"
    final = ServiceProcess(args, env=env)
    try:
        url = final.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as c:
            for image_id, digest in acked.items():
                assert c.get(f"/images/{image_id}").json()["sha256"] == digest
            for image_id in deleted:
                assert c.get(f"/images/{image_id}").status_code == 404
            count = c.get("/stats").json()["count"]
            assert 15 + len(acked) <= count <= 15 + len(acked) + 9  # at most 3 unacknowledged per kill
            assert (
                c.post("/images", files={"file": ("z.jpg", jpeg(pattern_image(99_999, 64)), "image/jpeg")}).status_code
                == 201
            )
    finally:
        final.stop()
    assert leftovers(b["index"]) == []


@pytest.mark.parametrize("point", ["upload-written", "journal-written", "journal-flushed"])
def test_sigkill_of_the_service_inside_a_write_breaks_nothing(tmp_path, point):
    """The service killed in the middle of an add: it starts again with every acknowledged add. The
    killed add was never acknowledged: it is absent when it died before its journal record was
    written, and present (whole) once the record was written, flushed or not (the page cache
    survives a process kill)."""
    b = tiny_bundle(tmp_path, per_class=3)
    first = ServiceProcess(["--index", str(b["index"])], env={"IMGSEARCH_DEVICE": "cpu"})
    try:
        url = first.wait_ready()
        kept = httpx.post(
            f"{url}/images", files={"file": ("k.jpg", jpeg(pattern_image(4001, 64)), "image/jpeg")}, timeout=30
        ).json()["id"]
    finally:
        first.stop()
    proc = service_driver(point, b["index"])
    try:
        url = proc.wait_ready()
        result: list[object] = []

        def add() -> None:
            try:
                result.append(
                    httpx.post(
                        f"{url}/images",
                        timeout=60,
                        files={"file": ("n.jpg", jpeg(pattern_image(4002, 64)), "image/jpeg")},
                    )
                )
            except httpx.HTTPError as exc:
                result.append(exc)

        t = threading.Thread(target=add)
        t.start()
        proc.wait_for_line(rf"PAUSED {point}")
    finally:
        assert proc.kill() == -signal.SIGKILL
    t.join(timeout=30)
    assert isinstance(result[0], httpx.HTTPError)  # never acknowledged
    again = ServiceProcess(["--index", str(b["index"])], env={"IMGSEARCH_DEVICE": "cpu"})
    try:
        url = again.wait_ready()
        assert httpx.get(f"{url}/images/{kept}", timeout=30).status_code == 200
        count = httpx.get(f"{url}/stats", timeout=30).json()["count"]
        assert count == (10 if point == "upload-written" else 11)  # 9 + the acknowledged add (+ the written one)
        r = httpx.post(
            f"{url}/images", files={"file": ("m.jpg", jpeg(pattern_image(4003, 64)), "image/jpeg")}, timeout=30
        )
        assert r.status_code == 201 and r.json()["count"] == count + 1
    finally:
        again.stop()
    assert leftovers(b["index"]) == []


@pytest.mark.parametrize("point", ["staged", "renamed", "compaction-published", "switched", "compaction-untrimmed"])
def test_sigkill_of_the_service_inside_a_compaction_loses_nothing(tmp_path, point):
    """Killed at each step of a compaction (version staged, renamed, published, swapped in memory,
    journal not yet trimmed), the service starts again with exactly the acknowledged writes."""
    b = tiny_bundle(tmp_path, per_class=3)
    proc = service_driver(point, b["index"])
    try:
        url = proc.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as c:
            before = sorted(
                int(h["id"])
                for h in c.post(
                    "/search", params={"k": 100}, files={"file": ("q.jpg", class_image(0), "image/jpeg")}
                ).json()["results"]
            )
            added = [
                c.post(
                    "/images",
                    files={"file": (f"{i}.jpg", jpeg(pattern_image(6000 + i, 64)), "image/jpeg")},
                    data={"label": "new"},
                ).json()["id"]
                for i in range(3)
            ]
            victim = before[0]
            assert c.delete(f"/images/{victim}").status_code == 200
        expected = sorted(set(before) - {victim} | set(added))
        outcome: list[object] = []

        def compact() -> None:
            try:
                outcome.append(httpx.post(f"{url}/admin/compact", timeout=60))
            except httpx.HTTPError as exc:
                outcome.append(exc)

        t = threading.Thread(target=compact)
        t.start()
        proc.wait_for_line(rf"PAUSED {point}")
    finally:
        assert proc.kill() == -signal.SIGKILL
    t.join(timeout=30)
    again = ServiceProcess(["--index", str(b["index"])], env={"IMGSEARCH_DEVICE": "cpu"})
    try:
        url = again.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as c:
            found = sorted(
                int(h["id"])
                for h in c.post(
                    "/search", params={"k": 100}, files={"file": ("q.jpg", class_image(0), "image/jpeg")}
                ).json()["results"]
            )
            assert found == expected
            assert c.get(f"/images/{victim}").status_code == 404
            # and a compaction now finishes, trims the journal and keeps the same content
            r = c.post("/admin/compact")
            assert r.status_code == 200, r.text
            assert r.json()["count"] == len(expected)
    finally:
        again.stop()
    index = b["index"]
    assert len(list((index / "journal").glob("*.wal"))) == 1  # only the newest (empty) segment is left
    assert sorted(open_bundle(index).ids()) == expected
    assert leftovers(index) == []


# ------------------------------------------------------------------ corrupt bundle files


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bit-flip":  # one byte in the middle: FAISS and SQLite would load it without a word
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1 :])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    else:
        raise ValueError(how)


def cli(package: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMGSEARCH_DEVICE": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", package, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )


def assert_one_line_naming(proc: subprocess.CompletedProcess[str], name: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr and name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", [INDEX_FILE, META_FILE])
@pytest.mark.parametrize("how", ["truncated", "bit-flip", "garbage", "empty", "missing"])
def test_a_corrupt_bundle_file_is_named_and_refused(built, name, how):
    index = built["index"]
    damage(open_bundle(index).version_dir / name, how)
    with pytest.raises(BundleError, match=re.escape(name)):
        open_bundle(index)
    if how == "truncated":  # a wrong size is seen before serving: the service refuses to start
        line = assert_one_line_naming(cli("service", "--index", str(index), "--port", "0"), name)
        assert line.startswith("error: cannot serve")
    if how == "bit-flip":
        # Same size, other bytes: SQLite may find the file malformed at start (the service refuses
        # to start), or not; then the background hash finds it once serving has started.
        proc = ServiceProcess(["--index", str(index)], env=SERVICE_ENV)
        try:
            try:
                started = proc.wait_ready(accept=(200, 503))  # serving: 503 once its integrity check found the damage
            except ServiceExited as exc:
                refused = [line for line in exc.output.splitlines() if line.startswith("error:")]
                assert refused, f"the service neither started nor refused:\n{exc.output}"
                assert name in refused[0] and refused[0].startswith("error: cannot serve"), refused[0]
            else:
                with httpx.Client(base_url=started, timeout=30) as c:
                    deadline = time.monotonic() + 30
                    while (r := c.get("/readyz")).status_code == 200 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert r.status_code == 503 and name in r.json()["detail"], r.text
                    add = c.post("/images", files={"file": ("a.jpg", jpeg(pattern_image(5151, 64)), "image/jpeg")})
                    assert add.status_code == 503, add.text  # writes refused on a damaged version
        finally:
            proc.kill()
    if how in ("truncated", "bit-flip"):  # the command lines, for two kinds of damage (subprocesses are slow)
        line = assert_one_line_naming(
            cli(
                "indexer",
                "build",
                "--model",
                str(built["model"]),
                "--images",
                str(built["images"]),
                "--index",
                str(index),
                "--no-progress",
            ),
            name,
        )
        assert "--rebuild" in line
        assert_one_line_naming(cli("indexer", "eval", "--index", str(index), "--queries", str(built["images"])), name)


def test_rebuild_replaces_a_corrupt_bundle(built):
    damage(open_bundle(built["index"]).version_dir / INDEX_FILE, "bit-flip")
    report = build_index(built["model"], built["images"], built["index"], progress=False, workers=1, rebuild=True)
    assert report.images == 12 and len(open_bundle(built["index"])) == 12


def _publish_corrupt_copy(index: Path, name: str) -> str:
    """What a broken writer could leave: a new version whose data file is damaged, named in CURRENT."""
    live = open_bundle(index)
    number = int(live.version.split("-")[0]) + 1
    new = f"{number:06d}-{live.version.split('-')[1]}"
    shutil.copytree(live.version_dir, index / VERSIONS_DIR / new)
    damage(index / VERSIONS_DIR / new / name, "bit-flip")
    (index / CURRENT_FILE).write_text(new + "\n")
    return new


@pytest.mark.parametrize("name", [INDEX_FILE, META_FILE])
def test_reload_of_a_corrupt_version_keeps_serving_the_previous_one(built, name):
    index = built["index"]
    with LiveServer(settings_for(index, watch_interval=0.1)) as server, server.client() as c:
        query = {"file": ("q.jpg", class_image(2), "image/jpeg")}
        before = c.post("/search", files=query).json()
        version = c.get("/stats").json()["bundle_version"]
        _publish_corrupt_copy(index, name)
        r = c.post("/admin/reload")
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        time.sleep(0.5)  # the watcher tries too, and fails, and keeps the loaded version
        assert c.get("/stats").json()["bundle_version"] == version
        assert c.post("/search", files=query).json()["results"] == before["results"]
        # a write is refused rather than built on (or over) the damaged version
        add = c.post("/images", files={"file": ("a.jpg", jpeg(pattern_image(5150, 64)), "image/jpeg")})
        assert add.status_code == 503 and add.json()["detail"]
        assert c.get("/readyz").status_code == 200


# ------------------------------------------------------------------------- failed writes


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "4m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode}); "
            "the RLIMIT_FSIZE test covers a failed write instead"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a ballast file until the file system is full."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)  # unbuffered: no flush left to fail at close
    try:
        for block in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        os.close(fd)
    return ballast


def test_disk_full_fails_the_build_and_the_add_cleanly(tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        model = make_tiny_model(disk / "model")
        images = make_corpus(tmp_path / "images", classes=3, per_class=4)
        index = disk / "index"
        build_index(model, images, index, progress=False, workers=1)
        before = snapshot(index)
        make_corpus(images, classes=5, per_class=4)
        fill(disk)

        with pytest.raises(BundleWriteError, match="No space left on device") as info:
            build_index(model, images, index, progress=False, workers=1)
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
        proc = cli(
            "indexer", "build", "--model", str(model), "--images", str(images), "--index", str(index), "--no-progress"
        )
        line = assert_one_line_naming(proc, str(index))
        assert "No space left on device" in line and "unchanged" in line
        assert snapshot(index) == before and leftovers(index) == []

        with LiveServer(settings_for(index)) as server, server.client() as c:
            new = jpeg(pattern_image(6060, 64))
            r = c.post("/images", files={"file": ("n.jpg", new, "image/jpeg")})
            assert r.status_code == 503, r.text
            assert r.json() == {
                "error": "write_failed",
                "detail": "the change was not saved: No space left on device; the index is unchanged",
            }
            victim = before[2][0]
            r = c.delete(f"/images/{victim}")
            assert r.status_code == 503 and r.json()["error"] == "write_failed"
            assert c.get(f"/images/{victim}").status_code == 200  # not deleted in memory either
            assert c.get("/stats").json()["count"] == 12
            assert c.post("/search", files={"file": ("q.jpg", class_image(0), "image/jpeg")}).status_code == 200
            assert snapshot(index) == before and leftovers(index) == []
            for f in disk.glob("ballast*"):
                f.unlink()  # space again: the same add now works
            r = c.post("/images", files={"file": ("n.jpg", new, "image/jpeg")})
            assert r.status_code == 201 and r.json()["count"] == 13
        assert build_index(model, images, index, progress=False, workers=1).images == 21


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    ("limit", "message"), [(4096, "File too large"), (20_000, "disk I/O error")], ids=["faiss-index", "metadata"]
)
def test_a_write_over_the_file_size_limit_fails_the_build_cleanly(built, limit, message):
    """RLIMIT_FSIZE: a failed write that needs no mount rights (EFBIG, like a full disk). The new
    index (~13 KB) is over 4096 bytes; the new metadata database (~60 KB) is over 20000."""
    index = built["index"]
    before = snapshot(index)
    make_corpus(built["images"], classes=3, per_class=60)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "indexer",
            "build",
            "--model",
            str(built["model"]),
            "--images",
            str(built["images"]),
            "--index",
            str(index),
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size(limit),
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    line = assert_one_line_naming(proc, str(index))
    assert message in line and "the live version is unchanged" in line
    assert snapshot(index) == before and leftovers(index) == []
    assert build_index(built["model"], built["images"], index, progress=False, workers=1).images == 180


_CAPS = {"dac_override": 1, "dac_read_search": 2, "fowner": 3}


def _read_only_user() -> None:
    """As root, drop the capabilities that let root write into a folder without write permission."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _CAPS.values():
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from this process and its exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _make_read_only(index: Path) -> None:
    for folder in (index, index / VERSIONS_DIR):
        folder.chmod(0o555)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(index / 'probe')!r}, 'w')"],
            capture_output=True,
            preexec_fn=_read_only_user,
        )
    except (subprocess.SubprocessError, OSError) as exc:  # no CAP_SETPCAP to drop capabilities with
        for folder in (index, index / VERSIONS_DIR):
            folder.chmod(0o755)
        pytest.skip(f"cannot drop root's capabilities here: {exc}")
    if probe.returncode == 0:
        for folder in (index, index / VERSIONS_DIR):
            folder.chmod(0o755)
        (index / "probe").unlink()
        pytest.skip("cannot make a folder read-only for a subprocess here")


def test_a_read_only_bundle_folder_fails_the_build_and_the_add_cleanly(built):
    index = built["index"]
    before = snapshot(index)
    make_corpus(built["images"], classes=4, per_class=4)
    _make_read_only(index)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "indexer",
                "build",
                "--model",
                str(built["model"]),
                "--images",
                str(built["images"]),
                "--index",
                str(index),
                "--no-progress",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_read_only_user,
        )
        line = assert_one_line_naming(proc, str(index))
        assert "Permission denied" in line
        assert snapshot(index) == before

        server = ServiceProcess(["--index", str(index)], env={"IMGSEARCH_DEVICE": "cpu"}, preexec_fn=_read_only_user)
        try:
            with httpx.Client(base_url=server.wait_ready(), timeout=30) as c:
                r = c.post("/images", files={"file": ("n.jpg", jpeg(pattern_image(7070, 64)), "image/jpeg")})
                assert r.status_code == 503, r.text
                assert r.json() == {
                    "error": "write_failed",
                    "detail": "the change was not saved: Permission denied; the index is unchanged",
                }
                assert c.get("/stats").json()["count"] == 12
                assert c.post("/search", files={"file": ("q.jpg", class_image(0), "image/jpeg")}).status_code == 200
        finally:
            server.stop()
        assert snapshot(index) == before
    finally:
        for folder in (index, index / VERSIONS_DIR):
            folder.chmod(0o755)
    assert build_index(built["model"], built["images"], index, progress=False, workers=1).images == 16


# ------------------------------------------------------------------------ conflicts, tombstones


def test_a_stale_writer_gets_a_bundle_conflict(built):
    a, b = open_bundle(built["index"]), open_bundle(built["index"])
    a.remove(a.ids()[:1])
    a.save()
    b.remove(b.ids()[-1:])
    with pytest.raises(BundleConflict, match="reload"):
        b.save()


def test_a_delete_through_the_api_sticks_across_incremental_builds(built):
    model, images, index = built["model"], built["images"], built["index"]
    with LiveServer(settings_for(index)) as server, server.client() as c:
        hit = c.post("/search", files={"file": ("q.jpg", class_image(0), "image/jpeg")}, params={"k": 1}).json()
        victim, rel = hit["results"][0]["id"], hit["results"][0]["path"]
        assert c.delete(f"/images/{victim}").status_code == 200

        report = build_index(model, images, index, progress=False, workers=1)  # the file is still in the corpus
        assert report.deleted == 1 and report.added == 0 and report.images == 11
        assert "left out 1 deleted through the API" in report.summary()
        assert c.post("/admin/reload").status_code == 200
        assert c.get(f"/images/{victim}").status_code == 404

        os.utime(images / rel, (time.time() + 5, time.time() + 5))  # touched, same bytes: still deleted
        assert build_index(model, images, index, progress=False, workers=1).deleted == 1
        assert open_bundle(index).deleted == {rel: open_bundle(index).deleted[rel]}

        pattern_image(123, 64).save(images / rel, quality=90)  # new content under the same name: a new image
        report = build_index(model, images, index, progress=False, workers=1)
        assert report.deleted == 0 and report.added == 1 and report.images == 12
        assert open_bundle(index).deleted == {}
        assert c.post("/admin/reload").status_code == 200
        assert c.get(f"/images/{victim}").status_code == 200

        # deleted again, then the file leaves the corpus and comes back: the tombstone went with it
        assert c.delete(f"/images/{victim}").status_code == 200
        moved = images.parent / "moved.jpg"
        (images / rel).rename(moved)
        assert build_index(model, images, index, progress=False, workers=1).images == 11
        assert open_bundle(index).deleted == {}
        moved.rename(images / rel)
        assert build_index(model, images, index, progress=False, workers=1).images == 12


def test_a_rebuild_keeps_the_api_deletes_until_the_file_changes(built):
    model, images, index = built["model"], built["images"], built["index"]
    b = open_bundle(index)
    gone = sorted(b.ids())[:2]
    rels = [b.get(i).path for i in gone]
    for i in gone:
        b.commit_delete(i)  # through the journal, as the API does
    assert build_index(model, images, index, progress=False, workers=1).images == 10
    report = build_index(model, images, index, progress=False, workers=1, rebuild=True)
    assert report.images == 10 and report.deleted == 2 and set(open_bundle(index).deleted) == set(rels)
    pattern_image(321, 64).save(images / rels[0], quality=90)  # new bytes: a new image
    report = build_index(model, images, index, progress=False, workers=1, rebuild=True)
    assert report.images == 11 and set(open_bundle(index).deleted) == {rels[1]}
