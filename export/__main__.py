"""python -m export: turn a fine-tuned run or a pretrained backbone into an ONNX embedding model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from export.check_images import load_check_images, load_images
from export.drift import MIN_DRIFT_IMAGES, MIN_MEAN_COSINE, MIN_TOP10_OVERLAP
from export.quantize import CALIBRATION_METHODS, DEFAULT_CALIBRATION

__all__ = ["main", "load_check_images"]

FP32_CHECK_COUNT = 16
INT8_CHECK_COUNT = 128  # the neighbour-overlap check wants a real set to rank within
CALIBRATION_COUNT = 128

DESCRIPTION = """\
Export an embedding model to ONNX: image in (uint8 RGB, NHWC), L2-normalised vector out, so
that inner product = cosine similarity. Writes OUT/model.onnx and OUT/model.json.

Before writing, the ONNX model is run on real check images and compared with Keras; if any
image's cosine similarity falls below 0.9999, nothing is written.

--precision int8: the checked model is statically quantised with onnxruntime (QDQ, per-channel
int8 weights, uint8 activations, biases corrected for the weights' rounding; the stem and the
pooling/L2-norm tail stay float), calibrated on --calibration-images (default: other images of
the check folder). Its embeddings are compared with the fp32 model's on the check images
(default {int8_count}): it is refused, and nothing written, if their mean cosine is below --min-cosine
(default {min_cosine}) or the mean overlap of each image's top-10 neighbours among the check images
is below --min-overlap (default {min_overlap}). EfficientNet-Lite0 measures 0.998 and 0.96-0.99 and
loses at most 0.003 mAP@10 on the dev sets (bench/results/int8.md). model.json records
"precision" and the figures (parity.int8_*).

examples:
  python -m export --backbone efficientnet_lite0 --out models/default   (pretrained, offline)
  python -m export --backbone efficientnet_lite0 --precision int8 --out models/int8  (quantised)
  python -m export --backbone efficientnet_lite0 --pooling gem --out models/gem  (GeM, p=3)
  python -m export --model runs/demo --out models/demo-finetuned        (a `python -m train` run)
"""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from train.backbones import BACKBONES

    description = DESCRIPTION.format(
        int8_count=INT8_CHECK_COUNT, min_cosine=MIN_MEAN_COSINE, min_overlap=MIN_TOP10_OVERLAP
    )
    p = argparse.ArgumentParser(
        prog="python -m export", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        type=Path,
        metavar="RUN_DIR_OR_KERAS_FILE",
        help="a fine-tuning run folder (or its model.keras): exports its 256-d embedding layer",
    )
    src.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        help="a pretrained backbone with no fine-tuning: exports its pooled features",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        help="with --backbone: 'imagenet' (efficientnet_lite0: embedded in a package; "
        "others: downloaded by Keras), a local weights file, or 'none'",
    )
    p.add_argument(
        "--pooling",
        choices=("gap", "gem"),
        default=None,
        help="with --backbone: how the last feature map becomes a vector: 'gap' "
        "global average pooling (default), 'gem' generalised-mean pooling (with the build's 256-d projection "
        "0.01 mAP@10 better on the dev sets, but a batch is not embedded bit for bit like single images; "
        "recorded in model.json)",
    )
    p.add_argument(
        "--gem-p", type=float, default=3.0, metavar="P", help="GeM exponent, > 0 (1 = average pooling; default 3)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for model.onnx/.json")
    p.add_argument(
        "--check-images",
        type=Path,
        metavar="DIR",
        help="real images for the Keras/ONNX parity check (default: the run's "
        "training folder, else the demo corpus, else scikit-image's photos)",
    )
    p.add_argument(
        "--check-count",
        type=int,
        default=None,
        help=f"how many check images to use (default {FP32_CHECK_COUNT}; "
        f"{INT8_CHECK_COUNT} with --precision int8, at least {MIN_DRIFT_IMAGES})",
    )
    int8 = p.add_argument_group("int8")
    int8.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32 (default) or int8: static quantisation, checked against fp32",
    )
    int8.add_argument(
        "--calibration-images",
        type=Path,
        metavar="DIR",
        help="images to calibrate the int8 activation ranges on (default: the "
        "check image folder, images other than the check images)",
    )
    int8.add_argument(
        "--calibration-count",
        type=int,
        default=CALIBRATION_COUNT,
        metavar="N",
        help=f"how many calibration images (default {CALIBRATION_COUNT})",
    )
    int8.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=DEFAULT_CALIBRATION,
        help=f"how activation ranges are chosen (default {DEFAULT_CALIBRATION}; "
        "entropy and percentile take 3-4x longer and measured the same)",
    )
    int8.add_argument(
        "--min-cosine",
        type=float,
        default=MIN_MEAN_COSINE,
        metavar="C",
        help=f"refuse int8 below this mean cosine to fp32 (default {MIN_MEAN_COSINE})",
    )
    int8.add_argument(
        "--min-overlap",
        type=float,
        default=MIN_TOP10_OVERLAP,
        metavar="F",
        help=f"refuse int8 below this mean top-10 neighbour overlap with fp32 (default {MIN_TOP10_OVERLAP})",
    )
    args = p.parse_args(argv)
    if args.check_count is None:
        args.check_count = INT8_CHECK_COUNT if args.precision == "int8" else FP32_CHECK_COUNT
    return args


def _default_check_dirs(data_dir: Path | None) -> list[Path]:
    dirs = [d for d in (data_dir, Path("data/demo/images")) if d is not None]
    try:
        import importlib.util

        spec = importlib.util.find_spec("skimage")
        if spec and spec.submodule_search_locations:
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    except ImportError:
        pass
    return dirs


def check_precision_args(args: argparse.Namespace) -> None:
    """ValueError for int8 options that cannot work, before any model is built."""
    if args.precision != "int8":
        if args.calibration_images is not None:
            raise ValueError("--calibration-images applies to --precision int8 only")
        return
    if args.check_count < MIN_DRIFT_IMAGES:
        raise ValueError(
            f"int8: the drift check needs at least {MIN_DRIFT_IMAGES} check images, --check-count is {args.check_count}"
        )
    if args.calibration_count < 1:
        raise ValueError("--calibration-count must be at least 1")
    for flag, value in (("--min-cosine", args.min_cosine), ("--min-overlap", args.min_overlap)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be between 0 and 1, got {value}")


def calibration_images(
    args: argparse.Namespace, check_folder: Path | None, check_files: list[Path], size: int
) -> np.ndarray:
    """The int8 calibration set: --calibration-images, else check-folder images other than the
    check images (so the drift check is not measured on what was calibrated on), else those."""
    folder = args.calibration_images or check_folder
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"calibration image folder not found: {folder}")
    same = args.calibration_images is None
    images, _ = load_images(folder, size, args.calibration_count, exclude=check_files if same else ())
    if len(images) == 0 and same:
        images, _ = load_images(folder, size, args.calibration_count)  # a folder of check images only
    if len(images) == 0:
        raise ValueError(f"no decodable calibration images in {folder}")
    print(f"int8 calibration on {len(images)} images from {folder}")
    return images


def main(argv: list[str] | None = None) -> int:
    from train.tf_import import import_tensorflow_quietly

    import_tensorflow_quietly()  # before the parser, which imports Keras for the backbone list
    args = _parse(argv)
    try:
        from export.models import from_backbone, from_run
        from export.onnx_export import export_embedding_model, pooling_label

        check_precision_args(args)  # before the (slow) model build
        if args.backbone:
            weights = None if args.weights.lower() == "none" else args.weights
            source = from_backbone(args.backbone, weights, args.pooling or "gap", args.gem_p)
        elif args.pooling is not None:
            raise ValueError(
                "--pooling applies to --backbone only: a fine-tuned run keeps the pooling it was trained with"
            )
        else:
            source = from_run(args.model)
        if args.check_images is not None:
            if not args.check_images.is_dir():
                raise FileNotFoundError(f"check image folder not found: {args.check_images}")
            candidates = [args.check_images]
        else:
            candidates = [d for d in _default_check_dirs(source.data_dir) if d.is_dir()]
        images, check_folder = np.zeros((0,), np.uint8), None
        check_files: list[Path] = []
        for folder in candidates:
            images, check_files = load_images(folder, source.input_size, args.check_count)
            if len(images):
                check_folder = folder
                print(f"parity check on {len(images)} images from {folder}")
                break
        calibration = None
        if args.precision == "int8":
            calibration = calibration_images(args, check_folder, check_files, source.input_size)
        card = export_embedding_model(
            source.model,
            args.out,
            backbone=source.backbone,
            source=source.source,
            input_size=source.input_size,
            check_images=images,
            class_names=source.class_names,
            pooling=source.pooling,
            gem_p=source.gem_p,
            precision=args.precision,
            calibration_images=calibration,
            calibration_method=args.calibration_method,
            min_cosine=args.min_cosine,
            min_overlap=args.min_overlap,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}/model.onnx ({card.source} {card.backbone}, {card.precision}, "
        f"{pooling_label(source.pooling, source.gem_p)} pooling, dim {card.dim}, "
        f"input {card.input.width}x{card.input.height} uint8); parity: min cosine "
        f"{card.parity['min_cosine']:.6f} over {card.parity['images']} images"
    )
    if card.precision == "int8":
        print(
            f"int8 vs fp32 on {card.parity['int8_images']} images: mean cosine "
            f"{card.parity['int8_mean_cosine']:.4f} (min {card.parity['int8_min_cosine']:.4f}), "
            f"top-10 neighbour overlap {card.parity['int8_top10_overlap']:.4f}; calibrated on "
            f"{card.parity['int8_calibration_images']} images"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
