"""`python -m service` as a child process that is ready when GET /readyz says so; process memory.

The one helper that tests, bench/ and loadtest/ start a real service with (standard library only,
so it imports without TensorFlow, FastAPI or httpx). Readiness is asked of the server, never
guessed from a line it prints. The service binds `--port 0` itself and the port is read from the
kernel (/proc: the listening socket the process holds), so no other process on the machine can
take the port between choosing and binding it. What the process prints (stdout and stderr as
one stream) is kept, for error messages and for callers that wait for a line of their own (a log
line, a test driver's marker).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from service.settings import ENV_PREFIX

REPO = Path(__file__).resolve().parents[1]
# resident memory now, its peak (high-water mark), and its private and file-backed (mapped, shared) parts
MEMORY_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
# loopback is never reached through a proxy, whatever http_proxy says
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def process_memory(pid: int) -> dict[str, int]:
    """Resident memory of a process in bytes, from /proc/<pid>/status: {"VmRSS": now, "VmHWM": peak}.

    Empty when the process is gone (or there is no /proc); a figure the kernel leaves out is left out.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in MEMORY_FIELDS:
            try:
                out[name] = int(rest.split()[0]) * 1024  # the kernel writes kB
            except (IndexError, ValueError):
                pass
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (uvicorn's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def proportional_memory(pid: int) -> int:
    """Proportional set size in bytes (/proc/<pid>/smaps_rollup): shared pages split between their
    users, so the sum over processes is what they cost together. 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on `host` (the OS picks it; another process may take it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on (Linux): its socket fds, looked up in /proc/net/tcp{,6}."""
    inodes = set()
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # an fd closed meanwhile
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st ... inode: "0A" is LISTEN, the port is hex after the colon
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def base_url(host: str, port: int) -> str:
    """The URL to reach a server listening on host:port from this machine."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ServiceExited(RuntimeError):
    """The service process ended before it was ready (or before a line it was expected to print)."""

    def __init__(self, message: str, returncode: int, output: str) -> None:
        super().__init__(f"{message} (exit status {returncode}):\n{output[-4000:]}")
        self.returncode, self.output = returncode, output


class ServiceProcess:
    """`python -m service ARGS --host HOST --port PORT` in a subprocess, started at construction.

    `args` must not contain --host or --port (they are given here); `url` is set once it is
    ready. `env` is added to this process's environment; with `inherit_settings=False`,
    IMGSEARCH_* variables of this process are dropped first, so that only `env` sets the
    service's settings. `command` replaces `python -m service` (a test driver that wraps the
    service, say). `log_file` gets a copy of everything the process prints. As a context
    manager: ready on entry (within `ready_timeout` s), stopped on exit.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        command: Sequence[str] | None = None,
        inherit_settings: bool = True,
        log_file: Path | None = None,
        append_log: bool = False,
        ready_timeout: float = 60,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.ready_timeout = host, ready_timeout
        # port 0: the service binds any free port and wait_ready learns which; without /proc to
        # learn it from, a port that is free now is the fallback
        self.port = port if port is not None else (0 if Path("/proc/self/fd").is_dir() else free_port(host))
        self.url = base_url(host, self.port) if self.port else ""  # known once ready
        inherited = {k: v for k, v in os.environ.items() if inherit_settings or not k.startswith(ENV_PREFIX)}
        full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        argv = [*(command or (sys.executable, "-m", "service")), *args, "--host", host, "--port", str(self.port)]
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._log: IO[str] | None = None
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,
        )
        if log_file is not None:
            try:
                self._log = open(log_file, "a" if append_log else "w")  # noqa: SIM115 - closed in stop()
            except OSError:
                self.proc.kill()
                self.proc.wait()
                raise
        self._reader = threading.Thread(target=self._read, name=f"service-{self.proc.pid}-output", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------------ output

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                if self._log is not None:
                    self._log.write(line)
                    self._log.flush()
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def output(self) -> str:
        """Everything the process printed so far."""
        with self._seen:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of `pattern` in a line the process printed, waiting up to `timeout` s for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = 0
        with self._seen:
            while True:
                for line in self.lines[checked:]:
                    if m := regex.search(line):
                        return m
                checked = len(self.lines)
                if not self._reader.is_alive():
                    raise ServiceExited(
                        f"the process printed no line matching {pattern!r}", self.proc.wait(), "".join(self.lines)
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no line matching {pattern!r} in {timeout:g} s:\n" + "".join(self.lines)[-4000:]
                    )
                self._seen.wait(min(left, 0.5))

    # --------------------------------------------------------------------- readiness

    def readyz(self, timeout: float = 5) -> int | None:
        """The status of GET /readyz now, or None when nothing answers (not bound or not listening yet)."""
        if not self.url:
            ports = listening_ports(self.proc.pid)
            if len(ports) != 1:
                return None  # not bound yet
            self.port = ports.pop()
            self.url = base_url(self.host, self.port)
        try:
            with _OPENER.open(f"{self.url}/readyz", timeout=timeout) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):  # refused, reset, timed out
            return None

    def wait_ready(self, timeout: float | None = None, accept: Sequence[int] = (200,)) -> str:
        """Wait until GET /readyz answers with a status in `accept` (200: ready); the base URL.

        ServiceExited when the process ends first, TimeoutError after `timeout` s (default: the
        `ready_timeout` given at start); both carry the tail of what it printed.
        """
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        status: int | None = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._reader.join(timeout=5)  # the last of its output, for the message
                raise ServiceExited("the service exited before it was ready", rc, self.output())
            status = self.readyz()
            if status in accept:
                return self.url
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the service was not ready in {timeout:g} s (GET /readyz: "
                    f"{status if status is not None else 'no answer'}):\n{self.output()[-4000:]}"
                )
            time.sleep(0.05)

    # --------------------------------------------------------------------- the process

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        """process_memory() of the service process (bytes)."""
        return process_memory(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` (uvicorn shuts down gracefully on SIGTERM), SIGKILL after `timeout` s; the exit status.

        A status of -SIGKILL after another signal means it did not exit in time.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)  # workers of its own may still hold the pipe: do not wait for ever
        with self._seen:
            if self._log is not None:
                self._log.close()
                self._log = None
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL now (no shutdown at all); the exit status, -SIGKILL."""
        return self.stop(signal.SIGKILL)

    def __enter__(self) -> ServiceProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
