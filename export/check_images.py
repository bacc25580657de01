"""Real images for the export's checks (Keras/ONNX parity, int8 drift) and int8 calibration."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np


def image_files(folder: Path) -> list[Path]:
    from indexer.images import IMAGE_EXTENSIONS

    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_images(folder: Path, size: int, count: int, exclude: Collection[Path] = ()) -> tuple[np.ndarray, list[Path]]:
    """Up to `count` decodable images under `folder`, spread across it and not in `exclude`,
    squashed to size x size; and the files they came from."""
    from indexer.images import ImageDecodeError, decode_image, resize_to

    skip = set(exclude)
    files = [p for p in image_files(folder) if p not in skip]
    step = max(1, len(files) // max(count, 1))
    batch, used = [], []
    for path in files[::step]:
        try:
            batch.append(resize_to(decode_image(path), (size, size)))
        except (ImageDecodeError, ValueError):
            continue
        used.append(path)
        if len(batch) == count:
            break
    images = np.stack(batch) if batch else np.zeros((0, size, size, 3), np.uint8)
    return images, used


def load_check_images(folder: Path, size: int, count: int) -> np.ndarray:
    """Up to `count` decodable images under `folder`, spread across it, prepared for the model."""
    return load_images(folder, size, count)[0]
