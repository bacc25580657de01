"""The index `--index-type auto` picks for N synthetic vectors, built and measured as a build makes it.

    python -m bench.auto_index [--n 1000000] [--dims 1280,256] [--extra ivf:pq:8@1280] [--out bench/results]

(`make bench` runs it as section f.)

For each dimension: what `choose_index("auto", ...)` picks on this machine (its build budget and
cores), the build time (IVF k-means on its capped sample, or HNSW insertions, on every core),
the index size, resident-memory growth, single-query queries/s (one thread, as the service
searches), and recall@10 against exact search on 1,000 held-out queries. Vectors come from
bench/synthetic.py (clustered on the unit sphere, as in section c). Writes auto_index.md/json.
--extra adds rows that are not auto's pick: TYPE:CODEC:REFINE@DIM (for example the IVF-PQ codec,
re-scored from float vectors, at 1,280 dimensions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.common import emit, rss_bytes
from bench.faiss_bench import Data
from bench.synthetic import Clustered
from indexer import faiss_index

K = 10
QUERIES = 1000
SINGLE = 300


def exact_top(data: Data, q: np.ndarray) -> np.ndarray:
    """Exact top-K ids of each query over every base vector (chunk by chunk)."""
    best_s = np.full((len(q), K), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), K), dtype=np.int64)
    for start, block in data.chunks():
        s = q @ block.T
        ids = np.broadcast_to(np.arange(start, start + len(block)), s.shape)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        top = np.argpartition(-all_s, K - 1, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def measure(
    n: int, dim: int, work: Path, requested: str = "auto", codec: str = "sq8", refine: int | None = None
) -> dict[str, Any]:
    gen = Clustered(dim)
    data = Data(gen, n + QUERIES, work)
    q = np.concatenate([b for s, b in data.chunks() if s + len(b) > n])[-QUERIES:]  # the last ones, held out
    base = Data.__new__(Data)
    base.gen, base.n, base.dim, base.path = gen, n, dim, data.path  # the first n vectors only
    choice = faiss_index.choose_index(requested, n, dim, codec, ivf_refine=refine)  # type: ignore[arg-type]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    training = base.head(min(n, int(choice.params.get("train_size", 0)))) if choice.type == "ivf" else None
    index = faiss_index.new_index(choice, dim, training)
    del training
    for start, block in base.chunks():
        faiss_index.add(index, block, np.arange(start, start + len(block), dtype=np.int64))
    build_s = time.perf_counter() - t0
    rss_growth = rss_bytes() - rss0
    with tempfile.NamedTemporaryFile(dir=work, suffix=".faiss") as fh:
        faiss_index.write(index, fh.name)
        size = os.path.getsize(fh.name)
    truth = exact_top(base, q)
    _, found = faiss_index.search(index, q, K, choice.params)
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    for i in range(SINGLE):
        faiss_index.search(index, q[i : i + 1], K, choice.params)
    qps = SINGLE / (time.perf_counter() - t0)
    return {
        "n": n,
        "dim": dim,
        "requested": requested,
        "type": choice.type,
        "params": choice.params,
        "reason": choice.reason,
        "build_s": build_s,
        "index_mib": round(size / 2**20, 2),
        "rss_growth_mib": round(rss_growth / 2**20, 1),
        "recall_at_10": round(recall, 3),
        "qps_single_1thread": round(qps, 1),
    }


def parse_extra(text: str) -> list[tuple[str, str, int, int]]:
    """TYPE:CODEC:REFINE@DIM,... -> [(type, codec, refine, dim)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        what, _, dim = part.partition("@")
        kind, codec, refine = (what.split(":") + ["sq8", "0"])[:3]
        out.append((kind, codec, int(refine), int(dim)))
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Every row of spec (n, dims, extra, work), and the Markdown of the table."""
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dim in spec["dims"]:
        rows.append(measure(int(spec["n"]), int(dim), work))
        print(rows[-1], flush=True)
    for kind, codec, refine, dim in spec.get("extra", []):
        rows.append(measure(int(spec["n"]), dim, work, kind, codec, refine))
        print(rows[-1], flush=True)
    return {"status": "done", "rows": rows, "markdown": "\n".join(render(rows))}


def render(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{os.cpu_count()} cores. Synthetic clustered unit vectors (bench/synthetic.py); 1,000 held-out queries; "
        "build = k-means on its capped sample (IVF) or graph insertions (HNSW) plus every add, on all cores.",
        "",
        "| vectors | dim | index | build | index size | RSS growth | recall@10 | q/s, one query, 1 thread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['n']:,} | {r['dim']} | {'auto: ' if r.get('requested', 'auto') == 'auto' else ''}{r['type']} "
        f"{r['params']} | {r['build_s']:.1f} s | {r['index_mib']:,} MiB | "
        f"{r['rss_growth_mib']:,} MiB | {r['recall_at_10']} | {r['qps_single_1thread']} |"
        for r in rows
    ]
    lines += ["", *[f"- {r['dim']}-d {r['type']}: {r['reason']}" for r in rows]]
    return lines


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # run_child's way (section f)
        emit(run(json.loads(sys.argv[1])))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.auto_index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", default="1280,256")
    parser.add_argument("--extra", default="", help="rows beside auto's pick, TYPE:CODEC:REFINE@DIM,...")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-bench")
    args = parser.parse_args(argv)
    spec = {
        "n": args.n,
        "dims": [int(d) for d in args.dims.split(",") if d],
        "extra": parse_extra(args.extra),
        "work": str(args.work),
    }
    result = run(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_index.json").write_text(json.dumps(result["rows"], indent=2) + "\n")
    text = "# What `--index-type auto` builds\n\n" + result["markdown"] + "\n"
    (args.out / "auto_index.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
