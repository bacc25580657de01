"""Crash-safe file writing and the bundle's single-writer lock."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeout(RuntimeError):
    """Another process holds the bundle's writer lock."""


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in a folder durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename over `path`: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no half-written file behind
        raise
    fsync_dir(path.parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link an immutable file into a new version (cheap), or copy it across filesystems."""
    try:
        os.link(src, dst)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(1 << 20):
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())


# flock locks belong to an open file: a second flock from the same process on a new descriptor
# would wait for itself, so the process keeps one descriptor per bundle and counts re-entries.
_held: dict[str, tuple[int, int]] = {}
_held_guard = threading.RLock()


@contextmanager
def writer_lock(root: Path, timeout: float = 0.0) -> Iterator[None]:
    """Exclusive writer lock on a bundle folder, re-entrant within this process."""
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    with _held_guard:
        if key in _held:
            fd, count = _held[key]
            _held[key] = (fd, count + 1)
        else:
            fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise LockTimeout(f"{root}: another process is writing to this index bundle") from None
                    time.sleep(0.05)
            _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _held_guard:
            fd, count = _held[key]
            if count > 1:
                _held[key] = (fd, count - 1)
            else:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
