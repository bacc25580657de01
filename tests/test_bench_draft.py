"""Fast decoding: JPEGs much larger than the model input are decoded in draft mode (libjpeg's
1/2-1/8 scaling) with their full size kept, EXIF orientation respected, and embeddings unchanged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import build_index
from indexer.bundle import open_bundle
from indexer.embedder import Embedder
from indexer.images import decode_image, decode_image_sized, load_for_model, resize_to
from tiny_model import make_tiny_model


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth photo-like picture (gradients + blobs), red strip on the left edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack(
        [127 + 100 * np.sin(xx / (37 + 11 * c) + yy / (53 + 7 * c) + rng.uniform(0, 6)) for c in range(3)], axis=2
    )
    arr[:, : w // 10] = (250, 0, 0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_draft_decodes_large_jpegs_at_reduced_scale():
    data = _jpeg(_photo(1600, 1200))
    full = decode_image(data)
    assert full.size == (1600, 1200)
    img, size = decode_image_sized(data, draft_size=(224, 224))
    assert size == (1600, 1200)  # the photo's size, not the decoded one
    assert img.size == (800, 600)  # 1/2: at least twice the target (reducing gap 2) in both directions
    img1, _ = decode_image_sized(data, draft_size=(224, 224), reducing_gap=1.0)
    assert img1.size == (400, 300)  # 1/4: the smallest scale still >= the target
    assert decode_image(_jpeg(_photo(300, 250)), draft_size=(224, 224)).size == (300, 250)  # too small to scale


def test_draft_respects_exif_orientation():
    stored = _photo(1200, 1800).transpose(Image.Transpose.ROTATE_90)  # stored on its side: 1800 x 1200
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _jpeg(stored, exif=exif.tobytes())
    img, size = decode_image_sized(data, draft_size=(224, 224))
    assert size == (1200, 1800)  # displayed width x height, full resolution
    assert img.size == (600, 900)
    pixel = img.getpixel((5, img.height // 2))
    assert isinstance(pixel, tuple)
    r, g, b = pixel
    assert r > 200 and g < 60 and b < 60  # the red strip is back on the left
    # a target that is wide but not tall must be swapped too, or the scale would be wrong
    img2, _ = decode_image_sized(data, draft_size=(600, 100), reducing_gap=1.0)
    assert img2.width >= 600 and img2.height >= 100 and img2.size == (600, 900)


def test_non_jpeg_and_no_draft_are_unchanged():
    png = io.BytesIO()
    _photo(1000, 800).save(png, "PNG")
    img, size = decode_image_sized(png.getvalue(), draft_size=(64, 64))
    assert img.size == size == (1000, 800)
    data = _jpeg(_photo(1000, 800))
    assert decode_image(data).size == (1000, 800)


def test_embeddings_with_and_without_draft_agree(tmp_path: Path):
    model = make_tiny_model(tmp_path / "m", size=32, dim=32)
    emb = Embedder(model, device="cpu")
    size = emb.card.size
    full, drafted = [], []
    for seed in range(8):
        data = _jpeg(_photo(1200 + 40 * seed, 900, seed))
        full.append(resize_to(decode_image(data), size))
        drafted.append(load_for_model(data, emb.card))
    cos = np.sum(emb.embed(np.stack(full)) * emb.embed(np.stack(drafted)), axis=1)
    assert cos.min() >= 0.99, cos


def test_build_records_full_size_and_matches_queries(tmp_path: Path):
    model = make_tiny_model(tmp_path / "m", size=32)
    images = tmp_path / "images" / "big"
    images.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 8
    (images / "wide.jpg").write_bytes(_jpeg(_photo(1400, 1000, 1)))
    (images / "turned.jpg").write_bytes(_jpeg(_photo(1000, 700, 2), exif=exif.tobytes()))
    report = build_index(model, tmp_path / "images", tmp_path / "index", progress=False, workers=2)
    assert report.added == 2 and report.skipped == 0
    bundle = open_bundle(tmp_path / "index")
    by_path = {r.path: r for r in bundle.records()}
    assert (by_path["big/wide.jpg"].width, by_path["big/wide.jpg"].height) == (1400, 1000)
    assert (by_path["big/turned.jpg"].width, by_path["big/turned.jpg"].height) == (700, 1000)
    # a query prepared with load_for_model (draft too) finds its own file first, at cosine ~1
    emb = Embedder(model, device="cpu")
    for rel in ("big/wide.jpg", "big/turned.jpg"):
        hits = bundle.search(emb.embed(load_for_model(tmp_path / "images" / rel, emb.card)[None]), k=1)
        assert hits[0][0].path == rel and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
