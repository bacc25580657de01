"""The write-ahead journal of online adds and deletes, beside the immutable bundle versions.

    INDEX/journal/<first-seq>.wal    segments, appended to in sequence order
    INDEX/journal/.lock              flock: exclusive to append, cut or trim; shared to read

Every record is `magic | payload length | crc32(payload)` then the payload: sequence number,
operation, image id, the vector (float32) and the record's metadata as JSON. An append is
flushed with fdatasync before it returns, so an acknowledged write is on disk.

A version's manifest names the last sequence number it holds (`journal_seq`); opening a bundle
replays the records after it. A damaged record at the very end of the newest segment is a write
that never finished (never acknowledged): it is cut off with a log line. A damaged record with
good ones after it, a gap in the sequence, or a vector of the wrong size is corruption:
`JournalCorrupt` names the file and the offset.

Several processes (uvicorn workers) share one journal: each appends under the exclusive lock,
after reading what the others appended (so sequence numbers stay dense and every process applies
the records in the same order), and `poll()` lets a process follow the others' writes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np

from indexer.atomic import fsync_dir
from indexer.metadata import ImageRecord

log = logging.getLogger("indexer.journal")

JOURNAL_DIR = "journal"
SEGMENT_SUFFIX = ".wal"
MAGIC = b"IJR1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
_FIXED = struct.Struct("<QBqI")  # seq, op, id, vector dimension
Op = Literal["add", "delete"]
_OPS: dict[int, Op] = {1: "add", 2: "delete"}
_OP_CODES = {name: code for code, name in _OPS.items()}
_SEGMENT_RE = re.compile(r"^(\d{16})\.wal$")
MAX_PAYLOAD = 64 << 20  # far above any real record: a length past it is damage, not data


class JournalError(Exception):
    """The journal cannot be read or written."""


class JournalCorrupt(JournalError):
    """A damaged record that is not a torn end: the service must not start on it."""


class JournalWriteError(JournalError, OSError):
    """An append could not be flushed to disk; it was cut off again and is not applied anywhere."""

    def __init__(self, message: str, reason: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal record: an add (record and vector) or a delete (and the corpus tombstone it leaves)."""

    seq: int
    op: Op
    id: int
    vector: np.ndarray | None = None
    record: ImageRecord | None = None
    tombstone: tuple[str, str] | None = None  # (corpus path, sha256) of a deleted corpus file


def add_entry(record: ImageRecord, vector: np.ndarray) -> Entry:
    """An add, before the journal gives it its sequence number."""
    return Entry(0, "add", record.id, np.asarray(vector, dtype=np.float32).reshape(-1), record)


def delete_entry(image_id: int, tombstone: tuple[str, str] | None = None) -> Entry:
    return Entry(0, "delete", int(image_id), tombstone=tombstone)


def encode(entry: Entry) -> bytes:
    vector = entry.vector if entry.vector is not None else np.zeros(0, dtype=np.float32)
    vec = np.ascontiguousarray(vector, dtype="<f4")
    rec = entry.record
    meta: dict[str, object] = {}
    if rec is not None:
        # the fields by hand: dataclasses.asdict deep-copies and costs tens of microseconds
        meta["r"] = [rec.path, rec.label, rec.size, rec.mtime, rec.sha256, rec.width, rec.height, rec.origin]
    if entry.tombstone is not None:
        meta["t"] = list(entry.tombstone)
    payload = (
        _FIXED.pack(entry.seq, _OP_CODES[entry.op], entry.id, len(vec))
        + vec.tobytes()
        + json.dumps(meta, separators=(",", ":")).encode()
    )
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> Entry:
    seq, op, image_id, dim = _FIXED.unpack_from(payload)
    start = _FIXED.size
    vector = np.frombuffer(payload, dtype="<f4", count=dim, offset=start).astype(np.float32) if dim else None
    meta = json.loads(payload[start + 4 * dim :])
    record = None
    if "r" in meta:
        path, label, size, mtime, sha, width, height, origin = meta["r"]
        record = ImageRecord(image_id, path, label, size, mtime, sha, width, height, origin)
    tomb = tuple(meta["t"]) if "t" in meta else None
    return Entry(seq, _OPS[op], image_id, vector, record, tomb)


def _parse_at(data: bytes, offset: int) -> tuple[Entry, int] | None:
    """The record at `offset` and the offset after it, or None when it is damaged or incomplete."""
    if offset + _HEADER.size > len(data):
        return None
    magic, length, crc = _HEADER.unpack_from(data, offset)
    end = offset + _HEADER.size + length
    if magic != MAGIC or length < _FIXED.size or length > MAX_PAYLOAD or end > len(data):
        return None
    payload = data[offset + _HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        entry = _decode_payload(payload)
    except (ValueError, KeyError, struct.error, TypeError):
        return None
    return entry, end


def _good_record_after(data: bytes, offset: int) -> int | None:
    """Offset of a valid record somewhere after `offset` (proof that the damage is not a torn end)."""
    pos = data.find(MAGIC, offset + 1)
    while pos != -1:
        if _parse_at(data, pos) is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None


def segment_name(first_seq: int) -> str:
    return f"{first_seq:016d}{SEGMENT_SUFFIX}"


class Journal:
    """The journal of one bundle folder, as seen by one process (thread-safe only under the caller's lock)."""

    def __init__(self, root: Path, dim: int) -> None:
        self.dir = Path(root) / JOURNAL_DIR
        self.dim = dim
        self.last_seq = 0
        self._segment: str | None = None  # the newest segment read so far, and how far
        self._offset = 0

    # ------------------------------------------------------------------ locking

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def segments(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), self.dir / e.name) for e in os.scandir(self.dir) if (m := _SEGMENT_RE.match(e.name))]
        return sorted(found)

    # ------------------------------------------------------------------ reading

    def open(self, after_seq: int) -> list[Entry]:
        """Validate the whole journal and return the records after `after_seq` (a version's journal_seq).

        Cuts a torn last record (logged); raises JournalCorrupt for any other damage.
        """
        with self._locked(fcntl.LOCK_EX):
            self.last_seq, self._segment, self._offset = after_seq, None, 0
            return self._read_new(cut_torn_end=True, after_seq=after_seq)

    def poll(self) -> list[Entry]:
        """Records appended (by any process) since the last read; never waits for a writer for long."""
        with self._locked(fcntl.LOCK_SH):
            return self._read_new(cut_torn_end=False)

    def _read_new(self, *, cut_torn_end: bool, after_seq: int | None = None) -> list[Entry]:
        out: list[Entry] = []
        segments = self.segments()
        for i, (_, path) in enumerate(segments):
            if self._segment is not None and path.name < self._segment:
                continue
            start = self._offset if path.name == self._segment else 0
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except FileNotFoundError:
                continue  # trimmed by a compaction since it was listed
            offset = 0
            while offset < len(data):
                parsed = _parse_at(data, offset)
                if parsed is None:
                    last = i == len(segments) - 1
                    good = _good_record_after(data, offset)
                    if good is not None or not last:
                        raise JournalCorrupt(
                            f"{path}: damaged record at byte {start + offset}"
                            + (
                                f" with good records after it (byte {start + good})"
                                if good is not None
                                else " in a segment that is not the newest"
                            )
                            + "; the journal is corrupt"
                        )
                    if cut_torn_end:
                        log.warning(
                            "%s: cut off an incomplete last record at byte %d (%d bytes; a write that "
                            "never finished and was never acknowledged)",
                            path,
                            start + offset,
                            len(data) - offset,
                        )
                        with open(path, "r+b") as fh:
                            fh.truncate(start + offset)
                            os.fsync(fh.fileno())
                    break
                entry, end = parsed
                if after_seq is not None and entry.seq <= after_seq:
                    offset = end  # already in the version
                    continue
                if entry.seq != self.last_seq + 1:
                    raise JournalCorrupt(
                        f"{path}: record {entry.seq} at byte {start + offset} follows record "
                        f"{self.last_seq}; the journal is corrupt (a gap or a repeat)"
                    )
                if entry.vector is not None and len(entry.vector) != self.dim:
                    raise JournalCorrupt(
                        f"{path}: record {entry.seq} holds a {len(entry.vector)}-d vector, the "
                        f"model's are {self.dim}-d; the journal belongs to another model"
                    )
                out.append(entry)
                self.last_seq = entry.seq
                offset = end
            self._segment, self._offset = path.name, start + offset
        return out

    # ------------------------------------------------------------------ writing

    def append(self, entry: Entry) -> tuple[list[Entry], Entry]:
        """Write one record and flush it to disk: (records other processes wrote before it, the record).

        The caller applies the first list, then the record, in that order. Raises JournalWriteError
        (the record is cut off again, nothing is applied) when the disk refuses it.
        """
        with self._locked(fcntl.LOCK_EX):
            others = self._read_new(cut_torn_end=True)
            seq = self.last_seq + 1
            stamped = Entry(seq, entry.op, entry.id, entry.vector, entry.record, entry.tombstone)
            data = encode(stamped)
            segments = self.segments()
            path = segments[-1][1] if segments else self.dir / segment_name(seq)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                before = os.fstat(fd).st_size
                try:
                    written = os.write(fd, data)
                    if written != len(data):
                        raise OSError(28, "No space left on device")  # a short write: the disk is full
                    os.fdatasync(fd)
                    if created:
                        fsync_dir(self.dir)
                except OSError as exc:
                    try:
                        os.ftruncate(fd, before)
                        os.fsync(fd)
                    except OSError:
                        log.exception("%s: could not cut off a failed append", path)
                    reason = exc.strerror or str(exc)
                    raise JournalWriteError(
                        f"{path}: cannot append to the journal: {reason}", reason, exc.errno
                    ) from exc
            finally:
                os.close(fd)
            self.last_seq, self._segment, self._offset = seq, path.name, before + len(data)
            return others, stamped

    def rotate(self) -> tuple[list[Entry], int]:
        """Start a new segment for the records after the current last one.

        Returns (records other processes wrote that this one had not read, the last seq).

        A compaction rotates first, so that once its version is published every older segment
        is wholly covered and can be deleted.
        """
        with self._locked(fcntl.LOCK_EX):
            others = self._read_new(cut_torn_end=True)
            path = self.dir / segment_name(self.last_seq + 1)
            if not path.exists():
                path.touch()
                fsync_dir(self.dir)
            return others, self.last_seq

    def trim(self, covered_seq: int) -> int:
        """Delete the segments whose every record is in a published version; returns how many."""
        with self._locked(fcntl.LOCK_EX):
            segments = self.segments()
            removed = 0
            for (_, path), (next_first, _) in pairwise(segments):
                if next_first - 1 <= covered_seq:
                    path.unlink(missing_ok=True)
                    removed += 1
            if removed:
                fsync_dir(self.dir)
            return removed
