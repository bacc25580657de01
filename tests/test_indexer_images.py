"""indexer.images: every format and mode the build must read, and the errors for bad bytes."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    load_for_model,
    prepare,
    resize_to,
)
from indexer.model_card import read_card
from tiny_model import make_tiny_model

RED = (220, 30, 30)


def _solid(mode: str = "RGB", size=(40, 30), color=RED) -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16bit_rgb(width: int, height: int, value: int) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">HHH", value, value // 2, 0) * width
    raw = row * height
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces a huge size (a decompression bomb) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def _close(pixel, expected, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


@pytest.mark.parametrize(
    "fmt,kw",
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"quality": 95}), ("BMP", {}), ("GIF", {}), ("TIFF", {})],
)
def test_every_format_decodes_to_rgb(fmt, kw):
    img = decode_image(_encode(_solid(), fmt, **kw))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert _close(img.getpixel((20, 15)), RED, tol=20)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGBA", "LA", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    src = _solid(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    img = decode_image(_encode(src, fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_cmyk_jpeg_keeps_its_colour():
    img = decode_image(_encode(_solid("CMYK"), "JPEG", quality=95))
    assert img.mode == "RGB" and _close(img.getpixel((5, 5)), RED, tol=25)


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    img = decode_image(_encode(rgba, "PNG"))
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 255)
    palette = rgba.convert("P")  # palette with a transparent entry
    assert decode_image(_encode(palette, "PNG")).getpixel((5, 5)) == (255, 255, 255)


def test_16bit_grayscale_is_scaled_not_clipped():
    arr = np.full((10, 10), 32896, dtype=np.uint16)  # mid grey in 16 bits
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    for fmt in ("PNG", "TIFF"):
        img = decode_image(_encode(src, fmt))
        pixel = img.getpixel((3, 3))
        assert isinstance(pixel, tuple)
        r, g, b = pixel
        assert r == g == b and 120 <= r <= 135, (fmt, r)


def test_16bit_rgb_png():
    img = decode_image(png_16bit_rgb(6, 4, 65535))
    assert img.mode == "RGB" and img.size == (6, 4)
    pixel = img.getpixel((2, 2))
    assert isinstance(pixel, tuple)
    r, g, b = pixel
    assert r >= 250 and 120 <= g <= 135 and b <= 5


def test_gif_uses_the_first_frame():
    frames = [_solid("RGB", color=RED).convert("P"), _solid("RGB", color=(0, 0, 250)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = decode_image(buf.getvalue())
    assert _close(img.getpixel((5, 5)), RED, tol=30)


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (0, 200, 0))
    src.paste((250, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = decode_image(_encode(src, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (20, 40)
    assert _close(img.getpixel((10, 2)), (250, 0, 0), tol=40)  # the left strip is now on top


def test_paths_and_bytes_give_the_same_image(tmp_path: Path):
    path = tmp_path / "x.png"
    _solid().save(path)
    assert np.array_equal(np.asarray(decode_image(path)), np.asarray(decode_image(path.read_bytes())))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"hello, this is text, not an image", "not an image"),
        (b"\xff\xd8\xff\xe0 garbage after a JPEG marker", None),
    ],
)
def test_bad_bytes_raise_decode_error(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_truncated_files_raise_decode_error():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP"):
        data = _encode(noisy, fmt)
        with pytest.raises(ImageDecodeError):
            decode_image(data[: len(data) // 2])


def test_unsupported_format_is_refused():
    with pytest.raises(ImageDecodeError):
        decode_image(_encode(_solid(), "PPM"))


def test_too_many_pixels_is_refused_from_the_header():
    with pytest.raises(ImageTooLargeError):
        decode_image(png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLargeError):
        decode_image(_encode(_solid(), "PNG"), max_pixels=100)
    assert decode_image(_encode(_solid(), "PNG"), max_pixels=None).size == (40, 30)


def test_missing_file_is_a_decode_error(tmp_path: Path):
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path / "nope.jpg")


def test_prepare_squashes_to_the_card_size(tmp_path: Path):
    card = read_card(make_tiny_model(tmp_path / "m"))
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    arr = prepare(img, card)
    assert arr.dtype == np.uint8 and arr.shape == (32, 32, 3)
    assert tuple(arr[5, 5]) == (10, 20, 30)
    # exactly Pillow's bilinear resize of the whole image, no crop
    assert np.array_equal(resize_to(img, (7, 9)), np.asarray(img.resize((7, 9), Image.Resampling.BILINEAR)))
    path = tmp_path / "a.png"
    img.save(path)
    assert np.array_equal(load_for_model(path, card), arr)


def test_extension_list():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
