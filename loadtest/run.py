"""The load test: a real `python -m service` on loopback, N concurrent clients, restart checks.

1. Setup: a model (`--model`, else models/default, else the embedded backbone exported with
   `python -m export`), a corpus (`--images`, else the demo corpus built with
   `python -m train.demo_data`) and a bundle (a copy of `--index`, else `python -m indexer build`),
   all in a work folder: the bundles of the repository are never touched.
2. Phase "sigterm": the server runs as a subprocess on 127.0.0.1 and a free port; `--clients`
   threads send searches, adds (each a new, distinct image) and deletes (of images this run
   added and saw acknowledged) for `--duration` seconds. Then the server gets SIGTERM.
3. Restart and check: every add the server acknowledged (201) is there, with the same content
   hash, and its vector finds it; every acknowledged delete (200) is gone.
4. Phase "sigkill": the same load on the restarted server, which gets SIGKILL while the clients
   are still sending. Restart and check again (every acknowledged write of both phases).
5. Report: requests, status codes, errors, latency percentiles per route, server memory, the
   checks; `report.json` and `report.md` in `--out`. Exit status 0 only when there was no 5xx,
   no unexpected answer and no lost or resurrected write.

Everything is bounded: each phase by time and by a request count, each request by a timeout,
and every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from indexer.metadata import upload_id  # the id the service gives an upload: names uncertain adds
from service.process import ServiceExited, ServiceProcess, process_memory

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the only address this load test ever connects to
MiB = 1 << 20
ROUTES = ("search", "add", "delete")
EXPECTED = {"search": 200, "add": 201, "delete": 200}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class LoadTestError(RuntimeError):
    """The load test could not be set up or run (not a finding about the service)."""


@dataclass
class Options:
    duration: float = 60.0
    clients: int = 16
    kill_duration: float | None = None  # default: min(20 s, duration / 3)
    out: Path = REPO / "loadtest" / "results"
    model: Path | None = None
    images: Path | None = None
    index: Path | None = None
    work: Path | None = None
    keep_work: bool = False
    seed: int = 0
    k: int = 10
    mix: tuple[float, float, float] = (0.70, 0.20, 0.10)  # search, add, delete
    request_timeout: float = 60.0
    max_requests: int = 200_000  # per phase
    demo_copies: int = 10
    server_env: dict[str, str] = field(default_factory=dict)
    quick: bool = False

    @property
    def kill_phase_s(self) -> float:
        return self.kill_duration if self.kill_duration is not None else min(20.0, self.duration / 3)


# ------------------------------------------------------------------------------------ setup


@dataclass
class Setup:
    work: Path
    model: Path
    images: Path
    index: Path
    model_card: dict[str, Any]
    timings: dict[str, float]
    notes: list[str]


def _run(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise LoadTestError(f"{what}: no result after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise LoadTestError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    return proc


def _is_model(folder: Path) -> bool:
    return (folder / "model.onnx").is_file() and (folder / "model.json").is_file()


def prepare(opts: Options, log: Callable[[str], None]) -> Setup:
    if opts.model is not None and not _is_model(Path(opts.model)):
        raise LoadTestError(f"{opts.model}: not an exported model folder (model.onnx + model.json)")
    if opts.images is not None and not Path(opts.images).is_dir():
        raise LoadTestError(f"{opts.images}: no such image folder")
    if opts.index is not None and not (Path(opts.index) / "CURRENT").is_file():
        raise LoadTestError(f"{opts.index}: not an index bundle")
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="imgsearch-loadtest-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    notes: list[str] = []

    t0 = time.monotonic()
    if opts.model is not None:
        model = Path(opts.model)
    elif _is_model(REPO / "models" / "default"):
        model = REPO / "models" / "default"
    else:
        model = work / "model"
        log(f"exporting the embedded efficientnet_lite0 backbone to {model} ...")
        _run(
            [sys.executable, "-m", "export", "--backbone", "efficientnet_lite0", "--out", str(model)],
            "exporting the default model",
            timeout=1800,
        )
        notes.append("model exported for this run (models/default was missing)")
    timings["model_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    if opts.images is not None:
        images = Path(opts.images)
    else:
        corpus = work / "corpus"
        log(f"building the demo corpus in {corpus} ...")
        _run(
            [
                sys.executable,
                "-m",
                "train.demo_data",
                "--out",
                str(corpus),
                "--copies",
                str(opts.demo_copies),
                "--queries",
                "2",
                "--seed",
                str(opts.seed),
            ],
            "building the demo corpus",
            timeout=1800,
        )
        images = corpus / "images"
    timings["corpus_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    index = work / "index"
    if index.exists():
        shutil.rmtree(index)
    if opts.index is not None:
        shutil.copytree(opts.index, index, ignore=shutil.ignore_patterns(".lock"))
        notes.append(f"bundle copied from {opts.index}")
    else:
        log(f"indexing {images} into {index} ...")
        _run(
            [
                sys.executable,
                "-m",
                "indexer",
                "build",
                "--model",
                str(model),
                "--images",
                str(images),
                "--index",
                str(index),
                "--no-progress",
                "--device",
                "cpu",
            ],
            "building the index",
            timeout=3600,
        )
    timings["index_s"] = time.monotonic() - t0
    card = json.loads((model / "model.json").read_text())
    return Setup(work, model, images, index, card, timings, notes)


def _image_files(folder: Path, limit: int, seed: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    random.Random(seed).shuffle(files)
    return files[:limit]


# ----------------------------------------------------------------------------------- server


class Server:
    """`python -m service` on 127.0.0.1 and a free port (service/process.py), its memory sampled while it runs."""

    def __init__(self, index: Path, log_path: Path, env: dict[str, str]) -> None:
        self.index, self.log_path, self.env = index, log_path, env
        self.process: ServiceProcess | None = None
        self._rss: list[int] = []  # bytes, every half second
        self._sampler_stop = threading.Event()

    @property
    def url(self) -> str:
        return self.process.url if self.process is not None else ""

    def start(self, timeout: float = 600) -> float:
        """Start it and wait until GET /readyz answers 200; the seconds that took."""
        t0 = time.monotonic()
        self.process = ServiceProcess(
            ["--index", str(self.index)],
            host=HOST,
            log_file=self.log_path,
            append_log=True,
            env={"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_LOG_LEVEL": "warning", **self.env},
        )
        try:
            self.process.wait_ready(timeout)
        except (ServiceExited, TimeoutError) as exc:
            raise LoadTestError(str(exc)) from None
        self._sampler_stop.clear()
        threading.Thread(target=self._sample, args=(self.process.pid,), daemon=True).start()
        return time.monotonic() - t0

    def _sample(self, pid: int) -> None:
        while not self._sampler_stop.wait(0.5):
            if (rss := process_memory(pid).get("VmRSS")) is not None:
                self._rss.append(rss)

    def sampled_max_rss_mib(self) -> float | None:
        """The largest resident memory seen by the sampler (also after a SIGKILL, when /proc has nothing left)."""
        return round(max(self._rss) / MiB, 1) if self._rss else None

    def memory(self) -> dict[str, float | None]:
        figures = self.process.memory() if self.process is not None else {}
        rss, hwm = figures.get("VmRSS"), figures.get("VmHWM")
        return {
            "rss_mib": round(rss / MiB, 1) if rss else None,
            "peak_rss_mib": round(hwm / MiB, 1) if hwm else None,
            "sampled_max_rss_mib": self.sampled_max_rss_mib(),
        }

    def signal(self, sig: int, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit; its status. LoadTestError when it outlives `timeout` (then killed)."""
        assert self.process is not None
        self._sampler_stop.set()
        code = self.process.stop(sig, timeout)
        if sig != signal.SIGKILL and code == -signal.SIGKILL:
            raise LoadTestError(f"the service did not exit within {timeout:.0f} s of signal {sig}")
        return code

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.proc.poll() is None:
            self._sampler_stop.set()
            self.process.kill()


# ------------------------------------------------------------------------------ bookkeeping


class Recorder:
    """Latencies and status codes per route, errors, for one phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {r: [] for r in ROUTES}
        self.status: dict[str, Counter[str]] = {r: Counter() for r in ROUTES}
        self.transport: dict[str, Counter[str]] = {r: Counter() for r in ROUTES}
        self.transport_after_kill = 0
        self.unexpected: list[str] = []
        self.requests = 0

    def answer(self, route: str, status: int, seconds: float, body: str) -> None:
        with self.lock:
            self.requests += 1
            self.latency[route].append(seconds)
            self.status[route][str(status)] += 1
            if status != EXPECTED[route] and len(self.unexpected) < 50:
                self.unexpected.append(f"{route} -> {status}: {body[:200]}")

    def failure(self, route: str, exc: BaseException, after_kill: bool) -> None:
        with self.lock:
            self.requests += 1
            if after_kill:
                self.transport_after_kill += 1
            else:
                self.transport[route][type(exc).__name__] += 1
                if len(self.unexpected) < 50:
                    self.unexpected.append(f"{route} -> {type(exc).__name__}: {exc}")


class Ledger:
    """Every write the server acknowledged, across phases; what the restart checks rely on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, str] = {}  # acknowledged adds not deleted since: id -> sha256
        self.deleted: dict[int, str] = {}  # acknowledged deletes: id -> sha256
        self.uncertain: set[int] = set()  # the answer was lost (server killed): state unknown
        self.lost_during_run: list[int] = []  # an acknowledged add answered 404 to its delete
        self.deletable: list[int] = []
        self.hashes: set[str] = set()
        self.acked_adds = 0
        self.acked_deletes = 0
        self.replaced = 0
        self.samples: dict[int, bytes] = {}  # a few acknowledged adds' bytes: their vectors must find them

    def new_hash(self, digest: str) -> bool:
        with self.lock:
            if digest in self.hashes:
                return False
            self.hashes.add(digest)
            return True

    def take(self, rng: random.Random) -> int | None:
        with self.lock:
            if not self.deletable:
                return None
            i = rng.randrange(len(self.deletable))
            self.deletable[i], self.deletable[-1] = self.deletable[-1], self.deletable[i]
            return self.deletable.pop()


def make_variant(base: Image.Image, rng: random.Random, tag: int) -> bytes:
    """A new JPEG from a corpus photo: crop, flip, rotation, colour, size, quality, and a tag."""
    w, h = base.size
    scale = rng.uniform(0.6, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = base.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    img = img.resize((rng.randint(160, 320), rng.randint(160, 320)), Image.Resampling.BILINEAR)
    px = img.load()
    assert px is not None  # load() returns None only for images without pixel access
    for i in range(32):  # the tag, one bit per pixel of the top row: every add is distinct
        px[i, 0] = (255, 255, 255) if (tag >> i) & 1 else (0, 0, 0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(70, 95))
    return buf.getvalue()


# ---------------------------------------------------------------------------------- clients


@dataclass
class Phase:
    name: str
    seconds: float
    kill: bool


def run_phase(
    phase: Phase,
    server: Server,
    opts: Options,
    ledger: Ledger,
    queries: list[bytes],
    bases: list[tuple[Image.Image, str]],
    tag_base: int,
) -> tuple[Recorder, dict[str, Any]]:
    rec = Recorder()
    stop = threading.Event()
    killed_at: list[float] = []
    counter = iter(range(opts.max_requests))
    counter_lock = threading.Lock()

    def next_request() -> bool:
        with counter_lock:
            return next(counter, None) is not None

    def client(cid: int) -> None:
        rng = random.Random(opts.seed * 1_000_003 + tag_base + cid)
        seq = 0
        with httpx.Client(base_url=server.url, timeout=opts.request_timeout) as c:
            while not stop.is_set() and next_request():
                roll = rng.random()
                route = "search" if roll < opts.mix[0] else "add" if roll < opts.mix[0] + opts.mix[1] else "delete"
                victim = ledger.take(rng) if route == "delete" else None
                if route == "delete" and victim is None:
                    route = "search"
                t0 = time.perf_counter()
                try:
                    if route == "search":
                        r = c.post(
                            "/search",
                            params={"k": opts.k},
                            files={"file": ("q.jpg", rng.choice(queries), "image/jpeg")},
                        )
                    elif route == "add":
                        while True:
                            base, label = rng.choice(bases)
                            tag = (tag_base + cid) << 20 | seq
                            seq += 1
                            data = make_variant(base, rng, tag)
                            digest = hashlib.sha256(data).hexdigest()
                            if ledger.new_hash(digest):
                                break
                        t0 = time.perf_counter()
                        r = c.post(
                            "/images",
                            files={"file": (f"add-{tag}.jpg", data, "image/jpeg")},
                            data={"label": f"loadtest-{label}"},
                        )
                    else:
                        r = c.delete(f"/images/{victim}")
                except httpx.HTTPError as exc:
                    after_kill = bool(killed_at)
                    rec.failure(route, exc, after_kill)
                    with ledger.lock:
                        if route == "add":
                            ledger.uncertain.add(upload_id(digest))
                        elif route == "delete" and victim is not None:
                            ledger.uncertain.add(victim)
                            ledger.live.pop(victim, None)
                    if after_kill or stop.is_set():
                        return
                    continue
                seconds = time.perf_counter() - t0
                rec.answer(route, r.status_code, seconds, r.text)
                with ledger.lock:
                    if route == "add":
                        if r.status_code == 201:
                            image_id = int(r.json()["id"])
                            ledger.acked_adds += 1
                            ledger.replaced += bool(r.json().get("replaced"))
                            ledger.live[image_id] = digest
                            ledger.deletable.append(image_id)
                            if len(ledger.samples) < 200:
                                ledger.samples[image_id] = data
                        else:
                            ledger.uncertain.add(upload_id(digest))
                    elif route == "delete" and victim is not None:
                        if r.status_code == 200:
                            ledger.acked_deletes += 1
                            ledger.deleted[victim] = ledger.live.pop(victim, "")
                        elif r.status_code == 404:
                            ledger.lost_during_run.append(victim)
                            ledger.live.pop(victim, None)
                        else:
                            ledger.uncertain.add(victim)
                            ledger.live.pop(victim, None)

    load_before = os.getloadavg()
    t_start = time.monotonic()
    with ThreadPoolExecutor(max_workers=opts.clients, thread_name_prefix="client") as pool:
        futures = [pool.submit(client, i) for i in range(opts.clients)]
        deadline = t_start + phase.seconds
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            time.sleep(0.05)
        exit_code: int | None
        if phase.kill:
            killed_at.append(time.monotonic())
            exit_code = server.signal(signal.SIGKILL)  # while the clients are still sending
            stop.set()
        else:
            stop.set()
            for f in futures:
                f.result()
            exit_code = None
        for f in futures:
            f.result()
    elapsed = time.monotonic() - t_start
    memory = server.memory() if not phase.kill else {"sampled_max_rss_mib": server.sampled_max_rss_mib()}
    if not phase.kill:
        exit_code = server.signal(signal.SIGTERM)
    info = {
        "seconds": round(elapsed, 2),
        "exit_code": exit_code,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "memory": memory,
    }
    return rec, info


# ----------------------------------------------------------------------------------- checks


def verify(server: Server, ledger: Ledger, base_count: int, queries: list[bytes]) -> dict[str, Any]:
    """After a restart: every acknowledged add is there (same bytes), every acknowledged delete gone."""
    with ledger.lock:
        live = {i: h for i, h in ledger.live.items() if i not in ledger.uncertain}
        deleted = {i: h for i, h in ledger.deleted.items() if i not in ledger.uncertain}
        uncertain = len(ledger.uncertain)
    missing: list[int] = []
    mismatched: list[int] = []
    resurrected: list[int] = []
    errors: list[str] = []

    def check(item: tuple[int, str, bool]) -> None:
        image_id, digest, should_exist = item
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.get(f"/images/{image_id}")
        if should_exist:
            if r.status_code == 404:
                missing.append(image_id)
            elif r.status_code != 200:
                errors.append(f"GET /images/{image_id} -> {r.status_code}")
            elif r.json().get("sha256") != digest:
                mismatched.append(image_id)
        elif r.status_code == 200:
            resurrected.append(image_id)
        elif r.status_code != 404:
            errors.append(f"GET /images/{image_id} -> {r.status_code}")

    items = [(i, h, True) for i, h in live.items()] + [(i, h, False) for i, h in deleted.items()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(check, items))

    with httpx.Client(base_url=server.url, timeout=60) as c:
        count = c.get("/stats").json()["count"]
        search_ok = c.post("/search", files={"file": ("q.jpg", queries[0], "image/jpeg")}).status_code == 200
        # the vectors came back too, not only the metadata: an added image finds itself first
        with ledger.lock:
            sampled = [(i, data) for i, data in ledger.samples.items() if i in live][:10]
        not_found_by_search = 0
        for image_id, data in sampled:
            r = c.post("/search", params={"k": 1}, files={"file": ("a.jpg", data, "image/jpeg")})
            top = r.json()["results"][0] if r.status_code == 200 and r.json()["results"] else {}
            not_found_by_search += top.get("id") != image_id
    expected = base_count + len(live)
    return {
        "acked_adds_present_checked": len(live),
        "acked_deletes_checked": len(deleted),
        "uncertain_writes_excluded": uncertain,
        "missing_adds": len(missing),
        "content_mismatches": len(mismatched),
        "resurrected_deletes": len(resurrected),
        "lost_during_run": len(ledger.lost_during_run),
        "other_errors": errors[:20],
        "count": count,
        "count_expected": expected if uncertain == 0 else None,
        "count_expected_range": [expected, expected + uncertain],
        "count_ok": count == expected if uncertain == 0 else expected <= count <= expected + uncertain,
        "search_after_restart_ok": search_ok,
        "adds_searched": len(sampled),
        "adds_not_found_by_search": not_found_by_search,
        "missing_ids": missing[:20],
        "resurrected_ids": resurrected[:20],
    }


# ----------------------------------------------------------------------------------- report


def _percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    ms = np.asarray(values) * 1000
    return {
        "count": len(values),
        "mean_ms": round(float(ms.mean()), 1),
        **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 95, 99)},
        "max_ms": round(float(ms.max()), 1),
    }


def summarise(phase: Phase, rec: Recorder, info: dict[str, Any]) -> dict[str, Any]:
    routes = {}
    for route in ROUTES:
        routes[route] = {
            "status": dict(sorted(rec.status[route].items())),
            "transport_errors": dict(rec.transport[route]),
            "latency": _percentiles(rec.latency[route]),
        }
    all_latency = [x for r in ROUTES for x in rec.latency[r]]
    answered = sum(sum(rec.status[r].values()) for r in ROUTES)
    five_xx = sum(n for r in ROUTES for s, n in rec.status[r].items() if s.startswith("5"))
    unexpected = sum(n for r in ROUTES for s, n in rec.status[r].items() if int(s) != EXPECTED[r])
    transport = sum(sum(rec.transport[r].values()) for r in ROUTES)
    return {
        "name": phase.name,
        "planned_s": phase.seconds,
        "ends_with": "SIGKILL" if phase.kill else "SIGTERM",
        **info,
        "requests": rec.requests,
        "answered": answered,
        "throughput_rps": round(answered / info["seconds"], 1) if info["seconds"] else 0.0,
        "status_5xx": five_xx,
        "unexpected_status": unexpected,
        "transport_errors": transport,
        "cut_off_by_kill": rec.transport_after_kill,
        "latency_all": _percentiles(all_latency),
        "routes": routes,
        "unexpected_samples": rec.unexpected[:10],
    }


def _versions() -> dict[str, str]:
    out = {}
    for name in ("fastapi", "uvicorn", "starlette", "onnxruntime", "faiss-cpu", "numpy", "pillow", "httpx"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))


def render_markdown(rep: dict[str, Any]) -> str:
    cfg, env = rep["config"], rep["environment"]
    lines = [
        "# Load test report",
        "",
        f"Run {rep['started_at']} with `{rep['command']}`: **{'PASS' if rep['passed'] else 'FAIL'}**"
        + ("" if rep["passed"] else f" ({'; '.join(rep['failures'])})"),
        "",
        f"- server: `python -m service` on 127.0.0.1 (1 worker, {cfg['server_env'] or 'default settings'}, "
        f"device cpu), model `{env['model']}` ({env['model_dim']}-d), bundle of {env['bundle_images']} images "
        f"from {env['corpus']}",
        f"- clients: {cfg['clients']} threads, each with its own keep-alive connection; mix "
        f"{cfg['mix'][0]:.0%} searches (k={cfg['k']}), {cfg['mix'][1]:.0%} adds (each a new image), "
        f"{cfg['mix'][2]:.0%} deletes (of acknowledged adds)",
        f"- machine: {env['cpus']} CPUs ({env['platform']}), Python {env['python']}; the CPUs were shared with "
        "other work (load averages below)",
        "",
        "## Requests",
        "",
        "| phase | s | requests | answered | req/s | 5xx | unexpected status | transport errors | cut off by the kill | load avg (1 min) before/after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rep["phases"]:
        lines.append(
            f"| {p['name']} (ends with {p['ends_with']}) | {p['seconds']} | {p['requests']} | {p['answered']} "
            f"| {p['throughput_rps']} | {p['status_5xx']} | {p['unexpected_status']} | {p['transport_errors']} "
            f"| {p['cut_off_by_kill']} | {p['load_before'][0]} / {p['load_after'][0]} |"
        )
    lines += [
        "",
        "## Latency (ms, answered requests)",
        "",
        "| phase | route | count | status codes | mean | p50 | p90 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rep["phases"]:
        for route, r in p["routes"].items():
            lat = r["latency"]
            if not lat.get("count"):
                continue
            codes = ", ".join(f"{s}: {n}" for s, n in r["status"].items())
            lines.append(
                f"| {p['name']} | {route} | {lat['count']} | {codes} | {lat['mean_ms']} | {lat['p50_ms']} "
                f"| {lat['p90_ms']} | {lat['p95_ms']} | {lat['p99_ms']} | {lat['max_ms']} |"
            )
    lines += [
        "",
        "## Acknowledged writes after each restart",
        "",
        "| after | restart s | adds checked | missing | content mismatch | deletes checked | resurrected "
        "| uncertain (answer lost in the kill) | count / expected | search ok | adds found by their own image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in rep["verification"]:
        low, high = v["count_expected_range"]
        exp = v["count_expected"] if v["count_expected"] is not None else f"{low} to {high}"
        lines.append(
            f"| {v['after']} | {v['restart_s']} | {v['acked_adds_present_checked']} | {v['missing_adds']} "
            f"| {v['content_mismatches']} | {v['acked_deletes_checked']} | {v['resurrected_deletes']} "
            f"| {v['uncertain_writes_excluded']} | {v['count']} / {exp} | {v['search_after_restart_ok']} "
            f"| {v['adds_searched'] - v['adds_not_found_by_search']} of {v['adds_searched']} |"
        )
    totals = rep["totals"]
    lines += [
        "",
        "## Totals",
        "",
        f"- requests: {totals['requests']}, answered: {totals['answered']}, 5xx: {totals['status_5xx']}, "
        f"unexpected status: {totals['unexpected_status']}, transport errors outside the kill: "
        f"{totals['transport_errors']}",
        f"- acknowledged adds: {totals['acked_adds']}, acknowledged deletes: {totals['acked_deletes']}, "
        f"lost acknowledged writes: {totals['lost_writes']}",
        f"- server memory: peak RSS {rep['phases'][0]['memory'].get('peak_rss_mib')} MiB in the first phase",
        "",
        "Reproduce with `make loadtest` (or the command above). A *lost* write is an add answered 201 that is "
        "missing (or has other content) after the restart, or a delete answered 200 whose image is back.",
        "",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- run


def run(opts: Options, command: str = "python -m loadtest", log: Callable[[str], None] = print) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    setup = prepare(opts, log)
    server_log = setup.work / "server.log"
    ledger = Ledger()
    failures: list[str] = []
    phases: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    server = Server(setup.index, server_log, opts.server_env)
    try:
        query_files = (
            _image_files(setup.images.parent / "queries", 64, opts.seed)
            if (setup.images.parent / "queries").is_dir()
            else []
        )
        query_files += _image_files(setup.images, 64 - len(query_files), opts.seed)
        if not query_files:
            raise LoadTestError(f"{setup.images}: no images")
        queries = [p.read_bytes() for p in query_files]
        bases = []
        for p in _image_files(setup.images, 32, opts.seed + 1):
            with Image.open(p) as src:
                img = src.convert("RGB")
                img.thumbnail((360, 360))
                bases.append((img, p.parent.name if p.parent != setup.images else "root"))

        log(f"starting the service on {HOST} ...")
        start_s = server.start()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            base_count = c.get("/stats").json()["count"]
        log(f"serving {base_count} images at {server.url} (start-up {start_s:.1f} s)")

        plan = [Phase("sigterm", opts.duration, kill=False), Phase("sigkill", opts.kill_phase_s, kill=True)]
        for n, phase in enumerate(plan):
            log(
                f"phase {phase.name}: {opts.clients} clients for {phase.seconds:.0f} s, then "
                f"{'SIGKILL' if phase.kill else 'SIGTERM'} ..."
            )
            rec, info = run_phase(phase, server, opts, ledger, queries, bases, tag_base=(n + 1) * 1000)
            summary = summarise(phase, rec, info)
            phases.append(summary)
            log(
                f"  {summary['requests']} requests, {summary['throughput_rps']} req/s, 5xx {summary['status_5xx']}, "
                f"unexpected {summary['unexpected_status']}, p50/p99 {summary['latency_all'].get('p50_ms')}/"
                f"{summary['latency_all'].get('p99_ms')} ms; server exit code {info['exit_code']}"
            )
            server = Server(setup.index, server_log, opts.server_env)
            restart_s = server.start()
            check = verify(server, ledger, base_count, queries)
            check = {"after": f"{phase.name} + restart", "restart_s": round(restart_s, 2), **check}
            checks.append(check)
            log(
                f"  restart {restart_s:.1f} s: {check['acked_adds_present_checked']} adds and "
                f"{check['acked_deletes_checked']} deletes checked, missing {check['missing_adds']}, resurrected "
                f"{check['resurrected_deletes']}"
            )
        server.signal(signal.SIGTERM)
    finally:
        server.ensure_stopped()

    totals = {
        "requests": sum(p["requests"] for p in phases),
        "answered": sum(p["answered"] for p in phases),
        "status_5xx": sum(p["status_5xx"] for p in phases),
        "unexpected_status": sum(p["unexpected_status"] for p in phases),
        "transport_errors": sum(p["transport_errors"] for p in phases),
        "acked_adds": ledger.acked_adds,
        "acked_deletes": ledger.acked_deletes,
        "replaced_adds": ledger.replaced,
        "lost_writes": sum(
            c["missing_adds"] + c["content_mismatches"] + c["resurrected_deletes"] + c["adds_not_found_by_search"]
            for c in checks
        )
        + len(ledger.lost_during_run),
    }
    if totals["status_5xx"]:
        failures.append(f"{totals['status_5xx']} answers with a 5xx status")
    if totals["unexpected_status"]:
        failures.append(f"{totals['unexpected_status']} unexpected answers")
    if totals["transport_errors"]:
        failures.append(f"{totals['transport_errors']} transport errors before any kill")
    if totals["lost_writes"]:
        failures.append(f"{totals['lost_writes']} lost acknowledged writes")
    for check in checks:
        if not check["count_ok"] or not check["search_after_restart_ok"] or check["other_errors"]:
            failures.append(
                f"check after {check['after']}: count {check['count']} (expected {check['count_expected']}), "
                f"search ok {check['search_after_restart_ok']}, errors {check['other_errors'][:3]}"
            )
    if phases and phases[0]["exit_code"] not in (0, -signal.SIGTERM):
        failures.append(f"exit code {phases[0]['exit_code']} after SIGTERM")
    if totals["acked_adds"] == 0 or totals["acked_deletes"] == 0:
        failures.append("no acknowledged add or delete: the load did not exercise writes")

    bundle_images = base_count
    report = {
        "started_at": started,
        "command": command,
        "passed": not failures,
        "failures": failures,
        "config": {
            "duration_s": opts.duration,
            "kill_phase_s": opts.kill_phase_s,
            "clients": opts.clients,
            "mix": list(opts.mix),
            "k": opts.k,
            "seed": opts.seed,
            "request_timeout_s": opts.request_timeout,
            "max_requests_per_phase": opts.max_requests,
            "server_env": opts.server_env,
            "quick": opts.quick,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "packages": _versions(),
            "model": f"{setup.model_card.get('backbone')}@{str(setup.model_card.get('onnx_sha256'))[:12]}",
            "model_dim": (setup.model_card.get("output") or {}).get("dim"),
            "bundle_images": bundle_images,
            "corpus": "the demo corpus (train.demo_data)" if opts.images is None else str(opts.images),
            "setup_s": {k: round(v, 1) for k, v in setup.timings.items()},
            "notes": setup.notes,
        },
        "phases": phases,
        "verification": checks,
        "totals": totals,
    }
    if not opts.keep_work and not failures and opts.work is None:
        shutil.rmtree(setup.work, ignore_errors=True)
    else:
        report["work_dir"] = str(setup.work)
    write_report(Path(opts.out), report)
    return report
