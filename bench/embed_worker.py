"""One corpus-embedding measurement, run in a fresh process: `python -m bench.embed_worker SPEC_JSON`.

Kinds:
- indexer: `indexer.build.build_index` end to end (JPEG files -> saved bundle), optionally with
  one piece swapped for an ablation (draft off / gap 1, process pool, no overlap, ORT threads,
  ORT spinning off). Swaps are counted, so a swap that no longer reaches the code fails loudly.
- ort: onnxruntime inference alone on pre-decoded uint8 batches (the ceiling).
- decode: decode + resize only (no inference), with threads or processes.
- keras_single: the seeds' simplest way: PIL + `model.predict` one image at a time.
- keras_tfdata: seed 004's way: a tf.data map(decode_jpeg, resize) pipeline, batches of 16, Keras.
- cosine: embeddings with and without draft decoding, image by image.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit
from indexer.embed_stage import windowed

_CALLS: dict[str, int] = {}


def _cpu_s() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _count(name: str) -> None:
    _CALLS[name] = _CALLS.get(name, 0) + 1


def list_jpegs(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


# --- pieces swapped into indexer.build for the ablation -------------------------------------

_LOAD: Callable[[Any], Any] | None = None


def _init_process(load: Callable[[Any], Any]) -> None:
    global _LOAD
    _LOAD = load


def _call_load(task: Any) -> Any:
    assert _LOAD is not None
    return _LOAD(task)


def process_pipeline(tasks: Sequence[Any], load: Callable[[Any], Any], workers: int, window: int) -> Iterator[Any]:
    """indexer.embed_stage.thread_pipeline with a process pool: same window, same order. fork passes the
    (unpicklable) load closure to the children; only tasks and results cross the pipe."""
    _count("process_pipeline")
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_process, initargs=(load,)) as pool:
        yield from windowed(pool, tasks, _call_load, window)


def sequential_pipeline(batch_size: int) -> Callable[..., Iterator[Any]]:
    """No overlap: decode one batch (in parallel workers), hand it over, and decode nothing while
    it is embedded."""

    def pipeline(tasks: Sequence[Any], load: Callable[[Any], Any], workers: int, window: int) -> Iterator[Any]:
        _count("sequential_pipeline")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i in range(0, len(tasks), batch_size):
                yield from list(pool.map(load, tasks[i : i + batch_size]))

    return pipeline


def _stage_options(spec: dict[str, Any]) -> tuple[Any, list[str]]:
    """The ablation's choices as the build's StageOptions; and the names of the swaps that must be seen to run."""
    import indexer.images as images
    from indexer.embed_stage import StageOptions

    expect: list[str] = []
    decode = None
    draft = spec.get("draft", "default")
    if draft != "default":

        def decode(data, card, max_pixels):
            _count("decode")
            if draft == "off":
                img, full = images.decode_image_sized(data, max_pixels, None)
            else:
                img, full = images.decode_image_sized(data, max_pixels, card.size, float(draft))
            return images.prepare(img, card), full

        if spec.get("pool", "thread") != "process":  # in a process pool the children count
            expect.append("decode")
    pipeline = None
    if spec.get("pool", "thread") == "process":
        pipeline = process_pipeline
        expect.append("process_pipeline")
    elif not spec.get("overlap", True):
        pipeline = sequential_pipeline(int(spec["batch_size"]))
        expect.append("sequential_pipeline")
    threads = spec.get("ort_threads")
    options = StageOptions(
        decode=decode,
        pipeline=pipeline,
        ort_threads=None if threads is None else int(threads),
        ort_spinning=bool(spec.get("ort_spinning", False)),
    )
    return options, expect


def run_indexer(spec: dict[str, Any]) -> dict[str, Any]:
    from indexer.build import build_index

    stage, expect = _stage_options(spec)
    index = Path(spec["index"])
    shutil.rmtree(index, ignore_errors=True)
    images = Path(spec["images"])
    n_files = len(list_jpegs(images))
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    report = build_index(
        Path(spec["model"]),
        images,
        index,
        rebuild=True,
        progress=False,
        workers=None if spec.get("workers") is None else int(spec["workers"]),
        batch_size=int(spec["batch_size"]),
        stage=stage,
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    missing = [name for name in expect if not _CALLS.get(name)]
    if missing:
        raise RuntimeError(f"ablation choice(s) {missing} never ran: indexer.embed_stage changed shape")
    shutil.rmtree(index, ignore_errors=True)
    return {
        "images": report.embedded,
        "files": n_files,
        "seconds": wall,
        "images_per_s": report.embedded / wall,
        "skipped": report.skipped,
        "timings": report.timings,
        "workers": report.workers,
        "batch_size": report.batch_size,
        "pipeline_images_per_s": report.images_per_s,
        "cpu_ms_per_image": 1000 * cpu / max(report.embedded, 1),
    }


def _decode_all(files: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    from indexer.images import decode_image, resize_to

    return np.stack([resize_to(decode_image(p, draft_size=size), size) for p in files])


def run_ort(spec: dict[str, Any]) -> dict[str, Any]:
    """Inference alone: the corpus decoded beforehand (not timed), batches fed from memory."""
    from indexer.embedder import Embedder

    threads = spec.get("ort_threads")
    emb = Embedder(Path(spec["model"]), device="cpu", threads=None if threads is None else int(threads))
    files = list_jpegs(Path(spec["images"]))
    pixels = _decode_all(files, emb.card.size)
    out: dict[str, Any] = {"images": len(files), "by_batch": {}}
    for bs in spec["batch_sizes"]:
        batches = [np.ascontiguousarray(pixels[i : i + bs]) for i in range(0, len(pixels), bs)]
        emb.embed(batches[0])  # warm-up: onnxruntime allocates its arenas on the first run
        done, t0, cpu0 = 0, time.perf_counter(), _cpu_s()
        while True:  # whole passes over the corpus, at least min_seconds
            for b in batches:
                emb.embed(b)
                done += len(b)
            if time.perf_counter() - t0 >= float(spec.get("min_seconds", 2.0)):
                break
        dt = time.perf_counter() - t0
        out["by_batch"][str(bs)] = {
            "images": done,
            "seconds": dt,
            "images_per_s": done / dt,
            "cpu_ms_per_image": 1000 * (_cpu_s() - cpu0) / done,
        }
    best = max(out["by_batch"].values(), key=lambda r: r["images_per_s"])
    out.update(images_per_s=best["images_per_s"], seconds=best["seconds"], cpu_ms_per_image=best["cpu_ms_per_image"])
    return out


def _decode_one(path: str, size: tuple[int, int], draft: str) -> np.ndarray:
    from indexer.images import decode_image, resize_to

    if draft == "off":
        img = decode_image(path)
    elif draft == "default":
        img = decode_image(path, draft_size=size)
    else:
        img = decode_image(path, draft_size=size, reducing_gap=float(draft))
    return resize_to(img, size)


def run_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode + resize only: threads vs processes, no inference competing for the cores."""
    files = [str(p) for p in list_jpegs(Path(spec["images"]))]
    size = (int(spec["size"][0]), int(spec["size"][1]))
    fn = functools.partial(_decode_one, size=size, draft=spec.get("draft", "default"))
    workers = int(spec["workers"])
    if spec["pool"] == "process":
        pool: Executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    else:
        pool = ThreadPoolExecutor(workers)
    with pool:
        list(pool.map(fn, files[: 2 * workers]))  # start the workers before timing
        t0 = time.perf_counter()
        n = sum(1 for _ in windowed(pool, files, fn, window=max(64, 4 * workers)))
        dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt}


def _keras_model(spec: dict[str, Any]) -> tuple[Any, int, float]:
    t0 = time.perf_counter()
    from export.models import from_backbone

    src = from_backbone(spec["backbone"], weights="imagenet")
    model: Any = src.model  # a keras.Model (EmbeddingSource types it as object)
    model.predict(np.zeros((1, src.input_size, src.input_size, 3), np.float32), verbose=0)  # warm-up
    return model, src.input_size, time.perf_counter() - t0


def _finish_index(vectors: np.ndarray, out: Path) -> None:
    """What the seeds end with too: the vectors in a FAISS inner-product index, saved."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))


def run_keras_single(spec: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    model, size, setup_s = _keras_model(spec)
    out = Path(spec["index"])
    t0 = time.perf_counter()
    files = list_jpegs(Path(spec["images"]))
    vectors = []
    for path in files:
        img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x = np.asarray(img, dtype=np.float32)[None]
        vectors.append(model.predict(x, verbose=0)[0])
    _finish_index(np.stack(vectors), out)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"images": len(files), "seconds": dt, "images_per_s": len(files) / dt, "setup_s": setup_s}


def run_keras_tfdata(spec: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf

    model, size, setup_s = _keras_model(spec)
    out = Path(spec["index"])

    def load_image(image_path):  # seed 004's load_image, minus Inception's preprocess_input
        img = tf.io.read_file(image_path)  # (normalisation is a layer inside our Keras model)
        img = tf.image.decode_jpeg(img, channels=3)
        img = tf.image.resize(img, (size, size))
        return img, image_path

    t0 = time.perf_counter()
    files = [str(p) for p in list_jpegs(Path(spec["images"]))]
    dataset = tf.data.Dataset.from_tensor_slices(files)
    dataset = dataset.map(load_image, num_parallel_calls=tf.data.AUTOTUNE).batch(int(spec.get("batch_size", 16)))
    vectors = []
    for img, _path in dataset:
        vectors.append(model(img).numpy())
    _finish_index(np.concatenate(vectors), out)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"images": len(files), "seconds": dt, "images_per_s": len(files) / dt, "setup_s": setup_s}


def run_cosine(spec: dict[str, Any]) -> dict[str, Any]:
    """Cosine between each image's embedding decoded in full and decoded in draft mode."""
    from indexer.embedder import Embedder
    from indexer.images import decode_image, resize_to

    emb = Embedder(Path(spec["model"]), device="cpu")
    size = emb.card.size
    files = list_jpegs(Path(spec["images"]))[: int(spec.get("limit", 10**9))]
    out: dict[str, Any] = {"images": len(files)}
    full = []
    drafted: dict[str, list[np.ndarray]] = {g: [] for g in spec["gaps"]}
    scaled: dict[str, int] = dict.fromkeys(spec["gaps"], 0)
    for i in range(0, len(files), 32):
        chunk = files[i : i + 32]
        full.append(emb.embed(np.stack([resize_to(decode_image(p), size) for p in chunk])))
        for gap in spec["gaps"]:
            imgs = []
            for p in chunk:
                img = decode_image(p, draft_size=size, reducing_gap=float(gap))
                scaled[gap] += img.size != decode_image_size(p)
                imgs.append(resize_to(img, size))
            drafted[gap].append(emb.embed(np.stack(imgs)))
    ref = np.concatenate(full)
    for gap in spec["gaps"]:
        cos = np.sum(ref * np.concatenate(drafted[gap]), axis=1)
        out[f"gap{gap}"] = {"min": float(cos.min()), "mean": float(cos.mean()), "drafted": scaled[gap]}
    return out


@functools.cache
def decode_image_size(path: Path) -> tuple[int, int]:
    from indexer.images import decode_image

    return decode_image(path).size


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "indexer": run_indexer,
    "ort": run_ort,
    "decode": run_decode,
    "keras_single": run_keras_single,
    "keras_tfdata": run_keras_tfdata,
    "cosine": run_cosine,
}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("quiet_tf", True):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = KINDS[spec["kind"]](spec)
    result["kind"] = spec["kind"]
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
