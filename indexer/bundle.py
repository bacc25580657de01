"""A loaded index bundle: the version CURRENT names, the journal after it, and the live index.

Two ways to hold one:

- live (`open_bundle(root)`, the service): the version's main index is never rewritten by a
  write. `commit_add` / `commit_delete` append a record to the journal, flush it, and only then
  apply it to the delta and the tombstones (live_index.py), so a write costs the same at 1k and
  1M vectors and a write that fails to persist is never visible. `compact()` (compaction.py)
  folds them into the next version in the background.
- build (`open_bundle(root, for_build=True)`, `new_bundle`, the offline build and tools that
  edit a bundle): changes go straight into a private copy of the index and `save()` publishes
  it as a new version. The journal is replayed into it first, so an offline build never loses
  an API add or brings back an API delete.

The on-disk layout and its guarantees are in versions.py; docs/reliability.md says what is promised.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from indexer import faiss_index
from indexer.atomic import write_atomic
from indexer.journal import Entry, Journal, JournalError, JournalWriteError, add_entry, delete_entry
from indexer.live_index import Hit, LiveIndex
from indexer.locks import BusyError, LockTimeout, timed_mutex, writer_lock
from indexer.metadata import ImageRecord, upload_id
from indexer.model_card import ModelCard, ModelCardError, file_sha256, read_card
from indexer.query_expansion import QueryExpansion, expand
from indexer.versions import (
    CURRENT_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    META_FILE,
    UPLOADS_DIR,
    VERSIONS_DIR,
    BundleConflict,
    BundleError,
    BundleWriteError,
    bundle_exists,
    open_version,
    publish_version,
    read_current,
    verify_files,
    write_error,
)

log = logging.getLogger("indexer.bundle")

UPLOAD_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "DIB": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
}
WRITE_LOCK_TIMEOUT = 2.0  # seconds a write waits for another one before the client is told to retry


class Bundle:
    """A loaded index bundle; searches run concurrently with each other and with writes."""

    def __init__(
        self,
        root: Path,
        *,
        model_dir: Path,
        card: ModelCard,
        live: LiveIndex,
        corpus_root: Path | None,
        manifest: dict[str, Any],
        version: str | None,
        journal: Journal | None,
        journal_seq: int = 0,
    ) -> None:
        self.path = Path(root)
        self.model_dir = Path(model_dir)
        self.card = card
        self.manifest = manifest
        self.version = version or ""
        self.corpus_root = corpus_root
        self.write_lock_timeout = WRITE_LOCK_TIMEOUT
        self._live = live
        self._journal = journal
        self.version_seq = journal_seq  # the journal position the loaded version holds
        self.applied_seq = journal_seq  # the last journal record applied in memory
        self._dirty = version is None
        self._write_mutex = threading.Lock()
        self._capture: list[Entry] | None = None  # records written while a compaction runs
        self.integrity_error: str | None = None  # set by verify(): a data file does not match its hash
        self.verified = False

    # ----------------------------------------------------------------- reading

    @property
    def live(self) -> LiveIndex:
        """The current in-memory index; one search uses one, even if a compaction swaps it meanwhile."""
        return self._live

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._live.records

    @property
    def dim(self) -> int:
        return self.card.dim

    @property
    def label_min_score(self) -> float | None:
        """The predicted-label threshold the build calibrated on this bundle's labels (labels.py), if any."""
        calibration = (self.manifest.get("build") or {}).get("label_calibration") or {}
        return calibration.get("min_score")

    @property
    def index_type(self) -> str:
        return self._live.index_type

    @property
    def index_params(self) -> dict[str, Any]:
        return dict(self._live.params)

    @property
    def version_dir(self) -> Path:
        return self.path / VERSIONS_DIR / self.version

    @property
    def dirty(self) -> bool:
        """True when there are changes that no version holds yet."""
        return self._dirty or self._live.pending > 0 or self.applied_seq != self.version_seq

    @property
    def mutable(self) -> bool:
        return self._live.mutable_main

    def ids(self) -> list[int]:
        return list(self._live.records)

    def records(self) -> list[ImageRecord]:
        return list(self._live.records.values())

    def get(self, image_id: int) -> ImageRecord:
        try:
            return self._live.records[int(image_id)]
        except (KeyError, ValueError, TypeError):
            raise KeyError(image_id) from None

    def labels(self) -> list[str]:
        return sorted({r.label for r in self._live.records.values() if r.label is not None})

    def vector(self, image_id: int) -> np.ndarray:
        """The stored vector of one image (decoded from its codes for IVF)."""
        self.get(image_id)
        return self._live.vector(image_id)

    def vectors(self, ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids, or for every stored vector."""
        return self._live.vectors(ids)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        min_score: float | None = None,
        label: str | None = None,
        exclude_ids: Iterable[int] | None = None,
        expansion: QueryExpansion | None = None,
    ) -> list[list[Hit]]:
        """Top-k neighbours of each query vector by cosine similarity, best first.

        `label` keeps only images of that class (exactly, see live_index.py); `exclude_ids` never
        returns those ids; `min_score` drops hits below it (so a query may get fewer than k).
        `expansion`: alpha-QE (query_expansion.py); scores are then similarities to the expanded query.
        """
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError("k must be at least 1")
        if len(q) == 0:
            return []
        exclude = np.fromiter((int(i) for i in exclude_ids), dtype=np.int64) if exclude_ids is not None else None
        live = self._live  # one index for both passes, even if a compaction swaps it meanwhile
        if expansion is not None and expansion.top > 0:
            first = live.search(q, expansion.top, label=label, exclude=exclude)
            q = expand(q, first, lambda ids: live.vectors(ids)[1], expansion.alpha)
        return live.search(q, k, min_score=min_score, label=label, exclude=exclude)

    def range_search(self, vectors: np.ndarray, min_score: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, (ids, scores) of every stored vector scoring above min_score (unordered)."""
        q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {q.shape}")
        return self._live.range_search(q, min_score)

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

    # ------------------------------------------------------------ integrity

    def verify(self) -> str | None:
        """Hash the version's data files against the manifest (the service runs this in the background)."""
        problem = verify_files(self.version_dir, self.manifest)
        self.integrity_error, self.verified = problem, True
        if problem:
            log.error("integrity check failed: %s; writes are refused and /readyz fails", problem)
        return problem

    def _check_writable(self) -> None:
        if self.integrity_error:
            raise BundleError(f"the bundle failed its integrity check ({self.integrity_error}); writes are refused")

    # --------------------------------------------------------- online writes

    def commit_add(self, record: ImageRecord, vector: np.ndarray) -> Entry | None:
        """Journal an add, flush it, then make it visible. None when the same image is already there."""
        vec = _check_vectors(np.asarray(vector, dtype=np.float32).reshape(1, -1), 1, self.dim)[0]
        old = self._live.records.get(record.id)
        if old is not None and old.sha256 == record.sha256 and old.label == record.label:
            return None  # re-uploading the same image with the same label changes nothing
        return self._commit(add_entry(record, vec))

    def commit_delete(self, image_id: int) -> Entry:
        """Journal a delete, flush it, then hide the image. KeyError when it is not in the index."""
        rec = self.get(image_id)
        tomb = (rec.path, rec.sha256) if rec.origin == "corpus" else None  # a corpus file stays deleted across builds
        return self._commit(delete_entry(image_id, tomb))

    def _commit(self, entry: Entry) -> Entry:
        if self._journal is None:
            raise BundleError("this bundle was opened for an offline build; it takes no online writes")
        with timed_mutex(self._write_mutex, self.write_lock_timeout, "the index"):
            self._check_writable()
            try:
                others, stamped = self._journal.append(entry)
            except JournalWriteError as exc:
                raise BundleWriteError(str(exc), exc.reason, exc.errno) from exc
            except JournalError as exc:
                raise BundleError(str(exc)) from exc
            except OSError as exc:  # the journal folder cannot be created or opened (read-only, full)
                raise write_error(self.path, "the journal", exc) from exc
            self.apply_locked([*others, stamped])
            return stamped

    def follow(self) -> int:
        """Apply what other processes appended to the journal; returns how many records (never waits)."""
        if self._journal is None or not self._write_mutex.acquire(blocking=False):
            return 0
        try:
            entries = self._journal.poll()
            self.apply_locked(entries)
            return len(entries)
        finally:
            self._write_mutex.release()

    def apply_locked(self, entries: Sequence[Entry]) -> None:
        """Apply journal records in order (the caller holds the write mutex)."""
        for e in entries:
            self._live.apply(e)
            self.applied_seq = e.seq
        if self._capture is not None:
            self._capture.extend(entries)

    @property
    def journal(self) -> Journal | None:
        return self._journal

    @property
    def write_mutex(self) -> threading.Lock:
        """Held by a write while it journals and applies one record (and briefly by compaction)."""
        return self._write_mutex

    def start_capture(self) -> list[Entry]:
        """From now on, keep the records applied (a compaction replays them onto its new index)."""
        self._capture = []
        return self._capture

    def stop_capture(self) -> None:
        self._capture = None

    def install(
        self,
        live: LiveIndex,
        version: str,
        manifest: dict[str, Any],
        model_dir: Path,
        version_seq: int,
        journal: Journal | None = None,
        applied_seq: int | None = None,
    ) -> None:
        """Swap in a new in-memory index and the version it stands on (the caller holds the write mutex)."""
        self._live, self.version, self.manifest, self.model_dir = live, version, manifest, Path(model_dir)
        self.version_seq = version_seq
        if journal is not None:
            self._journal = journal
        if applied_seq is not None:
            self.applied_seq = applied_seq
        self._dirty = False
        self.integrity_error, self.verified = None, True  # a version this process wrote and hashed itself

    # ------------------------------------------------------- offline changes

    def add(
        self,
        items: Sequence[tuple[ImageRecord, np.ndarray]] | Sequence[ImageRecord],
        vectors: np.ndarray | None = None,
    ) -> int:
        """Add records with their vectors: `add([(record, vector), ...])` or `add(records, vectors)`.

        An id already present is replaced. Returns how many were added.
        """
        records: list[ImageRecord]
        if vectors is None:
            # no vectors: items are (record, vector) pairs (the docstring's first form)
            pairs: list[tuple[ImageRecord, np.ndarray]] = list(items)  # type: ignore[arg-type]
            records = [p[0] for p in pairs]
            vecs = (
                np.stack([np.asarray(p[1], dtype=np.float32).reshape(-1) for p in pairs])
                if pairs
                else np.zeros((0, self.dim), np.float32)
            )
        else:
            records = list(items)  # type: ignore[arg-type]  # with vectors: items are records
            vecs = np.asarray(vectors, dtype=np.float32)
        if not records:
            return 0
        vecs = _check_vectors(vecs, len(records), self.dim)
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        if min(ids) < 0:
            raise ValueError("ids must be non-negative")
        self._live.add(records, vecs)
        self._dirty = True
        return len(records)

    def add_upload(
        self, data: bytes, vector: np.ndarray, *, label: str | None = None, size: tuple[int, int] | None = None
    ) -> ImageRecord:
        """Add an uploaded image to an offline bundle (its bytes kept in the bundle); see `upload_record`."""
        rec = self.upload_record(data, label=label, size=size)
        self.add([(rec, vector)])
        return rec

    def upload_record(
        self, data: bytes, *, label: str | None = None, size: tuple[int, int] | None = None
    ) -> ImageRecord:
        """Store an upload's bytes under uploads/ (fsync'd) and return its record (not added yet).

        The id comes from the content, so uploading the same bytes twice finds the same record.
        `size` is (width, height) after EXIF orientation when the caller already decoded the image.
        """
        digest = hashlib.sha256(data).hexdigest()
        image_id = upload_id(digest)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                if size is None:
                    size = img.size
        except Exception as exc:
            raise ValueError(f"upload is not an image: {exc}") from exc
        rel = f"{UPLOADS_DIR}/{image_id}.{UPLOAD_EXT.get(fmt, 'bin')}"
        target = self.path / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                write_atomic(target, data)
        except OSError as exc:
            raise write_error(target.parent, "the uploaded image", exc) from exc
        old = self._live.records.get(image_id)
        mtime = old.mtime if old is not None else time.time()
        return ImageRecord(
            id=image_id,
            path=rel,
            label=label,
            size=len(data),
            mtime=mtime,
            sha256=digest,
            width=int(size[0]),
            height=int(size[1]),
            origin="upload",
        )

    def update_records(self, records: Iterable[ImageRecord]) -> None:
        """Replace metadata of existing ids without touching their vectors (e.g. a new mtime)."""
        self._live.update_records(records)
        self._dirty = True

    def remove(self, ids: Iterable[int], *, tombstone: bool = False) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed. See LiveIndex.remove."""
        try:
            removed = self._live.remove(ids, tombstone=tombstone)
        except RuntimeError as exc:
            raise BundleError(str(exc)) from exc
        if removed:
            self._dirty = True
        return removed

    @property
    def deleted(self) -> dict[str, str]:
        """Tombstones: corpus path -> sha256 of the corpus files deleted through the API."""
        return dict(self._live.deleted)

    def is_deleted(self, rel: str, path: Path) -> bool:
        """True when the corpus file `rel` was deleted through the API and still has the same bytes.

        A tombstoned file whose content changed is a new image: its tombstone is dropped.
        """
        digest = self._live.deleted.get(rel)
        if digest is None:
            return False
        try:
            if file_sha256(Path(path)) == digest:
                return True
        except OSError:
            return True  # unreadable now: leave it out, as before
        del self._live.deleted[rel]
        self._dirty = True
        return False

    def forget_deleted(self, keep: Iterable[str]) -> None:
        """Drop the tombstones of corpus files that are no longer in the corpus (`keep`: paths listed)."""
        listed = set(keep)
        gone = [rel for rel in self._live.deleted if rel not in listed]
        for rel in gone:
            del self._live.deleted[rel]
        if gone:
            self._dirty = True

    def set_corpus_root(self, corpus_root: Path) -> None:
        root = Path(corpus_root).resolve()
        if root != self.corpus_root:
            self.corpus_root = root
            self._dirty = True

    def convert_index(self, choice: faiss_index.IndexChoice) -> None:
        """Move every stored vector into a new index of another type (or other parameters)."""
        ids, vecs = self._live.vectors()
        fresh = faiss_index.new_index(choice, self.dim, vecs)
        faiss_index.add(fresh, vecs, ids)
        self._live = LiveIndex(
            self.dim, fresh, dict(choice.params), self._live.records, self._live.deleted, mutable_main=True
        )
        self._dirty = True

    # ------------------------------------------------------------------ saving

    def save(self, build: dict[str, Any] | None = None, lock_timeout: float = 30.0) -> str:
        """Write the current state as a new version and switch CURRENT to it; returns the version.

        A crash at any point leaves the previous version live and complete. Refuses to overwrite a
        version written by someone else since this bundle was loaded (reload and retry). A live
        bundle compacts instead (compaction.py): the same result, without stopping its writers.
        """
        if not self.mutable:
            from indexer.compaction import compact

            compact(self, reason="save", lock_timeout=lock_timeout)
            return self.version
        try:
            with writer_lock(self.path, timeout=lock_timeout):
                live = self._live
                version, manifest, vdir = publish_version(
                    self.path,
                    self.model_dir,
                    self.card,
                    live.main,
                    live.params,
                    live.records,
                    live.deleted,
                    self.corpus_root,
                    build if build is not None else self.manifest.get("build"),
                    self.applied_seq,
                    expected_current=self.version or None,
                )
                if self._journal is not None:
                    self._journal.trim(self.applied_seq)
        except LockTimeout as exc:
            raise BundleError(str(exc)) from exc
        self.version, self.manifest, self.model_dir = version, manifest, vdir
        self.version_seq, self._dirty = self.applied_seq, False
        return version


# ----------------------------------------------------------------------- opening / creating


def _check_vectors(vecs: np.ndarray, n: int, dim: int) -> np.ndarray:
    if vecs.ndim != 2 or vecs.shape != (n, dim):
        raise ValueError(f"expected {n} vectors of dimension {dim}, got shape {vecs.shape}")
    if not np.all(np.isfinite(vecs)):
        raise ValueError("vectors contain NaN or infinity")
    return np.ascontiguousarray(vecs, dtype=np.float32)


def new_bundle(
    index_dir: Path,
    model_dir: Path,
    index: faiss.Index,
    index_params: dict[str, Any],
    corpus_root: Path | None,
    deleted: dict[str, str] | None = None,
) -> Bundle:
    """An empty, unsaved bundle for a model (save() writes its first version or replaces the live one).

    `deleted`: corpus tombstones to carry over (a rebuild keeps the API's deletes).
    """
    try:
        card = read_card(Path(model_dir))
    except ModelCardError as exc:
        raise BundleError(str(exc)) from exc
    if index.d != card.dim:
        raise BundleError(f"index dimension {index.d} != model dimension {card.dim}")
    root = Path(index_dir)
    journal = Journal(root, card.dim)
    seq = 0
    if bundle_exists(root):
        # replacing a bundle (--rebuild): the new version holds everything journalled so far. Those
        # records are read with the old model's dimension, which a new model may not share.
        version_seq, old_dim = _version_seq(root)
        journal.dim = old_dim or card.dim
        try:
            journal.open(version_seq)
        except JournalError as exc:
            raise BundleError(str(exc)) from exc
        journal.dim = card.dim  # every record so far is in the new version; later ones are the new model's
        seq = journal.last_seq
    live = LiveIndex(card.dim, index, index_params, {}, dict(deleted or {}), mutable_main=True)
    bundle = Bundle(
        root,
        model_dir=Path(model_dir),
        card=card,
        live=live,
        corpus_root=Path(corpus_root).resolve() if corpus_root is not None else None,
        manifest={},
        version=None,
        journal=journal,
        journal_seq=seq,
    )
    bundle.applied_seq = seq
    return bundle


def _version_seq(root: Path) -> tuple[int, int]:
    """(journal position, vector dimension) of the live version, from its manifest alone (0s when unreadable)."""
    try:
        manifest = json.loads((root / VERSIONS_DIR / read_current(root) / MANIFEST_FILE).read_text())
        return int(manifest.get("journal_seq", 0)), int(manifest["model"]["dim"])
    except (OSError, ValueError, TypeError, AttributeError, KeyError, BundleError):
        return 0, 0


def open_bundle(index_dir: Path, *, for_build: bool = False, verify: bool = True, mmap: bool = True) -> Bundle:
    """Load the live version of a bundle and replay its journal.

    `for_build`: a private copy to change and save() (offline builds and tools). `verify`: hash the
    data files now; the service passes False and calls `verify()` in the background after it starts.
    `mmap`: a live bundle maps its main index from the version's file (never with `for_build`).
    """
    root = Path(index_dir)
    data = open_version(root, mmap=mmap and not for_build)
    if verify and (problem := verify_files(data.dir, data.manifest)):
        raise BundleError(problem)
    journal = Journal(root, data.card.dim)
    try:
        entries = journal.open(data.journal_seq)
    except JournalError as exc:
        raise BundleError(str(exc)) from exc
    index, hidden = data.index, data.hidden
    if for_build and hidden:  # a private copy: drop the dead HNSW nodes now (offline, off every request path)
        index, _ = faiss_index.remove(index, np.fromiter(hidden, dtype=np.int64), data.params)
        hidden = set()
    live = LiveIndex(
        data.card.dim, index, data.params, data.records, data.deleted, mutable_main=for_build, hidden=hidden
    )
    for entry in entries:
        live.apply(entry)
    bundle = Bundle(
        root,
        model_dir=data.dir,
        card=data.card,
        live=live,
        corpus_root=data.corpus_root,
        manifest=data.manifest,
        version=data.version,
        journal=journal,
        journal_seq=data.journal_seq,
    )
    bundle.applied_seq = journal.last_seq
    bundle.verified = verify
    if entries:
        log.info(
            "%s: replayed %d journal records after version %s (up to record %d)",
            root,
            len(entries),
            data.version,
            journal.last_seq,
        )
    return bundle


def model_matches(bundle: Bundle, model_dir: Path) -> str | None:
    """None when the model folder holds the bundle's model; otherwise why not."""
    card = read_card(Path(model_dir))
    # the bundle's card may add a whitening to the same ONNX model: compare the model's own output
    if card.output.dim != bundle.card.output.dim:
        return f"the model's dimension is {card.output.dim}, the bundle's model outputs {bundle.card.output.dim}"
    if card.onnx_sha256 != bundle.card.onnx_sha256:
        return (
            f"the model (sha256 {card.onnx_sha256[:12]}) differs from the bundle's "
            f"(sha256 {bundle.card.onnx_sha256[:12]})"
        )
    return None


__all__ = [
    "CURRENT_FILE",
    "INDEX_FILE",
    "META_FILE",
    "VERSIONS_DIR",
    "Bundle",
    "BundleConflict",
    "BundleError",
    "BundleWriteError",
    "BusyError",
    "Hit",
    "ImageRecord",
    "bundle_exists",
    "model_matches",
    "new_bundle",
    "open_bundle",
]
