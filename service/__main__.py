"""`python -m service --index DIR [--host H --port P --workers N]`: serve an index bundle over HTTP.

Settings come from `IMGSEARCH_*` environment variables (see service/settings.py); the options
given here override them. The bundle is opened before the server starts: a missing, corrupt or
mismatched bundle stops the command with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from indexer.bundle import BundleError
from indexer.embedder import EmbedderError
from indexer.model_card import ModelCardError
from service.metrics import MULTIPROC_ENV
from service.process import base_url
from service.settings import ENV_PREFIX, Settings

EXIT_BAD_SETTINGS = 2
EXIT_NO_BUNDLE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve similar-image search over an index bundle. Other settings: IMGSEARCH_* environment "
        "variables (README, 'The service').",
    )
    p.add_argument("--index", help="index bundle folder (IMGSEARCH_INDEX)")
    p.add_argument("--host", help="address to listen on (IMGSEARCH_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port, 0 for any free one (IMGSEARCH_PORT, default 8000)")
    p.add_argument("--workers", type=int, help="worker processes (IMGSEARCH_WORKERS, default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="onnxruntime device (IMGSEARCH_DEVICE)")
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (IMGSEARCH_LOG_LEVEL, default info)",
    )
    return p


def page_url(host: str, port: int) -> str:
    return base_url(host, port) + "/"


class _Server(uvicorn.Server):
    """uvicorn's server, printing where the page is once the socket is bound (the real port for --port 0)."""

    banner: str = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and getattr(self, "servers", None):
            port = self.servers[0].sockets[0].getsockname()[1]
            url = page_url(self.config.host, port)
            print(f"{self.banner}\n  web page: {url}\n  API docs: {url}docs\n  (Ctrl+C to stop)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            field = ".".join(str(p) for p in err["loc"])
            if not field:
                print(f"error: bad settings: {msg}", file=sys.stderr)
                continue
            option = f"--{field.replace('_', '-')} or " if field in vars(args) else ""
            print(f"error: bad setting {field} ({option}{ENV_PREFIX}{field.upper()}): {msg}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from service.app import create_app
    from service.engine import Engine

    try:
        engine = Engine.open(settings)  # fail before binding the port, with one clear line
    except (BundleError, EmbedderError, ModelCardError) as exc:
        print(f"error: cannot serve {settings.index}: {exc}", file=sys.stderr)
        return EXIT_NO_BUNDLE
    snap = engine.loaded
    banner = (
        f"imgsearch: serving {len(snap.bundle)} images from {settings.index} "
        f"(model {snap.model_id}, bundle version {snap.version}, {snap.bundle.index_type} index)"
    )
    log_level = settings.log_level
    if settings.workers == 1:
        server = _Server(
            uvicorn.Config(
                create_app(settings, engine),
                host=settings.host,
                port=settings.port,
                log_level=log_level,
                limit_concurrency=settings.limit_concurrency,
                proxy_headers=False,
                server_header=False,
            )
        )
        server.banner = banner
        server.run()
        return 0 if server.started else 1
    # Several processes: each worker loads the bundle itself from the same settings, passed on
    # through the environment (the only place worker processes can read them from). The socket is
    # bound here, once, so that the printed URL has the real port (also for --port 0).
    del engine
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "service.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=log_level,
        limit_concurrency=settings.limit_concurrency,
        proxy_headers=False,
        server_header=False,
    )
    sock = config.bind_socket()
    sock.listen(config.backlog)  # connections wait in the queue until the workers accept them
    for name in ("index", "host", "port", "workers", "device", "log_level", "watch_interval"):
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(getattr(settings, name))
    # prometheus_client's multiprocess mode: every worker writes its samples under this folder
    # and /metrics sums them, whichever worker answers (service/metrics.py)
    metrics_dir = tempfile.mkdtemp(prefix="imgsearch-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    url = page_url(settings.host, sock.getsockname()[1])
    print(
        f"{banner}, {settings.workers} workers\n  web page: {url}\n  API docs: {url}docs\n  (Ctrl+C to stop)",
        flush=True,
    )
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
