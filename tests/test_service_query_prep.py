"""A query is prepared exactly like the corpus: the same photo, uploaded, finds itself at 1.0."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.build import build_index
from service_helpers import LiveServer, settings_for
from tiny_model import make_tiny_model, pattern_image


def _large_jpeg(seed: int) -> bytes:
    """A 1600x1200 photo-sized JPEG: far larger than the model input, so decoding can use draft."""
    rng = np.random.default_rng(seed)
    base = pattern_image(seed, size=64).resize((1600, 1200), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(base, np.int16) + rng.integers(-40, 40, (1200, 1600, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_uploaded_copy_of_an_indexed_large_jpeg_scores_one(tmp_path: Path):
    model = make_tiny_model(tmp_path / "model")
    images = tmp_path / "images" / "photos"
    images.mkdir(parents=True)
    photos = {f"p{i}.jpg": _large_jpeg(i) for i in range(4)}
    for name, data in photos.items():
        (images / name).write_bytes(data)
    index = tmp_path / "index"
    build_index(model, images.parent, index, progress=False)

    with LiveServer(settings_for(index)) as server, server.client() as client:
        for name, data in photos.items():
            resp = client.post("/search", params={"k": 1}, files={"file": (name, data, "image/jpeg")})
            assert resp.status_code == 200, resp.text
            (hit,) = resp.json()["results"]
            assert hit["path"] == f"photos/{name}"
            # Identical preparation gives the identical vector; a different decode path (e.g. full
            # size for queries, draft for the corpus) lands measurably below 1.
            assert hit["score"] > 1 - 1e-6, hit["score"]  # draft vs full decode: ~1 - 5e-6 here
