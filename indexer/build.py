"""`build_index`: a folder of images -> a new version of an index bundle (incremental by default)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from tqdm import tqdm

from indexer import faiss_index, labels, whitening
from indexer.bundle import Bundle, BundleError, bundle_exists, model_matches, new_bundle, open_bundle
from indexer.corpus import SkippedFile, list_images
from indexer.embed_stage import BuildError, Chunk, EngineInfo, StageOptions, Task, embed_local
from indexer.embedder import Device
from indexer.images import DEFAULT_MAX_PIXELS
from indexer.locks import LockTimeout, writer_lock
from indexer.metadata import ImageRecord, stable_id
from indexer.model_card import ModelCard, file_sha256, read_card

STAGES = ("list", "decode", "embed", "add", "save")
BuildEngine = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")


@dataclass
class BuildReport:
    index_dir: str
    version: str
    saved: bool  # False when nothing changed and the live version was kept
    rebuild: bool
    index_type: str
    index_reason: str
    index_params: dict[str, Any]
    images: int  # vectors in the bundle after the build
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: int = 0
    deleted: int = 0  # corpus files left out because they were deleted through the API (tombstones)
    skipped_files: list[SkippedFile] = field(default_factory=list)
    embedded: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    images_per_s: float = 0.0
    device: str = "cpu"
    providers: list[str] = field(default_factory=list)
    workers: int = 1  # decode threads (local) or embedder actors (ray)
    batch_size: int = 32
    engine: str = "local"
    whitening: str = "none"  # e.g. "pca 1280->256, power 0.0, learned from 700 images"
    # the predicted-label threshold learned from the corpus (labels.py); the service reads it from here
    label_calibration: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        t = self.timings
        lines = [
            f"index {self.index_dir} -> version {self.version}" + ("" if self.saved else " (no changes, kept)"),
            f"  images in index: {self.images}   index: {self.index_type} ({self.index_reason})   "
            f"whitening: {self.whitening}",
            f"  added {self.added}, updated {self.updated}, removed {self.removed}, "
            f"unchanged {self.unchanged}, skipped {self.skipped}"
            + (f", left out {self.deleted} deleted through the API" if self.deleted else ""),
            f"  embedded {self.embedded} images at {self.images_per_s:.1f} images/s on {self.device} "
            + (
                f"(ray: {self.workers} embedder actors, batch {self.batch_size})"
                if self.engine == "ray"
                else f"({self.workers} decode workers, batch {self.batch_size})"
            ),
            "  time: "
            + ", ".join(f"{s} {t.get(s, 0.0):.2f}s" for s in STAGES)
            + f", total {t.get('total', 0.0):.2f}s (decode is summed over workers; it overlaps embed)",
        ]
        if self.skipped_files:
            lines.append(f"  skipped files ({len(self.skipped_files)}):")
            lines += [f"    {s.path}: {s.reason}" for s in self.skipped_files[:50]]
            if len(self.skipped_files) > 50:
                lines.append(f"    ... and {len(self.skipped_files) - 50} more (see --json)")
        return "\n".join(lines)


def build_index(
    model_dir: Path,
    images_dir: Path,
    index_dir: Path,
    *,
    index_type: str = "flat",
    device: Device = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
    ivf_codec: str = "sq8",
    ivf_refine: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    engine: BuildEngine = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    stage: StageOptions | None = None,
    whiten: int | Literal["auto"] = "auto",
    whiten_power: float = whitening.DEFAULT_POWER,
    build_budget_s: float = faiss_index.BUILD_BUDGET_S,
) -> BuildReport:
    """Embed every image under images_dir into the bundle at index_dir and switch to the new version.

    Incremental unless `rebuild`: unchanged files (same size and mtime, or same bytes) are not
    decoded again, changed ones are re-embedded, deleted ones removed. Raises BuildError.

    `engine="ray"` decodes and embeds on a Ray cluster (`indexer.ray_engine`: `ray_address`, or a
    new local one; `ray_actors` onnxruntime actors); everything else is the same code as a local build.

    `whiten`: a new bundle learns a PCA projection to this many dimensions from its corpus
    (whitening.py; 0 = none). "auto": 256 when the model outputs more and the corpus has more than
    256 images. An existing bundle keeps the one it was built with; another needs `rebuild`.
    """
    t_start = time.perf_counter()
    model_dir, images_dir, index_dir = Path(model_dir), Path(images_dir).resolve(), Path(index_dir)
    if not images_dir.is_dir():
        raise BuildError(f"{images_dir}: no such image folder")
    if batch_size < 1:
        raise BuildError("--batch-size must be at least 1")
    if index_type not in faiss_index.INDEX_TYPES:
        raise BuildError(f"unknown index type {index_type!r}; use one of {', '.join(faiss_index.INDEX_TYPES)}")
    if engine not in ENGINES:
        raise BuildError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise BuildError("--engine ray needs Ray, which is not installed: pip install -e '.[ray]'")
    if ray_actors is not None and ray_actors < 1:
        raise BuildError("--ray-actors must be at least 1")
    if whiten != "auto" and (not isinstance(whiten, int) or whiten < 0):
        raise BuildError(f"--whiten must be 'auto', 0 (none) or a dimension, got {whiten!r}")
    card = read_card(model_dir)
    if card.whitening is not None:
        raise BuildError(
            f"{model_dir}: this is a bundle's model folder (it has a whitening); build from the exported model instead"
        )
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    try:
        with writer_lock(index_dir):
            return _build_locked(
                card,
                model_dir,
                images_dir,
                index_dir,
                index_type=index_type,
                device=device,
                batch_size=batch_size,
                workers=workers,
                rebuild=rebuild,
                progress=progress,
                ivf_codec=ivf_codec,
                ivf_refine=ivf_refine,
                max_pixels=max_pixels,
                t_start=t_start,
                engine=engine,
                ray_address=ray_address,
                ray_actors=ray_actors,
                stage=stage,
                whiten=whiten,
                whiten_power=whiten_power,
                build_budget_s=build_budget_s,
            )
    except LockTimeout as exc:
        raise BuildError(str(exc)) from exc


def _build_locked(
    card: ModelCard,
    model_dir: Path,
    images_dir: Path,
    index_dir: Path,
    *,
    index_type: str,
    device: Device,
    batch_size: int,
    workers: int,
    rebuild: bool,
    progress: bool,
    ivf_codec: str,
    max_pixels: int | None,
    t_start: float,
    ivf_refine: int | None = None,
    engine: BuildEngine = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    stage: StageOptions | None = None,
    whiten: int | Literal["auto"] = "auto",
    whiten_power: float = whitening.DEFAULT_POWER,
    build_budget_s: float = faiss_index.BUILD_BUDGET_S,
) -> BuildReport:
    timings = dict.fromkeys(STAGES, 0.0)
    old: Bundle | None = None
    uploads: list[ImageRecord] = []
    tombstones: dict[str, str] = {}  # --rebuild: the previous bundle's API deletes of corpus files
    if bundle_exists(index_dir):
        try:
            previous = open_bundle(index_dir, for_build=True)
        except BundleError as exc:
            if not rebuild:
                raise BuildError(f"{exc}; pass --rebuild to build a new bundle from scratch") from exc
            previous = None
        if previous is not None and not rebuild:
            if why := model_matches(previous, model_dir):
                raise BuildError(f"{index_dir}: {why}; pass --rebuild to re-embed every image with this model")
            if why := _whitening_mismatch(previous.card, whiten):
                raise BuildError(f"{index_dir}: {why}; pass --rebuild to learn a new one")
            old = previous
        elif previous is not None:
            # Uploads have no corpus file: re-embed their stored bytes with the new model.
            uploads = [r for r in previous.records() if r.origin == "upload"]
            # API deletes stay deleted through a rebuild too (the journal's, and the version's)
            tombstones = previous.deleted

    t0 = time.perf_counter()
    files, skipped = list_images(images_dir, exclude=(index_dir,))
    old_corpus = {r.path: r for r in old.records() if r.origin == "corpus"} if old else {}
    tasks: list[Task] = []
    unchanged = deleted = 0
    kept_deleted: dict[str, str] = {}
    for f in files:
        prev = old_corpus.get(f.rel)
        if prev is None and old is not None and old.is_deleted(f.rel, f.path):
            deleted += 1  # deleted through the API and not changed since: it stays deleted
            continue
        if f.rel in tombstones and _same_bytes(f.path, tombstones[f.rel]):
            kept_deleted[f.rel] = tombstones[f.rel]  # the same, through a rebuild
            deleted += 1
            continue
        if prev is not None and prev.size == f.size and prev.mtime == f.mtime:
            unchanged += 1
            continue
        tasks.append(
            Task(f.path, f.rel, stable_id(f.rel), f.label, "corpus", prev, prev is not None and prev.size == f.size)
        )
    for r in uploads:
        tasks.append(Task(index_dir / r.path, r.path, r.id, r.label, "upload", None, False))
    listed = {f.rel for f in files}
    gone = [r.id for rel, r in old_corpus.items() if rel not in listed]
    if old is not None:
        old.forget_deleted(listed)  # a tombstoned file that left the corpus may come back as new
    timings["list"] = time.perf_counter() - t0

    info = EngineInfo(workers=workers)
    new_records: list[ImageRecord] = []
    new_vectors: list[np.ndarray] = []
    touched: list[ImageRecord] = []
    added = updated = 0
    no_chunks: tuple[Chunk, ...] = ()
    chunks: Generator[Chunk, None, None] = (c for c in no_chunks)
    if old is not None:  # new images get the bundle's own model folder, whitening included
        card, model_dir = old.card, old.model_dir
    if tasks and engine == "ray":
        from indexer.ray_engine import embed_on_ray

        chunks = embed_on_ray(
            tasks,
            card,
            model_dir,
            device=device,
            batch_size=batch_size,
            max_pixels=max_pixels,
            address=ray_address,
            actors=ray_actors,
            timings=timings,
            info=info,
        )
    elif tasks:
        chunks = embed_local(
            tasks,
            card,
            model_dir,
            device=device,
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_pixels,
            timings=timings,
            info=info,
            options=stage,
        )
    t_pipe = time.perf_counter()
    bar = tqdm(total=len(tasks), unit="img", desc="embedding", disable=not progress or not tasks, dynamic_ncols=True)
    with bar, contextlib.closing(chunks):
        for results, chunk_vectors in chunks:
            for res in results:
                timings["decode"] += res.seconds
                if res.error is not None:
                    skipped.append(SkippedFile(res.task.rel, res.error))
                    if res.task.old is not None:
                        gone.append(res.task.old.id)  # its stored vector no longer describes the file
                elif res.unchanged:
                    assert res.record is not None
                    touched.append(res.record)
                    unchanged += 1
                else:
                    assert res.record is not None
                    new_records.append(res.record)
                    if res.task.old is None:
                        added += 1
                    else:
                        updated += 1
            if len(chunk_vectors):
                new_vectors.append(chunk_vectors)
            bar.update(len(results))
    pipeline_s = time.perf_counter() - t_pipe
    vectors = np.concatenate(new_vectors) if new_vectors else np.zeros((0, card.dim), dtype=np.float32)

    t0 = time.perf_counter()
    final_count = (len(old) - len(gone) if old else 0) + added
    staged_model: Path | None = None
    if old is None and (dim := _whitening_dim(whiten, card.output.dim, len(vectors))):
        try:
            transform = whitening.learn(vectors, dim, whiten_power)
        except whitening.WhiteningError as exc:
            raise BuildError(str(exc)) from exc
        staged_model = index_dir / f".model-{os.getpid()}"  # in the bundle: publish hard-links from it
        card = whitening.write_model_dir(model_dir, card, transform, len(vectors), staged_model)
        model_dir, vectors = staged_model, whitening.apply(transform, vectors)
    try:
        # index_type: a str, checked against INDEX_TYPES at the top of build_index
        choice = faiss_index.choose_index(
            index_type,  # type: ignore[arg-type]
            final_count,
            card.dim,
            ivf_codec,
            budget_s=build_budget_s,
            ivf_refine=ivf_refine,
        )
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # k-means and HNSW/IVF adds on every core
        if old is None:
            if choice.type == "ivf" and len(vectors) == 0:
                choice = faiss_index.IndexChoice("flat", {}, choice.reason + "; no vectors to train IVF on, used flat")
            index = faiss_index.new_index(choice, card.dim, vectors)
            bundle = new_bundle(index_dir, model_dir, index, choice.params, images_dir, deleted=kept_deleted)
        else:
            bundle = old
            bundle.set_corpus_root(images_dir)
        bundle.remove(gone)
        if touched:
            bundle.update_records(touched)
        bundle.add(new_records, vectors)
        if old is not None:
            choice = _keep_or_convert(bundle, choice, index_type)
        timings["add"] = time.perf_counter() - t0

        report = BuildReport(
            index_dir=str(index_dir),
            version=bundle.version,
            saved=False,
            rebuild=rebuild,
            index_type=choice.type,
            index_reason=choice.reason,
            index_params=bundle.index_params,
            images=len(bundle),
            added=added,
            updated=updated,
            removed=len(gone),
            unchanged=unchanged,
            skipped=len(skipped),
            skipped_files=skipped,
            deleted=deleted,
            embedded=len(new_records),
            images_per_s=len(new_records) / pipeline_s if new_records and pipeline_s > 0 else 0.0,
            device=info.device,
            providers=info.providers,
            workers=info.workers,
            batch_size=batch_size,
            engine=engine,
            whitening=_describe(card),
        )
        if bundle.dirty:
            report.label_calibration = _calibrate_labels(bundle)
        if bundle.dirty:
            t0 = time.perf_counter()
            report.timings = {**timings, "total": time.perf_counter() - t_start}
            report.version = bundle.save(build=_manifest_report(report))
            report.saved = True
            timings["save"] = time.perf_counter() - t0
        report.timings = {**timings, "total": time.perf_counter() - t_start}
        return report
    finally:
        if staged_model is not None:
            shutil.rmtree(staged_model, ignore_errors=True)


def _whitening_dim(whiten: int | Literal["auto"], model_dim: int, n: int) -> int:
    """The dimension a new bundle's whitening maps to (0: none)."""
    if whiten == "auto":
        dim = whitening.DEFAULT_DIM
        return dim if model_dim > dim and whitening.can_learn(n, dim) else 0
    return whiten


def _calibrate_labels(bundle: Bundle) -> dict[str, float] | None:
    """The label threshold from a sample of the bundle's labelled vectors (None: too few classes)."""
    labelled = [r.id for r in bundle.records() if r.label is not None]
    if len(labelled) > labels.CALIBRATION_GALLERY:
        labelled = random.Random(0).sample(labelled, labels.CALIBRATION_GALLERY)
    ids, vecs = bundle.vectors(labelled)
    cal = labels.calibrate(vecs, [bundle.get(int(i)).label for i in ids])
    return asdict(cal) if cal is not None else None


def _describe(card: ModelCard) -> str:
    w = card.whitening
    return (
        "none"
        if w is None
        else f"pca {w.input_dim}->{w.dim}, power {w.eigen_power}, learned from {w.learned_from} images"
    )


def _whitening_mismatch(card: ModelCard, whiten: int | Literal["auto"]) -> str | None:
    """Why an existing bundle cannot take new images with the whitening asked for (None: it can)."""
    if whiten == "auto":
        return None
    have = card.whitening.dim if card.whitening is not None else 0
    if whiten != have:
        return (
            f"the bundle was built with whitening to {have} dimensions"
            if have
            else "the bundle was built without whitening"
        ) + f", --whiten {whiten} asks for another"
    return None


def _same_bytes(path: Path, sha256: str) -> bool:
    """True when the file still has the content a tombstone recorded (unreadable counts as the same)."""
    try:
        return file_sha256(path) == sha256
    except OSError:
        return True


def _keep_or_convert(bundle: Bundle, choice: faiss_index.IndexChoice, requested: str) -> faiss_index.IndexChoice:
    """Incremental builds keep the bundle's index unless another type is asked for (or auto moves on)."""
    current = bundle.index_type
    if choice.type == current:
        return faiss_index.IndexChoice(
            current, bundle.index_params, f"kept the bundle's {current} index" if requested == "auto" else choice.reason
        )
    if current == "ivf":
        if requested == "auto":
            return faiss_index.IndexChoice("ivf", bundle.index_params, "auto: kept the bundle's ivf index")
        raise BuildError(
            f"the bundle holds an ivf index, whose vectors are compressed; switching to {choice.type} needs --rebuild"
        )
    bundle.convert_index(choice)
    return faiss_index.IndexChoice(choice.type, choice.params, choice.reason + f" (converted from {current})")


def _manifest_report(report: BuildReport) -> dict[str, Any]:
    """The build report as stored in the manifest (the skipped list capped to keep it small)."""
    data = report.to_dict()
    data["skipped_files"] = data["skipped_files"][:1000]
    data.pop("version", None)
    data.pop("saved", None)
    return data
