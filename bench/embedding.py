"""Section a (corpus embedding, JPEG files -> vectors in a saved index) and the fast-decoding
ablation (issue part 3). Every measurement runs in its own process (bench.embed_worker)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ChildError, log, run_child

WORKER = "bench.embed_worker"
LARGE_SIDE = (1024, 1600)  # long side of the large-JPEG copies
ROTATED_EVERY = 10  # every 10th large copy is stored on its side with EXIF orientation 6


# --- inputs ----------------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` in this project's root, output captured (not raised on failure)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def make_small_corpus(work: Path, copies: int) -> Path:
    out = work / f"demo-{copies}"
    images = out / "images"
    if not (out / "manifest.json").is_file():
        log(f"demo corpus: {copies} copies per class -> {out}")
        _python_m(
            "train.demo_data", "--out", str(out), "--copies", str(copies), "--queries", "0", "--force"
        ).check_returncode()
    return images


def make_large_corpus(small: Path, work: Path) -> Path:
    """Every small photo again as a 1024-1600 px JPEG (quality 90): where draft mode pays."""
    from PIL import Image

    out = work / f"{small.parent.name}-large" / "images"
    files = sorted(small.rglob("*.jpg"))
    done = out / ".complete"
    if done.is_file() and done.read_text() == str(len(files)):
        return out
    log(f"large corpus: {len(files)} JPEGs, long side {LARGE_SIDE[0]}-{LARGE_SIDE[1]} px -> {out}")
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(7)
    for i, src in enumerate(files):
        img = Image.open(src).convert("RGB")
        side = int(rng.integers(LARGE_SIDE[0], LARGE_SIDE[1] + 1))
        w, h = img.size
        scale = side / max(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        dest = out / src.relative_to(small)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if i % ROTATED_EVERY == 0:  # stored on its side; EXIF says "rotate 90 CW to display"
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(dest, "JPEG", quality=90, exif=exif.tobytes())
        else:
            img.save(dest, "JPEG", quality=90)
    done.write_text(str(len(files)))
    return out


def _export(out: Path, *flags: str) -> Path:
    """`python -m export --backbone efficientnet_lite0 FLAGS --out out`, unless out holds one."""
    if not (out / "model.json").is_file():
        log(f"exporting efficientnet_lite0 {' '.join(flags)} -> {out}")
        _python_m("export", "--backbone", "efficientnet_lite0", *flags, "--out", str(out)).check_returncode()
    return out


def export_model(work: Path) -> Path:
    return _export(work / "model-efficientnet_lite0")


def export_int8_model(work: Path, check_images: Path) -> Path:
    """The same backbone statically quantised (`--precision int8`), calibrated and checked on the
    bench's small corpus; the export refuses it (and this raises) if it drifts from fp32."""
    return _export(work / "model-efficientnet_lite0-int8", "--precision", "int8", "--check-images", str(check_images))


def int8_quality(fp32: Path, int8: Path, devsets: list[Path]) -> dict[str, Any]:
    """mAP@10 and recall@1 of both models on each labelled dev set (`python -m export.compare`:
    exact search of the queries in the gallery, paired bootstrap of the difference)."""
    args = ["export.compare", "--fp32", str(fp32), "--int8", str(int8), "--speed-images", "0"]
    for d in devsets:
        args += ["--devset", str(d)]
    log(f"  int8 vs fp32 retrieval on {', '.join(d.name for d in devsets)}")
    proc = _python_m(*args)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    report = json.loads(proc.stdout)
    return {d.name: report[d.name] for d in devsets}


def corpus_stats(images: Path) -> dict[str, Any]:
    from PIL import Image

    files = sorted(images.rglob("*.jpg"))
    sizes = [Image.open(f).size for f in files]
    longs = [max(s) for s in sizes]
    return {
        "path": str(images),
        "images": len(files),
        "bytes_mean": int(np.mean([f.stat().st_size for f in files])) if files else 0,
        "long_side_min": min(longs) if longs else 0,
        "long_side_max": max(longs) if longs else 0,
        "megapixels_mean": float(np.mean([w * h for w, h in sizes]) / 1e6) if sizes else 0.0,
    }


# --- the runs --------------------------------------------------------------------------------

ABLATION: list[tuple[str, str, dict[str, Any]]] = [
    # (key, what changes against the indexer's default, spec overrides)
    ("draft_off", "draft off (full-size JPEG decode)", {"draft": "off"}),
    ("draft_gap1", "draft with reducing gap 1 (smallest scale >= model input)", {"draft": "1.0"}),
    ("processes", "process pool (2 workers) instead of threads", {"pool": "process"}),
    ("threads_1", "1 decode thread", {"workers": 1}),
    ("processes_1", "1 decode process", {"workers": 1, "pool": "process"}),
    ("no_overlap", "no overlap: decode a batch, then embed it", {"overlap": False}),
    ("batch_8", "batch 8", {"batch_size": 8}),
    ("batch_16", "batch 16", {"batch_size": 16}),
    ("ort_threads_1", "onnxruntime 1 intra-op thread", {"ort_threads": 1}),
    ("ort_no_spin", "onnxruntime threads do not spin-wait", {"ort_spinning": False}),
]


def _try(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_child(WORKER, spec)
    except ChildError as exc:  # one broken measurement must not lose the rest of the report
        log(f"{label}: FAILED\n{exc}")
        return {"error": str(exc)[-1500:]}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = dict(max(ok, key=lambda r: r["images_per_s"]))
    best["repeats"] = [round(r["images_per_s"], 2) for r in ok]
    return best


def run_section(
    *,
    model: Path,
    corpora: dict[str, Path],
    work: Path,
    repeats: int,
    keras: bool,
    ablation: bool,
    batch_size: int,
    workers: int | None,
    cosine_limit: int,
    int8_model: Path | None = None,
    devsets: list[Path] | None = None,
) -> dict[str, Any]:
    """`int8_model`: also the indexer and the inference ceiling with that model, in the same
    interleaved rounds, against the fp32 ceiling; and both models' retrieval on `devsets`."""

    card = json.loads((model / "model.json").read_text())
    size = [card["input"]["width"], card["input"]["height"]]
    keras_ok = keras and card.get("source") == "pretrained"
    index_dir = work / "bench-index"
    base = {"model": str(model), "index": str(index_dir)}
    idx_default = {**base, "kind": "indexer", "workers": workers, "batch_size": batch_size}
    section: dict[str, Any] = {
        "title": "Corpus embedding: JPEG files on disk -> vectors in a saved index",
        "int8_model": str(int8_model) if int8_model else None,
        "status": "done",
        "model": {"backbone": card["backbone"], "input": size, "dim": card["output"]["dim"], "path": str(model)},
        "baseline": "keras_tfdata",
        "ceiling": "ort_inference",
        "indexer_config": {
            "workers": workers or "default (cpu count, max 8)",
            "batch_size": batch_size,
            "draft_reducing_gap": 2.0,
            "pool": "thread",
            "ort_threads": "default",
        },
        "corpora": {},
    }
    for name, images in corpora.items():
        log(f"section a, {name} corpus: {images}")
        stats = corpus_stats(images)
        spec_img = {"images": str(images)}
        ort_spec = {
            **base,
            **spec_img,
            "kind": "ort",
            "batch_sizes": [8, 32],
            "min_seconds": 1.0 if stats["images"] < 100 else 3.0,
        }
        ort_runs, idx_runs, ort8_runs, idx8_runs = [], [], [], []
        for r in range(repeats):  # interleaved, so all of them see the same background load
            log(f"  onnxruntime inference only ({r + 1}/{repeats})")
            ort_runs.append(_try("ort", ort_spec))
            log(f"  our indexer, build_index end to end ({r + 1}/{repeats})")
            idx_runs.append(_try("indexer", {**idx_default, **spec_img}))
            if int8_model is not None:
                log(f"  int8: onnxruntime inference only, and our indexer ({r + 1}/{repeats})")
                ort8_runs.append(_try("ort_int8", {**ort_spec, "model": str(int8_model)}))
                idx8_runs.append(_try("indexer_int8", {**idx_default, **spec_img, "model": str(int8_model)}))
        rows: dict[str, dict[str, Any]] = {"ort_inference": _best(ort_runs), "indexer": _best(idx_runs)}
        if int8_model is not None:
            rows["indexer_int8"], rows["ort_inference_int8"] = _best(idx8_runs), _best(ort8_runs)
        if keras_ok:  # best of `repeats` too: the baseline gets the same chance as the indexer
            single, tfdata = [], []
            for r in range(repeats):
                log(f"  seeds' way: PIL + Keras model.predict, one image at a time ({r + 1}/{repeats})")
                single.append(
                    _try("keras_single", {**base, **spec_img, "kind": "keras_single", "backbone": card["backbone"]})
                )
                log(f"  seeds' way: tf.data pipeline + Keras, batches of 16, seed 004 ({r + 1}/{repeats})")
                tfdata.append(
                    _try(
                        "keras_tfdata",
                        {**base, **spec_img, "kind": "keras_tfdata", "backbone": card["backbone"], "batch_size": 16},
                    )
                )
            rows["keras_single"], rows["keras_tfdata"] = _best(single), _best(tfdata)
        else:
            why = "no Keras model for this backbone (not a pretrained export)" if keras else "skipped (--no-keras)"
            rows["keras_single"] = {"skipped": why}
            rows["keras_tfdata"] = {"skipped": why}
        ablation_rows: dict[str, dict[str, Any]] = {}
        decode_rows: dict[str, dict[str, Any]] = {}
        if ablation:
            runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in ABLATION}
            for r in range(repeats):  # interleaved rounds, best run of each kept
                for key, _what, over in ABLATION:
                    log(f"  ablation: {key} ({r + 1}/{repeats})")
                    runs[key].append(_try(key, {**idx_default, **spec_img, **over}))
            ablation_rows = {key: _best(v) for key, v in runs.items()}
            for pool in ("thread", "process"):
                for w in (1, 2):
                    for draft in ("off", "default"):
                        key = f"{pool}_{w}_draft_{'off' if draft == 'off' else 'on'}"
                        log(f"  decode only: {key}")
                        decode_rows[key] = _try(
                            key,
                            {**spec_img, "kind": "decode", "size": size, "workers": w, "pool": pool, "draft": draft},
                        )
        log("  embeddings with and without draft decoding")
        cosine = _try("cosine", {**base, **spec_img, "kind": "cosine", "gaps": ["2.0", "1.0"], "limit": cosine_limit})
        section["corpora"][name] = {
            "stats": stats,
            "rows": rows,
            "ablation": ablation_rows,
            "decode_only": decode_rows,
            "cosine": cosine,
        }
        _ratios(section["corpora"][name])
    if int8_model is not None and devsets:
        section["int8_quality"] = int8_quality(model, int8_model, devsets)
    shutil.rmtree(index_dir, ignore_errors=True)
    return section


def _rate(row: dict[str, Any] | None) -> float | None:
    if not row or "images_per_s" not in row:
        return None
    return float(row["images_per_s"])


def _ratios(corpus: dict[str, Any]) -> None:
    rows = corpus["rows"]
    base = _rate(rows.get("keras_tfdata"))
    ceiling = _rate(rows.get("ort_inference"))
    default = _rate(rows.get("indexer"))
    for group in (rows, corpus["ablation"]):
        for row in group.values():
            rate = _rate(row)
            if rate is None:
                continue
            row["vs_baseline"] = rate / base if base else None
            row["vs_ceiling"] = rate / ceiling if ceiling else None
            if group is corpus["ablation"]:
                row["vs_default"] = rate / default if default else None
    d = corpus["decode_only"]
    ref = _rate(d.get("thread_1_draft_off"))
    for row in d.values():
        rate = _rate(row)
        if rate is not None and ref:
            row["vs_thread_1_draft_off"] = rate / ref
