"""Benchmarks of the whole pipeline; writes report.md and report.json.

    python -m bench [--out bench/results] [--quick] [--sections a,c,e] [--faiss-n 1000000] ...
    python -m bench bundle --model DIR --images DIR --pad N --index-type T --out DIR
    python -m bench writes --model DIR --images DIR [--cases flat:1000,...] [--out bench/results]

Sections (the keys of "sections" in report.json):
  a  corpus embedding, images/s from JPEG files to a saved index: our indexer vs the seeds' Keras
     ways vs onnxruntime inference alone; plus the fast-decoding ablation (draft, threads vs
     processes, overlap, batch size, onnxruntime threads)
  b  search over HTTP (placeholder: added with the service)
  c  FAISS index types on --faiss-n synthetic vectors: build time, memory, queries/s, recall@10
  d  service memory per 100k vectors (placeholder: added with b)
  e  other vector stores (LanceDB, Qdrant local mode) vs FAISS on --store-n vectors
  f  what `--index-type auto` builds for --auto-n vectors of each of --auto-dims (1M x 1280 and
     1M x 256 by default), plus --auto-extra rows (IVF-PQ re-scored from float vectors): build
     time on all cores, size, memory, recall@10, single-query queries/s (bench/auto_index.py)

Speeds are reported as ratios to a baseline measured in the same run (absolute figures too),
because the machines this runs on are shared and noisy. Every measurement runs in a fresh
process. --quick is a small smoke run (the test suite uses it, with even smaller settings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import embedding
from bench.common import ChildError, load_average, log, machine, run_child, versions
from bench.report import SECTION_ORDER, render

SECTIONS = {
    "a": "Corpus embedding",
    "b": "Search over HTTP",
    "c": "FAISS index types",
    "d": "Service memory per 100k vectors",
    "e": "Against other vector stores",
    "f": "What `--index-type auto` builds at a million vectors",
}
PENDING: dict[str, str] = {}
TARGET_CEILING = 0.70
TARGET_BASELINE = 4.0
TARGET_COSINE = 0.99
TARGET_INT8 = 1.4  # the int8 indexer end to end against the fp32 inference ceiling
TARGET_INT8_MAP_DROP = 0.01  # mAP@10, fp32 - int8, on each dev set


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for report.md and report.json")
    p.add_argument("--quick", action="store_true", help="a small smoke run (minutes, not half an hour)")
    p.add_argument(
        "--sections",
        default="a,b,c,e,f",
        help="comma-separated keys of the sections to run (default a,b,c,e,f; b also measures d)",
    )
    p.add_argument(
        "--http-n", type=int, help="vectors in the bundle of section b (default 100,000; 2,000 with --quick)"
    )
    p.add_argument(
        "--http-duration",
        type=float,
        default=20.0,
        help="seconds measured per batching setting and concurrency in section b (default 20)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "imgsearch-bench",
        help="scratch folder: corpora, exported model and synthetic vectors are cached here between runs",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="an exported model folder (model.onnx + model.json); default: export efficientnet_lite0 into --work",
    )
    p.add_argument(
        "--copies", type=int, help="demo corpus copies per class (19 classes); default 30 (570 photos), 2 with --quick"
    )
    p.add_argument(
        "--large",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run section a on 1024-1600 px copies of the corpus (default: on, off with --quick)",
    )
    p.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fast-decoding ablation runs (default: on, off with --quick)",
    )
    p.add_argument(
        "--keras", action=argparse.BooleanOptionalAction, default=True, help="the seeds' Keras ways (needs TensorFlow)"
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="section a also with the int8 export of the backbone (default: on, off with --quick or --model)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="runs of the indexer and of the inference ceiling, best kept (default 2, 1 with --quick)",
    )
    p.add_argument(
        "--devsets",
        type=Path,
        default=Path(__file__).resolve().parent.parent.parent / "shared" / "devsets",
        help="labelled dev sets (DIR/<set>/gallery, query) on which section a compares int8 with fp32 "
        "(default ../shared/devsets; skipped when missing)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="the indexer's batch size (build_index's default: 32)")
    p.add_argument(
        "--workers", type=int, default=None, help="the indexer's decode workers (default: build_index's own)"
    )
    p.add_argument("--faiss-n", type=int, help="vectors for section c (default 1,000,000; 50,000 with --quick)")
    p.add_argument("--faiss-queries", type=int, help="queries for section c (default 1000; 200 with --quick)")
    p.add_argument(
        "--hnsw-budget-s", type=float, help="target HNSW build time in section c (default 600; 30 with --quick)"
    )
    p.add_argument(
        "--pq-m",
        type=int,
        default=64,
        help="PQ sub-quantizers of the IVF-PQ index in section c (must divide the dimension)",
    )
    p.add_argument("--auto-n", type=int, help="vectors for section f (default 1,000,000; 20,000 with --quick)")
    p.add_argument("--auto-dims", default="1280,256", help="dimensions of section f's auto rows (default 1280,256)")
    p.add_argument(
        "--auto-extra",
        default="ivf:pq:8@1280",
        help="section f rows beside auto's pick, TYPE:CODEC:REFINE@DIM,... (default ivf:pq:8@1280)",
    )
    p.add_argument("--store-n", type=int, help="vectors for section e (default 100,000; 10,000 with --quick)")
    p.add_argument(
        "--merge", action="store_true", help="keep the sections of an existing report.json that this run does not redo"
    )
    p.add_argument(
        "--render-only", action="store_true", help="measure nothing: write report.md again from --out's report.json"
    )
    args = p.parse_args(argv)
    q = args.quick
    args.copies = args.copies or (2 if q else 30)
    args.large = (not q) if args.large is None else args.large
    args.ablation = (not q) if args.ablation is None else args.ablation
    args.int8 = (not q and args.model is None) if args.int8 is None else args.int8
    args.repeats = args.repeats or (1 if q else 2)
    args.faiss_n = args.faiss_n or (50_000 if q else 1_000_000)
    args.faiss_queries = args.faiss_queries or (200 if q else 1000)
    args.hnsw_budget_s = args.hnsw_budget_s or (30.0 if q else 600.0)
    args.store_n = args.store_n or (10_000 if q else 100_000)
    args.auto_n = args.auto_n or (20_000 if q else 1_000_000)
    args.http_n = args.http_n or (2_000 if q else 100_000)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if "d" in args.sections and "b" not in args.sections:
        args.sections.append("b")  # d is measured by the servers of b
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}")
    if args.faiss_n < 1000 or args.store_n < 1000:
        p.error("--faiss-n and --store-n must be at least 1000")
    return args


def _dim(model: Path) -> int:
    return int(json.loads((model / "model.json").read_text())["output"]["dim"])


def _targets(sec_a: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    labels = {"small": "demo corpus (small JPEGs)", "large": "large JPEGs (1024-1600 px)"}
    for name, corpus in sec_a.get("corpora", {}).items():
        rows = corpus["rows"]
        idx = rows.get("indexer", {})
        if "images_per_s" not in idx:
            continue
        ceiling = rows.get("ort_inference", {}).get("images_per_s")
        if ceiling:
            r = idx["images_per_s"] / ceiling
            out.append(
                {
                    "name": f"indexer vs onnxruntime inference only, {labels.get(name, name)}",
                    "target": f">= {TARGET_CEILING:.0%} of the ceiling",
                    "measured": f"{r:.0%} ({idx['images_per_s']:.1f} vs {ceiling:.1f} images/s)",
                    "ratio": r,
                    "reached": r >= TARGET_CEILING,
                    "corpus": name,
                }
            )
        base = rows.get("keras_tfdata", {}).get("images_per_s")
        if base:
            r = idx["images_per_s"] / base
            out.append(
                {
                    "name": f"indexer vs the seeds' tf.data + Keras way, {labels.get(name, name)}",
                    "target": f">= {TARGET_BASELINE:.0f}x",
                    "measured": f"{r:.1f}x ({idx['images_per_s']:.1f} vs {base:.1f} images/s)",
                    "ratio": r,
                    "reached": r >= TARGET_BASELINE,
                    "corpus": name,
                }
            )
        # informational: the best single change of the ablation that keeps the draft default
        # (gap 1 changes the embeddings more than the cosine target allows)
        ablation = {
            k: v for k, v in corpus.get("ablation", {}).items() if "images_per_s" in v and not k.startswith("draft")
        }
        if ablation and ceiling:
            key, row = max(ablation.items(), key=lambda kv: kv[1]["images_per_s"])
            r = row["images_per_s"] / ceiling
            if r > idx["images_per_s"] / ceiling:
                out.append(
                    {
                        "name": f"(not the default) indexer with `{key}` from the ablation, {labels.get(name, name)}",
                        "target": f">= {TARGET_CEILING:.0%} of the ceiling",
                        "measured": f"{r:.0%} of the ceiling"
                        + (f", {row['images_per_s'] / base:.1f}x baseline" if base else "")
                        + f" ({row['images_per_s']:.1f} images/s)",
                        "ratio": r,
                        "reached": r >= TARGET_CEILING,
                        "corpus": name,
                        "informational": True,
                    }
                )
        int8 = rows.get("indexer_int8", {}).get("images_per_s")
        if int8 and ceiling:
            r = int8 / ceiling
            fp32 = idx["images_per_s"]
            out.append(
                {
                    "name": f"int8 indexer end to end vs the fp32 inference ceiling, {labels.get(name, name)}",
                    "target": f">= {TARGET_INT8}x",
                    "measured": f"{r:.2f}x ({int8:.1f} vs {ceiling:.1f} images/s; fp32 indexer {fp32:.1f}, "
                    f"{int8 / fp32:.2f}x)",
                    "ratio": r,
                    "reached": r >= TARGET_INT8,
                    "corpus": name,
                }
            )
    for name, q in sec_a.get("int8_quality", {}).items():
        if not isinstance(q, dict) or "fp32" not in q:
            continue
        drop = q["fp32"]["mAP@10"] - q["int8"]["mAP@10"]
        out.append(
            {
                "name": f"mAP@10 drop from fp32 to int8, {name} ({q['queries']} queries)",
                "target": f"<= {TARGET_INT8_MAP_DROP}",
                "measured": f"{drop:+.4f} ({q['fp32']['mAP@10']:.4f} -> {q['int8']['mAP@10']:.4f})",
                "ratio": drop,
                "reached": drop <= TARGET_INT8_MAP_DROP,
            }
        )
    cos = [(n, c["cosine"]["gap2.0"]) for n, c in sec_a.get("corpora", {}).items() if "gap2.0" in c.get("cosine", {})]
    if cos:
        worst = min(g["min"] for _, g in cos)
        out.append(
            {
                "name": "embeddings with vs without draft decoding (indexer default)",
                "target": f"cosine >= {TARGET_COSINE}",
                "measured": "min " + ", ".join(f"{n} {g['min']:.4f}" for n, g in cos),
                "ratio": worst,
                "reached": worst >= TARGET_COSINE,
            }
        )
    return out


def _finish(report: dict[str, Any], args: argparse.Namespace, t_start: float, loads: list[Any]) -> None:
    """Fill in what is derived, and write both files (after each section too: a run that is
    stopped half-way still leaves the sections it finished)."""
    report = dict(report, sections=dict(report["sections"]))
    for key in SECTION_ORDER:
        if key not in report["sections"]:
            note = PENDING.get(key, f"{SECTIONS[key]}: not run this time (--sections {','.join(args.sections)})")
            report["sections"][key] = {
                "title": SECTIONS[key],
                "status": "pending" if key in PENDING else "not run",
                "note": note,
            }
    report["sections"] = {k: report["sections"][k] for k in SECTION_ORDER}
    if report["sections"]["a"].get("status") == "done":
        report["targets"] = _targets(report["sections"]["a"])
    report["load_end"] = load_average()
    report["load_samples"] = loads + [report["load_end"]]
    cores = report["machine"]["cores"] or 1
    peak = max((la[0] for la in report["load_samples"] if la), default=0.0)
    if peak > 1.25 * cores:  # this benchmark alone keeps about `cores` busy
        report["busy_note"] = (
            f"the machine was busy with other work during this run (1-minute load average up to {peak:.1f} "
            f"on {cores} cores, of which this benchmark accounts for at most about {cores}): absolute figures "
            "are low and noisy; the ratios are the figures to read."
        )
    else:
        report.pop("busy_note", None)
    report["seconds"] = time.perf_counter() - t_start
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(render(report))


def _run_http(report: dict[str, Any], args: argparse.Namespace, model: Path) -> None:
    """Sections b and d: a real server on a padded bundle, with the demo corpus's held-out queries."""
    from bench import http_search
    from train.demo_data import build_demo_corpus

    corpus = args.work / "demo-http"
    build_demo_corpus(corpus, copies=20, queries=4, seed=0)
    result = http_search.run_http_search_bench(
        model,
        corpus / "images",
        args.work / "http",
        n_vectors=args.http_n,
        duration_s=args.http_duration,
        queries_dir=corpus / "queries",
        quick=args.quick,
    )
    text = result.pop("markdown", None) or http_search.render_markdown(result)
    # The fragment holds both sections, each under its own "### b." / "### d." heading.
    part_b, _, part_d = text.partition("### d.")
    report["sections"]["b"] = {**result, "status": "done", "markdown": part_b.strip()}
    report["sections"]["d"] = {
        "status": "done",
        "memory": result.get("memory"),
        "markdown": ("### d." + part_d).strip() if part_d else "_(measured with b, above)_",
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bundle":  # python -m bench bundle ...: a padded bundle (bench/padded_bundle.py)
        from bench.padded_bundle import main as bundle_main

        return bundle_main(argv[1:])
    if argv and argv[0] == "writes":  # python -m bench writes ...: online writes by size (bench/writes.py)
        from bench.writes import main as writes_main

        return writes_main(argv[1:])
    args = _parse(argv)
    if args.render_only:
        (args.out / "report.md").write_text(render(json.loads((args.out / "report.json").read_text())))
        return 0
    t_start = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    loads = [load_average()]
    report: dict[str, Any] = {
        "schema": 1,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "versions": versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_start": loads[0],
        "sections": {},
        "targets": [],
        "notes": [],
    }
    previous = args.out / "report.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        for key, sec in old.get("sections", {}).items():
            if key not in args.sections and sec.get("status") == "done":
                report["sections"][key] = {**sec, "from_run": old.get("generated_at")}
    model: Path | None = None
    if {"a", "b", "c", "e"} & set(args.sections):
        model = args.model or embedding.export_model(args.work)
    dim = _dim(model) if model else 1280

    if "a" in args.sections:
        assert model is not None
        small = embedding.make_small_corpus(args.work, args.copies)
        corpora = {"small": small}
        if args.large:
            corpora["large"] = embedding.make_large_corpus(small, args.work)
        try:
            int8_model = embedding.export_int8_model(args.work, small) if args.int8 else None
            report["sections"]["a"] = embedding.run_section(
                model=model,
                corpora=corpora,
                work=args.work,
                repeats=args.repeats,
                keras=args.keras,
                ablation=args.ablation,
                batch_size=args.batch_size,
                workers=args.workers,
                cosine_limit=40 if args.quick else 300,
                int8_model=int8_model,
                devsets=[d for d in sorted(args.devsets.glob("*")) if (d / "query").is_dir()]
                if args.devsets.is_dir()
                else [],
            )
        except (ChildError, OSError, ValueError, subprocess.CalledProcessError) as exc:
            report["sections"]["a"] = {"status": "failed", "error": str(exc)}
        loads.append(load_average())
        _finish(report, args, t_start, loads)
    if "b" in args.sections:
        assert model is not None
        log(f"sections b and d: POST /search over HTTP on {args.http_n} vectors")
        try:
            _run_http(report, args, model)
        except (ChildError, OSError, RuntimeError, ValueError) as exc:
            report["sections"]["b"] = {"status": "failed", "error": str(exc)}
        loads.append(load_average())
        _finish(report, args, t_start, loads)
    if "c" in args.sections:
        log(f"section c: FAISS on {args.faiss_n} vectors")
        spec = {
            "n": args.faiss_n,
            "dim": dim,
            "queries": args.faiss_queries,
            "queries_single": 50 if args.quick else 200,
            "work": str(args.work),
            "hnsw_budget_s": args.hnsw_budget_s,
            "hnsw_probe_n": min(args.faiss_n, 5000 if args.quick else 10_000),
            "keep_data": False,
            "pq_m": args.pq_m,
        }
        try:
            report["sections"]["c"] = run_child("bench.faiss_bench", spec, timeout=3 * 3600)
        except ChildError as exc:
            report["sections"]["c"] = {"status": "failed", "error": str(exc)}
        loads.append(load_average())
        _finish(report, args, t_start, loads)
    if "e" in args.sections:
        log(f"section e: vector stores on {args.store_n} vectors")
        spec = {
            "n": args.store_n,
            "dim": dim,
            "queries": 100 if args.quick else 500,
            "queries_single": 20 if args.quick else 50,
            "work": str(args.work),
        }
        try:
            report["sections"]["e"] = run_child("bench.stores", spec, timeout=3600)
        except ChildError as exc:
            report["sections"]["e"] = {"status": "failed", "error": str(exc)}
        loads.append(load_average())
        _finish(report, args, t_start, loads)
    if "f" in args.sections:
        from bench.auto_index import parse_extra

        log(f"section f: what auto builds for {args.auto_n} vectors")
        spec = {
            "n": args.auto_n,
            "dims": [int(d) for d in args.auto_dims.split(",") if d],
            "extra": parse_extra(args.auto_extra),
            "work": str(args.work),
        }
        try:
            report["sections"]["f"] = run_child("bench.auto_index", spec, timeout=3 * 3600)
        except (ChildError, ValueError) as exc:
            report["sections"]["f"] = {"status": "failed", "error": str(exc)}
        loads.append(load_average())
        _finish(report, args, t_start, loads)
    _finish(report, args, t_start, loads)
    report = json.loads((args.out / "report.json").read_text())
    log(f"wrote {args.out / 'report.md'} and {args.out / 'report.json'} in {report['seconds']:.0f}s")
    failed = [k for k, s in report["sections"].items() if s.get("status") == "failed"]
    if failed:
        log(f"FAILED sections: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
