"""python -m export.compare: an fp32 and an int8 model folder side by side on labelled dev sets.

For each dev set (gallery/<class>/*, query/<class>/*): mAP@10 and recall@1 of exact cosine
search of the queries in the gallery, with the indexer's own per-query metric, and the paired
difference int8 - fp32 with a bootstrap interval over queries (the dev sets are small, so a
difference of 0.01 can be noise). Then the embedding speed of both models on the same prepared
images, alternating, in one process. Prints JSON. Used for bench/results/int8.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from indexer.embedder import Embedder

K = 10
BOOTSTRAP = 2000


def labelled_images(folder: Path) -> list[tuple[Path, str]]:
    from export.check_images import image_files

    return [(p, p.relative_to(folder).parts[0]) for p in image_files(folder)]


def embed_files(embedder: Embedder, files: Sequence[Path], batch: int = 32) -> np.ndarray:
    from indexer.images import load_for_model

    parts = [
        embedder.embed(np.stack([load_for_model(f, embedder.card) for f in files[i : i + batch]]))
        for i in range(0, len(files), batch)
    ]
    return np.concatenate(parts)


def per_query_metrics(
    gallery: np.ndarray, gallery_labels: list[str], queries: np.ndarray, query_labels: list[str]
) -> dict[str, np.ndarray]:
    """mAP@K and recall@1 per query, as `indexer eval` defines them (exact inner product)."""
    from indexer.evaluate import query_metrics
    from indexer.live_index import Hit

    counts = {label: gallery_labels.count(label) for label in set(gallery_labels)}
    scores = queries @ gallery.T
    top = np.argsort(-scores, axis=1)[:, :K]
    rows = [
        query_metrics(
            [Hit(int(j), float(scores[i, j]), "", gallery_labels[j]) for j in hits], label, counts.get(label, 0), K, 5
        )
        for i, (hits, label) in enumerate(zip(top, query_labels))
    ]
    return {name: np.array([r[name] for r in rows]) for name in (f"mAP@{K}", "recall@1")}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, float | list[float]]:
    """Mean of b - a and a 95% bootstrap interval over the (paired) queries."""
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)]}


def retrieval(models: Mapping[str, Embedder], devset: Path) -> dict[str, object]:
    gallery = labelled_images(devset / "gallery")
    queries = labelled_images(devset / "query")
    out: dict[str, object] = {"gallery": len(gallery), "queries": len(queries)}
    metrics = {}
    for name, embedder in models.items():
        g = embed_files(embedder, [p for p, _ in gallery])
        q = embed_files(embedder, [p for p, _ in queries])
        metrics[name] = per_query_metrics(g, [lab for _, lab in gallery], q, [lab for _, lab in queries])
        out[name] = {m: float(v.mean()) for m, v in metrics[name].items()}
    fp32, int8 = metrics["fp32"], metrics["int8"]
    out["int8_minus_fp32"] = {m: paired(fp32[m], int8[m]) for m in fp32}
    return out


def speed(models: Mapping[str, Embedder], images: np.ndarray, rounds: int, batch: int) -> dict[str, object]:
    """Images/s of each model on the same images. Rounds alternate the models, so that other
    load on a shared machine hits both alike; the ratio is taken within each round and its
    median reported, the rates are the best round's (the least disturbed)."""
    for embedder in models.values():
        embedder.embed(images[:batch])  # warm-up: first-run allocations
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, embedder in models.items():
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                embedder.embed(images[i : i + batch])
            rates[name].append(len(images) / (time.perf_counter() - start))
    ratios = [i / f for f, i in zip(rates["fp32"], rates["int8"])]
    return {
        **{f"{name}_images_per_s": max(r) for name, r in rates.items()},
        "int8_over_fp32_median": float(np.median(ratios)),
        "int8_over_fp32_rounds": [round(r, 3) for r in ratios],
    }


def main(argv: list[str] | None = None) -> int:
    from indexer.embedder import Embedder
    from indexer.images import load_for_model

    p = argparse.ArgumentParser(
        prog="python -m export.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--fp32", type=Path, required=True, help="fp32 model folder")
    p.add_argument("--int8", type=Path, required=True, help="int8 model folder")
    p.add_argument(
        "--devset",
        type=Path,
        action="append",
        default=[],
        help="a dev set folder with gallery/ and query/ (repeatable)",
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--speed-images", type=int, default=64, help="images timed per round (0: no timing)")
    p.add_argument(
        "--speed-dir",
        type=Path,
        default=None,
        help="where the timed images come from (default: the first dev set's queries)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    models = {
        name: Embedder(path, device="cpu", threads=args.threads)
        for name, path in (("fp32", args.fp32), ("int8", args.int8))
    }
    report: dict[str, object] = {name: str(path) for name, path in (("fp32", args.fp32), ("int8", args.int8))}
    for devset in args.devset:
        report[devset.name] = retrieval(models, devset)
    if args.speed_images:
        source = args.speed_dir or (args.devset[0] / "query" if args.devset else None)
        if source is not None:
            files = [f for f, _ in labelled_images(source)][: args.speed_images]
            images = np.stack([load_for_model(f, models["fp32"].card) for f in files])
            report["speed"] = {
                "images": len(images),
                "batch": args.batch,
                "threads": args.threads,
                **speed(models, images, args.rounds, args.batch),
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
