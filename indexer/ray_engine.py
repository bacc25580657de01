"""The Ray engine of `build_index`: decode and embed the task list with Ray Data on a Ray cluster.

`python -m indexer build --engine ray [--ray-address ADDR] [--ray-actors N]`

Only the decode+embed stage runs on Ray. Listing the corpus, the incremental diff against the
old bundle, the FAISS index, the metadata and the atomic save are the local build's code, run
in the driver, so a Ray build writes the same bundle as a local one.

    from_items(tasks)
      -> map_batches(_decode_batch)   Ray tasks: read, hash, decode, resize (`indexer.embed_stage.load_task`,
                                      the local build's own function: records are identical)
      -> map_batches(_EmbedActor)     a pool of actors, each with one onnxruntime session on one
                                      GPU where the cluster has GPUs, else one CPU
      -> the driver                   results put back in task order

Workers open the image files and the model folder by the driver's absolute paths: on a cluster
of several machines the corpus, the model folder (and, for --rebuild, the bundle's uploads) must
be on storage every node mounts at the same path (NFS, a shared volume), and every node needs
this project installed with its `ray` extra (`pip install '.[ray]'`, or the jobs image).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.embed_stage import BuildError, Chunk, Decoded, EngineInfo, Task, load_task
from indexer.embedder import Device, Embedder
from indexer.model_card import ModelCard

if TYPE_CHECKING:
    import ray.data

# Ray itself is imported where it is used: this module imports without it (the serving image has
# no Ray), and build_index checks that it is installed before it calls embed_on_ray.


def _decode_batch(batch: dict[str, np.ndarray], card: ModelCard, max_pixels: int | None) -> dict[str, Any]:
    """Ray task: `load_task` each task of the batch. Rows that are not to be embedded get zero pixels."""
    n = len(batch["i"])
    pixels = np.zeros((n, card.input.height, card.input.width, 3), dtype=np.uint8)
    embed = np.zeros(n, dtype=bool)
    loaded = np.empty(n, dtype=object)
    for k, blob in enumerate(batch["task"]):
        res: Decoded = load_task(pickle.loads(blob), card, max_pixels)
        if res.error is None and not res.unchanged:
            assert res.pixels is not None  # decoded: load_task sets the pixels
            pixels[k] = res.pixels
            embed[k] = True
        res.pixels = None
        loaded[k] = pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
    return {"i": batch["i"], "loaded": loaded, "embed": embed, "pixels": pixels}


class _EmbedActor:
    """Ray actor: one onnxruntime session, loaded once from the shared model folder."""

    def __init__(self, model_dir: str, device: Device, threads: int | None) -> None:
        self.embedder = Embedder(Path(model_dir), device=device, threads=threads)
        self.providers = ",".join(self.embedder.providers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        mask = np.asarray(batch["embed"], dtype=bool)
        n = len(mask)
        vectors = np.zeros((n, self.embedder.dim), dtype=np.float32)
        t = time.perf_counter()
        if mask.any():
            vectors[mask] = self.embedder.embed(np.ascontiguousarray(batch["pixels"][mask]))
        seconds = time.perf_counter() - t
        return {
            "i": batch["i"],
            "loaded": batch["loaded"],
            "embed": mask,
            "vector": vectors,
            "embed_s": np.full(n, seconds / max(n, 1)),
            "providers": np.full(n, self.providers, dtype=object),
        }


def embed_on_ray(
    tasks: Sequence[Task],
    card: ModelCard,
    model_dir: Path,
    *,
    device: Device,
    batch_size: int,
    max_pixels: int | None,
    address: str | None,
    actors: int | None,
    timings: dict[str, float],
    info: EngineInfo,
) -> Generator[Chunk, None, None]:
    """Connect to Ray (or start a local cluster), plan the dataset, and return its chunks in task order.

    When the chunks are done or closed, this call shuts down the Ray session it opened (a local
    cluster stops; a cluster it joined is only left). A session the caller opened before
    (`ray.init` in the same process) is used and left as it is.
    """
    t0 = time.perf_counter()
    session = _connect(address)
    try:
        ds = _dataset(
            tasks,
            card,
            model_dir,
            device=device,
            batch_size=batch_size,
            max_pixels=max_pixels,
            actors=actors,
            info=info,
        )
    except BaseException:
        _disconnect(session)
        raise
    timings["ray_init"] = time.perf_counter() - t0
    return _chunks(ds, len(tasks), card.dim, session=session, timings=timings, info=info)


def _connect(address: str | None) -> dict[str, str] | None:
    """Start or join Ray. Returns the environment from before when this call did (None: it was running)."""
    import ray

    if ray.is_initialized():
        return None
    environ = dict(os.environ)
    # An offline tool: no usage report to Anyscale unless the operator turned it on.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        # address None: RAY_ADDRESS when set (a job submitted to a cluster), else a new local cluster.
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:
        _disconnect(environ)
        where = f" at {address}" if address else ""
        raise BuildError(f"--engine ray: cannot start or reach the Ray cluster{where}: {_message(exc)}") from exc
    return environ


def _disconnect(environ: dict[str, str] | None) -> None:
    """Undo `_connect`: stop the local cluster it started, or leave the cluster it joined.

    ray.init sets variables in this process's environment (PYTHONBREAKPOINT, RAY_*) that outlive
    ray.shutdown; put them back, for callers that go on after the build.
    """
    import ray

    if environ is None:
        return
    ray.shutdown()
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


CPU_WAIT_S = 60.0


def _resources() -> dict[str, float]:
    """The cluster's resources, once it has CPUs: a job may start on a head with none (num-cpus 0)
    before its workers have joined."""
    import ray

    deadline = time.monotonic() + CPU_WAIT_S
    while True:
        resources = ray.cluster_resources()
        if resources.get("CPU", 0) > 0 or time.monotonic() >= deadline:
            return resources
        time.sleep(1.0)


def _dataset(
    tasks: Sequence[Task],
    card: ModelCard,
    model_dir: Path,
    *,
    device: Device,
    batch_size: int,
    max_pixels: int | None,
    actors: int | None,
    info: EngineInfo,
) -> ray.data.Dataset:
    import ray.data

    resources = _resources()
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        raise BuildError("--device cuda: the Ray cluster has no GPUs; use --device auto or cpu")
    if cpus <= 0:
        raise BuildError(f"the Ray cluster has no CPUs to decode images on (none joined in {CPU_WAIT_S:.0f} s)")
    use_gpu = device != "cpu" and gpus > 0
    # A one-CPU cluster: half a CPU each, so that a decode task and an actor both fit.
    cpu_share = 1.0 if cpus >= 2 else cpus / 2
    if use_gpu:
        # Decode tasks on the CPUs, one actor per GPU (Ray Data also reserves one CPU per actor).
        count = min(actors or gpus, gpus)
        remote: dict[str, Any] = {"num_gpus": 1}
    else:
        # With the same resources, Ray Data fuses the decode tasks into the actors: each actor
        # decodes and embeds its own batches (no pixels cross processes). One CPU slot is kept
        # free all the same, so that the two stages can never starve each other if not fused.
        slots = int(cpus / cpu_share)
        count = max(1, min(actors or slots - 1, slots - 1))
        remote = {"num_cpus": cpu_share}
    info.device, info.providers, info.workers = ("cuda" if use_gpu else "cpu"), [], count

    # Paths as the workers will open them: absolute, whatever their working directory.
    items = [
        {"i": i, "task": pickle.dumps(dataclasses.replace(t, path=t.path.absolute()), protocol=pickle.HIGHEST_PROTOCOL)}
        for i, t in enumerate(tasks)
    ]
    ds: ray.data.Dataset = ray.data.from_items(
        items, override_num_blocks=max(1, min(len(items), math.ceil(len(items) / batch_size)))
    )
    ctx = ds.context  # this dataset's own copy of the context, inherited by the stages below
    ctx.enable_progress_bars = False  # build_index shows its own bar
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ds = ds.map_batches(
        _decode_batch,  # type: ignore[arg-type]  # Ray's types do not know fn_kwargs fills card and max_pixels
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"card": card, "max_pixels": max_pixels},
        num_cpus=cpu_share,
    )
    return ds.map_batches(
        _EmbedActor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=count),
        fn_constructor_kwargs={
            "model_dir": str(Path(model_dir).resolve()),
            "device": device if use_gpu else "cpu",
            "threads": None if use_gpu else max(1, int(cpu_share)),
        },
        **remote,
    )


def _chunks(
    ds: ray.data.Dataset,
    total: int,
    dim: int,
    *,
    session: dict[str, str] | None,
    timings: dict[str, float],
    info: EngineInfo,
) -> Generator[Chunk, None, None]:
    """Stream the results back and hand them on in task order (Ray returns blocks as they finish)."""
    # Ray Data's own chatter ("Starting execution of Dataset ...", "Progress bars disabled ...");
    # its warnings about resources that cannot be had still show.
    quiet = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        pending: dict[int, tuple[Decoded, np.ndarray | None]] = {}
        done = 0
        providers: set[str] = set()  # the onnxruntime providers the actors ended up with
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            timings["embed"] += float(np.sum(batch["embed_s"]))
            providers.update(name for item in batch["providers"] for name in str(item).split(",") if name)
            for i, blob, embedded, vector in zip(batch["i"], batch["loaded"], batch["embed"], batch["vector"]):
                pending[int(i)] = (pickle.loads(blob), vector if embedded else None)
            results: list[Decoded] = []
            vectors: list[np.ndarray] = []
            while done in pending:
                res, vector = pending.pop(done)
                results.append(res)
                if vector is not None:
                    vectors.append(vector)
                done += 1
            if results:
                yield (
                    results,
                    (
                        np.stack(vectors).astype(np.float32, copy=False)
                        if vectors
                        else np.zeros((0, dim), dtype=np.float32)
                    ),
                )
        if done != total or pending:
            raise BuildError(f"the Ray build returned {done + len(pending)} results for {total} files")
        if providers:
            info.providers = sorted(providers)
            info.device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(f"the Ray build failed: {_message(exc)}") from exc
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if session is not None:
            t = time.perf_counter()
            _disconnect(session)
            timings["ray_shutdown"] = time.perf_counter() - t


def _message(exc: BaseException) -> str:
    """The root cause of a Ray error, on one line.

    Ray wraps a worker's exception several times, and for an actor that died in its constructor
    keeps only the text of the worker's traceback: its last "SomeError: message" line is the cause.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        inner = getattr(cur, "cause", None)
        cur = inner if isinstance(inner, BaseException) else cur.__cause__
    for item in chain:
        lines = [_ANSI.sub("", line).strip() for line in str(item).splitlines()]
        causes = [line for line in lines if _EXCEPTION_LINE.match(line)]
        if len(lines) > 1 and causes:
            return causes[-1]
    last = chain[-1]
    for item in reversed(chain):  # the innermost exception that says something
        text = _ANSI.sub("", str(item)).strip()
        if text:
            last = item
            break
    first = _ANSI.sub("", str(last)).strip().splitlines()
    return f"{type(last).__name__}: {first[0] if first else 'no message'}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*: \S")
