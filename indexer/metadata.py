"""Per-image metadata: the record type, stable ids and the SQLite file that stores them."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

Origin = Literal["corpus", "upload"]
_ID_MASK = (1 << 63) - 1  # positive int64: what FAISS ids are
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ImageRecord:
    id: int
    path: str  # posix path relative to the corpus root ("corpus") or to the bundle ("upload")
    label: str | None
    size: int  # bytes
    mtime: float  # seconds since the epoch
    sha256: str  # of the file's bytes
    width: int  # pixels, after EXIF orientation
    height: int
    origin: Origin = "corpus"


def label_counts(records: Iterable[ImageRecord]) -> tuple[dict[str, int], int]:
    """(images per label, sorted by label; how many are uploads) of a set of records."""
    labels: dict[str, int] = {}
    uploads = 0
    for rec in records:
        if rec.label is not None:
            labels[rec.label] = labels.get(rec.label, 0) + 1
        uploads += rec.origin == "upload"
    return dict(sorted(labels.items())), uploads


def stable_id(relative_path: str) -> int:
    """A 63-bit id derived from the posix relative path: the same file keeps its id across builds."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & _ID_MASK


def upload_id(sha256: str) -> int:
    """Uploads have no corpus path: their id comes from their content (re-uploading is idempotent)."""
    return stable_id(f"upload:{sha256}")


def label_for(relative_path: str) -> str | None:
    """The class folder, as in the seeds: `cat/x.jpg` -> "cat"; files at the root have none."""
    parts = PurePosixPath(relative_path).parts
    return parts[0] if len(parts) > 1 else None


class MetadataFormatError(ValueError):
    """The metadata file was written by a newer (or unknown) schema."""


_COLUMNS = ("id", "path", "label", "size", "mtime", "sha256", "width", "height", "origin")


def write_records(
    path: Path, records: Iterable[ImageRecord], deleted: dict[str, str] | None = None, hidden: Iterable[int] = ()
) -> None:
    """Write a new SQLite file (the caller makes it atomic by writing into a staging folder).

    `deleted`: corpus paths deleted through the API -> the sha256 of the file then (tombstones, so
    that an incremental build does not add the same file back). `hidden`: ids whose vectors are
    still in the index file but dead (an HNSW graph keeps deleted nodes until it is rebuilt).
    """
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")  # the caller fsyncs the finished file
        con.execute(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT, size INTEGER NOT NULL,"
            " mtime REAL NOT NULL, sha256 TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,"
            " origin TEXT NOT NULL, UNIQUE (origin, path))"
        )
        con.execute("CREATE INDEX images_label ON images(label)")
        con.execute("CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("INSERT INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        con.executemany(
            f"INSERT INTO images ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            ((r.id, r.path, r.label, r.size, r.mtime, r.sha256, r.width, r.height, r.origin) for r in records),
        )
        con.execute("CREATE TABLE hidden (id INTEGER PRIMARY KEY)")
        con.executemany("INSERT INTO hidden VALUES (?)", ((int(i),) for i in hidden))
        con.execute("CREATE TABLE deleted (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
        con.executemany("INSERT INTO deleted VALUES (?, ?)", sorted((deleted or {}).items()))
        con.commit()
    finally:
        con.close()


def read_records(path: Path) -> dict[int, ImageRecord]:
    if not path.is_file():
        raise FileNotFoundError(path)
    # Read-only URI: opening never creates or modifies a published version.
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        info = con.execute("SELECT value FROM info WHERE key = 'schema_version'").fetchone()
        if info is None or info[0] != str(SCHEMA_VERSION):
            raise MetadataFormatError(
                f"metadata schema version {info[0] if info else None!r} is not the one this "
                f"version of imgsearch reads ({SCHEMA_VERSION}); rebuild the bundle"
            )
        rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM images").fetchall()
    finally:
        con.close()
    return {row[0]: ImageRecord(*row) for row in rows}


def read_hidden(path: Path) -> set[int]:
    """The dead ids still in the index file ({} for files written before there were any)."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hidden'").fetchone() is None:
            return set()
        return {row[0] for row in con.execute("SELECT id FROM hidden")}
    finally:
        con.close()


def read_upload_paths(path: Path) -> set[str]:
    """The paths of the uploads a metadata file refers to (one indexed query, not every record)."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {row[0] for row in con.execute("SELECT path FROM images WHERE origin = 'upload'")}
    finally:
        con.close()


def read_deleted(path: Path) -> dict[str, str]:
    """The tombstones (corpus path -> sha256) of a metadata file; {} for files written before them."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'deleted'").fetchone() is None:
            return {}
        return dict(con.execute("SELECT path, sha256 FROM deleted").fetchall())
    finally:
        con.close()
