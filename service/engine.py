"""The loaded state of the service: an index bundle and the embedder of its model. No HTTP here.

`Engine` holds one `Loaded` snapshot (bundle + embedder). A request takes the snapshot once and
uses it to the end. Adds and deletes go to the bundle's journal and live index (indexer/bundle.py):
a write flushes one journal record and costs the same whatever the size of the index; searches
never wait for it. Compaction folds the journal into a new version in a background thread, and a
version another process published is swapped in the same way (compaction.rebase). Every method
is blocking: the HTTP layer calls them from its bounded thread pools.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from PIL import Image, ImageOps

from indexer import labels
from indexer.bundle import CURRENT_FILE, VERSIONS_DIR, Bundle, BundleError, Hit, open_bundle
from indexer.compaction import CompactionReport, compact, rebase
from indexer.embedder import Embedder
from indexer.images import SUPPORTED_FORMATS, ImageDecodeError, ImageTooLargeError, decode_for_model, to_rgb
from indexer.labels import LabelVote
from indexer.metadata import ImageRecord, label_counts
from indexer.model_card import read_card
from indexer.query_expansion import QueryExpansion
from service.batching import Announcement, MicroBatcher, SearchJob, search_jobs
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("service.engine")

THUMBNAIL_CACHE = 512
COMPACT_RETRY_S = 30  # after a background compaction could not run (a build holds the lock, a full disk)


class ImageInputError(Exception):
    """One of the uploaded images cannot be used; `cause` is ImageDecodeError or ImageTooLargeError."""

    def __init__(self, position: int, filename: str | None, cause: Exception, total: int = 1) -> None:
        super().__init__(f"file {position + 1} ({filename or 'unnamed'}): {cause}")
        self.position, self.filename, self.cause, self.total = position, filename, cause, total

    @property
    def what(self) -> str:
        """How the HTTP answer names the file: `file (x.jpg)`, or `file 3 (x.jpg)` in a batch."""
        what = "file" if self.total == 1 else f"file {self.position + 1}"
        return what + (f" ({self.filename})" if self.filename else "")


class ImageFileError(Exception):
    """An indexed image's file cannot be served (gone from disk, or outside its root)."""


@dataclass(frozen=True)
class Loaded:
    """One consistent pair: a bundle and the embedder of the model that made its vectors."""

    bundle: Bundle
    embedder: Embedder
    loaded_at: float = field(default_factory=time.time)

    @property
    def model_id(self) -> str:
        return model_id(self.bundle)

    @property
    def version(self) -> str:
        return self.bundle.version


@dataclass
class QueryResult:
    hits: list[Hit]
    predicted_label: str | None  # the vote's label, None below the label threshold (indexer/labels.py)
    label_vote: LabelVote | None = None


@dataclass
class SearchOutcome:
    queries: list[QueryResult]
    model: str


@dataclass
class AddOutcome:
    record: ImageRecord
    replaced: bool  # the id was already in the index
    count: int
    version: str
    changed: bool  # False: the same image with the same label was already there, nothing written
    seq: int  # the journal record that holds it
    write_s: float = 0.0  # storing the upload, journalling and applying: the add without its embedding


@dataclass
class DeleteOutcome:
    count: int
    version: str
    seq: int
    write_s: float = 0.0


@dataclass
class ReloadOutcome:
    version: str
    previous_version: str
    count: int
    model: str
    model_changed: bool
    seconds: float


def lower_thread_priority(increment: int) -> None:
    """Raise this thread's nice value by `increment` (Linux: threads have their own); best effort."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as exc:
        log.warning("could not lower the priority of the write threads: %s", exc)


def model_id(bundle: Bundle) -> str:
    return f"{bundle.card.backbone}@{bundle.card.onnx_sha256[:12]}"


def load(settings: Settings) -> Loaded:
    """Open the bundle and its model. Raises BundleError or EmbedderError with a one-line reason.

    Content hashes are not checked here: `Engine.verify` does it in the background once serving.
    """
    bundle = open_bundle(settings.index, verify=False)
    embedder = Embedder(
        bundle.model_dir, device=settings.device, threads=settings.threads, spinning=settings.ort_spinning
    )
    _check_pair(bundle, embedder)
    return Loaded(bundle, embedder)


def _check_pair(bundle: Bundle, embedder: Embedder) -> None:
    if embedder.card.onnx_sha256 != bundle.card.onnx_sha256 or embedder.dim != bundle.dim:
        raise BundleError(f"{bundle.path}: the model loaded does not match the bundle's vectors")


def make_thumbnail(path: Path, size: int, max_pixels: int | None) -> bytes:
    """A JPEG no larger than size x size (aspect kept), decoding JPEGs at reduced scale."""
    try:
        with Image.open(path, formats=SUPPORTED_FORMATS) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"{width}x{height} pixels, over the limit of {max_pixels}")
            img.draft("RGB", (size, size))
            if getattr(img, "is_animated", False):  # never n_frames: it walks every frame
                img.seek(0)
            img.load()
            out = to_rgb(ImageOps.exif_transpose(img))
            out.thumbnail((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except (ImageTooLargeError, ImageDecodeError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except FileNotFoundError as exc:
        raise ImageFileError("the image file is no longer on disk") from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot make a thumbnail: {exc}") from exc


class Engine:
    """The service's state and operations; thread-safe."""

    def __init__(self, settings: Settings, loaded: Loaded, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.expansion = QueryExpansion(settings.query_expansion, settings.query_expansion_alpha)
        self.metrics = metrics or Metrics()
        self._loaded = loaded
        self._compact_lock = threading.Lock()  # one compaction or reload at a time
        self._compacting = threading.Event()  # this process's own compaction is running
        self._compactor_guard = threading.Lock()
        self._compactor: threading.Thread | None = None
        self._compact_retry_at = 0.0
        # Writes (their embedding above all) run in threads of their own at a lower CPU priority,
        # so that on a few cores a stream of adds slows searches as little as it can.
        self.write_pool = ThreadPoolExecutor(
            max_workers=settings.write_pool_size,
            thread_name_prefix="write",
            initializer=lower_thread_priority,
            initargs=(settings.write_nice,),
        )
        loaded.bundle.write_lock_timeout = settings.write_lock_timeout
        self._thumbs: OrderedDict[tuple[int, str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.started_at = time.time()
        self.batcher: MicroBatcher[QueryResult] | None = None
        if settings.batching == "on" or (settings.batching == "auto" and loaded.embedder.device == "cuda"):
            self.batcher = MicroBatcher(
                self._run_batch,
                max_batch=settings.max_batch,
                wait_s=settings.batch_wait_ms / 1000,
                workers=settings.batch_workers,
                on_batch=self._observe_batch,
                max_queue=settings.max_batch_queue,
            )
        log.info(
            "micro-batching of POST /search: %s (batching=%s, onnxruntime on %s)",
            "on" if self.batcher is not None else "off",
            settings.batching,
            loaded.embedder.device,
        )

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics | None = None) -> Engine:
        return cls(settings, load(settings), metrics)

    # ------------------------------------------------------------------ reading

    @property
    def loaded(self) -> Loaded:
        """The current snapshot; hold on to it for the whole of one request."""
        return self._loaded

    def _embed(
        self, snap: Loaded, files: Sequence[bytes], names: Sequence[str | None]
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Vectors of the uploads, and each image's full (width, height)."""
        t0 = time.perf_counter()
        sizes, prepared = [], []
        for i, data in enumerate(files):
            size, pixels = self._decode(snap, data, i, names[i] if i < len(names) else None, len(files))
            sizes.append(size)
            prepared.append(pixels)
        t1 = time.perf_counter()
        vectors = snap.embedder.embed(np.stack(prepared))
        t2 = time.perf_counter()
        self.metrics.decode.observe(t1 - t0)
        self.metrics.embed.observe(t2 - t1)
        self.metrics.images_embedded.inc(amount=len(files))
        return vectors, sizes

    def _decode(
        self, snap: Loaded, data: bytes, position: int, name: str | None, total: int
    ) -> tuple[tuple[int, int], np.ndarray]:
        """Prepare one upload for the snapshot's model exactly as the indexer prepares the corpus:
        (the image's full width and height, the model's pixels); ImageInputError when unusable."""
        try:
            pixels, full_size = decode_for_model(data, snap.embedder.card, self.settings.max_pixels)
        except (ImageDecodeError, ImageTooLargeError) as exc:
            raise ImageInputError(position, name, exc, total) from exc
        return full_size, pixels

    def _search(
        self,
        snap: Loaded,
        vectors: np.ndarray,
        k: int,
        min_score: float | None,
        label: str | None,
        exclude: Sequence[int] | None = None,
    ) -> list[QueryResult]:
        faiss.omp_set_num_threads(self.settings.faiss_threads)  # per thread: this pool thread's FAISS calls
        t0 = time.perf_counter()
        rows = snap.bundle.search(
            vectors, k, min_score=min_score, label=label, exclude_ids=exclude, expansion=self.expansion
        )
        self.metrics.search.observe(time.perf_counter() - t0)
        return [self._result(snap, hits) for hits in rows]

    def _result(self, snap: Loaded, hits: list[Hit]) -> QueryResult:
        """The hits with their label vote, the label left out below the threshold."""
        result = labels.vote(hits)
        threshold = self.settings.label_min_score
        if threshold is None:
            threshold = snap.bundle.label_min_score
        return QueryResult(hits, labels.predict(result, threshold), result)

    def search_images(
        self,
        files: Sequence[bytes],
        k: int,
        min_score: float | None = None,
        label: str | None = None,
        names: Sequence[str | None] = (),
    ) -> SearchOutcome:
        """Decode, embed and search uploaded images (one result list per image)."""
        snap = self._loaded
        vectors, _ = self._embed(snap, files, names)
        return SearchOutcome(self._search(snap, vectors, k, min_score, label), snap.model_id)

    # --------------------------------------------------------- micro-batched search

    def prepare_query(self, data: bytes, name: str | None = None) -> tuple[Loaded, np.ndarray]:
        """Decode one query upload for a batched search: (the snapshot it belongs to, its pixels)."""
        snap = self._loaded
        t0 = time.perf_counter()
        _, pixels = self._decode(snap, data, 0, name, 1)
        self.metrics.decode.observe(time.perf_counter() - t0)
        return snap, pixels

    def submit_search(
        self,
        snap: Loaded,
        pixels: np.ndarray,
        k: int,
        min_score: float | None = None,
        label: str | None = None,
        announcement: Announcement | None = None,
    ) -> Future:
        """Queue a prepared query for the next micro-batch; the future gets its QueryResult.

        The same answer as `search_images([data], ...)` gives, bit for bit (service/batching.py).
        """
        if self.batcher is None:
            raise RuntimeError("batching is off (settings.batching)")
        return self.batcher.submit(SearchJob(snap, pixels, k, min_score, label), announcement)

    def _run_batch(self, snap: Loaded, jobs: list[SearchJob]) -> list[QueryResult]:
        """One micro-batch of one snapshot: one embedding call, then the grouped FAISS searches."""
        t0 = time.perf_counter()
        vectors = snap.embedder.embed(np.stack([job.pixels for job in jobs]))
        t1 = time.perf_counter()
        faiss.omp_set_num_threads(self.settings.faiss_threads)
        rows = search_jobs(snap.bundle, vectors, jobs, self.expansion)
        self.metrics.embed.observe(t1 - t0)
        self.metrics.search.observe(time.perf_counter() - t1)
        self.metrics.images_embedded.inc(amount=len(jobs))
        return [self._result(snap, hits) for hits in rows]

    def _observe_batch(self, size: int, waited: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_wait.observe(waited)

    def close(self) -> None:
        """Stop the micro-batcher (searches already queued are answered first) and the write pool."""
        if self.batcher is not None:
            self.batcher.close()
        self.write_pool.shutdown(wait=True)

    def similar(self, image_id: int, k: int, min_score: float | None = None, label: str | None = None) -> SearchOutcome:
        """Neighbours of an image already in the index, itself excluded. KeyError when unknown."""
        snap = self._loaded
        vector = snap.bundle.vector(image_id)
        return SearchOutcome(
            self._search(snap, vector[None, :], k, min_score, label, exclude=[image_id]), snap.model_id
        )

    def record(self, image_id: int) -> ImageRecord:
        return self._loaded.bundle.get(image_id)

    def image_path(self, image_id: int) -> Path:
        """The file of an indexed image (KeyError for unknown ids, ImageFileError when not servable)."""
        bundle = self._loaded.bundle
        try:
            path = bundle.absolute_path(image_id)
        except BundleError as exc:
            log.warning("image %s: refusing to serve its file: %s", image_id, exc)
            raise ImageFileError("the image file is not available") from exc
        if not path.is_file():
            raise ImageFileError("the image file is no longer on disk")
        return path

    def thumbnail(self, image_id: int, size: int) -> bytes:
        rec = self.record(image_id)
        key = (image_id, rec.sha256, size)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = make_thumbnail(self.image_path(image_id), size, self.settings.max_pixels)
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return data

    # ----------------------------------------------------------------- changing

    def add_image(self, data: bytes, label: str | None = None, filename: str | None = None) -> AddOutcome:
        """Embed an uploaded image and journal it (flushed to disk) before returning.

        The same bytes with the same label again change nothing (`created` and `changed` False).
        """
        self._sync_with_disk()
        snap = self._loaded
        vectors, sizes = self._embed(snap, [data], [filename])
        bundle = snap.bundle
        t0 = time.perf_counter()
        rec = bundle.upload_record(data, label=label, size=sizes[0])
        existed = rec.id in bundle
        entry = bundle.commit_add(rec, vectors[0])
        write_s = time.perf_counter() - t0
        if entry is not None:
            self.metrics.writes.inc("add")
        self._maybe_compact()
        return AddOutcome(
            bundle.get(rec.id),
            existed,
            len(bundle),
            bundle.version,
            entry is not None,
            entry.seq if entry is not None else bundle.applied_seq,
            write_s,
        )

    def delete_image(self, image_id: int) -> DeleteOutcome:
        """Journal the removal of an image (flushed to disk) before returning; KeyError when unknown."""
        self._sync_with_disk()
        bundle = self._loaded.bundle
        t0 = time.perf_counter()
        entry = bundle.commit_delete(image_id)
        write_s = time.perf_counter() - t0
        self.metrics.writes.inc("delete")
        self._maybe_compact()
        return DeleteOutcome(len(bundle), bundle.version, entry.seq, write_s)

    # -------------------------------------------------------------- compaction

    def compact(self, reason: str = "manual") -> CompactionReport:
        """Fold the journal's changes into a new version now (searches and writes go on meanwhile)."""
        with self._compact_lock:
            self._compacting.set()
            try:
                report = compact(
                    self._loaded.bundle,
                    reason=reason,
                    lock_timeout=self.settings.compact_lock_timeout,
                    rebuild_share=self.settings.compact_tombstone_share,
                )
            except Exception:
                self.metrics.compactions.inc("error")
                raise
            finally:
                self._compacting.clear()
            self.metrics.compactions.inc("ok")
            with self._thumbs_lock:
                self._thumbs.clear()
            return report

    def compaction_due(self) -> str | None:
        """Why a compaction should run now, or None."""
        live = self._loaded.bundle.live
        if len(live.delta_ids) >= self.settings.compact_delta:
            return f"delta of {len(live.delta_ids)} vectors"
        if live.pending and live.hidden_share() >= self.settings.compact_tombstone_share:
            return f"{live.hidden_share():.0%} of the main index deleted or replaced"
        return None

    def _maybe_compact(self) -> None:
        """Start a background compaction when the delta or the tombstones have grown past their limits."""
        reason = self.compaction_due()
        if reason is None or self._compact_lock.locked() or time.monotonic() < self._compact_retry_at:
            return
        with self._compactor_guard:
            if self._compactor is not None and self._compactor.is_alive():
                return
            self._compactor = threading.Thread(
                target=self._compact_quietly, args=(reason,), name="compaction", daemon=True
            )
            self._compactor.start()

    def _compact_quietly(self, reason: str) -> None:
        try:
            self.compact(reason)
        except BundleError as exc:
            self._compact_retry_at = time.monotonic() + COMPACT_RETRY_S
            log.warning("background compaction (%s) did not run: %s; next try in %d s", reason, exc, COMPACT_RETRY_S)
        except Exception:
            self._compact_retry_at = time.monotonic() + COMPACT_RETRY_S
            log.exception("background compaction (%s) failed; the journal still holds every write", reason)

    # ---------------------------------------------------------------- reloading

    def reload(self) -> ReloadOutcome:
        """Load the newest saved version and swap it in; requests in flight keep the old one."""
        try:
            out = self._reload()
        except Exception:
            self.metrics.reloads.inc("error")
            raise
        self.metrics.reloads.inc("ok")
        return out

    def refresh_if_changed(self) -> ReloadOutcome | None:
        """Follow other processes: apply their journal records, and rebase on a version they published."""
        bundle = self._loaded.bundle
        bundle.follow()
        if self._disk_version() in ("", bundle.version) or self._compact_lock.locked():
            return None
        out = self._reload()
        self.metrics.reloads.inc("watch")
        log.info("picked up bundle version %s (was %s)", out.version, out.previous_version)
        return out

    def _sync_with_disk(self) -> None:
        """Before a write: swap in a version another process published (a build), so the write's answer
        counts it. Never while this process compacts (its own new version is swapped in by then)."""
        if self._disk_version() not in ("", self._loaded.bundle.version) and not self._compacting.is_set():
            self._reload()  # waits for a reload in progress (the watcher's) and tries again: never skips it

    def _reload(self) -> ReloadOutcome:
        t0 = time.perf_counter()
        with self._compact_lock:  # never in the middle of this process's own compaction
            old = self._loaded
            previous = old.bundle.version
            if self._disk_version() == previous:
                return ReloadOutcome(
                    previous, previous, len(old.bundle), model_id(old.bundle), False, time.perf_counter() - t0
                )
            data_card = read_card(Path(self.settings.index) / VERSIONS_DIR / self._disk_version())
            if data_card.onnx_sha256 == old.bundle.card.onnx_sha256:
                rebase(old.bundle)  # same model: swap the index inside the same bundle
                loaded = old
            else:
                bundle = open_bundle(self.settings.index)
                embedder = Embedder(
                    bundle.model_dir,
                    device=self.settings.device,
                    threads=self.settings.threads,
                    spinning=self.settings.ort_spinning,
                )
                _check_pair(bundle, embedder)
                loaded = Loaded(bundle, embedder)
                self._loaded = loaded
        with self._thumbs_lock:
            self._thumbs.clear()
        bundle = loaded.bundle
        return ReloadOutcome(
            bundle.version, previous, len(bundle), model_id(bundle), loaded is not old, time.perf_counter() - t0
        )

    def verify(self) -> str | None:
        """Hash the served version's files (run in the background after start); the problem, or None."""
        problem = self._loaded.bundle.verify()
        self.metrics.integrity.set(0.0 if problem else 1.0)
        return problem

    def _disk_version(self) -> str:
        try:
            return (Path(self.settings.index) / CURRENT_FILE).read_text().strip()
        except OSError:
            return ""

    # -------------------------------------------------------------------- stats

    def stats(self) -> dict[str, object]:
        snap = self._loaded
        bundle, card = snap.bundle, snap.bundle.card
        labels, uploads = label_counts(bundle.records())
        return {
            "count": len(bundle),
            "dimension": bundle.dim,
            "index_type": bundle.index_type,
            "index_params": bundle.index_params,
            "model": {
                "id": snap.model_id,
                "backbone": card.backbone,
                "source": card.source,
                "dim": card.dim,
                "sha256": card.onnx_sha256,
                "input_size": [card.input.width, card.input.height],
                "class_names": len(card.class_names) if card.class_names else None,
                "device": snap.embedder.device,
            },
            "bundle_version": bundle.version,
            "bundle_created_at": bundle.manifest.get("created_at"),
            "labels": labels,
            "uploads": uploads,
            "uptime_s": round(time.time() - self.started_at, 3),
            "journal": {
                "applied_seq": bundle.applied_seq,
                "version_seq": bundle.version_seq,
                "delta_vectors": len(bundle.live.delta_ids),
                "tombstones": len(bundle.live.hidden),
            },
        }
