"""`python -m bench bundle`: a real bundle of a folder of images, padded with synthetic vectors.

    python -m bench bundle --model models/default --images data/demo/images --pad 100000 \
        --index-type hnsw --out /tmp/bundle-100k

The images are embedded for real (so searches with real photos find real neighbours); then N
unit vectors drawn around them (`synthetic_around`: cosine 0.64-0.9 to a real one, the spread of
photos of one class) are added under the same labels, so that anyone can make a 100k or 1M
bundle without embedding that many photos. The synthetic records have no image file.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.http_search import SEED, synthetic_around
from indexer import faiss_index
from indexer.build import build_index
from indexer.bundle import new_bundle, open_bundle
from indexer.metadata import ImageRecord, stable_id

# IVF at bench scale: a k-means sample of ~40 points per list, as FAISS advises, instead of the
# whole corpus (the default `auto` parameters are the subject of their own issue).
BENCH_IVF_NLIST = 1024


def make_padded_bundle(
    model_dir: Path, images_dir: Path, out_dir: Path, pad: int, index_type: str = "auto", seed: int = SEED
) -> dict[str, Any]:
    """Build the bundle at out_dir (replacing it); returns what was made and how long each step took."""
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="imgsearch-real-") as tmp:
        t0 = time.perf_counter()
        build_index(
            Path(model_dir), Path(images_dir), Path(tmp) / "real", index_type="flat", device="cpu", progress=False
        )
        timings["embed_s"] = time.perf_counter() - t0
        real = open_bundle(Path(tmp) / "real")
        ids, real_vecs = real.vectors()
        real_records = [real.get(int(i)) for i in ids]
        t0 = time.perf_counter()
        pad_vecs, origins = synthetic_around(real_vecs, pad, seed)
        pad_records = []
        for i, origin in enumerate(origins.tolist()):
            label = real_records[origin].label
            rel = f"synthetic/{label or 'none'}/{i:07d}.jpg"
            pad_records.append(ImageRecord(stable_id(rel), rel, label, 0, 0.0, "0" * 64, 0, 0))
        vecs = np.concatenate([real_vecs, pad_vecs]) if pad else real_vecs
        del pad_vecs
        timings["synthesize_s"] = time.perf_counter() - t0
        n = len(vecs)
        # index_type: a name from the CLI or bench.writes; choose_index raises ValueError on others
        choice = faiss_index.choose_index(index_type, n, real.dim)  # type: ignore[arg-type]
        if choice.type == "ivf":
            nlist = min(BENCH_IVF_NLIST, max(1, n // 39))
            choice.params.update(nlist=nlist, nprobe=min(nlist, 32), train_size=min(n, nlist * 39))
        t0 = time.perf_counter()
        index = faiss_index.new_index(choice, real.dim, vecs)
        shutil.rmtree(out_dir, ignore_errors=True)
        bundle = new_bundle(out_dir, real.model_dir, index, choice.params, Path(images_dir))
        bundle.add(real_records + pad_records, vecs)
        timings["index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bundle.save(build={"bench": "padded", "real": len(real_records), "synthetic": pad})
        timings["save_s"] = time.perf_counter() - t0
    return {
        "path": str(out_dir),
        "vectors": n,
        "real": len(real_records),
        "synthetic": pad,
        "index_type": choice.type,
        "index_params": choice.params,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench bundle",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="exported model folder (model.onnx + model.json)")
    p.add_argument("--images", type=Path, required=True, help="folder of images to embed for real (class subfolders)")
    p.add_argument("--pad", type=int, required=True, help="synthetic vectors to add around the real ones")
    p.add_argument(
        "--index-type", default="auto", choices=faiss_index.INDEX_TYPES, help="FAISS index type (default auto)"
    )
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if it exists)")
    args = p.parse_args(argv)
    if args.pad < 0:
        p.error("--pad must be >= 0")
    if not args.images.is_dir():
        p.error(f"{args.images}: no such image folder")
    info = make_padded_bundle(args.model, args.images, args.out, args.pad, args.index_type)
    print(
        f"{info['path']}: {info['vectors']} vectors ({info['real']} real, {info['synthetic']} synthetic), "
        f"{info['index_type']} index {info['index_params']}, steps {info['timings']}"
    )
    return 0
