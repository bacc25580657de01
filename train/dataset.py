"""The training data: a folder of class subfolders, as in the seeds.

    Folder/SubfolderA/img1.jpg
    Folder/SubfolderA/img2.jpg
    Folder/SubfolderB/img3.jpg

Class = subfolder name (sorted, so the class index is stable). Images are decoded and squashed
to the backbone's input size by `indexer.images`, the same functions the indexer and the service
use, so a training image is prepared exactly like a corpus image or a query.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from indexer.images import IMAGE_EXTENSIONS, decode_image, is_image_path, resize_to

# Decoded training sets up to this size stay in memory (about 3,400 images at 224 x 224);
# bigger ones are decoded again batch by batch so a large corpus never sits in RAM.
CACHE_LIMIT_BYTES = 512 * 2**20
LAYOUT_HINT = "expected DIR/<class>/<image files>, e.g. Folder/SubfolderA/img1.jpg"


class TrainDataError(ValueError):
    """A problem with the training folder, reported to the user in one line."""


@dataclass(frozen=True)
class ClassFolders:
    """Every candidate image file with its class index; nothing decoded yet."""

    root: Path
    class_names: list[str]
    paths: list[Path]
    labels: np.ndarray  # int32, index into class_names


@dataclass
class DecodedSet:
    """The readable images of a ClassFolders, and the files that were skipped."""

    class_names: list[str]
    paths: list[Path]
    labels: np.ndarray
    size: int
    images: np.ndarray | None  # (n, size, size, 3) uint8 when small enough to keep, else None
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


# --------------------------------------------------------------------------- listing


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere under a class folder (nested folders count for that class too)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and is_image_path(f)]
    return found


def list_class_folders(root: Path | str) -> ClassFolders:
    """List the class subfolders of `root` and their image files; fail clearly on bad layouts."""
    root = Path(root).expanduser()
    if not root.exists():
        raise TrainDataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise TrainDataError(f"data path is not a folder: {root}")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    if len(class_dirs) < 2:
        raise TrainDataError(f"need at least 2 class subfolders in {root}, found {len(class_dirs)} ({LAYOUT_HINT})")
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for index, folder in enumerate(class_dirs):
        files = _image_files(folder)
        if not files:
            empty.append(folder.name)
        paths += files
        labels += [index] * len(files)
    if empty:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise TrainDataError(
            f"class folder(s) with no image files in {root}: {', '.join(empty)} (extensions read: {exts})"
        )
    return ClassFolders(root, [p.name for p in class_dirs], paths, np.asarray(labels, dtype=np.int32))


# --------------------------------------------------------------------------- decoding


def load_image(path: Path | str, size: int) -> np.ndarray:
    """One image as the model sees it: RGB uint8 (size, size, 3), squashed bilinearly.

    Decoded like the indexer and the service decode (large JPEGs at reduced scale), so that the
    model trains on the pixels it will later embed.
    """
    return resize_to(decode_image(Path(path), draft_size=(size, size)), (size, size))


def _try_load(path: Path, size: int) -> np.ndarray | str:
    try:
        return load_image(path, size)
    except ValueError as exc:  # ImageDecodeError / ImageTooLargeError
        return str(exc) or type(exc).__name__


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_folders(
    folders: ClassFolders,
    size: int,
    *,
    cache_limit: int = CACHE_LIMIT_BYTES,
    progress: bool = True,
) -> DecodedSet:
    """Decode every file once: find the unreadable ones, and keep the pixels if they fit.

    Unreadable files are skipped and listed, never fatal; a class left with no readable image,
    or a folder with none at all, is an error.
    """
    keep = len(folders.paths) * size * size * 3 <= cache_limit
    images: list[np.ndarray] = []
    ok: list[int] = []
    skipped: list[tuple[Path, str]] = []
    # Pillow releases the GIL while decoding, so threads give real parallelism here.
    with ThreadPoolExecutor(_workers()) as pool:
        results = pool.map(lambda p: _try_load(p, size), folders.paths)
        # stdout, like Keras' progress bar: stderr is kept for errors.
        bar = tqdm(
            results,
            total=len(folders.paths),
            desc="decode",
            unit="img",
            disable=not progress,
            leave=False,
            file=sys.stdout,
        )
        for i, result in enumerate(bar):
            if isinstance(result, str):
                skipped.append((folders.paths[i], result))
                continue
            ok.append(i)
            if keep:
                images.append(result)
    _check_readable(folders, ok, skipped)
    return DecodedSet(
        class_names=folders.class_names,
        paths=[folders.paths[i] for i in ok],
        labels=folders.labels[ok],
        size=size,
        images=np.stack(images) if keep else None,
        skipped=skipped,
    )


def _check_readable(folders: ClassFolders, ok: Sequence[int], skipped: Sequence) -> None:
    if not ok:
        raise TrainDataError(f"no readable images in {folders.root}: all {len(skipped)} files failed to decode")
    counts = np.bincount(folders.labels[list(ok)], minlength=len(folders.class_names))
    unreadable = [name for name, n in zip(folders.class_names, counts) if n == 0]
    if unreadable:
        raise TrainDataError(
            f"class folder(s) with no readable images in {folders.root}: "
            f"{', '.join(unreadable)} (every file there failed to decode)"
        )


# --------------------------------------------------------------------------- split


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train indices, validation indices).

    Each class with >= 2 images puts round(fraction * n) of them, at least 1 and at most n - 1,
    into validation, so every class is both learned and measured. fraction 0 means no validation.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation split must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = 0
        if fraction > 0 and len(members) >= 2:
            n_val = min(len(members) - 1, max(1, round(fraction * len(members))))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --------------------------------------------------------------------------- batches


class ImageBatches(keras.utils.PyDataset):
    """Batches of (float32 pixels 0..255, int labels) from memory or decoded per batch.

    Shuffles again at the end of every epoch from its own seeded generator.
    """

    def __init__(
        self,
        data: DecodedSet,
        indices: Iterable[int],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        **kwargs,
    ) -> None:
        # Decoding from disk is I/O + Pillow work: let Keras prefetch batches on threads.
        if data.images is None:
            kwargs.setdefault("workers", min(4, _workers()))
        super().__init__(**kwargs)
        self.data = data
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = self.indices.copy()
        if shuffle:
            self._rng.shuffle(self._order)

    def __len__(self) -> int:
        return -(-len(self._order) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        return self._pixels(rows).astype(np.float32), self.data.labels[rows]

    def _pixels(self, rows: np.ndarray) -> np.ndarray:
        if self.data.images is not None:
            return self.data.images[rows]
        batch = []
        for i in rows:
            try:
                batch.append(load_image(self.data.paths[i], self.data.size))
            except ValueError as exc:  # the file changed since the first pass read it
                raise TrainDataError(f"{self.data.paths[i]} became unreadable during training: {exc}") from exc
        return np.stack(batch)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._rng.shuffle(self._order)


class ClassBalancedBatches(ImageBatches):
    """P x K batches for pair losses: `classes_per_batch` classes, `images_per_class` images of
    each, so every image in a batch has positives and negatives beside it.

    Classes are drawn without replacement until each has been used, images of a class without
    replacement while it has K left (with replacement for classes smaller than K). An epoch has
    about as many batches as plain batching of the same images would.
    """

    def __init__(
        self,
        data: DecodedSet,
        indices: Iterable[int],
        classes_per_batch: int,
        images_per_class: int,
        *,
        seed: int = 0,
        **kwargs,
    ) -> None:
        if classes_per_batch < 2 or images_per_class < 2:
            raise ValueError(
                "a P x K batch needs P >= 2 classes and K >= 2 images per class, "
                f"got P={classes_per_batch}, K={images_per_class}"
            )
        super().__init__(data, indices, classes_per_batch * images_per_class, shuffle=False, seed=seed, **kwargs)
        self.p, self.k = classes_per_batch, images_per_class
        labels = data.labels[self.indices]
        self._members = {int(c): self.indices[labels == c] for c in np.unique(labels)}
        if len(self._members) < self.p:
            raise ValueError(
                f"{self.p} classes per batch, but the training split has only {len(self._members)} classes"
            )
        self._batches = self._plan()

    def __len__(self) -> int:
        return max(1, -(-len(self.indices) // self.batch_size))

    def _plan(self) -> list[np.ndarray]:
        """This epoch's batches, each P classes x K rows, grouped by class."""
        classes = np.asarray(sorted(self._members))
        pools = {c: list(self._rng.permutation(m)) for c, m in self._members.items()}
        queue: list[int] = []
        batches = []
        for _ in range(len(self)):
            if len(queue) < self.p:  # refill: every class again, in a new order
                queue += [int(c) for c in self._rng.permutation(classes) if c not in queue]
            chosen, queue = queue[: self.p], queue[self.p :]
            rows = []
            for c in chosen:
                while len(pools[c]) < self.k:  # a small class repeats its images
                    pools[c] += list(self._rng.permutation(self._members[c]))
                take, pools[c] = pools[c][: self.k], pools[c][self.k :]
                rows += take
            batches.append(np.asarray(rows, dtype=np.int64))
        return batches

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._batches[index]
        return self._pixels(rows).astype(np.float32), self.data.labels[rows]

    def on_epoch_end(self) -> None:
        self._batches = self._plan()
