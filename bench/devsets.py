"""Retrieval quality on the labelled dev sets: pretrained descriptors and fine-tuned models.

    python -m bench.devsets --devsets ../shared/devsets --out bench/results      (make compare)
    python -m bench.devsets ... --default --losses cosface,arcface,multisimilarity,softmax --epochs 20

For each dev set (`gallery/<class>/`, `query/<class>/`): the pretrained efficientnet_lite0 with
average (GAP) and generalised-mean (GeM) pooling, each without and with the corpus-learned
projection to 256-d (`indexer build --whiten`), and with alpha query expansion; then, with
`--default`, a run of train's default recipe, and with `--losses`, one run per loss
(`python -m train --loss L [--epochs N]`), each exported and built with the defaults. Plus an
instance-level set made from the dev photos (bench/instance_set.py): several views of each
photo, as INRIA Holidays has. Scores are `indexer eval`'s recall@1, mAP over the whole ranking
(`indexer eval --k all`, the headline figure) and mAP@10 on the held-out queries. Every model,
run and bundle is kept under --work, so a second run only redoes what is missing. Writes
devsets.md and devsets.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.instance_set import make_instance_set
from indexer.atomic import link_or_copy
from indexer.build import build_index
from indexer.evaluate import evaluate
from indexer.query_expansion import QueryExpansion

DESCRIPTORS = (  # (row name, pooling, whiten dim, query expansion top)
    ("pretrained GAP 1280-d", "gap", 0, 0),
    ("pretrained GAP, PCA 256-d (the default export and build)", "gap", 256, 0),
    ("pretrained GeM 1280-d", "gem", 0, 0),
    ("pretrained GeM, PCA 256-d", "gem", 256, 0),
    ("pretrained GeM, PCA 256-d + alpha-QE top 2", "gem", 256, 2),
    ("pretrained GeM, PCA-whitened 256-d (power -0.5)", "gem", -256, 0),
)
INSTANCE = "instance (views of dev photos)"


def run(cmd: list[str]) -> float:
    """Run a child command (TensorFlow work runs in its own process); returns its seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def export_backbone(work: Path, pooling: str, check_images: Path) -> Path:
    out = work / "models" / pooling
    if not (out / "model.json").is_file():
        run(
            [
                sys.executable,
                "-m",
                "export",
                "--backbone",
                "efficientnet_lite0",
                "--pooling",
                pooling,
                "--out",
                str(out),
                "--check-images",
                str(check_images),
            ]
        )
    return out


def score(model: Path, gallery: Path, queries: Path, index: Path, whiten: int, qe: int) -> dict[str, float]:
    if not (index / "CURRENT").is_file():
        build_index(
            model,
            gallery,
            index,
            progress=False,
            device="cpu",
            whiten=abs(whiten),
            whiten_power=-0.5 if whiten < 0 else 0.0,
        )
    expansion = QueryExpansion(qe) if qe else None
    whole = evaluate(index, queries, device="cpu", k=None, expansion=expansion)["overall"]
    top10 = evaluate(index, queries, device="cpu", k=10, expansion=expansion)["overall"]
    return {
        "recall@1": round(whole["recall@1"], 3),
        "mAP": round(whole["mAP"], 3),
        "mAP@10": round(top10["mAP@10"], 3),
        "queries": int(whole["queries"]),
    }


def fine_tune(work: Path, name: str, gallery: Path, flags: list[str]) -> tuple[Path, float]:
    """One `python -m train` run with `flags` (none: the default recipe), exported; cached."""
    run_dir = work / "runs" / f"{name}-{'_'.join(f.lstrip('-') for f in flags) or 'default'}"
    seconds_file = run_dir / "seconds.txt"
    if not seconds_file.is_file():
        seconds = run([sys.executable, "-m", "train", "--data", str(gallery), "--out", str(run_dir), *flags])
        run(
            [
                sys.executable,
                "-m",
                "export",
                "--model",
                str(run_dir),
                "--out",
                str(run_dir / "onnx"),
                "--check-images",
                str(gallery),
            ]
        )
        seconds_file.write_text(f"{seconds:.0f}\n")
    return run_dir / "onnx", float(seconds_file.read_text())


def sets(devsets: Path, work: Path) -> dict[str, tuple[Path, Path]]:
    found = {d.name: (d / "gallery", d / "query") for d in sorted(devsets.iterdir()) if (d / "query").is_dir()}
    instance = work / "instance"
    if not (instance / "query").is_dir():
        photos = work / "photos"
        photos.mkdir(parents=True, exist_ok=True)
        for name, (gallery, _) in found.items():
            if not (photos / name).exists():  # hard links: the listing does not follow symlinks
                shutil.copytree(gallery, photos / name, copy_function=link_or_copy)
        make_instance_set(photos, instance, distractors=500)
    found[INSTANCE] = (instance / "gallery", instance / "query")
    return found


def render(rows: list[dict[str, Any]], names: list[str]) -> str:
    head = "| descriptor | " + " | ".join(f"{n}: recall@1 / mAP / mAP@10" for n in names) + " | training time |"
    lines = [head, "|" + " --- |" * (len(names) + 2)]
    for row in rows:
        cells = [
            f"{row[n]['recall@1']:.3f} / **{row[n]['mAP']:.3f}** / {row[n]['mAP@10']:.3f}" if n in row else "-"
            for n in names
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {row.get('time', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.devsets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devsets", type=Path, default=Path("../shared/devsets"), help="folder of dev sets")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where devsets.md/json go")
    parser.add_argument("--work", type=Path, default=Path("runs/devsets"), help="models, runs and bundles (kept)")
    parser.add_argument("--default", action="store_true", help="also fine-tune with train's default recipe")
    parser.add_argument("--losses", default="", help="comma-separated losses to fine-tune with (default: none)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the --losses runs (default: train's own)")
    args = parser.parse_args(argv)
    if not args.devsets.is_dir():
        parser.error(f"--devsets {args.devsets}: no such folder")
    found = sets(args.devsets, args.work)
    names = list(found)
    first_gallery = next(iter(found.values()))[0]
    rows: list[dict[str, Any]] = []
    for label, pooling, whiten, qe in DESCRIPTORS:
        model = export_backbone(args.work, pooling, first_gallery)
        row: dict[str, Any] = {"name": label}
        for name, (gallery, queries) in found.items():
            index = args.work / "bundles" / f"{name}-{pooling}-{whiten}".replace(" ", "_")
            row[name] = score(model, gallery, queries, index, whiten, qe)
            print(label, name, row[name], flush=True)
        rows.append(row)
    recipes: list[tuple[str, list[str]]] = [("fine-tuned, train's default recipe", [])] if args.default else []
    for loss in [x for x in args.losses.split(",") if x]:
        flags = ["--loss", loss] + (["--epochs", str(args.epochs)] if args.epochs else [])
        recipes.append((f"fine-tuned, {' '.join(flags)}", flags))
    for label, flags in recipes:
        row = {"name": label}
        times = []
        for name, (gallery, queries) in found.items():
            if name == INSTANCE:
                continue  # no classes to train on
            model, seconds = fine_tune(args.work, name, gallery, flags)
            times.append(f"{name} {seconds / 60:.0f} min")
            row[name] = score(model, gallery, queries, args.work / "bundles" / model.parent.name, 0, 0)
            print(row["name"], name, row[name], flush=True)
        row["time"] = ", ".join(times)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "devsets.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = render(rows, names)
    (args.out / "devsets.md").write_text("# Retrieval quality on the dev sets\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
