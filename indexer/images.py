"""Image decoding and resizing: the one preprocessing module (pure functions).

The indexer, the service and the training code all prepare images through these functions, so
a query is prepared exactly like the corpus it is compared with. Normalisation (mean/std) is not
here: it lives inside the ONNX graph.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from indexer.model_card import ModelCard

# Lower-case file extensions the indexer picks up when it walks a corpus.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
# About 80 megapixels (a 10000 x 8000 photo): below Pillow's own bomb warning threshold.
DEFAULT_MAX_PIXELS: int = 80_000_000
# Draft decoding leaves at least this many times the target size for the final bilinear resize
# (Pillow's own thumbnail() default): a 4000 x 3000 photo for a 224 x 224 model is decoded at 1/8.
DRAFT_REDUCING_GAP: float = 2.0
Image.init()  # register every plugin now, so the formats below are known to Image.open
# Pillow plugins we let parse untrusted bytes; anything else is refused as unsupported.
# (Multi-picture JPEGs from phone cameras open through the JPEG plugin as "MPO".)
SUPPORTED_FORMATS: tuple[str, ...] = tuple(
    f for f in ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF") if f in Image.OPEN
)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read: empty, corrupt, truncated or unsupported."""


class ImageTooLargeError(ValueError):
    """The image header announces more pixels than allowed (a decompression bomb guard)."""


def is_image_path(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(
    source: bytes | Path | str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    reducing_gap: float = DRAFT_REDUCING_GAP,
) -> Image.Image:
    """Decode the first frame of an image to an RGB Pillow image, EXIF orientation applied.

    The pixel count is checked from the header before any pixel data is decoded.
    `draft_size` = (width, height) the caller will resize to: a JPEG is then decoded by libjpeg
    at 1/2, 1/4 or 1/8 scale where that still leaves at least `reducing_gap` times this size
    (several times faster for photos much larger than the model input); the image is then that
    reduced size. None (the default) decodes at full size.
    Raises ImageDecodeError or ImageTooLargeError; never returns None.
    """
    return decode_image_sized(source, max_pixels, draft_size, reducing_gap)[0]


def decode_image_sized(
    source: bytes | Path | str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    reducing_gap: float = DRAFT_REDUCING_GAP,
) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, and the full-resolution (width, height) after EXIF orientation, as read from
    the header: the size of the photo, whatever scale `draft_size` let the decoder use."""
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else _read_file(Path(source))
    if len(data) == 0:
        raise ImageDecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image or an unsupported format") from exc
    except Exception as exc:  # Pillow plugins raise many types on hostile headers
        raise ImageDecodeError(f"unreadable image header: {exc}") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        # GIF/TIFF/WebP animations: the first frame only. is_animated looks for a second frame;
        # n_frames would walk every frame of the file (seconds for a GIF of a million tiny frames).
        if getattr(img, "is_animated", False):
            img.seek(0)
        on_side = False
        if draft_size is not None and img.format in ("JPEG", "MPO"):
            # JPEG keeps EXIF in a header segment; orientations 5-8 store the photo on its side,
            # so the requested size is swapped too. draft() must come before any pixel is decoded.
            on_side = img.getexif().get(0x0112) in (5, 6, 7, 8)
            dw, dh = max(1, round(draft_size[0] * reducing_gap)), max(1, round(draft_size[1] * reducing_gap))
            img.draft("RGB", (dh, dw) if on_side else (dw, dh))
        img.load()  # raises on truncated or corrupt pixel data
        drafted = img.size != (width, height)
        upright = ImageOps.exif_transpose(img)
        full_size = ((height, width) if on_side else (width, height)) if drafted else upright.size
        return to_rgb(upright), full_size
    except (ImageDecodeError, ImageTooLargeError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"too many pixels: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLargeError("not enough memory to decode the image") from exc
    except Exception as exc:  # truncated data, bad huffman tables, broken palettes, ...
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"{path}: is a directory") from exc
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency over white, 16-bit and float scaled down."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG, TIFF): Pillow's convert would clip at 255, not rescale.
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(arr / 257.0, 0, 255) if mode.startswith("I;16") or arr.max(initial=0) > 255 else arr
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr * scale), 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except Exception as exc:
        raise ImageDecodeError(f"unsupported image mode {mode}") from exc


def resize_to(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Squash the whole image to (width, height) with bilinear filtering; uint8 (H, W, 3)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    width, height = size
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def prepare(img: Image.Image, card: ModelCard) -> np.ndarray:
    """Prepare a decoded image for the model the card describes (its resize rule and size)."""
    if card.resize.method != "squash" or card.resize.filter != "bilinear":
        raise ValueError(f"unsupported resize rule {card.resize.method}/{card.resize.filter}")
    return resize_to(img, card.size)


def decode_for_model(
    source: bytes | Path | str, card: ModelCard, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """The one way corpus images and queries are prepared, so both land in the same space.

    JPEGs much larger than the model input are decoded at reduced scale (draft), then resized
    by the card's rule. Returns the model's pixels and the photo's full (width, height).
    """
    img, full_size = decode_image_sized(source, max_pixels=max_pixels, draft_size=card.size)
    return prepare(img, card), full_size


def load_for_model(path: Path | bytes, card: ModelCard, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_for_model`, pixels only."""
    return decode_for_model(path, card, max_pixels)[0]
