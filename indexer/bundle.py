"""The index bundle: model + FAISS index + metadata + manifest, versioned and switched atomically.

Layout of an index folder:

    INDEX/
      CURRENT                    the name of the live version (replaced with os.replace, fsync'd)
      versions/<NNNNNN-UTCSTAMP>/
        model.onnx, model.json   the model that made the vectors (hard-linked between versions)
        index.faiss              FAISS inner-product index, ids = record ids
        meta.sqlite              one row per vector (see metadata.py)
        manifest.json            counts, index type and parameters, model hash, corpus root, build report
      uploads/<id>.<ext>         bytes of images added through the API (no corpus file of their own)
      .lock                      single-writer lock (flock)

A version folder is complete before it gets its final name, and CURRENT only ever names a
complete version, so a writer killed at any moment leaves the previous version loadable.
The last KEEP_VERSIONS versions are kept.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from indexer import faiss_index
from indexer.atomic import LockTimeout, fsync_dir, fsync_file, link_or_copy, write_atomic, writer_lock
from indexer.metadata import ImageRecord, read_deleted, read_records, upload_id, write_records
from indexer.model_card import CARD_FILE, MODEL_FILE, ModelCard, ModelCardError, file_sha256, read_card

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
UPLOADS_DIR = "uploads"
INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
MANIFEST_FILE = "manifest.json"
KEEP_VERSIONS = 2
BUNDLE_FORMAT = 1
_VERSION_RE = re.compile(r"^(\d{6,})-\d{8}T\d{6}Z$")
_UPLOAD_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "DIB": "bmp", "GIF": "gif", "TIFF": "tif"}
_ORPHAN_UPLOAD_AGE_S = 3600  # an upload not yet in a saved version may belong to a save in progress


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


def _write_error(where: Path, what: str, exc: OSError) -> BundleWriteError:
    reason = exc.strerror or str(exc)
    return BundleWriteError(f"{where}: cannot write {what}: {reason}; the live version is unchanged", reason, exc.errno)


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    score: float
    path: str
    label: str | None


class _ReadWriteLock:
    """Many concurrent searches, or one mutation."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Bundle:
    """A loaded index bundle. Searches may run concurrently with each other; add/remove/save lock."""

    def __init__(
        self,
        root: Path,
        *,
        model_dir: Path,
        card: ModelCard,
        index: faiss.Index,
        index_params: dict[str, Any],
        records: dict[int, ImageRecord],
        corpus_root: Path | None,
        manifest: dict[str, Any],
        version: str | None,
        deleted: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(root)
        self.model_dir = Path(model_dir)
        self.card = card
        self.manifest = manifest
        self.version = version or ""
        self.corpus_root = corpus_root
        self._index = index
        self._params = dict(index_params)
        self._records = records
        self._lock = _ReadWriteLock()
        self._save_mutex = threading.Lock()
        self._label_ids: dict[str | None, np.ndarray] | None = None
        self._dirty = version is None
        # corpus path -> sha256 of corpus files deleted through the API (tombstones): an incremental
        # build does not add such a file back unless its content changed.
        self._deleted: dict[str, str] = dict(deleted or {})

    # ----------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._records

    @property
    def dim(self) -> int:
        return self.card.dim

    @property
    def index_type(self) -> str:
        return faiss_index.index_type_of(self._index)

    @property
    def index_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def version_dir(self) -> Path:
        return self.path / VERSIONS_DIR / self.version

    @property
    def dirty(self) -> bool:
        """True when there are changes that save() has not written yet."""
        return self._dirty

    def ids(self) -> list[int]:
        return list(self._records)

    def records(self) -> list[ImageRecord]:
        return list(self._records.values())

    def get(self, image_id: int) -> ImageRecord:
        try:
            return self._records[int(image_id)]
        except (KeyError, ValueError, TypeError):
            raise KeyError(image_id) from None

    def labels(self) -> list[str]:
        return sorted({r.label for r in self._records.values() if r.label is not None})

    def vector(self, image_id: int) -> np.ndarray:
        """The stored vector of one image (decoded from its codes for IVF)."""
        self.get(image_id)
        with self._lock.read():
            return faiss_index.reconstruct(self._index, np.array([int(image_id)]))[0]

    def vectors(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids, or for every stored vector."""
        with self._lock.read():
            arr = faiss_index.ids_of(self._index) if ids is None else np.asarray(ids, dtype=np.int64)
            return arr, faiss_index.reconstruct(self._index, arr)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        min_score: float | None = None,
        label: str | None = None,
        exclude_ids: Iterable[int] | None = None,
    ) -> list[list[Hit]]:
        """Top-k neighbours of each query vector by cosine similarity, best first.

        `label` keeps only images of that class; `exclude_ids` never returns those ids;
        `min_score` drops hits below it (so a query may get fewer than k).
        """
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError("k must be at least 1")
        exclude = np.fromiter((int(i) for i in exclude_ids), dtype=np.int64) if exclude_ids is not None else None
        with self._lock.read():
            include = None
            if label is not None:
                include = self._ids_for_label(label)
                if len(include) == 0:
                    return [[] for _ in range(len(q))]
            if self._index.ntotal == 0 or len(q) == 0:
                return [[] for _ in range(len(q))]
            selector = faiss_index.selector_for(include, exclude)
            kk = min(k, self._index.ntotal)
            scores, ids = faiss_index.search(self._index, q, kk, self._params, selector)
            results: list[list[Hit]] = []
            for row_scores, row_ids in zip(scores, ids):
                hits = []
                for score, image_id in zip(row_scores.tolist(), row_ids.tolist()):
                    if image_id < 0:
                        continue
                    score = min(1.0, max(-1.0, score))  # SQ8/PQ decoding can overshoot by a hair
                    if min_score is not None and score < min_score:
                        continue
                    rec = self._records.get(image_id)
                    if rec is None:
                        continue
                    hits.append(Hit(image_id, score, rec.path, rec.label))
                results.append(hits)
            return results

    def range_search(self, vectors: np.ndarray, min_score: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, (ids, scores) of every stored vector scoring above min_score (unordered)."""
        q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {q.shape}")
        with self._lock.read():
            if self._index.ntotal == 0:
                return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
            lims, scores, ids = self._index.range_search(q, float(min_score))
        return [(ids[lims[i] : lims[i + 1]], scores[lims[i] : lims[i + 1]]) for i in range(len(q))]

    def _ids_for_label(self, label: str) -> np.ndarray:
        if self._label_ids is None:
            groups: dict[str | None, list[int]] = {}
            for rec in self._records.values():
                groups.setdefault(rec.label, []).append(rec.id)
            self._label_ids = {key: np.array(v, dtype=np.int64) for key, v in groups.items()}
        return self._label_ids.get(label, np.zeros(0, dtype=np.int64))

    def absolute_path(self, image_id: int) -> Path:
        """The image file of a record, refusing any path that resolves outside its root."""
        rec = self.get(image_id)
        if rec.origin == "upload":
            root = (self.path / UPLOADS_DIR).resolve()
            candidate = (self.path / rec.path).resolve()
        else:
            if self.corpus_root is None:
                raise BundleError(f"image {image_id}: the bundle records no corpus root")
            root = self.corpus_root.resolve()
            candidate = (root / rec.path).resolve()
        if not candidate.is_relative_to(root):
            raise BundleError(f"image {image_id}: path {rec.path!r} escapes {root}")
        return candidate

    # ---------------------------------------------------------------- changing

    def add(
        self,
        items: Sequence[tuple[ImageRecord, np.ndarray]] | Sequence[ImageRecord],
        vectors: np.ndarray | None = None,
    ) -> int:
        """Add records with their vectors: `add([(record, vector), ...])` or `add(records, vectors)`.

        An id already present is replaced (its old vector removed). Returns how many were added.
        """
        if vectors is None:
            pairs = list(items)  # type: ignore[arg-type]
            records = [p[0] for p in pairs]  # type: ignore[index]
            vecs = np.stack([np.asarray(p[1], dtype=np.float32).reshape(-1) for p in pairs]) if pairs else None  # type: ignore[index]
        else:
            records = list(items)  # type: ignore[arg-type]
            vecs = np.asarray(vectors, dtype=np.float32)
        if not records:
            return 0
        assert vecs is not None
        if vecs.ndim != 2 or vecs.shape != (len(records), self.dim):
            raise ValueError(f"expected {len(records)} vectors of dimension {self.dim}, got shape {vecs.shape}")
        if not np.all(np.isfinite(vecs)):
            raise ValueError("vectors contain NaN or infinity")
        ids = np.array([r.id for r in records], dtype=np.int64)
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("duplicate ids in one add")
        if np.any(ids < 0):
            raise ValueError("ids must be non-negative")
        with self._lock.write():
            existing = np.array([i for i in ids.tolist() if i in self._records], dtype=np.int64)
            if len(existing):
                self._index, _ = faiss_index.remove(self._index, existing, self._params)
            faiss_index.add(self._index, vecs, ids)
            for rec in records:
                self._records[rec.id] = rec
            self._changed()
        return len(records)

    def add_upload(
        self, data: bytes, vector: np.ndarray, *, label: str | None = None, size: tuple[int, int] | None = None
    ) -> ImageRecord:
        """Add an uploaded image: its bytes are kept in the bundle so the file can be served.

        The id comes from the content, so uploading the same bytes twice replaces, not duplicates.
        `size` is (width, height) after EXIF orientation when the caller already decoded the image.
        """
        digest = _sha256(data)
        image_id = upload_id(digest)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                if size is None:
                    size = img.size
        except Exception as exc:
            raise ValueError(f"upload is not an image: {exc}") from exc
        rel = f"{UPLOADS_DIR}/{image_id}.{_UPLOAD_EXT.get(fmt, 'bin')}"
        target = self.path / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                write_atomic(target, data)
        except OSError as exc:
            raise _write_error(target.parent, "the uploaded image", exc) from exc
        rec = ImageRecord(
            id=image_id, path=rel, label=label, size=len(data), mtime=time.time(), sha256=digest,
            width=int(size[0]), height=int(size[1]), origin="upload",
        )
        self.add([(rec, vector)])
        return rec

    def update_records(self, records: Iterable[ImageRecord]) -> None:
        """Replace metadata of existing ids without touching their vectors (e.g. a new mtime)."""
        with self._lock.write():
            for rec in records:
                if rec.id not in self._records:
                    raise KeyError(rec.id)
                self._records[rec.id] = rec
            self._changed()

    def remove(self, ids: Iterable[int], *, tombstone: bool = False) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed.

        `tombstone`: remember the removed corpus files (path and content hash), so that an
        incremental build does not add them back (an API delete); a build's own removals do not.
        """
        wanted = np.array(sorted({int(i) for i in ids}), dtype=np.int64)
        with self._lock.write():
            present = np.array([i for i in wanted.tolist() if i in self._records], dtype=np.int64)
            if len(present) == 0:
                return 0
            self._index, removed = faiss_index.remove(self._index, present, self._params)
            if removed != len(present):
                raise BundleError(f"index removed {removed} of {len(present)} vectors: index and metadata disagree")
            for i in present.tolist():
                rec = self._records.pop(i)
                if tombstone and rec.origin == "corpus":
                    self._deleted[rec.path] = rec.sha256
            self._changed()
            return int(removed)

    @property
    def deleted(self) -> dict[str, str]:
        """Tombstones: corpus path -> sha256 of the corpus files deleted through the API."""
        return dict(self._deleted)

    def is_deleted(self, rel: str, path: Path) -> bool:
        """True when the corpus file `rel` was deleted through the API and still has the same bytes.

        A tombstoned file whose content changed is a new image: its tombstone is dropped.
        """
        digest = self._deleted.get(rel)
        if digest is None:
            return False
        try:
            if file_sha256(Path(path)) == digest:
                return True
        except OSError:
            return True  # unreadable now: leave it out, as before
        with self._lock.write():
            del self._deleted[rel]
            self._dirty = True
        return False

    def forget_deleted(self, keep: Iterable[str]) -> None:
        """Drop the tombstones of corpus files that are no longer in the corpus (`keep`: paths listed)."""
        listed = set(keep)
        gone = [rel for rel in self._deleted if rel not in listed]
        if gone:
            with self._lock.write():
                for rel in gone:
                    del self._deleted[rel]
                self._dirty = True

    def set_corpus_root(self, corpus_root: Path) -> None:
        root = Path(corpus_root).resolve()
        if root != self.corpus_root:
            self.corpus_root = root
            self._dirty = True

    def convert_index(self, choice: faiss_index.IndexChoice) -> None:
        """Move every stored vector into a new index of another type (or other parameters)."""
        with self._lock.write():
            ids = faiss_index.ids_of(self._index)
            vecs = faiss_index.reconstruct(self._index, ids)
            fresh = faiss_index.new_index(choice, self.dim, vecs)
            faiss_index.add(fresh, vecs, ids)
            self._index, self._params = fresh, dict(choice.params)
            self._changed()

    def _changed(self) -> None:
        self._label_ids = None
        self._dirty = True

    # ------------------------------------------------------------------ saving

    def save(self, build: dict[str, Any] | None = None, lock_timeout: float = 30.0) -> str:
        """Write the current state as a new version and switch CURRENT to it; returns the version.

        A crash at any point leaves the previous version live and complete. Refuses to overwrite a
        version written by someone else since this bundle was loaded (reload and retry).
        """
        with self._save_mutex, self._lock.read():
            try:
                with writer_lock(self.path, timeout=lock_timeout):
                    return self._save_locked(build)
            except LockTimeout as exc:
                raise BundleError(str(exc)) from exc
            except OSError as exc:  # disk full, read-only folder, quota, ...
                raise _write_error(self.path, "a new version", exc) from exc

    def _save_locked(self, build: dict[str, Any] | None) -> str:
        current = _read_current(self.path)
        if self.version and current != self.version:
            raise BundleConflict(
                f"{self.path}: version {current} was written since this bundle (version {self.version}) "
                "was loaded; reload it and retry"
            )
        versions = self.path / VERSIONS_DIR
        versions.mkdir(parents=True, exist_ok=True)
        new_version = _next_version(self.path)
        staging = versions / f".staging-{new_version}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            link_or_copy(self.model_dir / MODEL_FILE, staging / MODEL_FILE)
            shutil.copyfile(self.model_dir / CARD_FILE, staging / CARD_FILE)
            try:
                faiss_index.write(self._index, str(staging / INDEX_FILE))
            except RuntimeError as exc:  # FAISS reports a failed write (disk full) as a RuntimeError
                raise OSError(*_os_error_of(exc)) from exc
            try:
                write_records(staging / META_FILE, self._records.values(), self._deleted)
            except sqlite3.Error as exc:  # SQLITE_FULL, SQLITE_IOERR: not OSErrors, same meaning
                code = errno.ENOSPC if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" else errno.EIO
                raise OSError(code, f"cannot write the metadata database: {exc}") from exc
            # sizes and hashes of the data files: open_bundle refuses a truncated or altered file
            # instead of serving wrong neighbours from it
            files = {name: {"bytes": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
                     for name in (INDEX_FILE, META_FILE)}
            manifest = self._manifest(new_version, build, files)
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in (MODEL_FILE, CARD_FILE, INDEX_FILE, META_FILE, MANIFEST_FILE):
                fsync_file(staging / name)
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a half-written staging folder is never kept
            raise
        final = versions / new_version
        os.rename(staging, final)
        fsync_dir(versions)
        write_atomic(self.path / CURRENT_FILE, (new_version + "\n").encode())
        self.version, self.manifest, self.model_dir, self._dirty = new_version, manifest, final, False
        try:
            _prune(self.path, keep=KEEP_VERSIONS)
        except OSError:
            pass  # the new version is live; old versions are pruned by the next save
        return new_version

    def _manifest(self, version: str, build: dict[str, Any] | None,
                  files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        labels: dict[str, int] = {}
        uploads = 0
        for rec in self._records.values():
            if rec.label is not None:
                labels[rec.label] = labels.get(rec.label, 0) + 1
            uploads += rec.origin == "upload"
        return {
            "format": BUNDLE_FORMAT,
            "version": version,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "sha256": self.card.onnx_sha256,
                "dim": self.card.dim,
                "backbone": self.card.backbone,
                "source": self.card.source,
                "input_size": [self.card.input.width, self.card.input.height],
            },
            "index": {"type": self.index_type, "params": self._params, "ntotal": int(self._index.ntotal)},
            "counts": {"images": len(self._records), "corpus": len(self._records) - uploads, "uploads": uploads, "labels": dict(sorted(labels.items())),
                       "deleted": len(self._deleted)},
            "corpus_root": str(self.corpus_root) if self.corpus_root is not None else None,
            "build": build if build is not None else self.manifest.get("build"),
            "files": files or {},
        }


# ----------------------------------------------------------------------- opening / creating


def new_bundle(
    index_dir: Path,
    model_dir: Path,
    index: faiss.Index,
    index_params: dict[str, Any],
    corpus_root: Path | None,
) -> Bundle:
    """An empty, unsaved bundle for a model (save() writes its first version or replaces the live one)."""
    try:
        card = read_card(Path(model_dir))
    except ModelCardError as exc:
        raise BundleError(str(exc)) from exc
    if index.d != card.dim:
        raise BundleError(f"index dimension {index.d} != model dimension {card.dim}")
    return Bundle(
        Path(index_dir),
        model_dir=Path(model_dir),
        card=card,
        index=index,
        index_params=index_params,
        records={},
        corpus_root=Path(corpus_root).resolve() if corpus_root is not None else None,
        manifest={},
        version=None,
    )


def bundle_exists(index_dir: Path) -> bool:
    return (Path(index_dir) / CURRENT_FILE).is_file()


def open_bundle(index_dir: Path) -> Bundle:
    """Load the live version of a bundle, checking that model, index and metadata belong together."""
    root = Path(index_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no index bundle here (build one with `python -m indexer build`)")
    if not (root / CURRENT_FILE).is_file():
        raise BundleError(f"{root}: not an index bundle (no {CURRENT_FILE} file); build one with `python -m indexer build`")
    version = _read_current(root)
    vdir = root / VERSIONS_DIR / version
    if not vdir.is_dir():
        raise BundleError(f"{root}: {CURRENT_FILE} names version {version!r}, which does not exist")
    try:
        manifest = json.loads((vdir / MANIFEST_FILE).read_text())
        card = read_card(vdir)
    except (OSError, ValueError) as exc:  # ModelCardError and JSONDecodeError are ValueErrors
        raise BundleError(f"{vdir}: corrupt bundle: {exc}") from exc
    try:
        model_hash, model_dim = manifest["model"]["sha256"], int(manifest["model"]["dim"])
        params = dict(manifest["index"]["params"])
        corpus_root = manifest.get("corpus_root")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{vdir / MANIFEST_FILE}: missing field {exc}") from exc
    if model_hash != card.onnx_sha256:
        raise BundleError(
            f"{vdir}: the model in the bundle (sha256 {card.onnx_sha256[:12]}) is not the model that made "
            f"its vectors (sha256 {model_hash[:12]}); rebuild the index with --rebuild"
        )
    if model_dim != card.dim:
        raise BundleError(f"{vdir}: vectors have dimension {model_dim}, the model outputs {card.dim}; rebuild with --rebuild")
    for name in (INDEX_FILE, META_FILE):
        _verify_file(vdir / name, manifest.get("files"))
    try:
        index = faiss_index.configure(faiss_index.read(str(vdir / INDEX_FILE)), params)
    except Exception as exc:  # FAISS raises RuntimeError with a long C++ message
        raise BundleError(f"{vdir / INDEX_FILE}: corrupt or truncated FAISS index ({_first_line(exc)})") from exc
    try:
        records = read_records(vdir / META_FILE)
        deleted = read_deleted(vdir / META_FILE)
    except Exception as exc:  # sqlite3.DatabaseError, a missing table, ...
        raise BundleError(f"{vdir / META_FILE}: corrupt or truncated metadata database ({_first_line(exc)})") from exc
    if index.d != card.dim:
        raise BundleError(f"{vdir}: index dimension {index.d} != model dimension {card.dim}; rebuild with --rebuild")
    stored = faiss_index.ids_of(index)
    if len(stored) != len(records) or not np.all(np.isin(stored, np.fromiter(records, dtype=np.int64, count=len(records)))):
        raise BundleError(f"{vdir}: index has {len(stored)} vectors but metadata has {len(records)} records that do not match")
    return Bundle(
        root,
        model_dir=vdir,
        card=card,
        index=index,
        index_params=params,
        records=records,
        corpus_root=Path(corpus_root) if corpus_root else None,
        manifest=manifest,
        version=version,
        deleted=deleted,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _os_error_of(exc: RuntimeError) -> tuple[int, str]:
    """(errno, message) for a FAISS write error; FAISS only says which call failed."""
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG, errno.EIO):
        if os.strerror(code) in text:
            return code, os.strerror(code)
    return errno.EIO, f"cannot write the FAISS index ({_first_line(exc)})"


def _verify_file(path: Path, files: Any) -> None:
    """Check a data file against the size and sha256 the manifest recorded when it was written."""
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle")
    expected = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        return  # written before the manifest recorded hashes
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise BundleError(f"{path}: truncated or damaged ({size} bytes, the manifest says {expected.get('bytes')})")
    if file_sha256(path) != expected.get("sha256"):
        raise BundleError(f"{path}: corrupt (its content does not match the sha256 in the manifest)")


def model_matches(bundle: Bundle, model_dir: Path) -> str | None:
    """None when the model folder holds the bundle's model; otherwise why not."""
    card = read_card(Path(model_dir))
    if card.dim != bundle.card.dim:
        return f"the model's dimension is {card.dim}, the bundle's vectors have {bundle.card.dim}"
    if card.onnx_sha256 != bundle.card.onnx_sha256:
        return (
            f"the model (sha256 {card.onnx_sha256[:12]}) differs from the bundle's "
            f"(sha256 {bundle.card.onnx_sha256[:12]})"
        )
    return None


# ----------------------------------------------------------------------------- helpers


def _read_current(root: Path) -> str:
    try:
        name = (root / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return ""
    if name and not _VERSION_RE.match(name):
        raise BundleError(f"{root / CURRENT_FILE}: not a version name: {name[:40]!r}")
    return name


def _next_version(root: Path) -> str:
    counters = [0]
    for entry in (root / VERSIONS_DIR).iterdir():
        if m := _VERSION_RE.match(entry.name):
            counters.append(int(m.group(1)))
    current = _read_current(root)
    if m := _VERSION_RE.match(current):
        counters.append(int(m.group(1)))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{max(counters) + 1:06d}-{stamp}"


def _prune(root: Path, keep: int) -> None:
    """Delete old versions and leftovers of killed writers (the caller holds the writer lock)."""
    versions = root / VERSIONS_DIR
    current = _read_current(root)
    complete = sorted((e.name for e in versions.iterdir() if _VERSION_RE.match(e.name)), key=lambda n: int(n.split("-")[0]))
    for name in complete[:-keep] if keep else complete:
        if name != current:
            shutil.rmtree(versions / name, ignore_errors=True)
    for entry in versions.iterdir():
        if entry.name.startswith(".staging-"):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in root.glob(f".{CURRENT_FILE}.*.tmp"):
        entry.unlink(missing_ok=True)
    _collect_uploads(root)


def _collect_uploads(root: Path) -> None:
    uploads = root / UPLOADS_DIR
    if not uploads.is_dir():
        return
    referenced: set[str] = set()
    for vdir in (root / VERSIONS_DIR).iterdir():
        if _VERSION_RE.match(vdir.name) and (vdir / META_FILE).is_file():
            try:
                referenced.update(r.path for r in read_records(vdir / META_FILE).values() if r.origin == "upload")
            except Exception:
                return  # never delete uploads on a doubt
    now = time.time()
    for entry in uploads.iterdir():
        rel = f"{UPLOADS_DIR}/{entry.name}"
        if rel not in referenced and now - entry.stat().st_mtime > _ORPHAN_UPLOAD_AGE_S:
            entry.unlink(missing_ok=True)


def recover(index_dir: Path) -> None:
    """Remove what a killed writer left behind (staging folders); the live version is untouched."""
    root = Path(index_dir)
    if (root / VERSIONS_DIR).is_dir():
        with writer_lock(root):
            _prune(root, keep=KEEP_VERSIONS)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "Bundle",
    "BundleConflict",
    "BundleError",
    "BundleWriteError",
    "Hit",
    "ImageRecord",
    "bundle_exists",
    "model_matches",
    "new_bundle",
    "open_bundle",
    "recover",
]
