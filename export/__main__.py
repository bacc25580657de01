"""python -m export: turn a fine-tuned run or a pretrained backbone into an ONNX embedding model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DESCRIPTION = """\
Export an embedding model to ONNX: image in (uint8 RGB, NHWC), L2-normalised vector out, so
that inner product = cosine similarity. Writes OUT/model.onnx and OUT/model.json.

Before writing, the ONNX model is run on real check images and compared with Keras; if any
image's cosine similarity falls below 0.9999, nothing is written.

examples:
  python -m export --backbone efficientnet_lite0 --out models/default   (pretrained, offline)
  python -m export --backbone efficientnet_lite0 --pooling gem --out models/gem  (GeM, p=3)
  python -m export --model runs/demo --out models/demo-finetuned        (a `python -m train` run)
"""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from train.backbones import BACKBONES

    p = argparse.ArgumentParser(prog="python -m export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, metavar="RUN_DIR_OR_KERAS_FILE",
                     help="a fine-tuning run folder (or its model.keras): exports its 256-d "
                          "embedding layer")
    src.add_argument("--backbone", choices=sorted(BACKBONES),
                     help="a pretrained backbone with no fine-tuning: exports its pooled features")
    p.add_argument("--weights", default="imagenet",
                   help="with --backbone: 'imagenet' (efficientnet_lite0: embedded in a package; "
                        "others: downloaded by Keras), a local weights file, or 'none'")
    p.add_argument("--pooling", choices=("gap", "gem"), default="gap",
                   help="with --backbone: how the last feature map becomes a vector: 'gap' "
                        "global average pooling, 'gem' generalised-mean pooling (default: gap; "
                        "recorded in model.json)")
    p.add_argument("--gem-p", type=float, default=3.0, metavar="P",
                   help="GeM exponent, > 0 (1 = average pooling; default 3)")
    p.add_argument("--out", type=Path, required=True, help="output folder for model.onnx/.json")
    p.add_argument("--check-images", type=Path, metavar="DIR",
                   help="real images for the Keras/ONNX parity check (default: the run's "
                        "training folder, else the demo corpus, else scikit-image's photos)")
    p.add_argument("--check-count", type=int, default=16,
                   help="how many check images to use (default 16)")
    return p.parse_args(argv)


def _default_check_dirs(data_dir: Path | None) -> list[Path]:
    dirs = [d for d in (data_dir, Path("data/demo/images")) if d is not None]
    try:
        import importlib.util

        spec = importlib.util.find_spec("skimage")
        if spec and spec.submodule_search_locations:
            dirs.append(Path(list(spec.submodule_search_locations)[0]) / "data")
    except ImportError:
        pass
    return dirs


def load_check_images(folder: Path, size: int, count: int) -> np.ndarray:
    """Up to `count` decodable images under `folder`, spread across it, prepared for the model."""
    from indexer.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, resize_to

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(files) // max(count, 1))
    batch = []
    for path in files[::step]:
        try:
            batch.append(resize_to(decode_image(path), (size, size)))
        except (ImageDecodeError, ValueError):
            continue
        if len(batch) == count:
            break
    return np.stack(batch) if batch else np.zeros((0, size, size, 3), np.uint8)


def main(argv: list[str] | None = None) -> int:
    from train.tf_import import import_tensorflow_quietly

    import_tensorflow_quietly()  # before the parser, which imports Keras for the backbone list
    args = _parse(argv)
    try:
        from export.models import from_backbone, from_run
        from export.onnx_export import export_embedding_model, pooling_label

        if args.backbone:
            weights = None if args.weights.lower() == "none" else args.weights
            source = from_backbone(args.backbone, weights, args.pooling, args.gem_p)
        elif args.pooling != "gap":
            raise ValueError("--pooling applies to --backbone only: a fine-tuned run keeps "
                             "the pooling it was trained with")
        else:
            source = from_run(args.model)
        if args.check_images is not None:
            if not args.check_images.is_dir():
                raise FileNotFoundError(f"check image folder not found: {args.check_images}")
            candidates = [args.check_images]
        else:
            candidates = [d for d in _default_check_dirs(source.data_dir) if d.is_dir()]
        images = np.zeros((0,), np.uint8)
        for folder in candidates:
            images = load_check_images(folder, source.input_size, args.check_count)
            if len(images):
                print(f"parity check on {len(images)} images from {folder}")
                break
        card = export_embedding_model(
            source.model, args.out, backbone=source.backbone, source=source.source,
            input_size=source.input_size, check_images=images, class_names=source.class_names,
            pooling=source.pooling, gem_p=source.gem_p,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/model.onnx ({card.source} {card.backbone}, "
          f"{pooling_label(source.pooling, source.gem_p)} pooling, dim {card.dim}, "
          f"input {card.input.width}x{card.input.height} uint8); parity: min cosine "
          f"{card.parity['min_cosine']:.6f} over {card.parity['images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
