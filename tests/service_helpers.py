"""Helpers for the service tests: a real uvicorn server on a free port, tiny bundles, image bytes.

`ServiceProcess` (a real `python -m service` process, ready once /readyz answers 200) is
service/process.py's, shared with bench/ and loadtest/.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from PIL import Image

from indexer.build import build_index
from service.app import create_app
from service.process import ServiceProcess, process_memory
from service.settings import Settings
from tiny_model import make_corpus, make_tiny_model, pattern_image

__all__ = [
    "LiveServer",
    "ServiceProcess",
    "process_memory",
    "REPO",
    "metric_value",
    "jpeg",
    "png",
    "class_image",
    "tiny_bundle",
    "settings_for",
]

REPO = Path(__file__).resolve().parents[1]


class LiveServer:
    """`create_app(settings)` served by uvicorn in a background thread, on a port the OS picks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", log_config=None
        )  # dictConfig would bind handlers to a captured stderr
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server stopped during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start in 60 s")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the test server did not shut down"


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a /metrics answer (labels matched exactly, in any order), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def class_image(c: int, variant: int = 99, seed: int = 0) -> bytes:
    """A new noisy copy of class c of `make_corpus(seed=seed)`, as JPEG bytes (not in the corpus)."""
    return jpeg(pattern_image(seed * 1000 + c, 64, noise=12.0, noise_seed=424_242 + variant))


def tiny_bundle(root: Path, classes: int = 3, per_class: int = 5, seed: int = 0) -> dict[str, Path]:
    """A tiny model, a corpus of class folders and a flat index bundle built from them."""
    model = make_tiny_model(root / "model")
    images = make_corpus(root / "images", classes=classes, per_class=per_class, seed=seed)
    index = root / "index"
    build_index(model, images, index, progress=False, device="cpu", workers=1)
    return {"model": model, "images": images, "index": index}


def settings_for(index: Path, **overrides: Any) -> Settings:
    return Settings(**{"index": index, "device": "cpu", "threads": 1, "pool_size": 2, **overrides})
