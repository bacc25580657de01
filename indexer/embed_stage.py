"""The decode-and-embed stage of a build: the one part an engine (local threads, Ray) replaces.

The task list goes in (a file to read each), chunks come out in task order: each chunk is the
results of some tasks (pixels dropped) and the vectors of those among them that were embedded
(no error, not unchanged), in the same order. The caller closes the chunk iterator when it is
done (or fails), which lets an engine release what it holds.

`StageOptions` lets a caller choose how the local engine decodes and runs (the benchmark's
ablation uses it): the decode function, the pipeline that overlaps decoding with inference, and
onnxruntime's threads.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from indexer.embedder import Device, Embedder
from indexer.images import ImageDecodeError, ImageTooLargeError, decode_for_model
from indexer.metadata import ImageRecord, Origin
from indexer.model_card import ModelCard

T = TypeVar("T")
R = TypeVar("R")


class BuildError(Exception):
    """The build cannot proceed (wrong model for the bundle, missing folder, ...)."""


# (bytes, card, max_pixels) -> (the model's pixels, the photo's full (width, height))
Decode = Callable[[bytes, ModelCard, "int | None"], tuple[np.ndarray, tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class Task:
    """One file to read: a new or changed corpus file, or an upload to re-embed after --rebuild."""

    path: Path
    rel: str
    id: int
    label: str | None
    origin: Origin
    old: ImageRecord | None  # the record it replaces, if any
    same_size: bool  # when the size matches, the content hash may show it is unchanged


@dataclass(slots=True)
class Decoded:
    task: Task
    seconds: float
    record: ImageRecord | None = None
    pixels: np.ndarray | None = None
    unchanged: bool = False  # read and hashed: same bytes as the stored record
    error: str | None = None


def load_task(task: Task, card: ModelCard, max_pixels: int | None, decode: Decode | None = None) -> Decoded:
    """Worker: read, hash, decode and resize one file. Never raises for a bad file."""
    t0 = time.perf_counter()
    try:
        with open(task.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        if task.old is not None and task.same_size and task.old.sha256 == digest:
            rec = ImageRecord(**{**asdict(task.old), "mtime": st.st_mtime_ns / 1e9})
            return Decoded(task, time.perf_counter() - t0, record=rec, unchanged=True)
        # The record keeps the photo's full size, whatever scale the decoder used.
        pixels, (width, height) = (decode or decode_for_model)(data, card, max_pixels)
        rec = ImageRecord(
            id=task.id,
            path=task.rel,
            label=task.label,
            size=len(data),
            mtime=st.st_mtime_ns / 1e9,
            sha256=digest,
            width=width,
            height=height,
            origin=task.origin,
        )
        return Decoded(task, time.perf_counter() - t0, record=rec, pixels=pixels)
    except (ImageDecodeError, ImageTooLargeError) as exc:
        return Decoded(task, time.perf_counter() - t0, error=str(exc))
    except OSError as exc:
        return Decoded(task, time.perf_counter() - t0, error=f"cannot read: {exc.strerror or exc}")


def windowed(pool: Executor, tasks: Sequence[T], fn: Callable[[T], R], window: int) -> Iterator[R]:
    """fn(task) for each task, in task order, with up to `window` of them submitted to `pool` ahead."""
    pending: deque[Future[R]] = deque()
    todo = iter(tasks)
    for task in todo:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            break
    while pending:
        result = pending.popleft().result()
        for task in todo:
            pending.append(pool.submit(fn, task))
            break
        yield result


def thread_pipeline(
    tasks: Sequence[Task], load: Callable[[Task], Decoded], workers: int, window: int
) -> Iterator[Decoded]:
    """Results in task order, with up to `window` files being decoded ahead by a thread pool."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        yield from windowed(pool, tasks, load, window)


Chunk = tuple[list[Decoded], np.ndarray]
# (tasks, load, workers, window) -> results in task order, loaded ahead by up to `window`
Pipeline = Callable[[Sequence[Task], Callable[[Task], Decoded], int, int], Iterator[Decoded]]


@dataclass(frozen=True)
class StageOptions:
    """How the local engine decodes and runs; None = the defaults."""

    decode: Decode | None = None
    pipeline: Pipeline | None = None
    ort_threads: int | None = None
    ort_spinning: bool = False


@dataclass
class EngineInfo:
    """What an engine tells the report: where it embedded, and with how many workers."""

    device: str = "none"
    providers: list[str] = field(default_factory=list)
    workers: int = 1


def embed_local(
    tasks: Sequence[Task],
    card: ModelCard,
    model_dir: Path,
    *,
    device: Device,
    batch_size: int,
    workers: int,
    max_pixels: int | None,
    timings: dict[str, float],
    info: EngineInfo,
    options: StageOptions | None = None,
) -> Generator[Chunk, None, None]:
    """The local engine: a thread pool decodes ahead, one onnxruntime session embeds full batches."""
    opts = options or StageOptions()
    embedder = Embedder(model_dir, device=device, threads=opts.ort_threads, spinning=opts.ort_spinning)
    run = opts.pipeline or thread_pipeline
    info.device, info.providers, info.workers = embedder.device, embedder.providers, workers
    no_vectors = np.zeros((0, card.dim), dtype=np.float32)

    def embed(batch: list[Decoded]) -> Chunk:
        t = time.perf_counter()
        # the batch holds decoded images only: their pixels are set
        vectors = embedder.embed(np.stack([r.pixels for r in batch]))  # type: ignore[misc]
        timings["embed"] += time.perf_counter() - t
        for r in batch:
            r.pixels = None
        return batch, vectors

    def chunks() -> Generator[Chunk, None, None]:
        batch: list[Decoded] = []
        window = max(2 * batch_size, 4 * workers)
        for res in run(tasks, lambda task: load_task(task, card, max_pixels, opts.decode), workers, window):
            if res.error is not None or res.unchanged:
                yield [res], no_vectors
                continue
            batch.append(res)
            if len(batch) >= batch_size:
                yield embed(batch)
                batch = []
        if batch:
            yield embed(batch)

    return chunks()
