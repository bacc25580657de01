"""Dynamic micro-batching of single-image searches: one inference batch and one FAISS call for many.

Concurrent `POST /search` requests each decode their own upload (in the service's thread pool,
in parallel), then hand the prepared pixels to a `MicroBatcher` and wait on a future. A worker
thread takes the first waiting search, gathers more for at most `wait_s` (or until `max_batch`),
embeds them all with ONE `embedder.embed` call and searches them with one FAISS call per group of
searches that ask the same question (below), then resolves each future.

Exactness: a batched search returns exactly what the same search returns alone (ids, scores
bit for bit, order, ties included).

- The embedding: onnxruntime computes each image of a batch independently; tests check that a
  batch gives bit-identical vectors to one-by-one calls for the models we ship.
- FAISS: searches are grouped by (label filter, excluded ids, k), so every query of one FAISS call
  runs with the same selector, k and (for HNSW) efSearch as it would alone. Mixing k's in one call
  would not be exact: FAISS's result heap drops a candidate equal to its current k-th score, so a
  larger k can order exact ties differently. `min_score` is a filter applied after the search,
  exactly as `Bundle.search` applies it, so it does not split groups.
- HNSW (what `auto` picks from 50k to 2M vectors) scores each query of a batch with the same
  code as a query alone, so a group is one FAISS call. Flat and IVF start with an exhaustive scan
  whose single-query kernel differs from FAISS's multi-query kernel in the last bit (about 6e-8 on
  a score; for IVF it can change which lists are probed at an exact tie), so there each query of
  the group gets its own call; the embedding is still batched.

Snapshots: each search carries the engine snapshot it started with, and a batch is split by
snapshot, so a reload in the middle never makes a search run against a bundle it did not start on.

When it pays: on a GPU, where a batch of N images costs little more than one. On a CPU it does
not: EfficientNet-Lite0 costs ~8 ms of CPU per image alone and 10-11 ms per image in batches of
8-32 (the batch's activations leave the cache), HNSW saves only ~0.2 ms per query in a batch, and
one batch at a time leaves cores idle that concurrent single inferences would fill. So the
`batching` setting defaults to `auto`: on when onnxruntime runs on CUDA, off on a CPU
(figures: bench/http_search.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from indexer.bundle import Bundle, Hit
from indexer.query_expansion import QueryExpansion

log = logging.getLogger("service.batching")
R = TypeVar("R")

# Index types whose multi-query FAISS search scores each query exactly as a single-query search.
BATCH_EXACT_INDEX_TYPES = frozenset({"hnsw"})


@dataclass(eq=False)
class SearchJob:
    """One single-image search waiting for a batch: prepared pixels and the question asked."""

    snapshot: Any  # the engine snapshot (service.engine.Loaded) the request took when it started
    pixels: np.ndarray  # uint8 (H, W, 3), prepared for the snapshot's model
    k: int
    min_score: float | None = None
    label: str | None = None
    exclude: tuple[int, ...] | None = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class QueueFull(RuntimeError):
    """The micro-batch queue is at its bound: the client is told to retry (429)."""


class Announcement:
    """A request on its way to the batcher (still decoding); see `MicroBatcher.announce`."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class BatcherClosed(RuntimeError):
    """The batcher was closed (the service is shutting down)."""


@dataclass
class BatchStats:
    batches: int = 0
    searches: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it


class MicroBatcher(Generic[R]):
    """Gathers `SearchJob`s into batches and runs `run(snapshot, jobs) -> results` on a worker thread.

    `run` gets the jobs of one snapshot and returns one result per job, in order; an exception
    from it fails every job of that call. `wait_s` is the longest a worker holds a batch open for
    more jobs, and it only waits while another request has announced itself (is decoding): with
    nothing on the way, a lone search starts at once: at concurrency 1 batching adds no waiting,
    only the hand-off to the worker thread.
    """

    def __init__(
        self,
        run: Callable[[Any, list[SearchJob]], Sequence[R]],
        *,
        max_batch: int = 32,
        wait_s: float = 0.003,
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        max_queue: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_queue = max_queue  # None: unbounded
        self.wait_s = max(0.0, wait_s)
        self._workers_wanted = workers
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: deque[SearchJob] = deque()
        self._incoming = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.stats = BatchStats()

    # ------------------------------------------------------------------ callers

    @contextmanager
    def announce(self) -> Iterator[Announcement]:
        """Say that a search is on its way (decoding): a worker may hold its batch open for it.

        Pass the announcement to `submit`; leaving the block without submitting withdraws it.
        """
        ticket = Announcement()
        with self._cond:
            self._incoming += 1
        try:
            yield ticket
        finally:
            if not ticket.done:
                with self._cond:
                    ticket.done = True
                    self._incoming -= 1
                    self._cond.notify_all()

    def submit(self, job: SearchJob, announcement: Announcement | None = None) -> Future:
        """Queue a job; its future gets the job's result (or the exception of its batch)."""
        with self._cond:
            if announcement is not None and not announcement.done:
                announcement.done = True
                self._incoming -= 1
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} searches are already waiting for a batch; retry shortly")
            self._start_locked()
            job.queued_at = time.perf_counter()
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; the workers finish what is queued, then exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------ workers

    def _start_locked(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]  # a worker killed by a BaseException
        while len(self._threads) < self._workers_wanted:
            t = threading.Thread(target=self._work, name=f"search-batcher-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def _next_batch(self) -> list[SearchJob] | None:
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                deadline = time.monotonic() + self.wait_s
                # Hold the batch open only while more searches are on their way (decoding now).
                while len(self._queue) < self.max_batch and self._incoming > 0 and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._queue:  # another worker may have taken everything while this one waited
                    return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            self._record(len(batch))
            # One batch may hold searches that started on different snapshots (a reload between
            # them): each runs on its own.
            by_snapshot: dict[int, list[SearchJob]] = {}
            for job in batch:
                by_snapshot.setdefault(id(job.snapshot), []).append(job)
            for jobs in by_snapshot.values():
                self._run_jobs(jobs)
            if self._on_batch is not None:
                try:
                    self._on_batch(len(batch), started - min(j.queued_at for j in batch))
                except Exception:  # metrics never break searching
                    log.exception("batch metrics callback failed")

    def _run_jobs(self, jobs: list[SearchJob]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._run(live[0].snapshot, live)
            if len(results) != len(live):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(live)} searches")
        except BaseException as exc:
            for job in live:
                job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for job, result in zip(live, results):
            job.future.set_result(result)

    def _record(self, size: int) -> None:
        with self._cond:
            s = self.stats
            s.batches += 1
            s.searches += size
            s.largest = max(s.largest, size)
            s.sizes[size] = s.sizes.get(size, 0) + 1


# --------------------------------------------------------------------------- the search itself


def search_jobs(
    bundle: Bundle, vectors: np.ndarray, jobs: Sequence[SearchJob], expansion: QueryExpansion | None = None
) -> list[list[Hit]]:
    """Search the bundle for each job's vector: exactly what `bundle.search` gives each one alone.

    Jobs asking the same question (label, excluded ids, k) share one FAISS call when the index
    type scores a batch exactly like single queries (HNSW); otherwise they are searched one by one.
    `min_score` is applied per job afterwards, as `Bundle.search` applies it.
    """
    if len(vectors) != len(jobs):
        raise ValueError(f"{len(vectors)} vectors for {len(jobs)} searches")
    out: list[list[Hit]] = [[] for _ in jobs]
    groups: dict[tuple[str | None, tuple[int, ...] | None, int], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.label, job.exclude, job.k), []).append(i)
    together = bundle.index_type in BATCH_EXACT_INDEX_TYPES
    for (label, exclude, k), rows in groups.items():
        chunks = [rows] if together else [[r] for r in rows]
        for chunk in chunks:
            found = bundle.search(
                vectors[chunk] if len(chunk) > 1 else vectors[chunk[0]][None, :],
                k,
                label=label,
                exclude_ids=exclude,
                expansion=expansion,
            )
            for r, hits in zip(chunk, found):
                ms = jobs[r].min_score
                out[r] = hits if ms is None else [h for h in hits if h.score >= ms]
    return out


def batch_sizes(stats: BatchStats) -> list[tuple[int, int]]:
    """(size, batches) pairs, smallest size first (for logs and tests)."""
    return sorted(stats.sizes.items())


__all__ = [
    "BATCH_EXACT_INDEX_TYPES",
    "Announcement",
    "BatchStats",
    "BatcherClosed",
    "MicroBatcher",
    "SearchJob",
    "batch_sizes",
    "search_jobs",
]
