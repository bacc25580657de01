"""Memory and start time of the service with 1 and with N workers on one (large) bundle.

    python -m bench.worker_memory --index BUNDLE --query IMAGE [--workers 1,4] [--out bench/results]

Each worker maps the version's index file (faiss_index.read, mmap), so the vectors are page
cache shared by all of them instead of one copy each. For each worker count: seconds from the
start of `python -m service` until `/readyz` answers 200, then, after 20 searches, the resident
memory of the whole process tree: the sum of each process's private memory (RssAnon), of its
file-backed pages (RssFile: the mapped index among them, counted once per process that touched
them), and of its proportional set size (Pss, shared pages split between their users: what the
processes cost together). Writes workers.md and workers.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench.http_search import start_server
from service.process import process_memory, process_tree, proportional_memory

MiB = 1 << 20


def measure(index: Path, query: bytes, workers: int, log: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    with start_server(index, {"IMGSEARCH_WORKERS": str(workers)}, log) as server:
        ready_s = time.perf_counter() - t0
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for _ in range(20):  # several connections reach several workers
                r = client.post(
                    "/search", files={"file": ("q.jpg", query, "image/jpeg")}, headers={"Connection": "close"}
                )
                r.raise_for_status()
        pids = process_tree(server.proc.pid)
        mems = [process_memory(pid) for pid in pids]
        return {
            "workers": workers,
            "processes": len(pids),
            "ready_s": round(ready_s, 1),
            "rss_anon_mib": round(sum(m.get("RssAnon", 0) for m in mems) / MiB, 1),
            "rss_file_mib": round(sum(m.get("RssFile", 0) for m in mems) / MiB, 1),
            "pss_mib": round(sum(proportional_memory(pid) for pid in pids) / MiB, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.worker_memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index", type=Path, required=True, help="the bundle to serve")
    parser.add_argument("--query", type=Path, required=True, help="a JPEG to search with")
    parser.add_argument("--workers", default="1,4", help="comma-separated worker counts (default 1,4)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    manifest = json.loads(
        (args.index / "versions" / (args.index / "CURRENT").read_text().strip() / "manifest.json").read_text()
    )
    size = manifest["files"]["index.faiss"]["bytes"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        measure(args.index, args.query.read_bytes(), int(w), args.out / f"workers-{w}.log")
        for w in args.workers.split(",")
    ]
    info = {
        "vectors": manifest["index"]["ntotal"],
        "dim": manifest["model"]["dim"],
        "index_type": manifest["index"]["type"],
        "index_file_mib": round(size / MiB, 1),
        "rows": rows,
    }
    (args.out / "workers.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        "# Service memory by worker count\n",
        f"{info['vectors']:,} vectors of {info['dim']} dimensions, {info['index_type']} index, "
        f"index file {info['index_file_mib']:,} MiB, mapped by every worker.\n",
        "| workers | processes | ready after | private (RssAnon) | file-backed (RssFile) | together (Pss) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['workers']} | {r['processes']} | {r['ready_s']} s | {r['rss_anon_mib']:,} MiB | "
        f"{r['rss_file_mib']:,} MiB | {r['pss_mib']:,} MiB |"
        for r in rows
    ]
    (args.out / "workers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
