"""An instance-level retrieval set made from real photos: several views of each source photo.

    python -m bench.instance_set --photos ../shared/devsets/caltech-dev/gallery --out data/instance

Class-level dev sets ask "another photo of the same kind"; an instance set asks "the same object
or place from another viewpoint", as INRIA Holidays does. From each source photo it makes views:
a crop at another position and scale, a small rotation, a perspective tilt (a step sideways), and
light and colour changes. View 0 of a source becomes its query (`query/<source>/`); the other views
go to `gallery/<source>/`; further photos, one view each, are distractors
(`gallery/distractor-<n>/`). The layout is the one `python -m indexer eval --queries` reads.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from indexer.corpus import list_images


def view(img: Image.Image, rng: random.Random) -> Image.Image:
    """One random viewpoint of a photo (size kept near the source's)."""
    w, h = img.size
    scale = rng.uniform(0.5, 0.85)  # share of each side kept by the crop
    cw, ch = int(w * scale), int(h * scale)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    # a perspective tilt: the corners move inwards by up to 12% of a side
    dx, dy = cw * 0.12, ch * 0.12
    quad = (
        rng.uniform(0, dx),
        rng.uniform(0, dy),
        rng.uniform(0, dx),
        ch - rng.uniform(0, dy),
        cw - rng.uniform(0, dx),
        ch - rng.uniform(0, dy),
        cw - rng.uniform(0, dx),
        rng.uniform(0, dy),
    )
    out = out.transform((cw, ch), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)
    out = out.rotate(rng.uniform(-20, 20), Image.Resampling.BILINEAR, expand=False)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    return out


def make_instance_set(
    photos: Path, out: Path, *, sources: int = 150, views: int = 4, distractors: int = 300, seed: int = 0
) -> dict[str, int]:
    """Write the set; returns its counts. Raises ValueError when there are too few photos."""
    files, _ = list_images(Path(photos))
    rng = random.Random(seed)
    rng.shuffle(files)
    if len(files) < sources + 1:
        raise ValueError(f"{photos}: {len(files)} photos, need more than {sources}")
    chosen, extra = files[:sources], files[sources : sources + distractors]
    for i, f in enumerate(chosen):
        with Image.open(f.path) as src:
            img = src.convert("RGB")
        name = f"source-{i:04d}"
        for v in range(views):
            part = "query" if v == 0 else "gallery"
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            view(img, rng).save(folder / f"view{v}.jpg", quality=90)
    for i, f in enumerate(extra):
        with Image.open(f.path) as src:
            img = src.convert("RGB")
        folder = out / "gallery" / f"distractor-{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        view(img, rng).save(folder / "view.jpg", quality=90)
    return {"sources": len(chosen), "queries": len(chosen), "gallery": len(chosen) * (views - 1) + len(extra)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instance_set", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=Path, required=True, help="a folder of photos (class subfolders or not)")
    parser.add_argument("--out", type=Path, required=True, help="where gallery/ and query/ are written")
    parser.add_argument("--sources", type=int, default=150, help="source photos with a query each (default 150)")
    parser.add_argument("--views", type=int, default=4, help="views per source: 1 query + the rest in the gallery")
    parser.add_argument("--distractors", type=int, default=300, help="other photos, one view each, in the gallery")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        parser.error(f"--photos {args.photos}: no such folder")
    if args.views < 2:
        parser.error("--views must be at least 2 (one query and one gallery view)")
    try:
        counts = make_instance_set(
            args.photos, args.out, sources=args.sources, views=args.views, distractors=args.distractors, seed=args.seed
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.out}: {counts['queries']} queries, {counts['gallery']} gallery images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
