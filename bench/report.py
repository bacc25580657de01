"""The Markdown report (report.md) rendered from the JSON (report.json): one source of figures."""

from __future__ import annotations

import json
from typing import Any

SECTION_ORDER = ("a", "b", "c", "d", "e", "f")


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def _x(ratio: Any) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


A_ROWS = [
    ("indexer", "our indexer: `build_index` end to end (files -> saved bundle)"),
    ("ort_inference", "onnxruntime inference only, pre-decoded batches in memory"),
    ("indexer_int8", "our indexer with the int8 model (`--precision int8`), end to end"),
    ("ort_inference_int8", "onnxruntime inference only, int8 model"),
    ("keras_tfdata", "seeds' way: tf.data map(decode_jpeg, resize) + Keras, batches of 16 (seed 004)"),
    ("keras_single", "seeds' way: PIL + Keras `model.predict`, one image at a time"),
]


def _section_a(sec: dict[str, Any]) -> list[str]:
    m = sec["model"]
    lines = [
        f"Model: `{m['backbone']}` (input {m['input'][0]}x{m['input'][1]}, {m['dim']} dims), onnxruntime on the CPU. "
        "Images/s over all images, wall time from the file list to the saved index (our indexer: "
        "`build_index(..., rebuild=True)` including listing, hashing, decoding, embedding, FAISS add and the bundle save; "
        "the seeds' ways: decode, embed, FAISS add, `write_index`; their Keras model build is not counted). "
        "Baseline (1.00x) = the seeds' tf.data way; ceiling = onnxruntime inference alone (best of batch 8 and 32, "
        "the indexer's thread settings). Each speed is the best of the run's --repeats runs (listed in the notes).",
        "",
    ]
    cfg = sec.get("indexer_config", {})
    lines.append("Indexer settings: " + ", ".join(f"{k} {v}" for k, v in cfg.items()) + ".")
    lines.append("")
    for name, corpus in sec["corpora"].items():
        st = corpus["stats"]
        lines.append(
            f"#### {name.capitalize()} JPEGs: {st['images']} files, long side {st['long_side_min']}-{st['long_side_max']} px, "
            f"{st['megapixels_mean']:.2f} MP and {st['bytes_mean'] / 1024:.0f} KiB on average"
        )
        lines.append("")
        rows = []
        for key, label in A_ROWS:
            if key not in corpus["rows"] and key.endswith("_int8"):
                continue  # a run without the int8 model
            r = corpus["rows"].get(key, {})
            mark = " **(baseline)**" if key == sec["baseline"] else (" (ceiling)" if key == sec["ceiling"] else "")
            if "images_per_s" not in r:
                rows.append([label + mark, "-", "-", "-", "-", r.get("skipped") or ("FAILED" if "error" in r else "-")])
                continue
            extra = ""
            if key == "ort_inference":
                extra = ", ".join(f"batch {b}: {_f(v['images_per_s'])}/s" for b, v in r.get("by_batch", {}).items())
            elif key in ("indexer", "indexer_int8"):
                t = r.get("timings", {})
                extra = f"decode {_f(t.get('decode'), 2)}s (summed over workers), embed {_f(t.get('embed'), 2)}s, save {_f(t.get('save'), 2)}s"
            elif "setup_s" in r:
                extra = f"model build {_f(r['setup_s'])}s not counted"
            if r.get("cpu_ms_per_image"):
                extra += f"; CPU {_f(r['cpu_ms_per_image'])} ms/image"
            if r.get("repeats") and len(r["repeats"]) > 1:
                extra += f"; runs: {', '.join(_f(x) for x in r['repeats'])}/s"
            rows.append(
                [
                    label + mark,
                    _f(r["images_per_s"]),
                    _f(r.get("seconds"), 2),
                    _x(r.get("vs_baseline")),
                    _x(r.get("vs_ceiling")),
                    extra,
                ]
            )
        lines += _table(["way", "images/s", "seconds", "vs baseline", "vs ceiling", "notes"], rows)
    quality = sec.get("int8_quality")
    if quality:
        lines += [
            "#### int8 against fp32 on the labelled dev sets",
            "",
            "`python -m export.compare`: exact search of each dev set's queries in its gallery, the indexer's "
            "mAP@10 and recall@1; the difference with a paired bootstrap 95% interval over the queries.",
            "",
        ]
        if "error" in quality:
            lines += ["FAILED:", "", "```", str(quality["error"]), "```", ""]
        else:
            rows = []
            for name, q in quality.items():
                d = q["int8_minus_fp32"]["mAP@10"]
                rows.append(
                    [
                        name,
                        f"{q['fp32']['mAP@10']:.4f} / {q['fp32']['recall@1']:.3f}",
                        f"{q['int8']['mAP@10']:.4f} / {q['int8']['recall@1']:.3f}",
                        f"{d['mean']:+.4f} ({d['ci95'][0]:+.3f}..{d['ci95'][1]:+.3f})",
                    ]
                )
            lines += _table(["dev set", "fp32 mAP@10 / recall@1", "int8 mAP@10 / recall@1", "int8 - fp32 mAP@10"], rows)
    return lines


def _fast_decoding(sec: dict[str, Any]) -> list[str]:
    from bench.embedding import ABLATION

    lines = [
        "Each row changes one thing in the indexer's default pipeline (threads, draft with reducing gap 2, "
        "decode overlapped with inference) and runs `build_index` end to end again; 1.00x = the default row above.",
        "",
    ]
    names = list(sec["corpora"])
    header = (
        ["change"]
        + [f"{n}: images/s" for n in names]
        + [f"{n}: vs default" for n in names]
        + [f"{n}: CPU ms/image" for n in names]
    )
    rows = [
        ["(default: threads, draft, overlap)"]
        + [_f(sec["corpora"][n]["rows"].get("indexer", {}).get("images_per_s")) for n in names]
        + ["1.00x" for _ in names]
        + [_f(sec["corpora"][n]["rows"].get("indexer", {}).get("cpu_ms_per_image")) for n in names]
    ]
    for key, what, _ in ABLATION:
        cells = [what]
        ab = [sec["corpora"][n]["ablation"].get(key, {}) for n in names]
        cells += [_f(r.get("images_per_s")) if "images_per_s" in r else ("FAILED" if "error" in r else "-") for r in ab]
        cells += [_x(r.get("vs_default")) for r in ab]
        cells += [_f(r.get("cpu_ms_per_image")) for r in ab]
        rows.append(cells)
    if any(sec["corpora"][n]["ablation"] for n in names):
        lines += _table(header, rows)
    dec = {n: sec["corpora"][n]["decode_only"] for n in names if sec["corpora"][n]["decode_only"]}
    if dec:
        lines.append("Decode + resize alone (no inference), images/s; 1.00x = 1 thread, no draft:")
        lines.append("")
        keys = list(next(iter(dec.values())))
        rows = []
        for k in keys:
            pool, w, _, d = k.split("_")
            rows.append(
                [f"{w} {pool}{'es' if pool == 'process' and w != '1' else 's' if w != '1' else ''}, draft {d}"]
                + [
                    f"{_f(dec[n][k].get('images_per_s'))} ({_x(dec[n][k].get('vs_thread_1_draft_off'))})"
                    if n in dec and k in dec[n]
                    else "-"
                    for n in dec
                ]
            )
        lines += _table(["decode workers"] + list(dec), rows)
    lines.append("Embeddings with and without draft decoding (cosine, image by image, same model):")
    lines.append("")
    rows = []
    for n in names:
        c = sec["corpora"][n].get("cosine", {})
        for gap in ("2.0", "1.0"):
            g = c.get(f"gap{gap}")
            if g:
                rows.append(
                    [
                        n,
                        gap + (" (indexer default)" if gap == "2.0" else ""),
                        f"{g['drafted']} of {c['images']}",
                        f"{g['min']:.4f}",
                        f"{g['mean']:.4f}",
                    ]
                )
    lines += _table(["corpus", "reducing gap", "images decoded at reduced scale", "min cosine", "mean cosine"], rows)
    return lines


def _section_c(sec: dict[str, Any]) -> list[str]:
    d = sec["data"]
    lines = [
        f"{sec['n']:,} vectors of {sec['dim']} dims ({_mb(d['raw_bytes'])} as float32): {d['clusters']} clusters on the unit "
        f"sphere, each varying along its own {d['rank']}-dim subspace plus isotropic noise, L2-normalised "
        f"(`bench/synthetic.py`); {sec['queries']:,} held-out queries from the same distribution; recall@10 against "
        f"exact search. Indexes made by `indexer.faiss_index` (what a bundle holds), searched with its `search`; "
        f"FAISS with {sec['omp_threads']} OpenMP threads. Batch = all queries in one call; single = one query per call "
        f"({sec['queries_single']} queries), also with 1 OpenMP thread. Baseline (1.00x) = flat.",
        "",
    ]
    rows = []
    for name, info in sec["indexes"].items():
        params = ", ".join(f"{k}={v}" for k, v in info.get("params", {}).items() if k not in ("codec", "train_size"))
        for i, p in enumerate(info["points"]):
            first = i == 0
            rows.append(
                [
                    (f"**{name}** (baseline)" if name == sec["baseline"] else f"**{name}**") if first else "",
                    (params or "-") if first else "",
                    p["setting"],
                    _f(info["build_s"]) + "s" if first else "",
                    _x(info.get("build_vs_flat")) if first else "",
                    _mb(info["index_bytes"]) if first else "",
                    _mb(info.get("rss_delta_bytes")) if first else "",
                    _f(p["qps_batch"]),
                    _x(p.get("qps_batch_vs_flat")),
                    _f(p["qps_single"]),
                    _x(p.get("qps_single_vs_flat")),
                    _f(p.get("qps_single_1thread")),
                    f"{p['recall_at_10']:.3f}",
                ]
            )
    lines += _table(
        [
            "index",
            "params",
            "search setting",
            "build",
            "build vs flat",
            "index size",
            "RSS growth",
            "q/s batch",
            "vs flat",
            "q/s single",
            "vs flat",
            "q/s single, 1 thread",
            "recall@10",
        ],
        rows,
    )
    hnsw = sec["indexes"].get("hnsw", {})
    if hnsw.get("probes"):
        lines.append(
            "HNSW parameters were chosen by probing the insertion rate on a subset and projecting the build of all "
            "vectors (first candidate within the time budget; M=32/efConstruction=200 is `indexer.faiss_index`'s default):"
        )
        lines.append("")
        lines += _table(
            ["M", "efConstruction", "probe vectors", "vectors/s", "projected build"],
            [
                [
                    str(p["M"]),
                    str(p["efConstruction"]),
                    _f(p["probe_vectors"]),
                    _f(p["probe_rate_per_s"]),
                    _f(p["projected_build_s"]) + "s",
                ]
                for p in hnsw["probes"]
            ],
        )
    return lines


def _section_e(sec: dict[str, Any]) -> list[str]:
    v = sec.get("versions", {})
    lines = [
        f"{sec['n']:,} vectors from the same generator as section c, {sec['queries']:,} queries, recall@10 against exact "
        f"search. Baseline (1.00x) = FAISS flat. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + ".",
        "",
    ]
    rows = []
    for name, r in sec["rows"].items():
        rows.append(
            [
                name + (" **(baseline)**" if name == sec["baseline"] else ""),
                r["index"],
                _f(r["build_s"], 2) + "s",
                _x(r.get("build_vs_baseline")),
                _f(r["qps_batch"]),
                _x(r.get("qps_batch_vs_baseline")),
                _f(r["qps_single"]),
                _x(r.get("qps_single_vs_baseline")),
                f"{r['recall_at_10']:.3f}",
            ]
        )
    lines += _table(
        [
            "store",
            "index / mode",
            "build (insert + index)",
            "vs baseline",
            "q/s batch",
            "vs baseline",
            "q/s single",
            "vs baseline",
            "recall@10",
        ],
        rows,
    )
    lines.append(
        "FAISS answers single queries with 1 OpenMP thread here (batches with all cores): section c shows that "
        "one query per call on several OpenMP threads is many times slower on this machine."
    )
    lines.append("")
    for name, why in sec.get("skipped", {}).items():
        lines.append(f"- {name}: {why}")
    lines.append("")
    return lines


def render(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    lines = [
        f"# Benchmark report ({report['mode']} run)",
        "",
        f"Generated {report['generated_at']} by `python -m bench {' '.join(report.get('argv', []))}` in {report['seconds']:.0f}s.",
        "Speeds are ratios to a baseline measured in the same run (absolute figures beside them): this machine is shared "
        "and noisy.",
        "",
    ]
    lines += ["## Machine", ""]
    ram = m.get("ram_bytes")
    lines += [
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {ram / 2**30:.1f} GiB RAM"
        if ram
        else f"- CPU: {m['cpu']}",
        f"- OS: {m['os']}, {m['arch']}; GPU: {m.get('gpu') or 'none'}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- Load average (1/5/15 min) at start {report.get('load_start')}, at end {report.get('load_end')}",
    ]
    if report.get("busy_note"):
        lines.append(f"- **Note:** {report['busy_note']}")
    lines.append("")
    lines += ["## Targets", ""]
    if report["targets"]:
        rows = [
            [
                t["name"],
                t["target"],
                t["measured"],
                ("**reached**" if t["reached"] else "**not reached**")
                + (" (not with the defaults)" if t.get("informational") else ""),
            ]
            for t in report["targets"]
        ]
        lines += _table(["target", "wanted", "measured", ""], rows)
    else:
        lines += ["No target was measured in this run (section a not run).", ""]
    titles = {
        "a": "a. Corpus embedding",
        "b": "b. Search over HTTP",
        "c": "c. FAISS index types",
        "d": "d. Service memory per 100k vectors",
        "e": "e. Against other vector stores",
        "f": "f. What `--index-type auto` builds at a million vectors",
    }
    for key in SECTION_ORDER:
        sec = report["sections"].get(key)
        lines.append(f"## {titles[key]}")
        lines.append("")
        if sec and sec.get("status") == "failed":
            lines += ["**FAILED:**", "", "```", sec.get("error", "")[-1500:], "```", ""]
            continue
        if not sec or sec.get("status") != "done":
            lines.append(f"_{(sec or {}).get('note', 'not run')}_")
            lines.append("")
            continue
        if sec.get("from_run"):
            lines += [f"_(from the run of {sec['from_run']})_", ""]
        renderer = {"a": _section_a, "c": _section_c, "e": _section_e}.get(key)
        if renderer is None or "markdown" in sec:  # b and d: the section brings its own Markdown
            lines += [sec.get("markdown", "```json\n" + json.dumps(sec, indent=1)[:4000] + "\n```"), ""]
            continue
        lines += renderer(sec)
        if key == "a":
            lines += ["### Fast decoding (issue part 3): what each step gives", ""]
            lines += _fast_decoding(sec)
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines).rstrip() + "\n"
