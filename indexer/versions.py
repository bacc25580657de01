"""The immutable versions of a bundle on disk: open, publish, prune and verify them.

    INDEX/
      CURRENT                    the name of the live version (replaced with os.replace, fsync'd)
      versions/<NNNNNN-UTCSTAMP>/
        model.onnx, model.json   the model that made the vectors (hard-linked between versions)
        whitening.faiss          the PCA learned from the corpus, when built with one (whitening.py)
        index.faiss              FAISS inner-product index, ids = record ids
        meta.sqlite              one row per vector (see metadata.py), and the corpus tombstones
        manifest.json            format, counts, index type and parameters, model hash, corpus root,
                                 sizes and sha256 of the data files, build report, journal_seq
      journal/                   online adds and deletes after the version (journal.py)
      uploads/<id>.<ext>         bytes of images added through the API (no corpus file of their own)
      .lock                      the writer lock (locks.py): one publisher at a time

A version folder is complete before it gets its final name, and CURRENT only ever names a
complete version, so a writer killed at any moment leaves the previous version loadable.
Opening checks sizes, the manifest and the model hash; the content hashes of the data files are
checked by `verify_files`, which the service runs in the background after it starts serving.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer import faiss_index
from indexer.atomic import fsync_dir, fsync_file, link_or_copy, write_atomic
from indexer.metadata import (
    ImageRecord,
    MetadataFormatError,
    label_counts,
    read_deleted,
    read_hidden,
    read_records,
    read_upload_paths,
    write_records,
)
from indexer.model_card import CARD_FILE, MODEL_FILE, ModelCard, file_sha256, read_card

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
UPLOADS_DIR = "uploads"
INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (INDEX_FILE, META_FILE)
KEEP_VERSIONS = 2
BUNDLE_FORMAT = 2  # 2: manifests name the journal position they hold (journal_seq)
KNOWN_FORMATS = (1, 2)  # format 1 bundles have no journal: they open with journal_seq 0
VERSION_RE = re.compile(r"^(\d{6,})-\d{8}T\d{6}Z$")
ORPHAN_UPLOAD_AGE_S = 3600  # an upload not yet in a saved version may belong to a write in progress


class BundleError(Exception):
    """The index bundle is missing, corrupt, locked, or does not match its model."""


class BundleConflict(BundleError):
    """Another writer published a version since this bundle was loaded: reload it and retry."""


class BundleWriteError(BundleError, OSError):
    """The bundle could not be written (disk full, read-only folder, ...); the live version is unchanged.

    `reason` is the operating system's short message ("No space left on device"), without paths.
    Also an OSError, for callers that catch those.
    """

    def __init__(self, message: str, reason: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = errno


def write_error(where: Path, what: str, exc: OSError) -> BundleWriteError:
    reason = exc.strerror or str(exc)
    return BundleWriteError(f"{where}: cannot write {what}: {reason}; the live version is unchanged", reason, exc.errno)


@dataclass
class VersionData:
    """What one version holds, read back from disk."""

    version: str
    dir: Path
    card: ModelCard
    manifest: dict[str, Any]
    index: faiss.Index
    params: dict[str, Any]
    records: dict[int, ImageRecord]
    deleted: dict[str, str]
    corpus_root: Path | None
    journal_seq: int
    hidden: set[int]  # dead ids still in the index file (HNSW keeps deleted nodes until a rebuild)


def read_current(root: Path) -> str:
    try:
        name = (root / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return ""
    if name and not VERSION_RE.match(name):
        raise BundleError(f"{root / CURRENT_FILE}: not a version name: {name[:40]!r}")
    return name


def bundle_exists(index_dir: Path) -> bool:
    return (Path(index_dir) / CURRENT_FILE).is_file()


def open_version(root: Path, *, mmap: bool = False) -> VersionData:
    """Read the version CURRENT names, checking that model, index and metadata belong together.

    Checks file sizes against the manifest but not content hashes (see `verify_files`). `mmap`:
    map the index file read-only (faiss_index.read) instead of reading it into memory.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: no index bundle here (build one with `python -m indexer build`)")
    if not (root / CURRENT_FILE).is_file():
        raise BundleError(
            f"{root}: not an index bundle (no {CURRENT_FILE} file); build one with `python -m indexer build`"
        )
    version = read_current(root)
    vdir = root / VERSIONS_DIR / version
    if not vdir.is_dir():
        raise BundleError(f"{root}: {CURRENT_FILE} names version {version!r}, which does not exist")
    try:
        manifest = json.loads((vdir / MANIFEST_FILE).read_text())
        card = read_card(vdir)
    except (OSError, ValueError) as exc:  # ModelCardError and JSONDecodeError are ValueErrors
        raise BundleError(f"{vdir}: corrupt bundle: {exc}") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt not in KNOWN_FORMATS:
        raise BundleError(
            f"{vdir / MANIFEST_FILE}: bundle format {fmt!r} is not one this version of imgsearch "
            f"reads ({', '.join(map(str, KNOWN_FORMATS))}); rebuild it or upgrade imgsearch"
        )
    try:
        model_hash, model_dim = manifest["model"]["sha256"], int(manifest["model"]["dim"])
        params = dict(manifest["index"]["params"])
        corpus_root = manifest.get("corpus_root")
        journal_seq = int(manifest.get("journal_seq", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{vdir / MANIFEST_FILE}: missing field {exc}") from exc
    if model_hash != card.onnx_sha256:
        raise BundleError(
            f"{vdir}: the model in the bundle (sha256 {card.onnx_sha256[:12]}) is not the model that made "
            f"its vectors (sha256 {model_hash[:12]}); rebuild the index with --rebuild"
        )
    if model_dim != card.dim:
        raise BundleError(
            f"{vdir}: vectors have dimension {model_dim}, the model outputs {card.dim}; rebuild with --rebuild"
        )
    for name in DATA_FILES:
        check_size(vdir / name, manifest.get("files"))
    try:
        index = faiss_index.configure(faiss_index.read(str(vdir / INDEX_FILE), mmap=mmap), params)
    except Exception as exc:  # FAISS raises RuntimeError with a long C++ message
        raise BundleError(f"{vdir / INDEX_FILE}: corrupt or truncated FAISS index ({first_line(exc)})") from exc
    try:
        records = read_records(vdir / META_FILE)
        deleted = read_deleted(vdir / META_FILE)
        hidden = read_hidden(vdir / META_FILE)
    except MetadataFormatError as exc:
        raise BundleError(f"{vdir / META_FILE}: {exc}") from exc
    except Exception as exc:  # sqlite3.DatabaseError, a missing table, ...
        raise BundleError(f"{vdir / META_FILE}: corrupt or truncated metadata database ({first_line(exc)})") from exc
    if index.d != card.dim:
        raise BundleError(f"{vdir}: index dimension {index.d} != model dimension {card.dim}; rebuild with --rebuild")
    stored = faiss_index.ids_of(index)
    known = np.fromiter([*records, *hidden], dtype=np.int64, count=len(records) + len(hidden))
    if len(stored) != len(known) or not np.all(np.isin(stored, known)):
        raise BundleError(
            f"{vdir}: index has {len(stored)} vectors but metadata has {len(records)} records "
            f"(and {len(hidden)} dead ids) that do not match"
        )
    return VersionData(
        version,
        vdir,
        card,
        manifest,
        index,
        params,
        records,
        deleted,
        Path(corpus_root) if corpus_root else None,
        journal_seq,
        hidden,
    )


def check_size(path: Path, files: Any) -> None:
    """Check a data file's size against the manifest: a truncated file is refused before it is read."""
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle")
    expected = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        return  # written before the manifest recorded sizes
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise BundleError(f"{path}: truncated or damaged ({size} bytes, the manifest says {expected.get('bytes')})")


def verify_files(vdir: Path, manifest: Mapping[str, Any]) -> str | None:
    """None when every data file matches the sha256 in the manifest; otherwise what is wrong, naming the file."""
    files = manifest.get("files")
    for name in DATA_FILES:
        path = vdir / name
        try:
            check_size(path, files)
            expected = files.get(name) if isinstance(files, dict) else None
            if isinstance(expected, dict) and file_sha256(path) != expected.get("sha256"):
                return f"{path}: corrupt (its content does not match the sha256 in the manifest)"
        except BundleError as exc:
            return str(exc)
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror or exc})"
    return None


def next_version(root: Path) -> str:
    counters = [0]
    for entry in (root / VERSIONS_DIR).iterdir():
        if m := VERSION_RE.match(entry.name):
            counters.append(int(m.group(1)))
    if m := VERSION_RE.match(read_current(root)):
        counters.append(int(m.group(1)))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{max(counters) + 1:06d}-{stamp}"


def make_manifest(
    version: str,
    card: ModelCard,
    index: faiss.Index,
    params: Mapping[str, Any],
    records: Mapping[int, ImageRecord],
    deleted: Mapping[str, str],
    corpus_root: Path | None,
    build: Any,
    journal_seq: int,
    files: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    labels, uploads = label_counts(records.values())
    return {
        "format": BUNDLE_FORMAT,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "sha256": card.onnx_sha256,
            "dim": card.dim,
            "whitening": card.whitening.model_dump() if card.whitening is not None else None,
            "backbone": card.backbone,
            "source": card.source,
            "input_size": [card.input.width, card.input.height],
        },
        "index": {"type": faiss_index.index_type_of(index), "params": dict(params), "ntotal": int(index.ntotal)},
        "counts": {
            "images": len(records),
            "corpus": len(records) - uploads,
            "uploads": uploads,
            "labels": labels,
            "deleted": len(deleted),
        },
        "corpus_root": str(corpus_root) if corpus_root is not None else None,
        "build": build,
        "journal_seq": int(journal_seq),
        "files": files or {},
    }


def publish_version(
    root: Path,
    model_dir: Path,
    card: ModelCard,
    index: faiss.Index,
    params: Mapping[str, Any],
    records: Mapping[int, ImageRecord],
    deleted: Mapping[str, str],
    corpus_root: Path | None,
    build: Any,
    journal_seq: int,
    *,
    expected_current: str | None,
    hidden: Iterable[int] = (),
) -> tuple[str, dict[str, Any], Path]:
    """Write a new version and switch CURRENT to it: (version, manifest, its folder).

    The caller holds the writer lock. `expected_current`: refuse (BundleConflict) when CURRENT
    names another version, i.e. someone published since the caller read it (None: no check).
    Raises BundleWriteError when the disk refuses; the live version is then unchanged.
    """
    root = Path(root)
    current = read_current(root)
    if expected_current is not None and current != expected_current:
        raise BundleConflict(
            f"{root}: version {current} was written since version {expected_current} was loaded; reload it and retry"
        )
    try:
        versions = root / VERSIONS_DIR
        versions.mkdir(parents=True, exist_ok=True)
        new_version = next_version(root)
        staging = versions / f".staging-{new_version}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            model_files = [MODEL_FILE, CARD_FILE] + ([card.whitening.file] if card.whitening is not None else [])
            for name in model_files:  # the card is copied: write_card replaces it in place
                (shutil.copyfile if name == CARD_FILE else link_or_copy)(model_dir / name, staging / name)
            try:
                faiss_index.write(index, str(staging / INDEX_FILE))
            except RuntimeError as exc:  # FAISS reports a failed write (disk full) as a RuntimeError
                raise OSError(*os_error_of(exc)) from exc
            try:
                write_records(staging / META_FILE, records.values(), dict(deleted), hidden)
            except sqlite3.Error as exc:  # SQLITE_FULL, SQLITE_IOERR: not OSErrors, same meaning
                code = errno.ENOSPC if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" else errno.EIO
                raise OSError(code, f"cannot write the metadata database: {exc}") from exc
            # sizes and hashes of the data files: a truncated or altered file is refused instead of
            # serving wrong neighbours from it
            files = {
                name: {"bytes": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
                for name in DATA_FILES
            }
            manifest = make_manifest(
                new_version, card, index, params, records, deleted, corpus_root, build, journal_seq, files
            )
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in (*model_files, *DATA_FILES, MANIFEST_FILE):
                fsync_file(staging / name)
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a half-written staging folder is never kept
            raise
        final = versions / new_version
        os.rename(staging, final)
        fsync_dir(versions)
        write_atomic(root / CURRENT_FILE, (new_version + "\n").encode())
    except OSError as exc:  # disk full, read-only folder, quota, ...
        raise write_error(root, "a new version", exc) from exc
    try:
        prune(root, keep=KEEP_VERSIONS)
    except OSError:
        pass  # the new version is live; old versions are pruned by the next publish
    return new_version, manifest, final


def prune(root: Path, keep: int = KEEP_VERSIONS, live_uploads: set[str] | None = None) -> None:
    """Delete old versions and leftovers of killed writers (the caller holds the writer lock).

    `live_uploads`: the upload paths the journal still refers to; None = unknown, keep every upload.
    """
    versions = root / VERSIONS_DIR
    current = read_current(root)
    complete = sorted(
        (e.name for e in versions.iterdir() if VERSION_RE.match(e.name)), key=lambda n: int(n.split("-")[0])
    )
    for name in complete[:-keep] if keep else complete:
        if name != current:
            shutil.rmtree(versions / name, ignore_errors=True)
    for entry in versions.iterdir():
        if entry.name.startswith(".staging-"):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in root.glob(f".{CURRENT_FILE}.*.tmp"):
        entry.unlink(missing_ok=True)
    if live_uploads is not None:
        collect_uploads(root, live_uploads)


def collect_uploads(root: Path, live_uploads: set[str]) -> None:
    """Delete upload files no version refers to, once they are old enough not to belong to a write in flight."""
    uploads = root / UPLOADS_DIR
    if not uploads.is_dir():
        return
    referenced: set[str] = set(live_uploads)
    for vdir in (root / VERSIONS_DIR).iterdir():
        if VERSION_RE.match(vdir.name) and (vdir / META_FILE).is_file():
            try:
                referenced.update(read_upload_paths(vdir / META_FILE))
            except Exception:
                return  # never delete uploads on a doubt
    now = time.time()
    for entry in uploads.iterdir():
        rel = f"{UPLOADS_DIR}/{entry.name}"
        if rel not in referenced and now - entry.stat().st_mtime > ORPHAN_UPLOAD_AGE_S:
            entry.unlink(missing_ok=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def os_error_of(exc: RuntimeError) -> tuple[int, str]:
    """(errno, message) for a FAISS write error; FAISS only says which call failed."""
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG, errno.EIO):
        if os.strerror(code) in text:
            return code, os.strerror(code)
    return errno.EIO, f"cannot write the FAISS index ({first_line(exc)})"
