"""Online writes through the HTTP API: status codes, compaction under load, busy and overload answers."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from indexer.bundle import open_bundle
from service.batching import MicroBatcher, QueueFull, SearchJob
from service_helpers import LiveServer, class_image, jpeg, settings_for, tiny_bundle
from tiny_model import pattern_image


def upload(data: bytes, name: str = "x.jpg") -> dict:
    return {"file": (name, data, "image/jpeg")}


@pytest.fixture()
def bundle(tmp_path):
    return tiny_bundle(tmp_path)


def test_a_reupload_is_200_and_a_new_image_201(bundle):
    with LiveServer(settings_for(bundle["index"])) as server, server.client() as c:
        data = jpeg(pattern_image(4242, 64, noise=4.0, noise_seed=2))
        first = c.post("/images", files=upload(data), data={"label": "a"})
        assert first.status_code == 201 and first.json()["seq"] == 1
        assert "write;dur=" in first.headers["server-timing"]
        again = c.post("/images", files=upload(data), data={"label": "a"})
        assert again.status_code == 200 and again.json()["replaced"] and again.json()["seq"] == 1  # nothing written
        relabel = c.post("/images", files=upload(data), data={"label": "b"})
        assert relabel.status_code == 200 and relabel.json()["seq"] == 2 and relabel.json()["label"] == "b"
        image_id = first.json()["id"]
        assert c.delete(f"/images/{image_id}").json()["seq"] == 3
        readd = c.post("/images", files=upload(data), data={"label": "c"})
        assert readd.status_code == 201 and readd.json()["count"] == first.json()["count"]
    assert open_bundle(bundle["index"]).get(image_id).label == "c"


def test_a_compaction_under_concurrent_searches_and_writes_fails_no_request(bundle):
    settings = settings_for(bundle["index"], pool_size=4)
    failures: list[str] = []
    acked: set[int] = set()
    deleted: set[int] = set()
    stop = threading.Event()
    lock = threading.Lock()
    with LiveServer(settings) as server:

        def searcher(cls: int) -> None:
            with server.client() as c:
                while not stop.is_set():
                    r = c.post("/search", files=upload(class_image(cls)), params={"k": 5})
                    if r.status_code != 200 or r.json()["predicted_label"] != f"class_{cls}":
                        failures.append(f"search {r.status_code} {r.text[:200]}")

        def writer(seed: int) -> None:
            with server.client() as c:
                for i in range(40):
                    if stop.is_set():
                        return
                    r = c.post("/images", files=upload(jpeg(pattern_image(seed * 1000 + i, 64))), data={"label": "w"})
                    if r.status_code != 201:
                        failures.append(f"add {r.status_code} {r.text[:200]}")
                        continue
                    with lock:
                        acked.add(r.json()["id"])
                    if i % 3 == 0:
                        image_id = r.json()["id"]
                        d = c.delete(f"/images/{image_id}")
                        if d.status_code != 200:
                            failures.append(f"delete {d.status_code} {d.text[:200]}")
                        with lock:
                            deleted.add(image_id)

        threads = [threading.Thread(target=searcher, args=(k,)) for k in (0, 1)]
        threads += [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        versions = []
        try:
            with server.client() as c:
                for _ in range(4):
                    time.sleep(0.3)
                    r = c.post("/admin/compact")
                    if r.status_code != 200:
                        failures.append(f"compact {r.status_code} {r.text[:200]}")
                    else:
                        versions.append(r.json()["version"])
        finally:
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert failures == []
        assert len(set(versions)) == 4  # four new versions, each one pointer swap
        with server.client() as c:
            stats = c.get("/stats").json()
    final = open_bundle(bundle["index"])
    live = acked - deleted
    assert live <= set(final.ids()) and not deleted & set(final.ids())
    assert stats["count"] == len(final) == 15 + len(live)


def test_a_busy_write_gets_503_with_retry_after(bundle):
    with LiveServer(settings_for(bundle["index"], write_lock_timeout=0.2)) as server, server.client() as c:
        engine = server.app.state.engine
        mutex = engine.loaded.bundle.write_mutex
        with mutex:  # as if a write were stuck on a slow disk
            t0 = time.perf_counter()
            r = c.post("/images", files=upload(jpeg(pattern_image(5353, 64))))
            waited = time.perf_counter() - t0
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"] == "1"
        assert waited < 10
        assert c.post("/search", files=upload(class_image(0))).status_code == 200
        assert c.post("/images", files=upload(jpeg(pattern_image(5353, 64)))).status_code == 201


def test_overload_is_bounded(bundle):
    with LiveServer(settings_for(bundle["index"], max_batch_bytes=4096)) as server, server.client() as c:
        big = [("files", (f"{i}.jpg", jpeg(pattern_image(i, 64)), "image/jpeg")) for i in range(8)]
        r = c.post("/search/batch", files=big)
        assert r.status_code == 413, r.text
        r = c.request("FROBNICATE", "/search")
        assert r.status_code in (400, 405)
        metrics = c.get("/metrics").text
        assert "FROBNICATE" not in metrics and 'method="other"' in metrics


def test_the_micro_batch_queue_is_bounded():
    gate = threading.Event()

    def run(snap, jobs):
        gate.wait(10)
        return [None] * len(jobs)

    batcher: MicroBatcher = MicroBatcher(run, max_batch=1, wait_s=0, max_queue=2)
    try:
        pixels = np.zeros((2, 2, 3), np.uint8)
        futures = [batcher.submit(SearchJob(None, pixels, 1, None, None))]
        time.sleep(0.2)  # the worker takes the first job and blocks in run()
        futures += [batcher.submit(SearchJob(None, pixels, 1, None, None)) for _ in range(2)]
        with pytest.raises(QueueFull):
            batcher.submit(SearchJob(None, pixels, 1, None, None))
    finally:
        gate.set()
        batcher.close()
    assert all(f.result(timeout=10) is None for f in futures)


def test_two_workers_follow_each_others_writes(bundle):
    with (
        LiveServer(settings_for(bundle["index"], watch_interval=0.1)) as a,
        LiveServer(settings_for(bundle["index"], watch_interval=0.1)) as b,
    ):
        data = jpeg(pattern_image(8080, 64))
        added = httpx.post(f"{a.url}/images", files=upload(data), timeout=30).json()
        deadline = time.monotonic() + 10
        while httpx.get(f"{b.url}/images/{added['id']}", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "worker b never saw worker a's add"
            time.sleep(0.05)
        assert httpx.delete(f"{b.url}/images/{added['id']}", timeout=30).status_code == 200
        while httpx.get(f"{a.url}/images/{added['id']}", timeout=30).status_code != 404:
            assert time.monotonic() < deadline + 10, "worker a never saw worker b's delete"
            time.sleep(0.05)
        r = httpx.post(f"{a.url}/admin/compact", timeout=60)
        assert r.status_code == 200
        while httpx.get(f"{b.url}/stats", timeout=30).json()["bundle_version"] != r.json()["version"]:
            assert time.monotonic() < deadline + 20, "worker b never moved to a's compacted version"
            time.sleep(0.05)
        assert httpx.get(f"{b.url}/stats", timeout=30).json()["count"] == 15
