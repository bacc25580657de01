"""Walking an image folder: which files are candidates, their labels, and which are skipped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from indexer.images import is_image_path
from indexer.metadata import label_for


@dataclass(frozen=True, slots=True)
class CorpusFile:
    rel: str  # posix path relative to the corpus root
    path: Path  # absolute
    size: int
    mtime: float

    @property
    def label(self) -> str | None:
        return label_for(self.rel)


@dataclass(frozen=True, slots=True)
class SkippedFile:
    path: str
    reason: str


def list_images(root: Path, exclude: tuple[Path, ...] = ()) -> tuple[list[CorpusFile], list[SkippedFile]]:
    """All candidate image files under root (recursively, sorted), and the files passed over.

    Hidden files and folders (".name") are ignored silently; files without an image extension,
    empty files and links that lead outside the root are listed as skipped.
    """
    root = Path(root).resolve()
    excluded = {Path(p).resolve() for p in exclude}
    files: list[CorpusFile] = []
    skipped: list[SkippedFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if not is_image_path(name):
                skipped.append(SkippedFile(rel, f"not an image file (extension {path.suffix or 'none'!r})"))
                continue
            try:
                if path.is_symlink() and not path.resolve().is_relative_to(root):
                    skipped.append(SkippedFile(rel, "link to a file outside the corpus"))
                    continue
                st = path.stat()
            except OSError as exc:
                skipped.append(SkippedFile(rel, f"cannot read: {exc.strerror or exc}"))
                continue
            if not path.is_file():
                skipped.append(SkippedFile(rel, "not a regular file"))
            elif st.st_size == 0:
                skipped.append(SkippedFile(rel, "empty file (0 bytes)"))
            else:
                files.append(CorpusFile(rel, path, st.st_size, st.st_mtime_ns / 1e9))
    return files, skipped
