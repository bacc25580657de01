"""Section b/d of the benchmark: `/search` over HTTP against a real server, and its memory.

`run_http_search_bench(...)`:

1. builds a bundle from the real demo images embedded with the real model (`build_index`), then
   pads it with synthetic unit vectors clustered around the real ones (each with a metadata row:
   the label of the real vector it was drawn around) up to `n_vectors`, in the index type that
   `auto` picks at that size (HNSW at 100k). The padded bundle is kept in `out_dir` and reused by
   later runs with the same model, images and size.
2. for each batching setting, starts the real server (`python -m service --index ...`) as a
   subprocess (service/process.py: ready once GET /readyz answers), and for each concurrency runs
   a load generator in another process: N concurrent keep-alive connections (httpx, asyncio)
   uploading real JPEG queries (the demo queries, read once, multipart bodies built once) for a
   fixed time after a warm-up, recording each request's latency and status;
3. reads the server's resident memory (VmRSS, VmHWM: service.process.process_memory) after its
   load, and that of a server on the real images alone, for the memory per 100k vectors.

Server, load generator and everything else share the machine's cores: on 2 cores the client's
CPU time is taken from the server, so the figures are a lower bound of what the server does alone.
`python -m bench.http_search --help` runs it alone; `bench/__main__.py` calls the function.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load_average, log, machine, versions
from service.process import ServiceProcess

REPO = Path(__file__).resolve().parent.parent
SEED = 20240
TARGET_P50_C1_MS = 25.0
TARGET_QPS_C32 = 100.0
QUICK: dict[str, Any] = {"n_vectors": 2_000, "duration_s": 1.5, "warmup_s": 0.5, "concurrencies": (1, 4)}
BUNDLE_INFO = "bench_http_bundle.json"
LOADGEN_MARK = "LOADGEN_RESULT "


# ------------------------------------------------------------------------------------ bundles


def _file_fingerprint(root: Path) -> str:
    """Cheap identity of an image folder: relative paths, sizes and mtimes."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def synthetic_around(real: np.ndarray, n: int, seed: int = SEED, chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors, each drawn around a random real vector: (vectors float32 (n, d), origin rows).

    v = normalise(r + s * g / sqrt(d)), g ~ N(0, I), s uniform in [0.5, 1.2]: cosine to its real
    vector about 0.64-0.9, the range of different photos of one class under this model.
    """
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    origins = rng.integers(0, len(real), n)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        g = rng.standard_normal((m, d), dtype=np.float32)
        g *= (rng.uniform(0.5, 1.2, m).astype(np.float32) / np.float32(np.sqrt(d)))[:, None]
        g += real[origins[start:stop]]
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        out[start:stop] = g
    return out, origins


def build_bench_bundles(
    model_dir: Path, images_dir: Path, out_dir: Path, n_vectors: int, *, reuse: bool = True, seed: int = SEED
) -> dict[str, Any]:
    """The real-images bundle and the padded one (n_vectors, `auto` index type); reused when unchanged.

    Returns {"real": path, "padded": path, "n_real", "n_vectors", "index": {type, params, reason},
    "timings": {...}}.
    """
    from indexer import faiss_index
    from indexer.build import build_index
    from indexer.bundle import new_bundle, open_bundle
    from indexer.metadata import ImageRecord, stable_id
    from indexer.model_card import read_card

    model_dir, images_dir, out_dir = Path(model_dir), Path(images_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = read_card(model_dir)
    key = {
        "model": card.onnx_sha256,
        "images": _file_fingerprint(images_dir),
        "n_vectors": int(n_vectors),
        "seed": seed,
        "format": 1,
    }
    real_dir, padded_dir = out_dir / "bundle-real", out_dir / f"bundle-{n_vectors}"
    info_file = padded_dir / BUNDLE_INFO
    if reuse and info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
            if info.get("key") == key and (real_dir / "CURRENT").is_file() and (padded_dir / "CURRENT").is_file():
                info["reused"] = True
                return info
        except (OSError, ValueError):
            pass
    for d in (real_dir, padded_dir):
        shutil.rmtree(d, ignore_errors=True)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report = build_index(model_dir, images_dir, real_dir, index_type="flat", device="cpu", progress=False, rebuild=True)
    timings["embed_real_s"] = round(time.perf_counter() - t0, 2)
    real_bundle = open_bundle(real_dir)
    ids, real_vecs = real_bundle.vectors()
    real_records = [real_bundle.get(int(i)) for i in ids]
    n_real = len(real_records)
    if n_vectors < n_real:
        raise ValueError(f"n_vectors ({n_vectors}) is smaller than the {n_real} real images")
    log(
        f"http bench: {n_real} real images embedded in {timings['embed_real_s']} s "
        f"({report.images_per_s:.1f} img/s); padding to {n_vectors}"
    )

    t0 = time.perf_counter()
    n_pad = n_vectors - n_real
    pad_vecs, origins = synthetic_around(real_vecs, n_pad, seed)
    pad_records = []
    for i, origin in enumerate(origins.tolist()):
        label = real_records[origin].label
        rel = f"synthetic/{label or 'none'}/{i:07d}.jpg"
        pad_records.append(
            ImageRecord(id=stable_id(rel), path=rel, label=label, size=0, mtime=0.0, sha256="0" * 64, width=0, height=0)
        )
    all_vecs = np.concatenate([real_vecs, pad_vecs]) if n_pad else real_vecs
    all_records = real_records + pad_records
    del pad_vecs
    timings["synthesize_s"] = round(time.perf_counter() - t0, 2)

    # the real bundle's dimension: the build's default projection may have made it smaller than the model's
    choice = faiss_index.choose_index("auto", n_vectors, real_bundle.dim)
    t0 = time.perf_counter()
    index = faiss_index.new_index(choice, real_bundle.dim, all_vecs)
    bundle = new_bundle(padded_dir, real_bundle.model_dir, index, choice.params, images_dir)
    bundle.add(all_records, all_vecs)
    timings["index_build_s"] = round(time.perf_counter() - t0, 2)
    log(
        f"http bench: {choice.type} index of {n_vectors} vectors built in {timings['index_build_s']} s "
        f"({choice.reason})"
    )
    t0 = time.perf_counter()
    bundle.save(build={"bench": "http_search", "n_real": n_real, "n_synthetic": n_pad})
    timings["save_s"] = round(time.perf_counter() - t0, 2)
    info = {
        "key": key,
        "real": str(real_dir),
        "padded": str(padded_dir),
        "n_real": n_real,
        "n_vectors": n_vectors,
        "index": {"type": choice.type, "params": choice.params, "reason": choice.reason},
        "real_index": {"type": real_bundle.index_type},
        "timings": timings,
        "reused": False,
        "synthetic": "each padded vector = normalise(real + s*g/sqrt(d)), s ~ U(0.5, 1.2), label of its real vector",
    }
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


# ------------------------------------------------------------------------------------ servers


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def start_server(index_dir: Path, settings: dict[str, str], log_file: Path) -> ServiceProcess:
    """`python -m service --index DIR` in a subprocess on the CPU, with these IMGSEARCH_* settings
    and none of this process's; ready (GET /readyz) when entered as a context."""
    return ServiceProcess(
        ["--index", str(index_dir), "--log-level", "warning"],
        env={"IMGSEARCH_DEVICE": "cpu", **settings},
        inherit_settings=False,
        log_file=log_file,
        ready_timeout=300,
    )


def _metrics(url: str) -> dict[str, float]:
    """The server's micro-batch counters (sum and count of the batch-size histogram)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for name in ("imgsearch_search_batch_size_sum", "imgsearch_search_batch_size_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


# ----------------------------------------------------------------------------- load generator


def _multipart(name: str, data: bytes, boundary: str) -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


async def _load(
    url: str, queries: list[tuple[str, bytes]], concurrency: int, duration_s: float, warmup_s: float, k: int
) -> dict[str, Any]:
    import httpx

    boundary = "imgsearchbenchboundary7e3f"
    bodies = [_multipart(name, data, boundary) for name, data in queries]
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    counter = 0
    measuring = False

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120, headers=headers) as client:

        async def worker(stop_at: float) -> None:
            nonlocal counter
            while time.perf_counter() < stop_at:
                body = bodies[counter % len(bodies)]
                counter += 1
                record = measuring
                t0 = time.perf_counter()
                try:
                    r = await client.post("/search", params={"k": k}, content=body)
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        if record:
                            errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    took = r.json().get("took_ms")
                except Exception as exc:  # connection reset, timeout: an error, not a crash
                    if record:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                if record:
                    latencies.append(dt)
                    if took is not None:
                        server_ms.append(float(took))

        if warmup_s > 0:
            await asyncio.gather(*(worker(time.perf_counter() + warmup_s) for _ in range(concurrency)))
        warmup_requests = counter
        measuring = True
        t_start, cpu_start = time.perf_counter(), time.process_time()
        stop_at = t_start + duration_s
        await asyncio.gather(*(worker(stop_at) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
        client_cpu = time.process_time() - cpu_start

    return {
        "concurrency": concurrency,
        "latencies_ms": [round(x * 1000, 3) for x in latencies],
        "server_ms": server_ms,
        "errors": errors,
        "seconds": elapsed,
        "sent": counter,
        "warmup_requests": warmup_requests,
        "client_cpu_s": client_cpu,
    }


def summarize(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure set from one or more measured slices of the same configuration."""
    lat = np.array([x for s in slices for x in s["latencies_ms"]])
    server = np.array([x for s in slices for x in s["server_ms"]])
    errors = [e for s in slices for e in s["errors"]]
    seconds = sum(s["seconds"] for s in slices)

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 2) if len(a) else None

    out: dict[str, Any] = {
        "concurrency": slices[0]["concurrency"],
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": round(seconds, 3),
        "slices": len(slices),
        "qps": round(len(lat) / seconds, 2) if seconds > 0 else 0.0,
        "p50_ms": pct(lat, 50),
        "p95_ms": pct(lat, 95),
        "p99_ms": pct(lat, 99),
        "mean_ms": round(float(lat.mean()), 2) if len(lat) else None,
        "server_p50_ms": pct(server, 50),
        "client_cpu_ms_per_query": round(sum(s["client_cpu_s"] for s in slices) / len(lat) * 1000, 2)
        if len(lat)
        else None,
    }
    cpu = [c for s in slices if (c := s.get("server_cpu_s")) is not None]
    if len(cpu) == len(slices):
        # the server's CPU counter covers the warm-up requests too: divide by everything sent
        out["server_cpu_ms_per_query"] = round(sum(cpu) / sum(s["sent"] for s in slices) * 1000, 2)
    batches = sum(s.get("batches", 0) for s in slices)
    out["mean_batch"] = round(sum(s.get("batched", 0) for s in slices) / batches, 2) if batches else None
    return out


def load_queries(queries_dir: Path, limit: int = 64) -> list[tuple[str, bytes]]:
    files = sorted(p for p in Path(queries_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"{queries_dir}: no JPEG queries")
    step = max(1, len(files) // limit)
    return [(p.name, p.read_bytes()) for p in files[::step][:limit]]


def run_load(
    url: str,
    queries_dir: Path,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    k: int = 10,
    timeout: float | None = None,
) -> dict[str, Any]:
    """The load generator in its own process (it must not share the bench's interpreter or GIL)."""
    spec = {
        "url": url,
        "queries": str(queries_dir),
        "concurrency": concurrency,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "k": k,
    }
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.http_search", "_loadgen", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout or (duration_s + warmup_s) * 4 + 120,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(LOADGEN_MARK):
            return json.loads(line[len(LOADGEN_MARK) :])
    raise RuntimeError(f"load generator failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")


def _loadgen_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    queries = load_queries(Path(spec["queries"]))
    result = asyncio.run(
        _load(
            spec["url"],
            queries,
            int(spec["concurrency"]),
            float(spec["duration_s"]),
            float(spec["warmup_s"]),
            int(spec["k"]),
        )
    )
    sys.stdout.write(LOADGEN_MARK + json.dumps(result) + "\n")
    return 0


# ------------------------------------------------------------------------------------ the bench


def _default_queries(images_dir: Path) -> Path:
    sibling = Path(images_dir).parent / "queries"
    return sibling if sibling.is_dir() else Path(images_dir)


def run_http_search_bench(
    model_dir: Path,
    images_dir: Path,
    out_dir: Path,
    n_vectors: int = 100_000,
    concurrencies: Sequence[int] = (1, 8, 32),
    duration_s: float = 20.0,
    batching: Sequence[bool] = (False, True),
    *,
    queries_dir: Path | None = None,
    warmup_s: float = 3.0,
    k: int = 10,
    quick: bool = False,
    reuse: bool = True,
    memory_baseline: bool = True,
    server_settings: dict[str, str] | None = None,
    rounds: int = 2,
) -> dict[str, Any]:
    """HTTP search latency/throughput at each concurrency with batching off and on, and memory.

    `quick`: a small bundle (2k vectors), short runs, concurrencies 1 and 4 (a smoke test).
    `server_settings`: extra IMGSEARCH_* variables for the servers (e.g. batch_wait_ms).
    `rounds`: each (setting, concurrency) is measured in this many slices of duration_s / rounds,
    the settings taking turns, and the slices pooled.
    Returns a dict (see `render_markdown`); every figure is measured in this run.
    """
    if quick:
        n_vectors = min(n_vectors, QUICK["n_vectors"])
        duration_s = min(duration_s, QUICK["duration_s"])
        warmup_s = min(warmup_s, QUICK["warmup_s"])
        concurrencies = tuple(sorted({min(c, max(QUICK["concurrencies"])) for c in concurrencies}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries_dir = Path(queries_dir) if queries_dir is not None else _default_queries(Path(images_dir))
    t_all = time.perf_counter()
    load_before = load_average()

    bundles = build_bench_bundles(Path(model_dir), Path(images_dir), out_dir, n_vectors, reuse=reuse)
    memory: dict[str, Any] = {}
    server_start: dict[str, float] = {}
    slices: dict[tuple[bool, int], list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        # Every server is up for the whole bench and the settings take turns on each concurrency
        # (A B B A ...): the machine's other load drifts over minutes, and must not favour one.
        servers: dict[bool, ServiceProcess] = {}
        for on in batching:
            name = "on" if on else "off"
            t0 = time.perf_counter()
            settings = {"IMGSEARCH_BATCHING": "true" if on else "false", **(server_settings or {})}
            servers[on] = stack.enter_context(
                start_server(Path(bundles["padded"]), settings, out_dir / f"server-batching-{name}.log")
            )
            server_start[name] = round(time.perf_counter() - t0, 2)
            memory[f"rss_start_batching_{name}"] = servers[on].memory().get("VmRSS")
        for c in concurrencies:
            for r in range(rounds):
                order = list(batching) if r % 2 == 0 else list(reversed(batching))
                for on in order:
                    server = servers[on]
                    before, cpu0 = _metrics(server.url), cpu_seconds(server.pid)
                    res = run_load(server.url, queries_dir, c, duration_s / rounds, warmup_s, k)
                    cpu1, after = cpu_seconds(server.pid), _metrics(server.url)
                    res["server_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                    res["batches"] = (
                        after["imgsearch_search_batch_size_count"] - before["imgsearch_search_batch_size_count"]
                    )
                    res["batched"] = (
                        after["imgsearch_search_batch_size_sum"] - before["imgsearch_search_batch_size_sum"]
                    )
                    slices.setdefault((on, c), []).append(res)
            for on in batching:
                got = summarize(slices[(on, c)])
                log(
                    f"http bench: batching {'on' if on else 'off'}, concurrency {c}: {got['qps']} q/s, "
                    f"p50 {got['p50_ms']} ms, p99 {got['p99_ms']} ms, errors {got['errors']}, "
                    f"mean batch {got['mean_batch']}, server CPU {got.get('server_cpu_ms_per_query')} ms/query"
                )
        for on, server in servers.items():
            name = "on" if on else "off"
            mem = server.memory()
            memory[f"rss_loaded_batching_{name}"] = mem.get("VmRSS")
            memory[f"hwm_batching_{name}"] = mem.get("VmHWM")
    runs = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for (on, _c), parts in slices.items():
        run = {**summarize(parts), "batching": on}
        if run.get("server_cpu_ms_per_query") and run.get("client_cpu_ms_per_query"):
            # what these cores could serve with nothing else on them (client included)
            run["cpu_bound_qps"] = round(
                1000 * cores / (run["server_cpu_ms_per_query"] + run["client_cpu_ms_per_query"]), 1
            )
        runs.append(run)
    runs.sort(key=lambda r: (r["concurrency"], r["batching"]))

    if memory_baseline:
        on = batching[-1]
        settings = {"IMGSEARCH_BATCHING": "true" if on else "false", **(server_settings or {})}
        with start_server(Path(bundles["real"]), settings, out_dir / "server-real.log") as server:
            memory["rss_start_small"] = server.memory().get("VmRSS")
            run_load(server.url, queries_dir, max(concurrencies), min(duration_s, 5.0), 0.5, k)
            memory[f"rss_loaded_small_batching_{'on' if on else 'off'}"] = server.memory().get("VmRSS")
    memory.update(_memory_summary(memory, bundles, batching))

    result: dict[str, Any] = {
        "section": "http_search",
        "config": {
            "n_vectors": n_vectors,
            "n_real": bundles["n_real"],
            "concurrencies": list(concurrencies),
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "rounds": rounds,
            "k": k,
            "quick": quick,
            "queries": str(queries_dir),
            "model": str(model_dir),
            "server_settings": server_settings or {},
            "client": "separate process, httpx.AsyncClient, one keep-alive connection per concurrent request, "
            "multipart bodies built once; shares the CPU with the server",
        },
        "machine": machine(),
        "versions": versions(),
        "load_average": {"before": load_before, "after": load_average()},
        "index": bundles["index"],
        "bundle": {"reused": bundles.get("reused", False), "timings": bundles["timings"]},
        "server_start_s": server_start,
        "runs": runs,
        "batching_gain": _gains(runs),
        "memory": memory,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    result["targets"] = _targets(result)
    result["markdown"] = render_markdown(result)
    (out_dir / "http_search.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _memory_summary(memory: dict[str, Any], bundles: dict[str, Any], batching: Sequence[bool]) -> dict[str, Any]:
    """Per 100k vectors from the resident memory at start (index and metadata loaded, before any
    inference: onnxruntime's buffers grow with the batch sizes a load brings, the index does not)."""
    name = "on" if batching[-1] else "off"
    big, small = memory.get(f"rss_start_batching_{name}"), memory.get("rss_start_small")
    n_big, n_small = bundles["n_vectors"], bundles["n_real"]

    def mib(v: float | None) -> float | None:
        return round(v / 2**20, 1) if v else None

    out: dict[str, Any] = {
        "vectors_float32_mib_per_100k": round(100_000 * 1280 * 4 / 2**20, 1),
        "rss_start_mib": mib(big),
        "rss_start_small_mib": mib(small),
    }
    if big and small and n_big > n_small:
        out["per_100k_mib"] = round((big - small) / (n_big - n_small) * 100_000 / 2**20, 1)
    for on in batching:
        key = "on" if on else "off"
        out[f"rss_loaded_batching_{key}_mib"] = mib(memory.get(f"rss_loaded_batching_{key}"))
        out[f"peak_batching_{key}_mib"] = mib(memory.get(f"hwm_batching_{key}"))
    out["rss_loaded_small_mib"] = mib(memory.get(f"rss_loaded_small_batching_{name}"))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _gains(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Batching on / off at each concurrency (the baseline is the off run of this same bench)."""
    by = {(r["batching"], r["concurrency"]): r for r in runs}
    out: dict[str, dict[str, float | None]] = {}
    for (on, c), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        off = by.get((False, c))
        if not on or off is None:
            continue
        out[str(c)] = {
            "qps_ratio": _ratio(r["qps"], off["qps"]),
            "p50_ratio": _ratio(r["p50_ms"], off["p50_ms"]),
            "p99_ratio": _ratio(r["p99_ms"], off["p99_ms"]),
        }
    return out


def _targets(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]

    def pick(on: bool, c: int) -> dict[str, Any] | None:
        return next((r for r in runs if r["batching"] == on and r["concurrency"] == c), None)

    out: dict[str, Any] = {"index_type": result["index"]["type"], "n_vectors": result["config"]["n_vectors"]}
    for on in (True, False):
        name = "batching_on" if on else "batching_off"
        c1, c32 = pick(on, 1), pick(on, 32)
        errors = sum(r["errors"] for r in runs if r["batching"] == on)
        out[name] = {
            "p50_c1_ms": c1["p50_ms"] if c1 else None,
            "p50_c1_met": bool(c1 and c1["p50_ms"] is not None and c1["p50_ms"] <= TARGET_P50_C1_MS),
            "qps_c32": c32["qps"] if c32 else None,
            "qps_c32_met": bool(c32 and c32["qps"] >= TARGET_QPS_C32),
            "cpu_bound_qps_c32": c32.get("cpu_bound_qps") if c32 else None,
            "errors": errors,
        }
    out["targets"] = {"p50_c1_ms_max": TARGET_P50_C1_MS, "qps_c32_min": TARGET_QPS_C32, "errors": 0}
    return out


def render_markdown(result: dict[str, Any]) -> str:
    """A Markdown fragment for the report: the runs table, batching gain, memory, targets."""
    cfg, idx, mem = result["config"], result["index"], result["memory"]
    m = result.get("machine", {})
    lines = [
        f"### b. Search over HTTP ({cfg['n_vectors']:,} vectors, {idx['type']} index)",
        "",
        f"Real server (`python -m service`, access log off, default settings but `IMGSEARCH_BATCHING` forced on or "
        f"off per row, {json.dumps(cfg.get('server_settings') or {})} besides; the default `auto` is off on a CPU) "
        f"on {m.get('cores_usable', '?')} cores "
        f"({m.get('cpu', '?')}); the load generator runs in a separate process on the same cores "
        f"(httpx async, keep-alive, pre-built multipart bodies of {cfg['queries']}), so it takes CPU time from "
        f"the server. Both servers stay up and take turns: each setting and concurrency gets {cfg['duration_s']} s "
        f"measured in {cfg.get('rounds', 1)} slices (A B B A order), each after {cfg['warmup_s']} s of warm-up; "
        f"k = {cfg['k']}. "
        f"The bundle is {cfg['n_real']} real images embedded by the real model, padded with synthetic unit "
        f"vectors drawn around them. `auto` picked **{idx['type']}** {json.dumps(idx['params'])} "
        f"({idx['reason']}). Load average before/after: {result['load_average']['before']} / "
        f"{result['load_average']['after']}.",
        "",
        "| batching | concurrency | queries/s | p50 ms | p95 ms | p99 ms | server p50 ms | mean batch "
        "| server CPU ms/query | client CPU ms/query | CPU-bound q/s | requests | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["batching"], r["concurrency"])):
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['qps']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['server_p50_ms']} | {r['mean_batch'] or '-'} | "
            f"{r.get('server_cpu_ms_per_query', '-')} | {r.get('client_cpu_ms_per_query', '-')} | "
            f"{r.get('cpu_bound_qps', '-')} | "
            f"{r['requests']} | {r['errors']} |"
        )
    lines += [
        "",
        "Server CPU ms/query is the server process's CPU time (all threads) over the run divided by the "
        "requests it answered: unlike latency and queries/s it does not depend on what else runs on the "
        "machine. CPU-bound q/s = 1000 x cores / (server + client CPU ms per query): what these cores "
        "could serve with nothing else running on them (an upper bound; the machine here is shared).",
    ]
    if result["batching_gain"]:
        lines += [
            "",
            "Batching on / off (same run): "
            + "; ".join(
                f"concurrency {c}: {g['qps_ratio']}x queries/s, p50 x{g['p50_ratio']}, p99 x{g['p99_ratio']}"
                for c, g in result["batching_gain"].items()
            )
            + ".",
        ]
    lines += [
        "",
        "### d. Memory of the running service",
        "",
        f"Resident memory of the server once started (bundle loaded, before any search): "
        f"{mem.get('rss_start_mib')} MiB with {cfg['n_vectors']:,} vectors, {mem.get('rss_start_small_mib')} "
        f"MiB with the {cfg['n_real']} real images alone: **{mem.get('per_100k_mib')} MiB per 100k vectors** "
        f"(the float32 vectors alone are {mem['vectors_float32_mib_per_100k']} MiB per 100k at 1280 "
        f"dimensions; the rest is the {idx['type']} structure and the metadata rows). After the load: "
        + ", ".join(
            f"{mem.get(f'rss_loaded_batching_{b}_mib')} MiB (batching {b}, peak "
            f"{mem.get(f'peak_batching_{b}_mib')} MiB)"
            for b in ("off", "on")
            if mem.get(f"rss_loaded_batching_{b}_mib")
        )
        + f"; {mem.get('rss_loaded_small_mib')} MiB for the small bundle: onnxruntime's buffers grow with "
        "the batch sizes the load brings.",
    ]
    t = result["targets"]
    lines += [""]
    for name in ("batching_off", "batching_on"):
        got = t.get(name, {})
        if got.get("p50_c1_ms") is None and got.get("qps_c32") is None:
            continue
        lines.append(
            f"Targets, {name.replace('_', ' ')}: p50 at concurrency 1 <= {TARGET_P50_C1_MS:g} ms: "
            f"{got.get('p50_c1_ms')} ms, {'met' if got.get('p50_c1_met') else 'NOT met'}; "
            f">= {TARGET_QPS_C32:g} queries/s at concurrency 32: {got.get('qps_c32')} "
            f"(CPU-bound {got.get('cpu_bound_qps_c32')}), {'met' if got.get('qps_c32_met') else 'NOT met'}; "
            f"errors: {got.get('errors')}.  "
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_loadgen":
        return _loadgen_main(argv[1])
    p = argparse.ArgumentParser(prog="python -m bench.http_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "models" / "default"))
    p.add_argument("--images", default=str(REPO / "data" / "demo" / "images"))
    p.add_argument("--queries", default=None)
    p.add_argument("--out", default=str(REPO / "bench-out" / "http"))
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batching", choices=["off", "on", "both"], default="both")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-reuse", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="IMGSEARCH_X=V", help="extra server setting")
    args = p.parse_args(argv)
    batching = {"off": (False,), "on": (True,), "both": (False, True)}[args.batching]
    extra = dict(s.split("=", 1) for s in args.set)
    result = run_http_search_bench(
        Path(args.model),
        Path(args.images),
        Path(args.out),
        args.n,
        args.concurrency,
        args.duration,
        batching,
        queries_dir=Path(args.queries) if args.queries else None,
        warmup_s=args.warmup,
        quick=args.quick,
        reuse=not args.no_reuse,
        server_settings=extra,
        rounds=args.rounds,
    )
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
