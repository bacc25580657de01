"""Contact sheets: grids of thumbnails so that a person can look at clusters and duplicates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from indexer.images import ImageDecodeError, ImageTooLargeError, decode_image

BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
TEXT = (30, 30, 30)
CAPTION_H = 14
PADDING = 4


def thumbnail(path: Path | None, size: int) -> Image.Image:
    """A size x size RGB tile: the picture fitted inside, or a grey tile when it cannot be read."""
    tile = Image.new("RGB", (size, size), BACKGROUND)
    try:
        if path is None:
            raise ImageDecodeError("no file")
        img = decode_image(path)
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
        tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    except (ImageDecodeError, ImageTooLargeError):
        ImageDraw.Draw(tile).rectangle((0, 0, size - 1, size - 1), fill=MISSING)
        ImageDraw.Draw(tile).text((4, size // 2 - 6), "missing", fill=TEXT)
    return tile


def contact_sheet(
    rows: Sequence[Sequence[tuple[Path | None, str]]], *, thumb: int = 96, title: str | None = None
) -> Image.Image:
    """One row of captioned thumbnails per entry of `rows` ((path, caption) pairs)."""
    columns = max((len(r) for r in rows), default=1) or 1
    cell_w, cell_h = thumb + PADDING, thumb + CAPTION_H + PADDING
    top = CAPTION_H + PADDING if title else 0
    sheet = Image.new("RGB", (columns * cell_w + PADDING, top + max(1, len(rows)) * cell_h + PADDING), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PADDING, PADDING // 2), title[:200], fill=TEXT)
    chars = max(4, thumb // 6)  # the default bitmap font is about 6 pixels wide
    for r, row in enumerate(rows):
        for c, (path, caption) in enumerate(row):
            x, y = PADDING + c * cell_w, top + PADDING + r * cell_h
            sheet.paste(thumbnail(path, thumb), (x, y))
            text = caption if len(caption) <= chars else caption[: chars - 1] + "~"
            draw.text((x, y + thumb + 1), text, fill=TEXT)
    return sheet


def grid(items: Sequence[tuple[Path | None, str]], columns: int) -> list[list[tuple[Path | None, str]]]:
    """Split a flat list of tiles into rows of `columns`."""
    return [list(items[i : i + columns]) for i in range(0, len(items), columns)]
