"""/metrics of a service with several workers: prometheus_client's multiprocess mode sums them."""

from __future__ import annotations

import time

import httpx

from service_helpers import ServiceProcess, class_image, metric_value, tiny_bundle


def test_metrics_from_two_workers_count_every_request_whichever_worker_answers(tmp_path):
    b = tiny_bundle(tmp_path)
    proc = ServiceProcess(
        ["--index", str(b["index"]), "--port", "0", "--workers", "2", "--log-level", "warning"],
        env={"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_THREADS": "1"},
    )
    try:
        url = proc.wait_ready(timeout=120)
        deadline = time.monotonic() + 60
        while True:  # both workers up: the banner is printed by the parent before they start
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the workers never became ready"
            time.sleep(0.2)
        for _ in range(30):  # a new connection each: the workers share the listening socket
            assert (
                httpx.post(
                    f"{url}/search", files={"file": ("q.jpg", class_image(0), "image/jpeg")}, timeout=30
                ).status_code
                == 200
            )
        seen = set()
        for _ in range(8):
            text = httpx.get(f"{url}/metrics", timeout=30).text
            searches = metric_value(text, "imgsearch_http_requests_total", route="/search", method="POST", status="200")
            embedded = metric_value(text, "imgsearch_images_embedded_total")
            seen.add((searches, embedded))
        assert seen == {(30.0, 30.0)}  # every answer: all 30 searches, summed over both workers
        assert "process_resident_memory_bytes" not in text  # per-process figures would describe one worker only
    finally:
        proc.stop()
