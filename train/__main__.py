"""`python -m train`: fine-tune a backbone on a folder of class subfolders.

Only `python -m train` runs this file; `python -m train.demo_data` and other submodules run
their own `__main__` blocks and never import it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn, Sequence

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


def _split(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser(backbones: dict) -> argparse.ArgumentParser:
    from train.backbones import DEFAULT_BACKBONE

    notes = "\n".join(f"  {name:<20} {b.input_size}x{b.input_size} -> {b.feature_dim}-d; "
                      f"imagenet weights: {b.weights_note}" for name, b in sorted(backbones.items()))
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
            "The backbone is frozen while a new head trains (an embedding layer, L2-normalised,\n"
            "then a softmax classifier); optionally the top backbone layers are then unfrozen\n"
            "at a lower learning rate. The head's normalised embedding is what `python -m\n"
            "export` turns into the search model. Unreadable images are skipped and listed."
        ),
        epilog=(
            "backbones:\n" + notes + "\n\n"
            "writes to OUT: model.keras, classes.json, run.json, history.csv,\n"
            "learning_curve.png and logs/ (TensorBoard). A previous run in OUT is replaced.\n\n"
            "example:\n"
            "  python -m train.demo_data --out data/demo\n"
            "  python -m train --data data/demo/images --epochs 5 --fine-tune-layers 20 "
            "--out runs/demo"
        ),
    )
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of class subfolders of images (DIR/<class>/*.jpg)")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="NAME",
                        help=f"one of: {', '.join(sorted(backbones))} "
                             f"(default: {DEFAULT_BACKBONE})")
    parser.add_argument("--weights", default="imagenet", metavar="imagenet|none|FILE",
                        help="pretrained weights: 'imagenet', 'none' (random init) or a local "
                             "weights file for machines without internet (default: imagenet)")
    parser.add_argument("--epochs", type=_positive_int, default=5,
                        help="epochs of the head phase, backbone frozen (default: 5)")
    parser.add_argument("--fine-tune-layers", type=_non_negative_int, default=0, metavar="N",
                        help="then unfreeze the top N backbone layers (BatchNorm stays frozen) "
                             "and keep training; 0 = off (default: 0)")
    parser.add_argument("--fine-tune-epochs", type=_non_negative_int, default=None, metavar="N",
                        help="epochs of the fine-tune phase (default: same as --epochs)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="(default: 16)")
    parser.add_argument("--embedding-dim", type=_positive_int, default=256,
                        help="size of the exported embedding (default: 256)")
    parser.add_argument("--learning-rate", type=_positive_float, default=1e-3,
                        help="Adam learning rate of the head phase (default: 1e-3)")
    parser.add_argument("--fine-tune-learning-rate", type=_positive_float, default=None,
                        metavar="LR", help="learning rate of the fine-tune phase "
                                           "(default: --learning-rate / 10)")
    parser.add_argument("--validation-split", type=_split, default=0.2, metavar="FRACTION",
                        help="fraction of each class held out for validation, seeded and "
                             "stratified; 0 = none (default: 0.2)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the split, augmentation and initialisation (default: 0)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress output, only the final summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import_tensorflow_quietly()
    from train.backbones import BACKBONES
    from train.finetune import TrainDataError, TrainError, fine_tune, format_summary

    args = build_parser(BACKBONES).parse_args(argv)
    try:
        run = fine_tune(
            args.data, args.out,
            backbone=args.backbone, weights=args.weights, epochs=args.epochs,
            fine_tune_layers=args.fine_tune_layers, fine_tune_epochs=args.fine_tune_epochs,
            batch_size=args.batch_size, embedding_dim=args.embedding_dim,
            learning_rate=args.learning_rate,
            fine_tune_learning_rate=args.fine_tune_learning_rate,
            validation_split=args.validation_split, seed=args.seed,
            verbose=0 if args.quiet else "auto",
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
