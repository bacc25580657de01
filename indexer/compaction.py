"""Compaction: fold a live bundle's delta and tombstones into its next version, off the request path.

0. Take the bundle's writer lock (no other process publishes meanwhile; a build holding it makes
   the compaction give up at once instead of folding for nothing).
1. Under the write mutex (a few milliseconds): start a new journal segment, take what the fold
   needs (the main index, which is never changed, a copy of the small delta and of the hidden
   ids, the records) and start keeping the records written from then on.
2. Without any lock that a search or a write takes: build the new main index and publish it as
   a version whose manifest says which journal record it holds (`journal_seq`).
3. Replay the records written meanwhile onto a new in-memory index, then, under the write mutex,
   replay the last few and swap it in: one pointer change.
4. Only then delete the journal segments the version holds, and prune old versions.

A crash at any step leaves a version and a journal that together hold every acknowledged write:
before the publish, the old version and the whole journal; after it, the new version and the
records after its journal_seq (the older segments are skipped, then trimmed by the next run).

`rebase` is the same swap for a version another process published (a build, another worker's
compaction): open it, replay the journal after it, swap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from indexer import faiss_index
from indexer.bundle import Bundle
from indexer.journal import Entry, Journal, JournalError
from indexer.live_index import HNSW_REBUILD_SHARE, LiveIndex, fold
from indexer.locks import LockTimeout, timed_mutex, writer_lock
from indexer.versions import INDEX_FILE, BundleError, open_version, prune, publish_version, verify_files

log = logging.getLogger("indexer.compaction")

CATCH_UP_UNDER_LOCK = 32  # replay outside the mutex until at most this many records are left
SNAPSHOT_LOCK_TIMEOUT = 30.0


@dataclass
class CompactionReport:
    version: str
    previous_version: str
    journal_seq: int
    images: int
    folded: int  # delta vectors and hidden ids folded into the new main index
    replayed: int  # records written during the compaction, replayed onto the new index
    seconds: float
    reason: str


def compact(
    bundle: Bundle, *, reason: str = "manual", lock_timeout: float = 0.0, rebuild_share: float = HNSW_REBUILD_SHARE
) -> CompactionReport:
    """Fold the bundle's pending changes into a new version. Raises BundleError (LockTimeout: busy)."""
    t0 = time.perf_counter()
    journal = bundle.journal
    if journal is None:
        raise BundleError("compaction needs a live bundle")
    try:
        # The writer lock first, so that no fold is wasted while another process (a build) publishes.
        with writer_lock(bundle.path, timeout=lock_timeout):
            with timed_mutex(bundle.write_mutex, SNAPSHOT_LOCK_TIMEOUT, "the index"):
                try:
                    others, seq = journal.rotate()
                except (JournalError, OSError) as exc:
                    raise BundleError(f"cannot start a journal segment: {exc}") from exc
                bundle.apply_locked(others)
                live = bundle.live
                inputs = live.fold_inputs(rebuild_share)
                records, deleted = dict(live.records), dict(live.deleted)
                base_version, corpus_root = bundle.version, bundle.corpus_root
                capture = bundle.start_capture()
            try:
                main, kept = fold(inputs)
                version, manifest, vdir = publish_version(
                    bundle.path,
                    bundle.model_dir,
                    bundle.card,
                    main,
                    inputs.params,
                    records,
                    deleted,
                    corpus_root,
                    bundle.manifest.get("build"),
                    seq,
                    expected_current=base_version or None,
                    hidden=kept.tolist(),
                )
                # serve the published file mapped, as a restart would: the folded copy's memory is freed
                mapped = faiss_index.configure(faiss_index.read(str(vdir / INDEX_FILE), mmap=True), inputs.params)
                fresh = LiveIndex(bundle.dim, mapped, inputs.params, records, deleted, hidden=kept.tolist())
                del main
                done = _replay(fresh, capture, 0)
                with bundle.write_mutex:  # the swap: the last few records, then one pointer change
                    _replay(fresh, capture, done, until_end=True)
                    bundle.install(fresh, version, manifest, vdir, seq)
                    replayed = len(capture)
                    uploads = {r.path for r in records.values() if r.origin == "upload"}
                    uploads.update(
                        e.record.path for e in capture if e.record is not None and e.record.origin == "upload"
                    )
                    bundle.stop_capture()
            except BaseException:
                bundle.stop_capture()
                raise
    except LockTimeout as exc:
        raise BundleError(str(exc)) from exc
    try:
        journal.trim(seq)
        with writer_lock(bundle.path, timeout=lock_timeout):
            prune(bundle.path, live_uploads=uploads)
    except (OSError, LockTimeout, JournalError) as exc:
        log.warning(
            "compaction to %s: could not trim the journal or prune old versions (%s); the next one will", version, exc
        )
    report = CompactionReport(
        version,
        base_version,
        seq,
        len(records),
        len(inputs.delta_ids) + len(inputs.hidden) - len(kept),
        replayed,
        time.perf_counter() - t0,
        reason,
    )
    log.info(
        "compacted %s -> %s (%s): %d images, folded %d changes, replayed %d written meanwhile, %.2f s",
        base_version,
        version,
        reason,
        report.images,
        report.folded,
        replayed,
        report.seconds,
    )
    return report


def _replay(live: LiveIndex, entries: list[Entry], start: int, until_end: bool = False) -> int:
    """Apply entries[start:] (the list may grow meanwhile); returns how many are applied in all."""
    done = start
    while done < len(entries) and (until_end or len(entries) - done > CATCH_UP_UNDER_LOCK):
        live.apply(entries[done])
        done += 1
    return done


def rebase(bundle: Bundle, *, verify: bool = True) -> str:
    """Swap in the version CURRENT names now (published by another process), with the journal after it."""
    data = open_version(bundle.path, mmap=not bundle.mutable)
    if verify and (problem := verify_files(data.dir, data.manifest)):
        raise BundleError(problem)
    if data.card.onnx_sha256 != bundle.card.onnx_sha256:
        raise BundleError(f"{data.dir}: the new version was made by another model; restart the service to serve it")
    journal = Journal(bundle.path, bundle.dim)
    try:
        entries = journal.open(data.journal_seq)
    except JournalError as exc:
        raise BundleError(str(exc)) from exc
    fresh = LiveIndex(bundle.dim, data.index, data.params, data.records, data.deleted, hidden=data.hidden)
    for entry in entries:
        fresh.apply(entry)
    with bundle.write_mutex:
        try:
            later = journal.poll()
        except JournalError as exc:
            raise BundleError(str(exc)) from exc
        for entry in later:
            fresh.apply(entry)
        bundle.corpus_root = data.corpus_root
        bundle.install(
            fresh,
            data.version,
            data.manifest,
            data.dir,
            data.journal_seq,
            journal=journal,
            applied_seq=journal.last_seq,
        )
    return data.version
