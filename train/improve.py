"""`python -m train improve`: fine-tune, export, stage, compare with the served bundle, publish.

The loop, each step the same code as its own command:

1. held-out queries: a labelled folder (`queries`), or a seeded per-class split of the served
   bundle's corpus images (`indexer.evaluate.split_queries`). Training images with the bytes of
   a query are left out of training (a hard-linked copy of the training folder under WORK), so
   the new model is never scored on images it trained on.
2. `train.finetune.fine_tune` into WORK/run, `python -m export` into WORK/run/onnx.
3. a staged bundle at WORK/staged from the served bundle's corpus, with the new model.
4. `indexer.evaluate.evaluate` on the served bundle with `compare=` the staged one.
5. publish only when staged mAP - served mAP > `min_gain`: the served bundle's journal is
   compacted into a version, then the bundle is rebuilt in place with the new model
   (`build_index(..., rebuild=True)`, under the writer lock), which re-embeds its uploads and
   keeps its API deletes. Copying the staged version in instead would drop the uploads and
   deletes the served bundle got through the API. A running service notices the new CURRENT
   (its watcher, or POST /admin/reload) and swaps the model in.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from indexer.atomic import link_or_copy
from indexer.build import BuildError, build_index
from indexer.bundle import BundleError, bundle_exists, open_bundle
from indexer.corpus import list_images
from indexer.embedder import Device
from indexer.evaluate import evaluate, split_queries
from indexer.model_card import file_sha256, read_card
from indexer.versions import MANIFEST_FILE, VERSIONS_DIR, read_current

if TYPE_CHECKING:  # importing it loads Keras; the CLI loads TensorFlow quietly first
    from train.backbones import Backbone

RUN_DIR = "run"
MODEL_DIR = "onnx"  # inside the run folder, as `make export-run` writes it
STAGED_DIR = "staged"
TRAIN_COPY_DIR = "train-images"
REPORT_FILE = "improve.json"
DEFAULT_QUERY_SPLIT = 0.2
PUBLISH_METHOD = (
    "rebuilt the served bundle in place with the new model (its journal compacted, "
    "then build --rebuild under the writer lock): its uploads are re-embedded and its "
    "API deletes kept; the staged version is not copied in, as it has neither"
)
Decision = Literal["published", "kept", "dry-run"]


class ImproveError(Exception):
    """A step of the loop failed; the message names the step. The served bundle keeps its model."""


@dataclass
class ImproveReport:
    served: dict[str, Any]  # `evaluate` result of the served bundle
    staged: dict[str, Any]  # and of the staged one, on the same queries
    metric: str  # "mAP@10"
    gain: float  # staged - served, of `metric`
    min_gain: float
    decision: Decision
    queries: str  # where the queries came from
    held_out: int  # training images left out because they are queries
    run_dir: str
    model_dir: str
    model_sha256: str
    staged_dir: str
    version_before: str
    version_after: str
    publish_method: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def published(self) -> bool:
        return self.decision == "published"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _say(verbose: int, message: str) -> None:
    if verbose:
        print(message, flush=True)


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Turn the errors each part raises into one ImproveError that says which step failed."""
    try:
        yield
    except ImproveError:
        raise
    except (ValueError, KeyError, BuildError, BundleError, OSError) as exc:
        raise ImproveError(f"{name}: {exc}") from exc


# --------------------------------------------------------------------------- checks


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _served_model_sha(index: Path) -> str:
    """The model hash of the version CURRENT names, from its manifest (no index loaded)."""
    manifest = json.loads((index / VERSIONS_DIR / read_current(index) / MANIFEST_FILE).read_text())
    return str(manifest["model"]["sha256"])


def _check_paths(images: Path, index: Path, queries: Path | None, work: Path) -> None:
    if not images.is_dir():
        raise ImproveError(f"training images: no such folder: {images}")
    if queries is not None and not queries.is_dir():
        raise ImproveError(f"queries: no such folder: {queries}")
    if not bundle_exists(index):
        raise ImproveError(
            f"served bundle: no index bundle at {index}; build the first one with "
            f"`python -m indexer build --model MODEL --images {images} --index {index}`"
        )
    for name, folder in (("training images", images), ("served bundle", index)):
        if _inside(work, folder):
            raise ImproveError(f"--work {work} is inside the {name} folder {folder}; put it elsewhere")


# --------------------------------------------------------------------------- held-out queries


def _query_hashes(queries: Path) -> set[str]:
    files, _ = list_images(queries)
    return {file_sha256(f.path) for f in files if f.label is not None}


def _training_folder(images: Path, held_out: set[str], copy_dir: Path) -> tuple[Path, int]:
    """`images`, or a hard-linked copy of it without the files whose bytes are queries."""
    from train.dataset import list_class_folders

    folders = list_class_folders(images)
    keep = [p for p in folders.paths if file_sha256(p) not in held_out]
    left_out = len(folders.paths) - len(keep)
    if left_out == 0:
        return images, 0
    shutil.rmtree(copy_dir, ignore_errors=True)
    root = folders.root
    for path in keep:
        dest = copy_dir / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, dest)
    return copy_dir, left_out


# --------------------------------------------------------------------------- the loop


def _export(run_dir: Path, model_dir: Path, check_images: Path, verbose: int) -> None:
    """`python -m export --model RUN --out RUN/onnx`, in this process (TensorFlow is loaded)."""
    from export.__main__ import main as export_main

    quiet = contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext()
    with quiet:  # its errors go to stderr either way
        rc = export_main(["--model", str(run_dir), "--out", str(model_dir), "--check-images", str(check_images)])
    if rc != 0:
        raise ImproveError(f"export of {run_dir} failed (exit status {rc}, message above)")


def _fold_journal(index: Path) -> None:
    """Compact the served bundle's journal into a version before the rebuild: a rebuild with a
    model of another dimension refuses a journal that still holds the old model's vectors. The
    rebuild then re-reads the compacted writes from that version, uploads and deletes alike."""
    from indexer.compaction import compact

    bundle = open_bundle(index, verify=False)
    if bundle.dirty:
        compact(bundle, reason="improve: before publishing a new model", lock_timeout=30.0)


def _overall(result: Mapping[str, Any], key: str) -> float:
    value = result["overall"].get(key)
    if value is None:
        raise ImproveError(
            f"evaluation: no scorable queries in {result['index']} ({len(result['skipped_queries'])} skipped)"
        )
    return float(value)


def improve(
    images: Path | str,
    index: Path | str,
    *,
    queries: Path | str | None = None,
    query_split: float = DEFAULT_QUERY_SPLIT,
    work: Path | str = Path("runs/improve"),
    backbone: str | Backbone | None = None,
    weights: str | Path | None = "imagenet",
    recipe: Mapping[str, Any] | None = None,
    min_gain: float = 0.0,
    dry_run: bool = False,
    device: Device = "auto",
    whiten: int | Literal["auto"] = "auto",
    k: int = 10,
    verbose: int | str = "auto",
) -> ImproveReport:
    """Run the whole loop (module docstring); raises ImproveError with the failed step's message.

    `backbone`: a name or a `train.backbones.Backbone` (None: the default); `recipe`: fields of
    `train.finetune.Recipe`, passed to `fine_tune`. The served bundle changes only when the
    decision is "published".
    """
    from train.finetune import fine_tune, format_summary, resolve_verbose

    verbose = resolve_verbose(verbose)  # Keras' bar on a terminal, a line per epoch in logs
    images, index, work = Path(images), Path(index), Path(work)
    queries = Path(queries) if queries is not None else None
    recipe = dict(recipe or {})
    _check_paths(images, index, queries, work)
    if queries is None and not 0 < query_split < 1:
        raise ImproveError(f"held-out queries: the query split must be between 0 and 1, got {query_split:g}")
    notes: list[str] = []

    with _step("served bundle"):
        served = open_bundle(index, verify=False)  # for its corpus, index type and split only
        version_before, served_sha = served.version, served.card.onnx_sha256
        corpus = served.corpus_root if served.corpus_root is not None and served.corpus_root.is_dir() else None
        if corpus is None:
            corpus = images.resolve()
            notes.append(
                f"the served bundle's corpus root ({served.corpus_root}) is not a folder here; "
                f"staged and published from --images {images}"
            )
        index_type = served.index_type
    if _inside(work, corpus):
        raise ImproveError(f"--work {work} is inside the corpus {corpus}; put it elsewhere")

    with _step("held-out queries"):
        if queries is not None:
            held_out = _query_hashes(queries)
            where = f"folder {queries}"
        else:
            seed = int(recipe.get("seed", 0))
            held = split_queries(served, query_split, seed)
            held_out = {served.get(q.exclude_id).sha256 for q in held if q.exclude_id is not None}
            where = (
                f"{len(held)} corpus images held out of {index} (split {query_split:g}, "
                f"seed {seed}), each excluded from its own results"
            )
        del served  # the evaluation opens both bundles itself
        train_dir, left_out = _training_folder(images, held_out, work / TRAIN_COPY_DIR)
    _say(
        verbose,
        f"queries: {where}; {left_out} training images with a query's bytes left out"
        + (f" (training on the copy {train_dir})" if left_out else ""),
    )

    run_dir, model_dir, staged_dir = work / RUN_DIR, work / RUN_DIR / MODEL_DIR, work / STAGED_DIR
    _say(verbose, f"[1/4] fine-tuning on {train_dir} into {run_dir}")
    with _step("training"):
        kwargs: dict[str, Any] = {} if backbone is None else {"backbone": backbone}
        run = fine_tune(train_dir, run_dir, weights=weights, verbose=verbose, **kwargs, **recipe)
    _say(verbose, format_summary(run, run_dir))

    _say(verbose, f"[2/4] exporting to {model_dir}")
    with _step("export"):
        _export(run_dir, model_dir, train_dir, verbose)
        new_sha = read_card(model_dir).onnx_sha256

    _say(verbose, f"[3/4] staged bundle {staged_dir} from {corpus}")
    build: dict[str, Any] = {"index_type": index_type, "device": device, "whiten": whiten, "progress": verbose == 1}
    with _step("staged build"):
        shutil.rmtree(staged_dir, ignore_errors=True)  # always fresh: the model is new every run
        staged = build_index(model_dir, corpus, staged_dir, rebuild=True, **build)
    _say(verbose, staged.summary())

    _say(verbose, f"[4/4] evaluating served {index} and staged {staged_dir} on the same queries")
    with _step("evaluation"):
        result = evaluate(
            index,
            queries,
            split=None if queries is not None else query_split,
            k=k,
            compare=staged_dir,
            device=device,
            seed=int(recipe.get("seed", 0)),
        )
    metric = f"mAP@{k}"
    gain = _overall(result["compare"], metric) - _overall(result["index"], metric)

    report = ImproveReport(
        served=result["index"],
        staged=result["compare"],
        metric=metric,
        gain=gain,
        min_gain=min_gain,
        decision="kept",
        queries=where,
        held_out=left_out,
        run_dir=str(run_dir),
        model_dir=str(model_dir),
        model_sha256=new_sha,
        staged_dir=str(staged_dir),
        version_before=version_before,
        version_after=read_current(index),
        notes=notes,
    )
    if gain > min_gain and dry_run:
        report.decision = "dry-run"
    elif gain > min_gain:
        with _step("publish"):
            # The comparison is only valid against the model it measured.
            if (now := _served_model_sha(index)) != served_sha:
                raise ImproveError(
                    f"the served bundle's model changed during the run ({served_sha[:12]} -> "
                    f"{now[:12]}); not published, run again"
                )
            _fold_journal(index)
            published = build_index(model_dir, corpus, index, rebuild=True, **build)
        report.decision, report.publish_method = "published", PUBLISH_METHOD
        report.version_after = published.version
    (work / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report


# --------------------------------------------------------------------------- output


def format_report(report: ImproveReport) -> str:
    """The comparison table and the decision, as the CLI prints them."""
    s, t = report.served, report.staged

    def row(name: str, a: str, b: str, d: str = "") -> str:
        return f"  {name:<10} {a:>18} {b:>18} {d:>11}"

    lines = [f"queries: {report.queries}", row("", "served", "staged", "difference")]
    for key in (report.metric, "recall@1"):
        a, b = s["overall"].get(key), t["overall"].get(key)
        lines.append(row(key, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}"))
    lines.append(row("queries", str(s["queries"]), str(t["queries"])))
    lines.append(
        row(
            "model",
            f"{s['model']['backbone']}@{s['model']['sha256']}",
            f"{t['model']['backbone']}@{t['model']['sha256']}",
        )
    )
    lines += [f"note: {n}" for n in report.notes]
    a, b = s["overall"][report.metric], t["overall"][report.metric]
    change = f"{report.metric} {a:.3f} -> {b:.3f} (gain {report.gain:+.3f}, needed > {report.min_gain:g})"
    if report.decision == "published":
        lines += [
            f"published: {change}",
            f"  {report.publish_method}",
            f"  served bundle version {report.version_before} -> {report.version_after}, model "
            f"sha256 {report.model_sha256[:12]}; a running service swaps it in at its next watch "
            f"(IMGSEARCH_WATCH_INTERVAL), on POST /admin/reload, or before its next write",
        ]
    elif report.decision == "dry-run":
        lines.append(
            f"dry run: would publish, {change}; the served bundle is unchanged (staged bundle: {report.staged_dir})"
        )
    else:
        lines.append(f"kept the served bundle: {change}; staged bundle left at {report.staged_dir}")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace, recipe: Mapping[str, Any], out: Callable[[str], None] = print) -> int:
    """The body of `python -m train improve` once its arguments are parsed: 0 published or kept."""
    try:
        report = improve(
            args.images,
            args.index,
            queries=args.queries,
            query_split=args.query_split,
            work=args.work,
            backbone=args.backbone,
            weights=args.weights,
            recipe=recipe,
            min_gain=args.min_gain,
            dry_run=args.dry_run,
            device=args.device,
            whiten=args.whiten,
            verbose=0 if args.quiet else "auto",
        )
    except ImproveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A publish cut short leaves the previous version live (versions.py).
        print("error: interrupted; the served bundle's live version is unchanged", file=sys.stderr)
        return 130
    out(format_report(report))
    return 0


__all__ = ["ImproveError", "ImproveReport", "improve", "format_report", "run_cli"]
