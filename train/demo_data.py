"""Build a small, deterministic demo corpus from the photographs shipped inside scikit-image.

Every source photograph becomes one class folder of varied copies (crop, flip, rotation, scale,
colour jitter, JPEG re-encoding), plus held-out query copies drawn from separate random
streams. The whole thing is offline: only files already on disk in the installed
``skimage/data`` folder are read; skimage itself is never imported (its fetchers could try to
download) and neither is TensorFlow.

    python -m train.demo_data --out data/demo [--copies 20] [--queries 4] [--seed 0] [--force]

Layout::

    OUT/images/<class>/<class>_NNN.jpg
    OUT/queries/<class>/<class>_qNN.jpg
    OUT/manifest.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

log = logging.getLogger(__name__)

# Bump when the augmentation changes, so an old corpus on disk is not mistaken for a current one.
GENERATOR = "train.demo_data"
GENERATOR_VERSION = 1

# (class name, file in skimage/data). Real photographs only: synthetic images (chessboards,
# color, logo, phantom, horse silhouette) and the near-twin motorcycle_right are left out.
SOURCES: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("brick", "brick.png"),
    ("camera", "camera.png"),
    ("cell", "cell.png"),
    ("chelsea", "chelsea.png"),
    ("clock_motion", "clock_motion.png"),
    ("coffee", "coffee.png"),
    ("coins", "coins.png"),
    ("grass", "grass.png"),
    ("gravel", "gravel.png"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("ihc", "ihc.png"),
    ("microaneurysms", "microaneurysms.png"),
    ("moon", "moon.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("page", "page.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
    ("text", "text.png"),
)
MIN_CLASSES = 10
MAX_COPIES = 999  # file names use three digits: <class>_NNN.jpg
MAX_QUERIES = 99  # and two for queries: <class>_qNN.jpg

# Augmentation ranges.
CROP_AREA = (0.55, 1.0)  # fraction of the source area kept by the random crop
CROP_ASPECT = (3 / 4, 4 / 3)  # crop aspect relative to the source aspect (log-uniform)
MAX_ROTATION_DEG = 15.0
OUT_LONG_SIDE = (256, 320)  # longest side of the written JPEG: the scale change
BRIGHTNESS = (0.75, 1.25)
CONTRAST = (0.75, 1.25)
SATURATION = (0.7, 1.3)
JPEG_QUALITY = (60, 95)
SOURCE_MAX_SIDE = 640  # big sources are shrunk once; every output is at most 320 px anyway
# Reflection margin for rotations up to 15 deg: a corner moves by at most sin(15 deg)/2 ~ 0.13
# of the longest side, plus a few pixels for the bicubic kernel.
ROTATION_MARGIN = 0.15

_SPLIT_CODES = {"images": 0, "queries": 1}  # separate random streams: queries are held out


class DemoDataError(RuntimeError):
    """A problem with the environment or the output folder, reported without a traceback."""


@dataclass(frozen=True)
class SourceImage:
    name: str
    path: Path
    sha256: str
    image: Image.Image  # RGB, longest side <= SOURCE_MAX_SIDE
    padded: Image.Image  # `image` with a reflected border, so rotations never show black corners
    margin: int


# --------------------------------------------------------------------------- sources


def skimage_data_dir() -> Path:
    """The ``data`` folder of the installed scikit-image, found without importing skimage."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(
            "scikit-image is not installed; the demo photographs ship inside it: pip install -e .[train]"
        )
    for location in spec.submodule_search_locations:
        data_dir = Path(location) / "data"
        if data_dir.is_dir():
            return data_dir
    raise DemoDataError("scikit-image is installed but has no data folder; reinstall it: pip install -e .[train]")


def skimage_version() -> str:
    try:
        return importlib.metadata.version("scikit-image")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def available_sources(data_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The listed sources present on disk, and the names of the missing ones."""
    found: list[tuple[str, Path]] = []
    missing: list[str] = []
    for name, filename in SOURCES:
        path = data_dir / filename
        if path.is_file():
            found.append((name, path))
        else:
            missing.append(filename)
    return found, missing


def load_source(name: str, path: Path) -> SourceImage:
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            image = im.convert("RGB")  # grayscale sources become 3-channel
    except (OSError, ValueError) as exc:
        raise DemoDataError(f"cannot decode source photo {path}: {exc}") from exc
    if max(image.size) > SOURCE_MAX_SIDE:
        image = resize_long_side(image, SOURCE_MAX_SIDE)
    margin = math.ceil(ROTATION_MARGIN * max(image.size)) + 4
    border = ((margin, margin), (margin, margin), (0, 0))
    padded = Image.fromarray(np.pad(np.asarray(image), border, mode="symmetric"))
    return SourceImage(name, path, hashlib.sha256(data).hexdigest(), image, padded, margin)


# --------------------------------------------------------------------------- augmentation


def copy_rng(seed: int, name: str, split: str, index: int) -> np.random.Generator:
    """One independent stream per copy, from a stable hash of the class name (not hash())."""
    name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    entropy = [seed, name_key, _SPLIT_CODES[split], index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def resize_long_side(image: Image.Image, long_side: int) -> Image.Image:
    w, h = image.size
    scale = long_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A random box keeping CROP_AREA of the area, with a mildly jittered aspect ratio."""
    area = rng.uniform(*CROP_AREA) * width * height
    aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    cw = min(width, max(1, round(math.sqrt(area * aspect * width / height))))
    ch = min(height, max(1, round(area / cw)))
    x0 = int(rng.integers(0, width - cw + 1))
    y0 = int(rng.integers(0, height - ch + 1))
    return x0, y0, x0 + cw, y0 + ch


def crop_rotated(src: SourceImage, box: tuple[int, int, int, int], angle: float) -> Image.Image:
    """Crop `box` from the source rotated by `angle` about the box centre.

    Neighbouring real pixels (or their reflection at the border) fill the rotated corners.
    """
    x0, y0, x1, y1 = box
    cw, ch = x1 - x0, y1 - y0
    m = min(src.margin, math.ceil(ROTATION_MARGIN * max(cw, ch)) + 4)
    p = src.margin
    region = src.padded.crop((x0 + p - m, y0 + p - m, x1 + p + m, y1 + p + m))
    rotated = region.rotate(angle, resample=Image.Resampling.BICUBIC)
    return rotated.crop((m, m, m + cw, m + ch))


def jitter_colour(image: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    return ImageEnhance.Color(image).enhance(saturation)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    # Every encoder option is explicit so that the bytes depend only on the pixels and quality.
    buf = io.BytesIO()
    image.save(
        buf,
        format="JPEG",
        quality=quality,
        subsampling="4:2:0",
        optimize=False,
        progressive=False,
        exif=b"",
        icc_profile=None,
    )
    return buf.getvalue()


def make_copy(src: SourceImage, rng: np.random.Generator) -> bytes:
    """One augmented JPEG copy of a source photo."""
    # Draw every parameter up front, in a fixed order, so the stream never depends on branches.
    box = crop_box(rng, *src.image.size)
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    flip = bool(rng.random() < 0.5)
    long_side = int(rng.integers(OUT_LONG_SIDE[0], OUT_LONG_SIDE[1] + 1))
    brightness = float(rng.uniform(*BRIGHTNESS))
    contrast = float(rng.uniform(*CONTRAST))
    saturation = float(rng.uniform(*SATURATION))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))

    image = crop_rotated(src, box, angle)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = resize_long_side(image, long_side)
    image = jitter_colour(image, brightness, contrast, saturation)
    return encode_jpeg(image, quality)


# --------------------------------------------------------------------------- corpus on disk


def file_name(name: str, split: str, index: int) -> str:
    return f"{name}_{index:03d}.jpg" if split == "images" else f"{name}_q{index:02d}.jpg"


def params_of(copies: int, queries: int, seed: int) -> dict[str, Any]:
    return {
        "copies": copies,
        "queries": queries,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        return None
    return manifest


def is_complete(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of `out` if it is a complete corpus built with `params`, else None."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("params") != params:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not all((out / rel).is_file() for rel in files):
        return None
    return manifest


def check_replaceable(out: Path) -> None:
    """Refuse to replace anything that is not an empty folder or a corpus of ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DemoDataError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and read_manifest(out) is None:
        raise DemoDataError(
            f"{out} is not empty and holds no demo corpus manifest; refusing to replace it "
            "(choose another --out or empty it)"
        )


def write_split(
    tmp: Path, sources: Sequence[SourceImage], split: str, count: int, seed: int, bar: tqdm
) -> dict[str, str]:
    """Write `count` copies per class under tmp/<split>/; return {relative path: sha256}."""
    hashes: dict[str, str] = {}
    if count == 0:
        return hashes  # no empty class folders: they would read as classes without images
    for src in sources:
        class_dir = tmp / split / src.name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            data = make_copy(src, copy_rng(seed, src.name, split, index))
            rel = f"{split}/{src.name}/{file_name(src.name, split, index)}"
            (tmp / rel).write_bytes(data)
            hashes[rel] = hashlib.sha256(data).hexdigest()
            bar.update(1)
    return hashes


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build over `out`; the old corpus is removed only after the switch."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()  # only the unique name is wanted
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # put the previous corpus back
        raise
    shutil.rmtree(old, ignore_errors=True)


def validate_args(copies: int, queries: int, seed: int) -> None:
    if not 1 <= copies <= MAX_COPIES:
        raise ValueError(f"copies must be between 1 and {MAX_COPIES}, got {copies}")
    if not 0 <= queries <= MAX_QUERIES:
        raise ValueError(f"queries must be between 0 and {MAX_QUERIES}, got {queries}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def build_demo_corpus(out: Path, copies: int = 20, queries: int = 4, seed: int = 0, force: bool = False) -> dict:
    """Build (or reuse) the demo corpus in `out` and return its manifest.

    Raises ValueError for bad arguments and DemoDataError for a missing scikit-image, too few
    source photos or an output folder that cannot be written or must not be replaced.
    """
    validate_args(copies, queries, seed)
    out = Path(out).expanduser().absolute()
    params = params_of(copies, queries, seed)

    if not force and (manifest := is_complete(out, params)) is not None:
        log.info(
            "%s already holds a complete demo corpus (copies=%d, queries=%d, seed=%d); "
            "not rebuilding (use --force to rebuild)",
            out,
            copies,
            queries,
            seed,
        )
        return manifest

    data_dir = skimage_data_dir()
    found, missing = available_sources(data_dir)
    for filename in missing:
        log.warning("demo source %s is missing from %s; skipping that class", filename, data_dir)
    if len(found) < MIN_CLASSES:
        raise DemoDataError(
            f"only {len(found)} of the demo photographs were found in {data_dir} "
            f"(at least {MIN_CLASSES} are needed); reinstall scikit-image: pip install -e .[train]"
        )
    check_replaceable(out)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except FileExistsError as exc:  # mkdir(exist_ok=True) says this when a file is in the way
        raise DemoDataError(f"cannot write to {out}: {exc.filename} is not a folder") from exc
    except OSError as exc:
        raise DemoDataError(f"cannot write to {out}: {exc.strerror or exc}") from exc

    try:
        sources = [load_source(name, path) for name, path in found]
        total = len(sources) * (copies + queries)
        with tqdm(total=total, desc="demo corpus", unit="img") as bar:
            files = write_split(tmp, sources, "images", copies, seed, bar)
            (tmp / "queries").mkdir(exist_ok=True)
            files.update(write_split(tmp, sources, "queries", queries, seed, bar))
        manifest = make_manifest(sources, missing, params, files)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the corpus is meant to be shared
        swap_into_place(tmp, out)
    except BaseException as exc:  # also Ctrl-C: never leave a half corpus behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DemoDataError(f"cannot write the demo corpus to {out}: {exc}") from exc
        raise
    return manifest


def make_manifest(
    sources: Sequence[SourceImage],
    missing: Sequence[str],
    params: dict[str, Any],
    files: dict[str, str],
) -> dict[str, Any]:
    # No timestamps: the same arguments must give a byte-identical manifest too.
    return {
        "generator": GENERATOR,
        "params": params,
        "seed": params["seed"],
        "classes": [s.name for s in sources],
        "counts": {
            "classes": len(sources),
            "images": len(sources) * params["copies"],
            "queries": len(sources) * params["queries"],
            "images_per_class": params["copies"],
            "queries_per_class": params["queries"],
        },
        "sources": {s.name: {"file": s.path.name, "sha256": s.sha256} for s in sources},
        "skipped_sources": sorted(missing),
        "skimage_version": skimage_version(),
        "files": dict(sorted(files.items())),
    }


# --------------------------------------------------------------------------- CLI


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.demo_data",
        description=(
            "Build a deterministic demo corpus of class folders from the photographs that "
            "scikit-image ships inside its wheel (offline; nothing is downloaded). Each of the "
            f"{len(SOURCES)} source photos becomes a class of augmented JPEG copies (random crop, "
            "flip, rotation, scale, colour jitter, JPEG quality 60-95) plus held-out query copies."
        ),
        epilog=(
            "Layout: OUT/images/<class>/<class>_NNN.jpg, OUT/queries/<class>/<class>_qNN.jpg, "
            "OUT/manifest.json. Rerunning with the same arguments reuses a complete corpus."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/demo")
    parser.add_argument(
        "--copies", type=_int_at_least(1), default=20, help=f"gallery copies per class, 1-{MAX_COPIES} (default: 20)"
    )
    parser.add_argument(
        "--queries",
        type=_int_at_least(0),
        default=4,
        help=f"held-out query copies per class, 0-{MAX_QUERIES} (default: 4)",
    )
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT already holds a complete corpus")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build_demo_corpus(args.out, args.copies, args.queries, args.seed, args.force)
    except (DemoDataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    counts = manifest["counts"]
    print(
        f"demo corpus in {args.out}: {counts['classes']} classes, {counts['images']} gallery "
        f"images ({counts['images_per_class']}/class), {counts['queries']} queries "
        f"({counts['queries_per_class']}/class), seed {manifest['seed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
