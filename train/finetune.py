"""Fine-tune a backbone on a folder of class subfolders and write a run folder.

The model: pixels -> augmentation (random crops and flips) -> backbone (BatchNorm always in
inference mode) -> Dropout -> Dense `embedding` -> L2 `embedding_norm` -> a head that depends
on the loss (`train.losses`): a scaled softmax classifier (`softmax`), a cosine classifier
(`cosface`, `arcface`), or nothing (`multisimilarity`, a pair loss on P x K batches).

Phases: "head" (the warm-up, `warmup_epochs`): the backbone is frozen while the head learns.
"fine-tune" (the remaining epochs): the top `fine_tune_layers` backbone layers are unfrozen
(BatchNormalization layers stay frozen) and training goes on at a lower learning rate with a
cosine decay. Layers are counted as Keras layers of the flattened backbone (convolutions,
BatchNorm, activations, adds, pooling), from the output end, not as blocks.

Validation is by retrieval: after every epoch (and once before training, on the backbone's
pooled features) the validation images are the queries and the training images the gallery;
mAP (over the whole ranking) and recall@1 go into history.csv, the learning curve and
TensorBoard. The weights of the epoch with the best validation mAP are the ones saved;
`patience` stops a phase early.

The exported embedding is the head's `embedding_norm` output, not the backbone's features.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from train.backbones import DEFAULT_BACKBONE, Backbone, get_backbone
from train.dataset import (
    ClassBalancedBatches,
    DecodedSet,
    ImageBatches,
    TrainDataError,
    decode_folders,
    list_class_folders,
    stratified_split,
)
from train.layers import CosineClassifier, L2Normalize
from train.losses import (
    DEFAULT_SCALE,
    LOSSES,
    MARGIN_LOSSES,
    PAIR_LOSSES,
    default_margin,
    make_loss,
)
from train.plots import plot_learning_curve
from train.retrieval import retrieval_metrics, unit_rows

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
RUN_FILE = "run.json"
HISTORY_FILE = "history.csv"
CURVE_FILE = "learning_curve.png"
LOGS_DIR = "logs"
EMBEDDING_LAYER = "embedding"
EMBEDDING_NORM_LAYER = "embedding_norm"
CLASSIFIER_LAYER = "classifier"
HISTORY_COLUMNS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "val_map", "val_recall_at_1", "lr")
RETRIEVAL_KEYS = ("val_map", "val_recall_at_1")

# Softmax over dot products of unit vectors spans only [-|w|, |w|]; a fixed scale lets the
# classifier reach confident probabilities early, so the embedding itself gets sharp gradients
# (the NormFace / cosine-softmax observation).
LOGIT_SCALE = 16.0
DROPOUT = 0.2

# The default recipe: the best one measured on the dev sets (README, step 2; bench/results/devsets.md).
DEFAULT_LOSS = "arcface"
DEFAULT_EPOCHS = 20
DEFAULT_WARMUP_EPOCHS = 8
DEFAULT_FINE_TUNE_LAYERS = 90
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_FINE_TUNE_LEARNING_RATE = 3e-4
DEFAULT_VALIDATION_SPLIT = 0.1
DEFAULT_CLASSES_PER_BATCH = 8
DEFAULT_IMAGES_PER_CLASS = 4
# Random crops keep 90-100 % of the side: on clothing-dev, larger crops cut away what tells a
# T-shirt from a long-sleeve or a polo (mAP 0.632 keeping 60-100 %, 0.645 80-100 %, 0.663 90-100 %).
CROP_SCALE = 0.1


class TrainError(ValueError):
    """A bad argument or setting, reported to the user in one line."""


# --------------------------------------------------------------------------- model


def augmentation_layers(seed: int) -> list[layers.Layer]:
    """Random crops (zoom in, then shift the window) and horizontal flips; every layer is the
    identity at inference, so the exported model sees the whole image."""
    return [
        layers.RandomFlip("horizontal", seed=seed, name="augment_flip"),
        # A negative zoom factor zooms in: the output is a crop resized to the input size.
        layers.RandomZoom((-CROP_SCALE, 0.0), fill_mode="reflect", seed=seed + 1, name="augment_crop"),
        layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 2, name="augment_shift"),
    ]


def _head(x, loss: str, n_classes: int):
    """The loss-specific layers on top of `embedding_norm`."""
    if loss == "softmax":
        x = layers.Rescaling(LOGIT_SCALE, name="logit_scale")(x)
        return layers.Dense(n_classes, activation="softmax", name=CLASSIFIER_LAYER)(x)
    if loss in MARGIN_LOSSES:
        return CosineClassifier(n_classes, name=CLASSIFIER_LAYER)(x)
    return x  # pair losses work on the embedding itself


def build_classifier(
    backbone_model: keras.Model,
    input_size: int,
    n_classes: int,
    embedding_dim: int,
    seed: int = 0,
    loss: str = "softmax",
) -> keras.Model:
    """pixels -> augmentation -> frozen backbone -> embedding -> embedding_norm -> head."""
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
    outputs = _head(x, loss, n_classes)
    return keras.Model(inputs, outputs, name=f"{backbone_model.name}_{loss}")


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


def compile_model(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    loss: keras.losses.Loss,
    with_accuracy: bool,
) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss,
        metrics=["accuracy"] if with_accuracy else [],
    )


def cosine_decay(learning_rate: float, steps: int) -> keras.optimizers.schedules.CosineDecay:
    """From `learning_rate` down to 1 % of it over `steps` optimizer steps."""
    return keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps), alpha=0.01)


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
        for key in HISTORY_COLUMNS[2:-1]:
            row[key] = float(logs[key]) if key in logs else None
        row["lr"] = current_lr(self.model)
        self.rows.append(row)
        write_history(self.path, self.rows)


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback (logs/train and logs/validation, tags epoch_loss,
    epoch_accuracy, epoch_learning_rate, and in validation epoch_map and epoch_recall_at_1),
    stepped by history.csv's epoch numbers: 1 is the first epoch, 0 the pretrained backbone
    (`log_pretrained`), and the fine-tune phase goes on from where the warm-up stopped."""

    def __init__(self, log_dir: Path) -> None:
        # No graph: the backbone's would dwarf the curves, and each phase would write one.
        super().__init__(log_dir=str(log_dir), write_graph=False)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch + 1, logs)


def log_pretrained(log_dir: Path, figures: Mapping[str, float]) -> None:
    """Step 0 of the validation curves: retrieval on the backbone's features before training,
    under the tags Keras' callback gives the epochs after it (val_map -> epoch_map)."""
    writer = tf.summary.create_file_writer(str(log_dir / "validation"))
    with writer.as_default():
        for key, value in figures.items():
            tf.summary.scalar("epoch_" + key.removeprefix("val_"), value, step=0)
    writer.close()


class EmbeddingProbe:
    """Embeds the training and validation images (no augmentation) and scores retrieval.

    While the backbone is frozen its features never change, so they are computed once and
    only the `embedding` layer is applied each epoch; afterwards the whole model runs.
    """

    def __init__(
        self,
        model: keras.Model,
        backbone_model: keras.Model,
        data: DecodedSet,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int,
    ) -> None:
        self.model, self.backbone_model, self.data = model, backbone_model, data
        self.train_idx, self.val_idx, self.batch_size = train_idx, val_idx, batch_size
        self.embedder = keras.Model(model.input, model.get_layer(EMBEDDING_NORM_LAYER).output)
        self.rows = np.concatenate([val_idx, train_idx])
        self._features: np.ndarray | None = None

    def _predict(self, net: keras.Model) -> np.ndarray:
        batches = ImageBatches(self.data, self.rows, self.batch_size)
        return np.asarray(net.predict(batches, verbose=0))

    def backbone_features(self) -> np.ndarray:
        if self._features is None:
            self._features = self._predict(self.backbone_model)
        return self._features

    def embeddings(self, backbone_frozen: bool) -> np.ndarray:
        if not backbone_frozen:
            return self._predict(self.embedder)
        dense = self.model.get_layer(EMBEDDING_LAYER)  # Dropout before it is the identity here
        return unit_rows(keras.ops.convert_to_numpy(dense(self.backbone_features())))

    def score(self, vectors: np.ndarray) -> dict[str, float]:
        n = len(self.val_idx)
        found = retrieval_metrics(
            vectors[:n], self.data.labels[self.val_idx], vectors[n:], self.data.labels[self.train_idx]
        )
        return {"val_map": found["map"], "val_recall_at_1": found["recall@1"]}


@dataclass
class BestEpoch:
    """The best validation mAP so far, its epoch and a copy of the model's weights then."""

    map: float = -1.0
    recall_at_1: float | None = None
    epoch: int = 0
    weights: list[np.ndarray] | None = None
    stopped_early: bool = False


class RetrievalValidation(keras.callbacks.Callback):
    """Adds val_map / val_recall_at_1 to the epoch logs (before the recorders see them),
    keeps the best epoch's weights, and stops the phase after `patience` epochs without a
    better mAP (0 = never)."""

    def __init__(self, probe: EmbeddingProbe, best: BestEpoch, backbone_frozen: bool, patience: int) -> None:
        super().__init__()
        self.probe, self.best = probe, best
        self.backbone_frozen, self.patience = backbone_frozen, patience
        self._waited = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        found = self.probe.score(self.probe.embeddings(self.backbone_frozen))
        if logs is not None:
            logs.update(found)
        if found["val_map"] > self.best.map:
            self.best.map, self.best.recall_at_1 = found["val_map"], found["val_recall_at_1"]
            self.best.epoch, self.best.weights = epoch + 1, self.model.get_weights()
            self._waited = 0
            return
        self._waited += 1
        if self.patience and self._waited >= self.patience:
            self.best.stopped_early = True
            self.model.stop_training = True


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})


# --------------------------------------------------------------------------- checks


def resolve_weights(weights: str | Path | None) -> str | Path | None:
    """ "imagenet", None ("none" on the command line) or an existing local weights file."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights) == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TrainError(f"weights file not found: {path}")
    return path


@dataclass(frozen=True)
class Recipe:
    """Everything that decides how a run trains (recorded in run.json)."""

    loss: str = DEFAULT_LOSS
    margin: float | None = None  # None: the loss's default (cosface 0.2, arcface 0.3)
    scale: float = DEFAULT_SCALE
    epochs: int = DEFAULT_EPOCHS  # all epochs, warm-up included
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS
    fine_tune_layers: int = DEFAULT_FINE_TUNE_LAYERS
    batch_size: int = DEFAULT_BATCH_SIZE
    classes_per_batch: int = DEFAULT_CLASSES_PER_BATCH
    images_per_class: int = DEFAULT_IMAGES_PER_CLASS
    embedding_dim: int = 256
    learning_rate: float = DEFAULT_LEARNING_RATE
    fine_tune_learning_rate: float = DEFAULT_FINE_TUNE_LEARNING_RATE
    patience: int = 0
    validation_split: float = DEFAULT_VALIDATION_SPLIT
    seed: int = 0

    @property
    def head_epochs(self) -> int:
        """Epochs with the backbone frozen: the warm-up, or every epoch when nothing unfreezes."""
        return min(self.warmup_epochs, self.epochs) if self.fine_tune_layers else self.epochs

    @property
    def fine_tune_epochs(self) -> int:
        return self.epochs - self.head_epochs

    @property
    def resolved_margin(self) -> float:
        return default_margin(self.loss) if self.margin is None else self.margin


def check_recipe(r: Recipe) -> None:
    problems = []
    if r.loss not in LOSSES:
        problems.append(f"unknown loss {r.loss!r}; choose from: {', '.join(LOSSES)}")
    for name, value, low in (
        ("epochs", r.epochs, 1),
        ("warm-up epochs", r.warmup_epochs, 0),
        ("fine-tune layers", r.fine_tune_layers, 0),
        ("batch size", r.batch_size, 1),
        ("embedding dim", r.embedding_dim, 2),
        ("classes per batch", r.classes_per_batch, 2),
        ("images per class", r.images_per_class, 2),
        ("patience", r.patience, 0),
        ("seed", r.seed, 0),
    ):
        if value < low:
            problems.append(f"{name} must be >= {low}, got {value}")
    for name, number in (
        ("learning rate", r.learning_rate),
        ("fine-tune learning rate", r.fine_tune_learning_rate),
        ("scale", r.scale),
    ):
        if not (math.isfinite(number) and number > 0):
            problems.append(f"{name} must be a positive number, got {number}")
    if not (math.isfinite(r.resolved_margin) and 0 <= r.resolved_margin < 1):
        problems.append(f"margin must be in [0, 1), got {r.resolved_margin}")
    if not 0.0 <= r.validation_split < 1.0:
        problems.append(f"validation split must be in [0, 1), got {r.validation_split}")
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
    return {k: last.get(k) for k in HISTORY_COLUMNS[2:-1]}


def _per_class(data: DecodedSet, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, dict]:
    n = len(data.class_names)
    train = np.bincount(data.labels[train_idx], minlength=n)
    val = np.bincount(data.labels[val_idx], minlength=n)
    return {name: {"train": int(t), "val": int(v)} for name, t, v in zip(data.class_names, train, val)}


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


def _resolve_backbone(backbone: str | Backbone) -> Backbone:
    """A registered backbone by name, or a Backbone given directly (tests use tiny ones)."""
    if isinstance(backbone, Backbone):
        return backbone
    try:
        return get_backbone(backbone)
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def _training_batches(data: DecodedSet, train_idx: np.ndarray, r: Recipe) -> ImageBatches:
    """P x K batches for pair losses, shuffled plain batches for the classification losses."""
    if r.loss in PAIR_LOSSES:
        try:
            return ClassBalancedBatches(data, train_idx, r.classes_per_batch, r.images_per_class, seed=r.seed)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    return ImageBatches(data, train_idx, r.batch_size, shuffle=True, seed=r.seed)


@dataclass
class Trainer:
    """The state two phases share: model, data, validation and the history rows."""

    model: keras.Model
    recipe: Recipe
    train: ImageBatches
    val: ImageBatches | None
    probe: EmbeddingProbe | None
    out_dir: Path
    verbose: int
    rows: list[dict[str, Any]]
    best: BestEpoch

    def compile(self, learning_rate) -> None:
        loss = make_loss(self.recipe.loss, scale=self.recipe.scale, margin=self.recipe.resolved_margin)
        compile_model(self.model, learning_rate, loss, self.recipe.loss not in PAIR_LOSSES)

    def fit(self, phase: str, first_epoch: int, epochs: int, backbone_frozen: bool) -> None:
        callbacks: list[keras.callbacks.Callback] = []
        if self.probe is not None:  # first: it adds the retrieval figures the others record
            callbacks.append(RetrievalValidation(self.probe, self.best, backbone_frozen, self.recipe.patience))
        callbacks += [
            HistoryRecorder(self.out_dir / HISTORY_FILE, self.rows, phase),
            EpochTensorBoard(self.out_dir / LOGS_DIR),
        ]
        self.model.fit(
            self.train,
            validation_data=self.val,
            initial_epoch=first_epoch,
            epochs=first_epoch + epochs,
            callbacks=callbacks,
            verbose=self.verbose,
        )

    def record_pretrained(self) -> dict[str, float] | None:
        """Epoch 0: retrieval on the backbone's own pooled features, before any training."""
        if self.probe is None:
            return None
        found = self.probe.score(self.probe.backbone_features())
        self.rows.append({"epoch": 0, "phase": "pretrained", **found})
        write_history(self.out_dir / HISTORY_FILE, self.rows)
        log_pretrained(self.out_dir / LOGS_DIR, found)
        return found

    def restore_best(self) -> None:
        if self.best.weights is not None:
            self.model.set_weights(self.best.weights)


def _figures(found: Mapping[str, Any] | None) -> dict[str, float | None]:
    found = found or {}
    return {"map": found.get("val_map"), "recall@1": found.get("val_recall_at_1")}


def _validation_summary(pretrained: dict[str, float] | None, best: BestEpoch) -> dict[str, Any]:
    tuned = None if best.weights is None else {"val_map": best.map, "val_recall_at_1": best.recall_at_1}
    return {
        "queries": "validation split",
        "gallery": "training split",
        "metric": "cosine, mAP over the whole ranking and recall@1 as in `python -m indexer eval --k all`",
        "pretrained": _figures(pretrained),
        "fine_tuned": _figures(tuned),
        "best_epoch": best.epoch if best.weights is not None else None,
        "stopped_early": best.stopped_early,
    }


def fine_tune(
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    backbone: str | Backbone = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    verbose: int | str = "auto",
    **recipe: Any,
) -> dict[str, Any]:
    """Fine-tune `backbone` on DATA_DIR/<class>/<images> and write the run folder OUT_DIR.

    `recipe` takes the fields of `Recipe` (loss, epochs, warmup_epochs, fine_tune_layers, ...);
    the defaults are the best recipe measured on the dev sets. Returns the content of run.json.
    Raises TrainError / TrainDataError (both ValueError) for bad arguments or data, with a
    message meant for the user.
    """
    started = time.perf_counter()
    verbose = resolve_verbose(verbose)
    try:
        r = Recipe(**recipe)
    except TypeError as exc:
        raise TrainError(str(exc)) from None
    check_recipe(r)
    spec = _resolve_backbone(backbone)
    weights = resolve_weights(weights)
    out_dir = Path(out_dir).expanduser()
    timings: dict[str, float] = {}

    # Data first: a wrong folder fails before any model is built.
    t = time.perf_counter()
    folders = list_class_folders(data_dir)
    _say(
        verbose,
        f"found {len(folders.paths)} image files in {len(folders.class_names)} "
        f"classes under {folders.root}; decoding at {spec.input_size}x{spec.input_size}",
    )
    # A live bar only on a terminal (verbose 1); logs get the one line below.
    data = decode_folders(folders, spec.input_size, progress=verbose == 1)
    timings["decode_s"] = round(time.perf_counter() - t, 2)
    for path, reason in data.skipped:
        _say(verbose, f"skipped unreadable file {path}: {reason}")
    train_idx, val_idx = stratified_split(data.labels, r.validation_split, r.seed)
    _say(
        verbose,
        f"decoded {len(data.paths)} images in {timings['decode_s']:.1f}s: "
        f"{len(train_idx)} training, {len(val_idx)} validation, "
        f"{len(data.skipped)} skipped",
    )

    prepare_out_dir(out_dir)
    keras.utils.set_random_seed(r.seed)
    backbone_model = _build_backbone(spec, weights)
    model = build_classifier(
        backbone_model, spec.input_size, len(data.class_names), r.embedding_dim, r.seed, loss=r.loss
    )
    trainer = Trainer(
        model,
        r,
        _training_batches(data, train_idx, r),
        ImageBatches(data, val_idx, r.batch_size) if len(val_idx) else None,
        EmbeddingProbe(model, backbone_model, data, train_idx, val_idx, r.batch_size) if len(val_idx) else None,
        out_dir,
        verbose,
        [],
        BestEpoch(),
    )

    t = time.perf_counter()
    pretrained = trainer.record_pretrained()
    timings["pretrained_eval_s"] = round(time.perf_counter() - t, 2)
    if pretrained is not None:
        _say(
            verbose,
            f"pretrained {spec.name} features: val mAP {pretrained['val_map']:.3f}, "
            f"recall@1 {pretrained['val_recall_at_1']:.3f}",
        )

    t = time.perf_counter()
    _say(
        verbose,
        f"phase 1: training the {r.loss} head ({_n(r.head_epochs, 'epoch')}, "
        f"lr {r.learning_rate:g}), {spec.name} frozen",
    )
    trainer.compile(r.learning_rate)
    trainer.fit("head", 0, r.head_epochs, backbone_frozen=True)
    timings["head_s"] = round(time.perf_counter() - t, 2)

    unfrozen: list[str] = []
    if r.fine_tune_epochs > 0:
        t = time.perf_counter()
        unfrozen = unfreeze_top_layers(backbone_model, r.fine_tune_layers)
        _say(
            verbose,
            f"phase 2: fine-tuning the top {r.fine_tune_layers} layers of {spec.name} "
            f"({len(unfrozen)} with weights, BatchNorm frozen), "
            f"{_n(r.fine_tune_epochs, 'epoch')}, lr {r.fine_tune_learning_rate:g} "
            f"with cosine decay",
        )
        # Trainability changed: recompile, with the schedule over this phase's steps.
        trainer.compile(cosine_decay(r.fine_tune_learning_rate, r.fine_tune_epochs * len(trainer.train)))
        trainer.fit("fine-tune", r.head_epochs, r.fine_tune_epochs, backbone_frozen=False)
        timings["fine_tune_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    trainer.restore_best()  # the saved (and exported) weights are the best epoch's
    model.save(out_dir / MODEL_FILE)
    (out_dir / CLASSES_FILE).write_text(json.dumps(data.class_names, indent=2) + "\n", encoding="utf-8")
    rows = trainer.rows
    write_history(out_dir / HISTORY_FILE, rows)
    plot_learning_curve(
        rows, out_dir / CURVE_FILE, title=f"{spec.name}, {r.loss} on {folders.root.parent.name}/{folders.root.name}"
    )
    timings["save_s"] = round(time.perf_counter() - t, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)

    run = {
        "backbone": spec.name,
        "input_size": spec.input_size,
        "pooling": "gap",
        "embedding_dim": r.embedding_dim,
        "weights": None if weights is None else str(weights),
        "loss": r.loss,
        "margin": r.resolved_margin if r.loss in MARGIN_LOSSES else None,
        "scale": r.scale if r.loss in MARGIN_LOSSES else None,
        "epochs": r.epochs,
        "warmup_epochs": r.head_epochs if r.fine_tune_epochs else 0,
        "epochs_run": sum(1 for row in rows if row["phase"] != "pretrained"),
        "fine_tune_layers": r.fine_tune_layers,
        "fine_tune_layers_counted_as": "Keras layers of the flattened backbone, from the top",
        "fine_tune_epochs": r.fine_tune_epochs,
        "unfrozen_layers": unfrozen,
        "batch_size": trainer.train.batch_size,
        "classes_per_batch": r.classes_per_batch if r.loss in PAIR_LOSSES else None,
        "images_per_class": r.images_per_class if r.loss in PAIR_LOSSES else None,
        "learning_rate": r.learning_rate,
        "fine_tune_learning_rate": r.fine_tune_learning_rate,
        "fine_tune_schedule": "cosine decay to 1%",
        "patience": r.patience,
        "seed": r.seed,
        "validation_split": r.validation_split,
        "data": str(folders.root.resolve()),
        "num_classes": len(data.class_names),
        "counts": {"train": len(train_idx), "val": len(val_idx), "skipped": len(data.skipped)},
        "per_class": _per_class(data, train_idx, val_idx),
        "skipped": [{"path": str(p), "reason": r_} for p, r_ in data.skipped],
        "validation": _validation_summary(pretrained, trainer.best),
        "final": _final_metrics(rows),
        "timings": timings,
        "layers": {
            "embedding": EMBEDDING_LAYER,
            "embedding_norm": EMBEDDING_NORM_LAYER,
            "classifier": CLASSIFIER_LAYER if r.loss not in PAIR_LOSSES else None,
            "backbone": backbone_model.name,
        },
        "versions": package_versions(),
    }
    # Written last: a run folder with run.json in it is a complete run.
    (out_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return run


def format_summary(run: Mapping[str, Any], out_dir: Path | str) -> str:
    """The end-of-run report the CLI prints."""
    counts, final, val = run["counts"], run["final"], run["validation"]
    out = Path(out_dir)

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    pre, tuned = val["pretrained"], val["fine_tuned"]
    lines = [
        f"fine-tuned {run['backbone']} ({run['loss']} loss) on {run['num_classes']} classes: "
        f"{counts['train']} train, {counts['val']} val, {counts['skipped']} skipped",
        f"validation retrieval (val queries vs train images): pretrained mAP {num(pre['map'])} "
        f"recall@1 {num(pre['recall@1'])} -> fine-tuned mAP {num(tuned['map'])} "
        f"recall@1 {num(tuned['recall@1'])}"
        + ("" if val["best_epoch"] is None else f" (best epoch {val['best_epoch']}, kept)"),
        f"final epoch: train accuracy {pct(final['accuracy'])}, val accuracy "
        f"{pct(final['val_accuracy'])}" + ("" if final["val_loss"] is None else f", val loss {final['val_loss']:.4f}"),
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
    "TrainError",
    "TrainDataError",
    "Recipe",
    "fine_tune",
    "format_summary",
    "build_classifier",
    "unfreeze_top_layers",
    "leaf_layers",
    "augmentation_layers",
    "retrieval_metrics",
]
