"""Fine-tune a backbone on a folder of class subfolders and write a run folder.

Phase 1 ("head"): the backbone is frozen (and run in inference mode, so BatchNorm statistics
stay ImageNet's) while a new head learns: Dropout -> Dense embedding -> L2 normalisation ->
scaled softmax classifier. Phase 2 ("fine-tune", optional): the top N backbone layers are
unfrozen (BatchNormalization layers stay frozen) and training continues at a lower rate.

The exported embedding is the head's `embedding_norm` output, not the backbone's features: with
a frozen backbone those never change, so only the head carries what fine-tuning learned.

Run folder (the contract with `export/`): model.keras, classes.json, run.json, history.csv,
learning_curve.png, logs/ (TensorBoard).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from tensorflow.core.framework import summary_pb2

from train.backbones import DEFAULT_BACKBONE, Backbone, get_backbone
from train.dataset import (
    DecodedSet, ImageBatches, TrainDataError, decode_folders, list_class_folders,
    stratified_split,
)
from train.layers import L2Normalize
from train.plots import plot_learning_curve

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
RUN_FILE = "run.json"
HISTORY_FILE = "history.csv"
CURVE_FILE = "learning_curve.png"
LOGS_DIR = "logs"
EMBEDDING_LAYER = "embedding"
EMBEDDING_NORM_LAYER = "embedding_norm"
CLASSIFIER_LAYER = "classifier"
HISTORY_COLUMNS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "lr")

# Softmax over dot products of unit vectors spans only [-|w|, |w|]; a fixed scale lets the
# classifier reach confident probabilities early, so the embedding itself gets sharp gradients
# (the NormFace / cosine-softmax observation).
LOGIT_SCALE = 16.0
DROPOUT = 0.2
FINE_TUNE_LR_FACTOR = 0.1


# What TensorBoard's scalars plugin tags its events with (tensorboard.plugins.scalar).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class TrainError(ValueError):
    """A bad argument or setting, reported to the user in one line."""


# --------------------------------------------------------------------------- model


def augmentation_layers(seed: int) -> list[layers.Layer]:
    """Light, label-preserving augmentation; every layer is the identity at inference."""
    return [
        layers.RandomFlip("horizontal", seed=seed, name="augment_flip"),
        layers.RandomRotation(0.03, fill_mode="reflect", seed=seed + 1, name="augment_rotation"),
        layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 2, name="augment_zoom"),
        layers.RandomTranslation(0.05, 0.05, fill_mode="reflect", seed=seed + 3,
                                 name="augment_translation"),
        layers.RandomContrast(0.1, seed=seed + 4, name="augment_contrast"),
        layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 5,
                                name="augment_brightness"),
    ]


def build_classifier(
    backbone_model: keras.Model, input_size: int, n_classes: int, embedding_dim: int, seed: int = 0,
) -> keras.Model:
    """pixels -> augmentation -> frozen backbone -> embedding -> embedding_norm -> classifier."""
    backbone_model.trainable = False
    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="pixels")
    x = inputs
    for layer in augmentation_layers(seed):
        x = layer(x)
    # training=False keeps BatchNorm in inference mode even when layers are unfrozen later.
    x = backbone_model(x, training=False)
    x = layers.Dropout(DROPOUT, seed=seed, name="head_dropout")(x)
    x = layers.Dense(embedding_dim, name=EMBEDDING_LAYER)(x)
    x = L2Normalize(name=EMBEDDING_NORM_LAYER)(x)
    x = layers.Rescaling(LOGIT_SCALE, name="logit_scale")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name=CLASSIFIER_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"{backbone_model.name}_classifier")


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of `model` in order, nested models flattened, input layers left out."""
    leaves: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves += leaf_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            leaves.append(layer)
    return leaves


def unfreeze_top_layers(backbone_model: keras.Model, n: int) -> list[str]:
    """Make the top `n` backbone layers trainable, BatchNormalization excepted.

    Returns the names of the layers with weights that became trainable.
    """
    backbone_model.trainable = True  # propagates down; each leaf is then set on its own
    leaves = leaf_layers(backbone_model)
    top = {id(layer) for layer in leaves[-n:]} if n > 0 else set()
    unfrozen = []
    for layer in leaves:
        layer.trainable = id(layer) in top and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


# --------------------------------------------------------------------------- history


def current_lr(model: keras.Model) -> float:
    """The optimizer's learning rate, without float32 noise (1e-3, not 0.0010000000474974513)."""
    value = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    return float(f"{value:.6g}")


class HistoryRecorder(keras.callbacks.Callback):
    """Appends one row per epoch (with its phase and learning rate) and rewrites history.csv,
    so the file is current while a long run is still going."""

    def __init__(self, path: Path, rows: list[dict[str, Any]], phase: str) -> None:
        super().__init__()
        self.path, self.rows, self.phase = path, rows, phase

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        logs = logs or {}
        row: dict[str, Any] = {"epoch": epoch + 1, "phase": self.phase}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            row[key] = float(logs[key]) if key in logs else None
        row["lr"] = current_lr(self.model)
        self.rows.append(row)
        write_history(self.path, self.rows)


class TensorBoardScalars(keras.callbacks.Callback):
    """Epoch scalars in TensorBoard's own layout: logs/train and logs/validation, tags
    epoch_loss, epoch_accuracy, epoch_learning_rate.

    Keras' TensorBoard callback calls tf.summary.scalar, which needs the `tensorboard` package
    (not a training dependency); the generic tf.summary.write with the scalars plugin's metadata
    writes the same events without it.
    """

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir = log_dir
        self._writers: dict[str, Any] = {}

    def _writer(self, split: str):
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(str(self.log_dir / split))
        return self._writers[split]

    def _write(self, split: str, tag: str, value: float, step: int) -> None:
        with self._writer(split).as_default():
            tf.summary.write(tag, tf.constant(value, tf.float32), step=step,
                             metadata=_SCALAR_METADATA)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        for key, value in (logs or {}).items():
            split = "validation" if key.startswith("val_") else "train"
            self._write(split, "epoch_" + key.removeprefix("val_"), float(value), epoch)
        self._write("train", "epoch_learning_rate", current_lr(self.model), epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})


# --------------------------------------------------------------------------- checks


def resolve_weights(weights: str | Path | None) -> str | Path | None:
    """"imagenet", None ("none" on the command line) or an existing local weights file."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights) == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TrainError(f"weights file not found: {path}")
    return path


def check_arguments(
    epochs: int, fine_tune_layers: int, fine_tune_epochs: int, batch_size: int,
    embedding_dim: int, learning_rate: float, fine_tune_learning_rate: float,
    validation_split: float, seed: int,
) -> None:
    problems = []
    if epochs < 1:
        problems.append(f"epochs must be >= 1, got {epochs}")
    if fine_tune_layers < 0:
        problems.append(f"fine-tune layers must be >= 0, got {fine_tune_layers}")
    if fine_tune_epochs < 0:
        problems.append(f"fine-tune epochs must be >= 0, got {fine_tune_epochs}")
    if batch_size < 1:
        problems.append(f"batch size must be >= 1, got {batch_size}")
    if embedding_dim < 2:
        problems.append(f"embedding dim must be >= 2, got {embedding_dim}")
    for name, lr in (("learning rate", learning_rate),
                     ("fine-tune learning rate", fine_tune_learning_rate)):
        if not (math.isfinite(lr) and lr > 0):
            problems.append(f"{name} must be a positive number, got {lr}")
    if not 0.0 <= validation_split < 1.0:
        problems.append(f"validation split must be in [0, 1), got {validation_split}")
    if seed < 0:
        problems.append(f"seed must be >= 0, got {seed}")
    if problems:
        raise TrainError("; ".join(problems))


def resolve_verbose(verbose: int | str) -> int:
    """Keras' progress bar on a terminal, one line per epoch in logs and CI."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(verbose)


# --------------------------------------------------------------------------- run folder


def prepare_out_dir(out_dir: Path) -> None:
    """Create OUT; when it holds a previous run, remove that run's artefacts first so that
    TensorBoard logs and history rows of two runs never mix (other files are left alone)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
    if not (out_dir / RUN_FILE).exists():
        return
    for name in (RUN_FILE, MODEL_FILE, CLASSES_FILE, HISTORY_FILE, CURVE_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / LOGS_DIR, ignore_errors=True)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pillow"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _final_metrics(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    last = rows[-1] if rows else {}
    return {k: last.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")}


def _per_class(data: DecodedSet, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, dict]:
    n = len(data.class_names)
    train = np.bincount(data.labels[train_idx], minlength=n)
    val = np.bincount(data.labels[val_idx], minlength=n)
    return {name: {"train": int(t), "val": int(v)}
            for name, t, v in zip(data.class_names, train, val)}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _say(verbose: int, message: str) -> None:
    if verbose:
        print(message, flush=True)


# --------------------------------------------------------------------------- training


def _build_backbone(spec: Backbone, weights: str | Path | None) -> keras.Model:
    try:
        return spec.build(weights)
    except FileNotFoundError as exc:
        raise TrainError(str(exc)) from exc
    except (ValueError, OSError, KeyError) as exc:  # a file that is not weights for this net
        raise TrainError(f"cannot load {spec.name} weights from {weights}: {exc}") from exc


def _fit_phase(
    model: keras.Model, train: ImageBatches, val: ImageBatches | None, *, phase: str,
    first_epoch: int, epochs: int, rows: list[dict[str, Any]], out_dir: Path, verbose: int,
) -> None:
    callbacks = [
        HistoryRecorder(out_dir / HISTORY_FILE, rows, phase),
        TensorBoardScalars(out_dir / LOGS_DIR),
    ]
    model.fit(train, validation_data=val, initial_epoch=first_epoch,
              epochs=first_epoch + epochs, callbacks=callbacks, verbose=verbose)


def fine_tune(
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    epochs: int = 5,
    fine_tune_layers: int = 0,
    fine_tune_epochs: int | None = None,
    batch_size: int = 16,
    embedding_dim: int = 256,
    learning_rate: float = 1e-3,
    fine_tune_learning_rate: float | None = None,
    validation_split: float = 0.2,
    seed: int = 0,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Fine-tune `backbone` on DATA_DIR/<class>/<images> and write the run folder OUT_DIR.

    Returns the content of run.json. Raises TrainError / TrainDataError (both ValueError) for
    bad arguments or data, with a message meant for the user.
    """
    started = time.perf_counter()
    verbose = resolve_verbose(verbose)
    fine_tune_epochs = epochs if fine_tune_epochs is None else fine_tune_epochs
    if fine_tune_learning_rate is None:
        fine_tune_learning_rate = learning_rate * FINE_TUNE_LR_FACTOR
    check_arguments(epochs, fine_tune_layers, fine_tune_epochs, batch_size, embedding_dim,
                    learning_rate, fine_tune_learning_rate, validation_split, seed)
    try:
        spec = get_backbone(backbone)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    weights = resolve_weights(weights)
    out_dir = Path(out_dir).expanduser()
    timings: dict[str, float] = {}

    # Data first: a wrong folder fails before any model is built.
    t = time.perf_counter()
    folders = list_class_folders(data_dir)
    _say(verbose, f"found {len(folders.paths)} image files in {len(folders.class_names)} "
                  f"classes under {folders.root}; decoding at {spec.input_size}x{spec.input_size}")
    # A live bar only on a terminal (verbose 1); logs get the one line below.
    data = decode_folders(folders, spec.input_size, progress=verbose == 1)
    timings["decode_s"] = round(time.perf_counter() - t, 2)
    for path, reason in data.skipped:
        _say(verbose, f"skipped unreadable file {path}: {reason}")
    train_idx, val_idx = stratified_split(data.labels, validation_split, seed)
    _say(verbose, f"decoded {len(data.paths)} images in {timings['decode_s']:.1f}s: "
                  f"{len(train_idx)} training, {len(val_idx)} validation, "
                  f"{len(data.skipped)} skipped")

    prepare_out_dir(out_dir)
    keras.utils.set_random_seed(seed)
    backbone_model = _build_backbone(spec, weights)
    model = build_classifier(backbone_model, spec.input_size, len(data.class_names),
                             embedding_dim, seed)
    train_batches = ImageBatches(data, train_idx, batch_size, shuffle=True, seed=seed)
    val_batches = ImageBatches(data, val_idx, batch_size) if len(val_idx) else None

    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    _say(verbose, f"phase 1: training the head ({_n(epochs, 'epoch')}, lr {learning_rate:g}), "
                  f"{spec.name} frozen")
    compile_model(model, learning_rate)
    _fit_phase(model, train_batches, val_batches, phase="head", first_epoch=0, epochs=epochs,
               rows=rows, out_dir=out_dir, verbose=verbose)
    timings["head_s"] = round(time.perf_counter() - t, 2)

    unfrozen: list[str] = []
    if fine_tune_layers > 0 and fine_tune_epochs > 0:
        t = time.perf_counter()
        unfrozen = unfreeze_top_layers(backbone_model, fine_tune_layers)
        _say(verbose, f"phase 2: fine-tuning the top {fine_tune_layers} layers of {spec.name} "
                      f"({len(unfrozen)} with weights, BatchNorm frozen), "
                      f"{_n(fine_tune_epochs, 'epoch')}, lr {fine_tune_learning_rate:g}")
        compile_model(model, fine_tune_learning_rate)  # trainability changed: recompile
        _fit_phase(model, train_batches, val_batches, phase="fine-tune", first_epoch=epochs,
                   epochs=fine_tune_epochs, rows=rows, out_dir=out_dir, verbose=verbose)
        timings["fine_tune_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    model.save(out_dir / MODEL_FILE)
    (out_dir / CLASSES_FILE).write_text(json.dumps(data.class_names, indent=2) + "\n",
                                        encoding="utf-8")
    write_history(out_dir / HISTORY_FILE, rows)
    plot_learning_curve(rows, out_dir / CURVE_FILE,
                        title=f"{spec.name} on {folders.root.parent.name}/{folders.root.name}")
    timings["save_s"] = round(time.perf_counter() - t, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)

    run = {
        "backbone": spec.name,
        "input_size": spec.input_size,
        "embedding_dim": embedding_dim,
        "weights": None if weights is None else str(weights),
        "epochs": epochs,
        "fine_tune_layers": fine_tune_layers,
        "fine_tune_epochs": fine_tune_epochs if fine_tune_layers > 0 else 0,
        "unfrozen_layers": unfrozen,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "fine_tune_learning_rate": fine_tune_learning_rate,
        "seed": seed,
        "validation_split": validation_split,
        "data": str(folders.root.resolve()),
        "num_classes": len(data.class_names),
        "counts": {"train": int(len(train_idx)), "val": int(len(val_idx)),
                   "skipped": len(data.skipped)},
        "per_class": _per_class(data, train_idx, val_idx),
        "skipped": [{"path": str(p), "reason": r} for p, r in data.skipped],
        "final": _final_metrics(rows),
        "timings": timings,
        "layers": {"embedding": EMBEDDING_LAYER, "embedding_norm": EMBEDDING_NORM_LAYER,
                   "classifier": CLASSIFIER_LAYER, "backbone": backbone_model.name},
        "versions": package_versions(),
    }
    # Written last: a run folder with run.json in it is a complete run.
    (out_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return run


def format_summary(run: Mapping[str, Any], out_dir: Path | str) -> str:
    """The end-of-run report the CLI prints."""
    counts, final = run["counts"], run["final"]
    out = Path(out_dir)

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"fine-tuned {run['backbone']} on {run['num_classes']} classes: "
        f"{counts['train']} train, {counts['val']} val, {counts['skipped']} skipped",
        f"final: train accuracy {pct(final['accuracy'])}, val accuracy "
        f"{pct(final['val_accuracy'])}"
        + ("" if final["val_loss"] is None else f", val loss {final['val_loss']:.4f}"),
        f"time: {run['timings']['total_s']:.1f}s",
    ]
    if run["skipped"]:
        lines.append(f"skipped {counts['skipped']} unreadable file(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in run["skipped"][:20]]
        if len(run["skipped"]) > 20:
            lines.append(f"  ... and {len(run['skipped']) - 20} more (see run.json)")
    lines += [
        f"written to {out}/:",
        f"  {MODEL_FILE} (embedding layer: {EMBEDDING_NORM_LAYER}, "
        f"{run['embedding_dim']}-d), {CLASSES_FILE}, {RUN_FILE}",
        f"  {HISTORY_FILE}, {CURVE_FILE}, {LOGS_DIR}/ (tensorboard --logdir {out / LOGS_DIR})",
    ]
    return "\n".join(lines)


__all__ = [
    "TrainError", "TrainDataError", "fine_tune", "format_summary", "build_classifier",
    "unfreeze_top_layers", "leaf_layers", "augmentation_layers",
]
