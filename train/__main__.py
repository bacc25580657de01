"""`python -m train`: fine-tune a backbone on a folder of class subfolders.

Only `python -m train` runs this file; `python -m train.demo_data` and other submodules run
their own `__main__` blocks and never import it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from train.tf_import import import_tensorflow_quietly


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage block: the error is the thing to read.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse(text: str, cast: type[int] | type[float], what: str) -> float:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(_parse(text, int, "an integer"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(_parse(text, int, "an integer"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _split(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that make up a `train.finetune.Recipe`; defaults are the measured best."""
    from train.finetune import Recipe
    from train.losses import DEFAULT_MARGINS, LOSSES

    d = Recipe()
    g = parser.add_argument_group("loss")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default=d.loss,
        help="softmax: scaled softmax classifier; cosface / arcface: cosine "
        "classifier with an additive cosine / angular margin; multisimilarity: "
        f"pair loss on P x K batches (default: {d.loss})",
    )
    g.add_argument(
        "--margin",
        type=_non_negative_float,
        default=None,
        help="margin of cosface / arcface (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MARGINS.items())
        + ")",
    )
    g.add_argument(
        "--scale",
        type=_positive_float,
        default=d.scale,
        help=f"logit scale s of cosface / arcface (default: {d.scale:g})",
    )
    g.add_argument(
        "--classes-per-batch",
        type=_positive_int,
        default=d.classes_per_batch,
        metavar="P",
        help=f"multisimilarity: P classes per batch (default: {d.classes_per_batch})",
    )
    g.add_argument(
        "--images-per-class",
        type=_positive_int,
        default=d.images_per_class,
        metavar="K",
        help=f"multisimilarity: K images of each class per batch (default: {d.images_per_class})",
    )

    g = parser.add_argument_group("schedule")
    g.add_argument(
        "--epochs", type=_positive_int, default=d.epochs, help=f"all epochs, warm-up included (default: {d.epochs})"
    )
    g.add_argument(
        "--warmup-epochs",
        type=_non_negative_int,
        default=d.warmup_epochs,
        metavar="N",
        help=f"first N epochs with the whole backbone frozen, only the head trains (default: {d.warmup_epochs})",
    )
    g.add_argument(
        "--fine-tune-layers",
        type=_non_negative_int,
        default=d.fine_tune_layers,
        metavar="N",
        help="after the warm-up, unfreeze the top N backbone LAYERS (Keras layers "
        "of the flattened backbone counted from the output: convolutions, "
        "BatchNorm, activations, adds; not blocks). BatchNorm stays frozen "
        "and in inference mode; 0 = never unfreeze, every epoch trains only "
        f"the head (default: {d.fine_tune_layers}; efficientnet_lite0 has "
        "142, its top 90 reach back to block 6 of 16)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help=f"batch size of softmax / cosface / arcface; multisimilarity uses P x K (default: {d.batch_size})",
    )
    g.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=d.learning_rate,
        help=f"Adam learning rate of the warm-up (default: {d.learning_rate:g})",
    )
    g.add_argument(
        "--fine-tune-learning-rate",
        type=_positive_float,
        default=d.fine_tune_learning_rate,
        metavar="LR",
        help="starting learning rate of the fine-tune phase, cosine-decayed to 1%% "
        f"of it by the last epoch (default: {d.fine_tune_learning_rate:g})",
    )
    g.add_argument(
        "--patience",
        type=_non_negative_int,
        default=d.patience,
        metavar="N",
        help="end a phase after N epochs without a better validation mAP; 0 = "
        f"never (default: {d.patience}). The best epoch's weights are "
        "saved either way",
    )
    g.add_argument(
        "--embedding-dim",
        type=_positive_int,
        default=d.embedding_dim,
        help=f"size of the exported embedding (default: {d.embedding_dim})",
    )
    g.add_argument(
        "--validation-split",
        type=_split,
        default=d.validation_split,
        metavar="FRACTION",
        help="fraction of each class held out, seeded and stratified: the "
        "retrieval queries of every epoch's validation (mAP, recall@1 against "
        "the training images); 0 = none, the last epoch is kept "
        f"(default: {d.validation_split:g})",
    )
    g.add_argument(
        "--seed",
        type=_non_negative_int,
        default=d.seed,
        help=f"seed of the split, sampling, augmentation and init (default: {d.seed})",
    )


def build_parser(backbones: dict) -> argparse.ArgumentParser:
    from train.backbones import DEFAULT_BACKBONE

    notes = "\n".join(
        f"  {name:<20} {b.input_size}x{b.input_size} -> {b.feature_dim}-d; imagenet weights: {b.weights_note}"
        for name, b in sorted(backbones.items())
    )
    parser = _Parser(
        prog="python -m train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fine-tune an ImageNet-pretrained CNN on a folder of class subfolders, as in\n"
            "Keras' image_dataset_from_directory: the subfolder name is the class.\n\n"
            "  Folder/\n"
            "    SubfolderA/img1.jpg\n"
            "    SubfolderA/img2.jpg\n"
            "    SubfolderB/img3.jpg\n\n"
            "Warm-up: the backbone is frozen while a new head trains (an embedding layer,\n"
            "L2-normalised, then the loss's head). Fine-tune: the top backbone layers are\n"
            "unfrozen (BatchNorm kept frozen) at a lower, cosine-decayed learning rate.\n"
            "Training images get random crops and horizontal flips. After every epoch the\n"
            "validation split is searched against the training images (cosine): mAP (over\n"
            "the whole ranking) and recall@1 are logged and the best epoch's weights are the\n"
            "ones saved. The head's normalised embedding is what `python -m export` turns\n"
            "into the search model. Unreadable images are skipped and listed. With no flags\n"
            "but --data and --out, this runs the recipe measured on the dev sets (arcface,\n"
            "8 warm-up epochs, then the top 90 layers for 12 epochs at 3e-4, 10% held out\n"
            "for validation; about 5 minutes for 500 photos on 2 CPU cores)."
        ),
        epilog=(
            "backbones:\n" + notes + "\n\n"
            "writes to OUT: model.keras, classes.json, run.json (with the pretrained and the\n"
            "fine-tuned validation mAP / recall@1), history.csv, learning_curve.png and\n"
            "logs/ (TensorBoard). A previous run in OUT is replaced.\n\n"
            "examples:\n"
            "  python -m train.demo_data --out data/demo\n"
            "  python -m train --data data/demo/images --out runs/demo\n"
            "  python -m train --data DIR --out RUN --loss multisimilarity "
            "--classes-per-batch 8 --images-per-class 4\n"
            "  python -m train --data DIR --out RUN --loss softmax --fine-tune-layers 0 "
            "--epochs 5\n\n"
            "the whole loop (train, export, stage, compare, publish if better):\n"
            "  python -m train improve --help"
        ),
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of class subfolders of images (DIR/<class>/*.jpg)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        metavar="NAME",
        help=f"one of: {', '.join(sorted(backbones))} (default: {DEFAULT_BACKBONE})",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|none|FILE",
        help="pretrained weights: 'imagenet', 'none' (random init) or a local "
        "weights file for machines without internet (default: imagenet)",
    )
    _recipe_arguments(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output, only the final summary")
    return parser


def build_improve_parser(backbones: dict) -> argparse.ArgumentParser:
    """`python -m train improve`: the training flags plus where the loop reads and publishes."""
    from indexer.whitening import parse_whiten
    from train.backbones import DEFAULT_BACKBONE
    from train.improve import DEFAULT_QUERY_SPLIT

    parser = _Parser(
        prog="python -m train improve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The whole loop in one command: fine-tune on --images (into WORK/run), export it\n"
            "(WORK/run/onnx), build a staged bundle of the served bundle's corpus with it\n"
            "(WORK/staged), evaluate the served and the staged bundle on the same labelled\n"
            "queries, print the comparison, and publish only when the staged mAP@10 beats the\n"
            "served one by more than --min-gain. Publishing rebuilds the served bundle in place\n"
            "with the new model (uploads re-embedded, API deletes and journal kept, under the\n"
            "writer lock); a running service picks the new version up by its usual reload.\n"
            "Query images are never trained on: training images with a query's bytes are left\n"
            "out (a hard-linked copy of --images under WORK)."
        ),
        epilog=(
            "exit status: 0 when published or kept (not better), 2 on errors, 130 interrupted.\n\n"
            "examples:\n"
            "  python -m train improve --images data/demo/images --index bundles/demo "
            "--queries data/demo/queries\n"
            "  python -m train improve --images DIR --index BUNDLE --epochs 5 --min-gain 0.01 "
            "--dry-run"
        ),
    )
    parser.add_argument("--images", type=Path, required=True, help="labelled training folder (DIR/<class>/*.jpg)")
    parser.add_argument(
        "--index", type=Path, required=True, help="the served bundle: compared against, and published to"
    )
    parser.add_argument(
        "--queries",
        type=Path,
        default=None,
        help="labelled validation queries (DIR/<class>/*.jpg); default: a seeded "
        "per-class split of the served bundle's corpus (--query-split)",
    )
    parser.add_argument(
        "--query-split",
        type=_split,
        default=DEFAULT_QUERY_SPLIT,
        metavar="FRACTION",
        help="without --queries: the fraction of each class held out as queries "
        f"and left out of training (default: {DEFAULT_QUERY_SPLIT:g})",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/improve"),
        help="folder for the run, the export and the staged bundle (default: runs/improve)",
    )
    parser.add_argument(
        "--min-gain",
        type=_non_negative_float,
        default=0.0,
        help="publish only when staged mAP@10 - served mAP@10 is above this (default: 0)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="everything but the publish: the served bundle is never changed"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="onnxruntime device of the builds and the evaluation (default: auto)",
    )
    parser.add_argument(
        "--whiten",
        type=parse_whiten,
        default="auto",
        metavar="auto|N",
        help="whitening of the staged and published bundle, as `indexer build --whiten` (default: auto)",
    )
    parser.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        metavar="NAME",
        help=f"one of: {', '.join(sorted(backbones))} (default: {DEFAULT_BACKBONE})",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|none|FILE",
        help="pretrained weights, as for `python -m train` (default: imagenet)",
    )
    _recipe_arguments(parser)
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output, only the comparison and the decision"
    )
    return parser


RECIPE_FLAGS = (
    "loss",
    "margin",
    "scale",
    "classes_per_batch",
    "images_per_class",
    "epochs",
    "warmup_epochs",
    "fine_tune_layers",
    "batch_size",
    "learning_rate",
    "fine_tune_learning_rate",
    "patience",
    "embedding_dim",
    "validation_split",
    "seed",
)


def improve_main(argv: Sequence[str]) -> int:
    from train.backbones import BACKBONES
    from train.improve import run_cli

    args = build_improve_parser(BACKBONES).parse_args(argv)
    return run_cli(args, {name: getattr(args, name) for name in RECIPE_FLAGS})


def main(argv: Sequence[str] | None = None) -> int:
    import_tensorflow_quietly()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["improve"]:  # the one subcommand; `python -m train --data ...` is unchanged
        return improve_main(argv[1:])
    from train.backbones import BACKBONES
    from train.finetune import TrainDataError, TrainError, fine_tune, format_summary

    args = build_parser(BACKBONES).parse_args(argv)
    try:
        run = fine_tune(
            args.data,
            args.out,
            backbone=args.backbone,
            weights=args.weights,
            verbose=0 if args.quiet else "auto",
            **{name: getattr(args, name) for name in RECIPE_FLAGS},
        )
    except (TrainError, TrainDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(format_summary(run, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
