"""`python -m bench writes`: online adds and deletes over HTTP against a real server, by bundle size.

For each bundle (index type x size, padded with `bench bundle`):
  - p50/p99 of POST /images (a new image each time: decode + embed + journal) and of
    DELETE /images/{id}, and of the part without the embedding (the server's `Server-Timing:
    write` header: storing the upload, the journal append and its fdatasync, the in-memory apply);
  - start-up: seconds from process start to /readyz, and the content hash that start-up no
    longer waits for (the old start-up did it before serving);
  - on the 100k bundles: search p50/p99 at concurrency 8 with and without 20 writes/s beside it,
    and the longest search while POST /admin/compact runs.
Targets: p50 at 1M at most 1.5x the p50 at 1k for each operation; the write part at most 20 ms at
1M; search p99 with writes at most 1.5x without. Writes report.md-style text to --out/writes.md
and the figures to --out/writes.json.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.common import log, machine
from bench.http_search import start_server
from bench.padded_bundle import make_padded_bundle
from indexer.metadata import read_records
from indexer.versions import MANIFEST_FILE, META_FILE, VERSIONS_DIR, read_current, verify_files

TARGET_GROWTH = 1.5
TARGET_WRITE_MS = 20.0
TARGET_SEARCH_P99 = 1.5


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _image(i: int) -> bytes:
    rng = np.random.default_rng(10_000 + i)
    arr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _server_ms(r: httpx.Response) -> float:
    timing = r.headers.get("server-timing", "")
    return float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")


def _writes(url: str, n: int, delete_ids: list[int], offset: int) -> dict[str, Any]:
    add_ms, add_write, del_ms, del_write = [], [], [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/images", files={"file": ("a.jpg", _image(offset + i), "image/jpeg")})
            add_ms.append((time.perf_counter() - t0) * 1000)
            assert r.status_code in (200, 201), r.text
            add_write.append(_server_ms(r))
        for image_id in delete_ids[:n]:
            t0 = time.perf_counter()
            r = c.delete(f"/images/{image_id}")
            del_ms.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
            del_write.append(_server_ms(r))
    return {
        f"{name}_{stat}": round(f(values), 2)
        for name, values in (("add", add_ms), ("add_write", add_write), ("delete", del_ms), ("delete_write", del_write))
        for stat, f in (("p50", lambda v: _pct(v, 50)), ("p99", lambda v: _pct(v, 99)))
    }


def _search_load(
    url: str,
    queries: list[bytes],
    concurrency: int,
    seconds: float,
    writes_per_s: float = 0.0,
    delete_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Searches from `concurrency` threads for `seconds`, with a writer beside them at `writes_per_s`."""
    stop = time.monotonic() + seconds
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def searcher(t: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = t
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = c.post("/search", files={"file": ("q.jpg", queries[i % len(queries)], "image/jpeg")})
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(ms)
                    errors[0] += r.status_code != 200
                i += concurrency

    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(concurrency)]
    results: mp.Queue = mp.get_context("spawn").Queue()
    # the writer in a process of its own: its client work must not take the searchers' GIL
    writer = (
        mp.get_context("spawn").Process(
            target=_writer_main, args=(url, writes_per_s, seconds, list(delete_ids or []), results)
        )
        if writes_per_s > 0
        else None
    )
    if writer is not None:
        writer.start()
        assert results.get(timeout=120) == "ready"
    stop = time.monotonic() + seconds  # searchers and writer start together
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writes, write_errors = results.get(timeout=120) if writer is not None else (0, 0)
    if writer is not None:
        writer.join(timeout=60)
    return {
        "searches": len(lat),
        "p50_ms": round(_pct(lat, 50), 2),
        "p99_ms": round(_pct(lat, 99), 2),
        "max_ms": round(max(lat), 2) if lat else None,
        "errors": errors[0] + write_errors,
        "writes": writes,
        "writes_per_s": round(writes / seconds, 1),
    }


def _writer_main(url: str, writes_per_s: float, seconds: float, delete_ids: list[int], results: Any) -> None:
    """Open loop for `seconds` once it has said "ready": a write every 1/writes_per_s seconds (adds and
    deletes in turn), whether or not the last one has finished; then puts (writes, errors) on `results`."""
    counts = [0, 0]
    lock = threading.Lock()

    def write_one(k: int, image_id: int | None) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            if image_id is None:
                r = c.post("/images", files={"file": ("w.jpg", _image(900_000 + k), "image/jpeg")})
            else:
                r = c.delete(f"/images/{image_id}")
        with lock:
            counts[0] += 1
            counts[1] += r.status_code >= 400

    results.put("ready")
    end_at = time.monotonic() + seconds
    with ThreadPoolExecutor(max_workers=8) as pool:
        k = 0
        next_at = time.monotonic()
        while time.monotonic() < end_at:
            pool.submit(write_one, k, None if k % 2 == 0 or not delete_ids else delete_ids.pop())
            k += 1
            next_at += 1.0 / writes_per_s
            time.sleep(max(0.0, next_at - time.monotonic()))
    results.put((counts[0], counts[1]))


def _during_compaction(url: str, queries: list[bytes]) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def compact() -> None:
        time.sleep(1.0)
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/admin/compact", timeout=600)
        result["compaction_s"] = round(time.perf_counter() - t0, 2)
        result["compaction_status"] = r.status_code

    t = threading.Thread(target=compact)
    t.start()
    load: dict[str, Any] = {}
    while t.is_alive() or not load:
        part = _search_load(url, queries, 8, 3.0)
        load = {
            **part,
            "max_ms": max(load.get("max_ms") or 0, part["max_ms"] or 0),
            "searches": load.get("searches", 0) + part["searches"],
            "errors": load.get("errors", 0) + part["errors"],
        }
    t.join()
    return {**result, "longest_search_ms": load["max_ms"], "searches": load["searches"], "errors": load["errors"]}


def run(
    model: Path, images: Path, work: Path, cases: list[tuple[str, int]], n_writes: int, load_s: float
) -> dict[str, Any]:
    photos = sorted(images.rglob("*.jpg"))
    n_images = len(photos)
    queries = [p.read_bytes() for p in photos[:32]]
    out: dict[str, Any] = {"machine": machine(), "cases": []}
    for kind, n in cases:
        folder = work / f"writes-{kind}-{n}"
        log(f"writes bench: {kind} bundle of {n} vectors")
        made = make_padded_bundle(model, images, folder, max(0, n - n_images), kind)
        vdir = folder / VERSIONS_DIR / read_current(folder)
        manifest = json.loads((vdir / MANIFEST_FILE).read_text())
        synthetic = [i for i, r in read_records(vdir / META_FILE).items() if r.path.startswith("synthetic/")]
        rng = np.random.default_rng(0)
        delete_ids = [int(i) for i in rng.choice(synthetic, min(len(synthetic), 4 * n_writes + 200), replace=False)]
        t0 = time.perf_counter()
        problem = verify_files(vdir, manifest)  # what start-up used to do before serving
        hash_s = time.perf_counter() - t0
        case: dict[str, Any] = {
            "index_type": kind,
            "vectors": made["vectors"],
            "build": made["timings"],
            "hash_s": round(hash_s, 2),
            "hash_ok": problem is None,
        }
        settings = {
            "IMGSEARCH_COMPACT_DELTA": "1000000",
            "IMGSEARCH_COMPACT_TOMBSTONE_SHARE": "1.0",
            "IMGSEARCH_THREADS": "1",
        }
        os.sync()  # the bundle's gigabytes on disk first: their writeback would stall the writes' fsyncs
        t0 = time.perf_counter()
        with start_server(folder, settings, work / f"server-{kind}-{n}.log") as server:
            with httpx.Client(base_url=server.url, timeout=600) as c:
                while c.get("/readyz").status_code != 200:
                    time.sleep(0.05)
                case["start_to_ready_s"] = round(time.perf_counter() - t0, 2)
                case["start_with_hash_first_s"] = round(case["start_to_ready_s"] + hash_s, 2)
                deadline = time.monotonic() + 300
                while not c.get("/readyz").json().get("verified") and time.monotonic() < deadline:
                    time.sleep(0.1)  # measure the steady state, after the background hash
                case["verified_after_s"] = round(time.perf_counter() - t0, 2)
            case.update(_writes(server.url, n_writes, delete_ids, offset=n))
            if n == 100_000:
                case["search_c8"] = _search_load(server.url, queries, 8, load_s)
                case["search_c8_with_writes"] = _search_load(
                    server.url, queries, 8, load_s, 20.0, delete_ids[n_writes:]
                )
                case["compaction"] = _during_compaction(server.url, queries)
        shutil.rmtree(folder, ignore_errors=True)  # 1M bundles are gigabytes
        log(f"writes bench: {json.dumps(case)}")
        out["cases"].append(case)
    out["targets"] = targets(out["cases"])
    return out


def targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by = {(c["index_type"], c["vectors"]): c for c in cases}
    small = {k: c for (k, n), c in by.items() if n <= 2_000}
    for (kind, n), c in sorted(by.items()):
        if n < 1_000_000:
            continue
        base = small.get(kind) or small.get("flat")
        for op in ("add", "delete"):
            if base:
                r = c[f"{op}_p50"] / base[f"{op}_p50"]
                rows.append(
                    {
                        "name": f"{op} p50 at {n:,} ({kind}) vs {base['vectors']:,} ({base['index_type']})",
                        "target": f"<= {TARGET_GROWTH}x",
                        "measured": f"{r:.2f}x ({c[f'{op}_p50']} vs {base[f'{op}_p50']} ms)",
                        "reached": r <= TARGET_GROWTH,
                    }
                )
            w = c[f"{op}_write_p50"]
            rows.append(
                {
                    "name": f"{op} without the embedding, p50 at {n:,} ({kind})",
                    "target": f"<= {TARGET_WRITE_MS:g} ms",
                    "measured": f"{w} ms (p99 {c[f'{op}_write_p99']} ms)",
                    "reached": w <= TARGET_WRITE_MS,
                }
            )
    for c in cases:
        if "search_c8" in c:
            a, b = c["search_c8"]["p99_ms"], c["search_c8_with_writes"]["p99_ms"]
            rows.append(
                {
                    "name": f"search p99 at concurrency 8 with 20 writes/s vs without ({c['index_type']}, "
                    f"{c['vectors']:,})",
                    "target": f"<= {TARGET_SEARCH_P99}x",
                    "measured": f"{b / a:.2f}x ({b} vs {a} ms; {c['search_c8_with_writes']['writes_per_s']} writes/s)",
                    "reached": b / a <= TARGET_SEARCH_P99,
                }
            )
    return rows


def render(result: dict[str, Any]) -> str:
    lines = [
        "# Online writes benchmark",
        "",
        f"Machine: {result['machine'].get('cpu')}, "
        f"{result['machine'].get('cores')} cores. Every figure comes from this run.",
        "",
        "## Targets",
        "",
        "| what | target | measured | reached |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['name']} | {t['target']} | {t['measured']} | {'yes' if t['reached'] else '**no**'} |"
        for t in result["targets"]
    ]
    lines += [
        "",
        "## Adds and deletes over HTTP (ms)",
        "",
        "| index | vectors | add p50 | add p99 | add write p50 | add write p99 | delete p50 | delete p99 | "
        "delete write p50 | delete write p99 | start to /readyz (s) | hash that start-up no longer waits for (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = sorted({c.get("run", "") for c in result["cases"]})
    for c in result["cases"]:
        lines.append(
            f"| {c['index_type']} | {c['vectors']:,} | {c['add_p50']} | {c['add_p99']} | {c['add_write_p50']} | "
            f"{c['add_write_p99']} | {c['delete_p50']} | {c['delete_p99']} | {c['delete_write_p50']} | "
            f"{c['delete_write_p99']} | {c['start_to_ready_s']} | {c['hash_s']} |"
            + (f" (run {c.get('run')})" if len(runs) > 1 else "")
        )
    lines += [
        "",
        "`write`: the server's own time for the part after the embedding (the `Server-Timing` header): "
        "storing the upload, the journal append with its fdatasync, and the in-memory apply.",
        "Start-up before this change hashed every data file before serving: about "
        "start-to-ready + hash seconds. Writes are timed once the background hash has finished.",
        "",
    ]
    for c in result["cases"]:
        if "search_c8" in c:
            a, b, comp = c["search_c8"], c["search_c8_with_writes"], c["compaction"]
            lines += [
                f"## Searches beside writes and compaction ({c['index_type']}, {c['vectors']:,} vectors)",
                "",
                "| load | searches | p50 ms | p99 ms | max ms | errors |",
                "|---|---|---|---|---|---|",
                f"| searches only, concurrency 8 | {a['searches']} | {a['p50_ms']} | {a['p99_ms']} | {a['max_ms']} | {a['errors']} |",
                f"| with {b['writes_per_s']} writes/s | {b['searches']} | {b['p50_ms']} | {b['p99_ms']} | {b['max_ms']} | {b['errors']} |",
                "",
                f"Compaction of the journal at {c['vectors']:,} vectors took {comp.get('compaction_s')} s "
                f"(status {comp.get('compaction_status')}); the longest search meanwhile: "
                f"{comp['longest_search_ms']} ms over {comp['searches']} searches, {comp['errors']} errors.",
                "",
            ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench writes",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--model", type=Path, required=True, help="exported model folder")
    p.add_argument(
        "--images", type=Path, required=True, help="real images (class folders) for the bundles and the queries"
    )
    p.add_argument(
        "--cases",
        default="flat:1000,hnsw:1000,flat:100000,hnsw:100000,flat:1000000,ivf:1000000",
        help="comma-separated TYPE:VECTORS bundles (default: flat and hnsw at 1k and 100k, flat and ivf at 1M)",
    )
    p.add_argument("--writes", type=int, default=40, help="adds and deletes timed per bundle (default 40 each)")
    p.add_argument("--load-s", type=float, default=15.0, help="seconds of each search load at 100k (default 15)")
    p.add_argument("--work", type=Path, default=Path("/tmp/imgsearch-bench"), help="scratch folder for the bundles")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for writes.md and writes.json")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the cases of an existing writes.json that this run does not redo (marked with their run)",
    )
    args = p.parse_args(argv)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.model, args.images, args.work, cases, args.writes, args.load_s)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for case in result["cases"]:
        case["run"] = stamp
    previous = args.out / "writes.json"
    if args.merge and previous.is_file():
        redone = {(c["index_type"], c["vectors"]) for c in result["cases"]}
        kept = [c for c in json.loads(previous.read_text())["cases"] if (c["index_type"], c["vectors"]) not in redone]
        result["cases"] = sorted(kept + result["cases"], key=lambda c: (c["vectors"], c["index_type"]))
        result["targets"] = targets(result["cases"])
    (args.out / "writes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "writes.md").write_text(render(result))
    print(render(result))
    return 0
