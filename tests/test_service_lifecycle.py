"""`python -m service`: start-up, refusal of bad bundles, restarts, and reloads under load."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx

from indexer.build import build_index
from service_helpers import REPO, LiveServer, ServiceProcess, class_image, jpeg, settings_for, tiny_bundle
from tiny_model import make_corpus, make_tiny_model, pattern_image


def upload(data: bytes, name: str = "q.jpg") -> dict:
    return {"file": (name, data, "image/jpeg")}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_an_add_and_a_delete_survive_a_restart(tmp_path):
    b = tiny_bundle(tmp_path)
    new = jpeg(pattern_image(31337, 64))
    first = ServiceProcess(["--index", str(b["index"]), "--log-level", "warning"], env={"IMGSEARCH_DEVICE": "cpu"})
    try:
        url = first.wait_ready()
        first.wait_for_line("serving 15 images", timeout=10)  # the banner may reach the pipe after /readyz
        with httpx.Client(base_url=url, timeout=30) as c:
            added = c.post("/images", files=upload(new), data={"label": "kept"})
            assert added.status_code == 201, added.text
            victim = c.post("/search", files=upload(class_image(0)), params={"k": 1}).json()["results"][0]["id"]
            assert c.delete(f"/images/{victim}").status_code == 200
    finally:
        # uvicorn shuts down gracefully on SIGTERM, then exits by that signal
        assert first.stop() in (0, -15), "".join(first.lines)

    second = ServiceProcess(["--index", str(b["index"])], env={"IMGSEARCH_DEVICE": "cpu"})
    try:
        url = second.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as c:
            image_id = added.json()["id"]
            meta = c.get(f"/images/{image_id}")
            assert meta.status_code == 200 and meta.json()["label"] == "kept"
            top = c.post("/search", files=upload(new), params={"k": 1}).json()["results"][0]
            assert top["id"] == image_id
            assert c.get(f"/images/{image_id}/file").content == new
            assert c.get(f"/images/{victim}").status_code == 404
            assert c.get("/stats").json()["count"] == 15
    finally:
        second.stop()


def test_the_service_refuses_a_missing_or_mismatched_bundle(tmp_path):
    r = run_cli("--index", str(tmp_path / "nothing-here"), "--port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot serve") and "no index bundle" in lines[0], r.stderr

    b = tiny_bundle(tmp_path / "b", per_class=2)
    version = (b["index"] / "CURRENT").read_text().strip()
    make_tiny_model(b["index"] / "versions" / version, seed=5)  # another model beside the vectors
    r = run_cli("--index", str(b["index"]), "--port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not the model that made its vectors" in lines[0], r.stderr


def test_bad_settings_fail_at_start(tmp_path):
    r = run_cli("--index", str(tmp_path), env={"IMGSEARCH_MAX_K": "0"})
    assert r.returncode == 2 and "max_k" in r.stderr and "IMGSEARCH_MAX_K" in r.stderr
    r = run_cli("--index", str(tmp_path), "--port", "70000")
    assert r.returncode == 2 and "port" in r.stderr


def test_reload_under_concurrent_searches_fails_no_request(tmp_path):
    b = tiny_bundle(tmp_path, classes=3, per_class=4)
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    with LiveServer(settings_for(b["index"], pool_size=3)) as server:

        def hammer(c: int) -> None:
            with server.client() as client:
                while not stop.is_set():
                    try:
                        r = client.post("/search", files=upload(class_image(c)), params={"k": 4})
                        outcome = (r.status_code, r.json().get("predicted_label") or "")
                    except Exception as exc:  # a dropped connection counts as a failure too
                        outcome = (-1, repr(exc))
                    with lock:
                        results.append(outcome)

        threads = [threading.Thread(target=hammer, args=(c,)) for c in (0, 1, 2)]
        for t in threads:
            t.start()
        try:
            with server.client() as admin:
                old_version = admin.get("/stats").json()["bundle_version"]
                # 1. the corpus grows a class: incremental rebuild, then reload while searches run
                make_corpus(b["images"], classes=4, per_class=4)
                build_index(b["model"], b["images"], b["index"], progress=False, device="cpu", workers=1)
                r = admin.post("/admin/reload")
                assert r.status_code == 200, r.text
                assert r.json()["previous_version"] == old_version and r.json()["count"] == 16
                assert not r.json()["model_changed"]
                for _ in range(3):
                    assert admin.post("/admin/reload").status_code == 200
                # 2. a different model: full rebuild, reload swaps the embedder with the index
                other = make_tiny_model(tmp_path / "model2", seed=9)
                build_index(other, b["images"], b["index"], progress=False, device="cpu", workers=1, rebuild=True)
                r = admin.post("/admin/reload")
                assert r.status_code == 200 and r.json()["model_changed"], r.text
                # 3. keep swapping while the searches go on, until plenty have overlapped the swaps
                deadline = time.monotonic() + 15
                while len(results) < 150 and time.monotonic() < deadline:
                    assert admin.post("/admin/reload").status_code == 200
        finally:
            stop.set()
            for t in threads:
                t.join()

        failed = [r for r in results if r[0] != 200]
        assert failed == [] and len(results) >= 150, (len(results), failed[:5])
        wrong = [r for r in results if r[1] not in ("class_0", "class_1", "class_2")]
        assert wrong == []
        with server.client() as c:
            body = c.post("/search", files=upload(class_image(3)), params={"k": 4}).json()
            assert body["predicted_label"] == "class_3" and body["model"].startswith("tiny@")
            stats = c.get("/stats").json()
            assert stats["count"] == 16 and stats["model"]["sha256"].startswith(body["model"].split("@")[1])


def test_watch_interval_picks_up_an_outside_rebuild(tmp_path):
    b = tiny_bundle(tmp_path, classes=2, per_class=3)
    with LiveServer(settings_for(b["index"], watch_interval=0.2)) as server, server.client() as c:
        before = c.get("/stats").json()["bundle_version"]
        make_corpus(b["images"], classes=3, per_class=3)
        build_index(b["model"], b["images"], b["index"], progress=False, device="cpu", workers=1)
        deadline = time.monotonic() + 20
        while c.get("/stats").json()["bundle_version"] == before:
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.1)
        assert c.get("/stats").json()["count"] == 9
        # an add after an outside rebuild starts from the newest version, never overwriting it
        r = c.post("/images", files=upload(jpeg(pattern_image(555, 64))))
        assert r.status_code == 201 and r.json()["count"] == 10


def test_an_add_after_an_outside_rebuild_keeps_both(tmp_path):
    b = tiny_bundle(tmp_path, classes=2, per_class=3)
    with LiveServer(settings_for(b["index"])) as server, server.client() as c:
        make_corpus(b["images"], classes=3, per_class=3)
        build_index(b["model"], b["images"], b["index"], progress=False, device="cpu", workers=1)
        r = c.post("/images", files=upload(jpeg(pattern_image(556, 64))))
        assert r.status_code == 201 and r.json()["count"] == 10  # 9 from the rebuild + 1


def test_several_workers_see_each_others_changes(tmp_path):
    b = tiny_bundle(tmp_path, classes=2, per_class=3)
    proc = ServiceProcess(
        ["--index", str(b["index"]), "--workers", "2", "--log-level", "warning"],
        env={"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_WATCH_INTERVAL": "0.3", "IMGSEARCH_THREADS": "1"},
    )
    try:
        url = proc.wait_ready()
        proc.wait_for_line("2 workers", timeout=10)
        # new connections each time, so that requests spread over both workers
        r = httpx.post(f"{url}/images", files=upload(jpeg(pattern_image(8080, 64))), timeout=30)
        assert r.status_code == 201, r.text
        image_id = r.json()["id"]
        deadline = time.monotonic() + 20
        while True:
            codes = [httpx.get(f"{url}/images/{image_id}", timeout=30).status_code for _ in range(8)]
            if codes == [200] * 8:
                break
            assert time.monotonic() < deadline, codes
            time.sleep(0.2)
        assert httpx.delete(f"{url}/images/{image_id}", timeout=30).status_code == 200
        # a worker that has not seen the add yet syncs to the newest version before it writes
        r = httpx.post(f"{url}/images", files=upload(jpeg(pattern_image(8081, 64))), timeout=30)
        assert r.status_code == 201 and r.json()["count"] == 7
    finally:
        proc.stop()
