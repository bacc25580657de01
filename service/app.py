"""The FastAPI app: HTTP only. The engine (bundle + embedder) is loaded once, in the lifespan.

`create_app(settings)` builds the app from its parts: the routers of service/routes/, the
middleware of service/middleware.py and the error handlers of service/errors.py (where the
engine's exceptions become HTTP answers, in one place). Routes get the engine through the typed
dependency `EngineDep` (service/dependencies.py); decoding, inference and FAISS search run in a
bounded thread pool (service/pool.py), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from service import errors
from service.dependencies import access_for
from service.engine import Engine
from service.metrics import Gauge, Metrics, worker_exited
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.openapi import DESCRIPTION
from service.pool import Pool
from service.routes import admin, images, ops, page, search
from service.settings import Settings

log = logging.getLogger("service")

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and small fields around each file


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app for these settings. Pass an already loaded engine to skip loading it in the lifespan."""
    metrics = engine.metrics if engine is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = Pool(settings.pool_size)
        opened_here = app.state.engine is None
        if opened_here:
            app.state.engine = await anyio.to_thread.run_sync(Engine.open, settings, metrics)
        eng: Engine = app.state.engine
        snap = eng.loaded
        log.info(
            "index %s: %d images, model %s, bundle version %s, %s index",
            settings.index,
            len(snap.bundle),
            snap.model_id,
            snap.version,
            snap.bundle.index_type,
        )
        watcher = asyncio.create_task(_watch(eng, settings.watch_interval)) if settings.watch_interval > 0 else None
        # the content hashes, after serving has started (start-up reads the index once, not twice)
        verifier = threading.Thread(target=_verify_quietly, args=(eng,), name="verify", daemon=True)
        verifier.start()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if opened_here:
                await anyio.to_thread.run_sync(eng.close)  # the micro-batcher's thread
            worker_exited(os.getpid())

    docs_assets = page.docs_assets()
    app = FastAPI(
        title="imgsearch",
        summary="Similar-image search: upload an image, get its nearest neighbours.",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None if docs_assets is not None else "/docs",
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    add_gauges(app, metrics)
    add_middleware(app, settings, metrics)

    access = access_for(settings)
    app.include_router(search.router(settings, access))
    app.include_router(images.router(settings, access))
    app.include_router(admin.router(access))
    app.include_router(ops.router(access, metrics))
    app.include_router(page.router())
    if docs_assets is not None:
        app.mount(page.DOCS_ASSETS_URL, StaticFiles(directory=docs_assets), name="docs-assets")
        app.include_router(page.docs_router())
    return app


def add_gauges(app: FastAPI, metrics: Metrics) -> None:
    """Gauges of the served index, read from whatever engine the app holds when /metrics is asked."""

    def snapshot_gauge() -> list[tuple[tuple[str, ...], float]]:
        eng = app.state.engine
        return [((), float(len(eng.loaded.bundle)))] if eng is not None else []

    def info_gauge() -> list[tuple[tuple[str, ...], float]]:
        eng = app.state.engine
        return (
            [((eng.loaded.version, eng.loaded.model_id, eng.loaded.bundle.index_type), 1.0)] if eng is not None else []
        )

    metrics.add_gauge(Gauge("imgsearch_index_images", "Images in the served index.", snapshot_gauge))
    metrics.add_gauge(
        Gauge(
            "imgsearch_bundle_info",
            "The served bundle version, model and index type.",
            info_gauge,
            ("version", "model", "index_type"),
        )
    )


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Body limits innermost, then CORS, then metrics outermost (so they count every answer)."""
    upload_limit = settings.max_upload_bytes + FORM_OVERHEAD
    batch_limit = min((settings.max_upload_bytes + FORM_OVERHEAD) * settings.max_batch_files, settings.max_batch_bytes)

    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: batch_limit if path == "/search/batch" else upload_limit,
        body_timeout=settings.body_timeout,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)


def _verify_quietly(engine: Engine) -> None:
    try:
        engine.verify()
    except Exception:
        log.exception("the background integrity check could not run")


async def _watch(engine: Engine, interval: float) -> None:
    """Pick up versions published by other processes (a rebuild, other workers)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(engine.refresh_if_changed)
        except Exception:
            log.exception("could not load the newer bundle version; still serving %s", engine.loaded.version)


def create_app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` and worker processes: settings from IMGSEARCH_* variables."""
    return create_app(Settings())
