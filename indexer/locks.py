"""Locks of a bundle: the cross-process writer lock (flock) and the in-memory read/write lock.

- `writer_lock(root)`: one process at a time publishes a version (a build, a compaction).
- `ReadWriteLock`: many searches at once, or one change to the in-memory index. Fair: a waiting
  writer stops new readers from entering, so a steady stream of searches cannot starve it, and a
  writer hands over to the readers that queued behind it. Changes are microseconds long (one
  vector into the delta, one id into the tombstones), so readers hardly ever wait.
- `BusyError`: a lock was not free within its short timeout; the HTTP layer answers 503 with
  Retry-After instead of keeping the client waiting.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class LockTimeout(RuntimeError):
    """Another process holds the bundle's writer lock."""


class BusyError(RuntimeError):
    """A write could not start within its lock timeout; try again shortly."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ReadWriteLock:
    """Many concurrent readers, or one writer; writers waiting are served before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@contextmanager
def timed_mutex(lock: threading.Lock, timeout: float, what: str) -> Iterator[None]:
    """Hold `lock`, or raise BusyError when it is not free within `timeout` seconds."""
    if not lock.acquire(timeout=timeout):
        raise BusyError(f"{what} is busy; retry shortly")
    try:
        yield
    finally:
        lock.release()


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
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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
