"""Shared helpers: machine and version facts, timing, memory, running one measurement in a child process."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.process import process_memory

RESULT_MARK = "BENCH_RESULT "
PACKAGES = (
    "numpy",
    "onnxruntime",
    "faiss-cpu",
    "tensorflow-cpu",
    "keras",
    "pillow",
    "tf2onnx",
    "qdrant-client",
    "lancedb",
    "chromadb",
)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:  # which libjpeg Pillow decodes with matters for draft mode
        from PIL import features

        out["pillow-libjpeg"] = features.version("jpg")
    except Exception:
        out["pillow-libjpeg"] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    os_name = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"') + f" (kernel {platform.release()})"
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": _mem_total(),
        "os": os_name,
        "arch": platform.machine(),
        "gpu": None,
    }


def rss_bytes() -> int:
    """Resident memory of this process now (its peak where there is no /proc)."""
    if (rss := process_memory(os.getpid()).get("VmRSS")) is not None:
        return rss
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def emit(result: dict[str, Any]) -> None:
    """A child's answer: one marked JSON line on stdout."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


class ChildError(RuntimeError):
    pass


def run_child(
    module: str, spec: dict[str, Any], timeout: float = 1800, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `python -m module JSON` in a fresh interpreter (no TensorFlow or thread pools left over
    from the previous measurement) and return the dict it emitted."""
    child_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore", **(env or {})}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(spec)],
        cwd=root,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise ChildError(f"{module} {spec.get('kind')} failed (exit {proc.returncode}):\n{tail}")


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()
