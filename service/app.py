"""The FastAPI app: HTTP only. The engine (bundle + embedder) is loaded once, in the lifespan.

`create_app(settings)` builds the app; routes get the engine through the typed dependency
`EngineDep`. Decoding, inference and FAISS search run in a bounded thread pool, never on the
event loop.
"""


import asyncio
import contextlib
import functools
import hmac
import logging
import mimetypes
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, Security, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.bundle import BundleError, BundleWriteError, BusyError
from indexer.embedder import EmbedderError
from indexer.images import ImageDecodeError, ImageTooLargeError
from service import errors
from service.engine import Engine, ImageFileError, ImageInputError, QueryResult
from service.batching import QueueFull
from service.errors import BadRequest, NotFound, TooLarge, TooManyRequests, Unauthorized, Unavailable
from service.metrics import CONTENT_TYPE, Gauge, Metrics, method_label, worker_exited
from service.schemas import (
    MAX_ID,
    AddResponse,
    BatchQueryResult,
    BatchSearchResponse,
    CompactResponse,
    DeleteResponse,
    ErrorBody,
    Health,
    ImageInfo,
    Ready,
    ReloadResponse,
    SearchHit,
    SearchResponse,
    Stats,
)
from service.settings import Settings

log = logging.getLogger("service")
T = TypeVar("T")

FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and small fields around each file
THUMBNAIL_MIN, THUMBNAIL_MAX = 16, 1024
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")
DESCRIPTION = """Serves an index bundle built with `python -m indexer build`.

Upload an image to `POST /search` and get its nearest neighbours by cosine similarity of the
model's embeddings. Every error answer is JSON: `{"error": "<code>", "detail": "<what was wrong>"}`.
When the service has an API key, send it as `X-API-Key: <key>` or `Authorization: Bearer <key>`.
"""


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Not a readable image (corrupt, truncated, empty)", 401: "Missing or wrong API key",
            404: "No such image", 413: "Upload too large, or too many pixels", 415: "Not an image, or an unsupported format",
            422: "Invalid parameter (e.g. `k` out of range)", 503: "The index cannot be changed or loaded right now"}
    return {c: {"model": ErrorBody, "description": text.get(c, "Error")} for c in codes}


def _links(pointer: str, *targets: str) -> dict[str, Any]:
    """OpenAPI links: where an id in this answer can be used next (for /docs and stateful API testing)."""
    names = {"get_image": "Metadata", "get_image_file": "File", "similar_images": "Similar", "delete_image": "Delete"}
    return {f"{names[t]}{'OfFirstResult' if '/results/' in pointer else ''}":
            {"operationId": t, "parameters": {"image_id": f"$response.body#{pointer}"}} for t in targets}


def _ok(status: int, pointer: str, *targets: str, errors_: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    return {status: {"links": _links(pointer, *targets)}, **_errors(*errors_)}


# ----------------------------------------------------------------------------- middleware


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        # Connection: close, so that the rest of an endless body is not read and thrown away
        super().__init__(413, f"the request body is larger than the {limit} bytes this endpoint accepts",
                         headers={"Connection": "close"})


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the client sent no part of the request body for {seconds:g} s",
                         headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuse bodies over a limit while they are read, never buffering more than the limit.

    With `body_timeout`, a client that stops sending in the middle of a body gets a 408 (slowloris):
    the wait is between two parts of the body, so a slow but steady upload is not cut off.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], body_timeout: float | None = None) -> None:
        self.app, self.limit_for, self.body_timeout = app, limit_for, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = errors.json_error(413, "too_large", f"the request body ({declared} bytes) is larger than the "
                                         f"{limit} bytes this endpoint accepts", headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0
        body_done = False

        async def limited() -> Message:
            nonlocal seen, body_done
            if body_done or self.body_timeout is None:
                message = await receive()  # after the body: waiting for a disconnect is not a stall
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except TimeoutError:
                    raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class MetricsMiddleware:
    """Request counts and latency per route template; adds nosniff to every answer."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        self.metrics.track_in_flight(1)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.track_in_flight(-1)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = method_label(scope.get("method", ""))
            self.metrics.requests.inc(route, method, str(status))
            self.metrics.latency.observe(time.perf_counter() - t0, route, method)


# ---------------------------------------------------------------------------- dependencies


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise Unavailable("the index is not loaded yet")
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key.")
_bearer = HTTPBearer(auto_error=False, description="The service's API key as a bearer token.")


def _key_checker(settings: Settings) -> Callable[..., Any]:
    expected = settings.api_key.get_secret_value().encode() if settings.api_key is not None else b""

    async def require_api_key(
        key: Annotated[str | None, Security(_key_header)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
    ) -> None:
        given = key if key is not None else (bearer.credentials if bearer is not None else None)
        if given is None:
            raise Unauthorized()
        # compare_digest takes time independent of where the strings differ
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            raise Unauthorized("wrong API key")

    return require_api_key


# -------------------------------------------------------------------------------- the app


def _page() -> str:
    return resources.files("service").joinpath("static/index.html").read_text(encoding="utf-8")


def _docs_assets() -> Path | None:
    """Swagger UI's files from the fastapi-offline package, so /docs works without internet."""
    try:
        import fastapi_offline  # type: ignore[import-not-found]
    except ImportError:
        return None
    static = Path(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app for these settings. Pass an already loaded engine to skip loading it in the lifespan."""
    metrics = engine.metrics if engine is not None else Metrics()
    limiter_box: dict[str, anyio.CapacityLimiter] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limiter_box["pool"] = anyio.CapacityLimiter(settings.pool_size)
        opened_here = app.state.engine is None
        if opened_here:
            app.state.engine = await anyio.to_thread.run_sync(Engine.open, settings, metrics)
        eng: Engine = app.state.engine
        snap = eng.loaded
        log.info("index %s: %d images, model %s, bundle version %s, %s index", settings.index, len(snap.bundle),
                 snap.model_id, snap.version, snap.bundle.index_type)
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

    docs_assets = _docs_assets()
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

    def snapshot_gauge() -> list[tuple[tuple[str, ...], float]]:
        eng = app.state.engine
        return [((), float(len(eng.loaded.bundle)))] if eng is not None else []

    def info_gauge() -> list[tuple[tuple[str, ...], float]]:
        eng = app.state.engine
        return [((eng.loaded.version, eng.loaded.model_id, eng.loaded.bundle.index_type), 1.0)] if eng is not None else []

    metrics.add_gauge(Gauge("imgsearch_index_images", "Images in the served index.", snapshot_gauge))
    metrics.add_gauge(Gauge("imgsearch_bundle_info", "The served bundle version, model and index type.", info_gauge,
                            ("version", "model", "index_type")))

    upload_limit = settings.max_upload_bytes + FORM_OVERHEAD
    batch_limit = min((settings.max_upload_bytes + FORM_OVERHEAD) * settings.max_batch_files, settings.max_batch_bytes)

    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: batch_limit if path == "/search/batch" else upload_limit,
                       body_timeout=settings.body_timeout)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    writer_deps = [Depends(_key_checker(settings))] if settings.api_key is not None else []
    reader_deps = writer_deps if settings.protect_search else []
    auth_errors = (401,) if writer_deps else ()
    read_auth_errors = (401,) if reader_deps else ()

    K = Annotated[int, Query(ge=1, le=settings.max_k, description=f"Number of neighbours, 1 to {settings.max_k}.")]
    MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, description="Drop neighbours with a lower cosine similarity.")]
    LabelFilter = Annotated[str | None, Query(min_length=1, max_length=200, description="Only neighbours with this label.")]
    ImageIdPath = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Image id.")]

    async def pooled(fn: Callable[..., T], *args: Any, image_id: int | None = None) -> T:
        """Run blocking work in the bounded pool, mapping the engine's exceptions to HTTP errors."""
        return await mapped(anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter_box["pool"]),
                            image_id)

    async def written(engine: Engine, fn: Callable[..., T], *args: Any, image_id: int | None = None) -> T:
        """Run a write in the engine's own write pool: queued adds never hold a search's slot."""
        loop = asyncio.get_running_loop()
        return await mapped(loop.run_in_executor(engine.write_pool, functools.partial(fn, *args)), image_id)

    async def mapped(work: Awaitable[T], image_id: int | None = None) -> T:
        """The result of blocking work (pooled or micro-batched), the engine's exceptions mapped to HTTP errors."""
        try:
            return await work
        except ImageInputError as exc:
            raise errors.image_error(exc.cause, exc.what) from exc
        except KeyError as exc:
            if image_id is None:
                raise
            raise NotFound(f"no image with id {image_id} in the index") from exc
        except ImageFileError as exc:
            raise NotFound(f"image {image_id}: {exc}", code="file_unavailable") from exc
        except (ImageDecodeError, ImageTooLargeError) as exc:  # a stored file that cannot be read
            raise NotFound(f"image {image_id}: the stored file cannot be decoded", code="file_unavailable") from exc
        except BusyError as exc:
            raise Unavailable(str(exc), code="busy", headers={"Retry-After": f"{exc.retry_after:g}"}) from exc
        except QueueFull as exc:
            raise TooManyRequests(str(exc), headers={"Retry-After": "1"}) from exc
        except BundleWriteError as exc:  # disk full, read-only folder: say so, without paths
            raise Unavailable(f"the change was not saved: {exc.reason}; the index is unchanged",
                              code="write_failed") from exc
        except (BundleError, EmbedderError) as exc:
            err = Unavailable("the index bundle could not be read or written; the cause is in the server log")
            raise err from exc

    def named(file: UploadFile, what: str = "file") -> str:
        return f"{what} ({file.filename})" if file.filename else what

    async def read_upload(file: UploadFile, what: str) -> bytes:
        limit = settings.max_upload_bytes
        if file.size is not None and file.size > limit:
            raise TooLarge(f"{what}: {file.size} bytes, over the limit of {limit}", code="file_too_large")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"{what}: over the limit of {limit} bytes", code="file_too_large")
        if not data:
            raise BadRequest(f"{what}: empty file", code="empty_file")
        return data

    def hits(result: QueryResult) -> list[SearchHit]:
        return [SearchHit(id=h.id, score=h.score, path=h.path, label=h.label, image_url=f"/images/{h.id}/file")
                for h in result.hits]

    # ------------------------------------------------------------------------- search

    @app.post("/search", response_model=SearchResponse, tags=["search"], dependencies=reader_deps,
              operation_id="search", summary="Find images similar to an uploaded image",
              responses=_ok(200, "/results/0/id", "get_image", "similar_images",
                            errors_=(400, *read_auth_errors, 413, 415, 422)))
    async def search(
        engine: EngineDep,
        file: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, BMP, GIF or TIFF).")],
        k: K = settings.default_k,
        min_score: MinScore = None,
        label: LabelFilter = None,
    ) -> SearchResponse:
        """Nearest neighbours of an uploaded image, best first (score = cosine similarity)."""
        t0 = time.perf_counter()
        data = await read_upload(file, named(file))
        q, model = await search_one(engine, data, k, min_score, label, file.filename)
        return SearchResponse(results=hits(q), predicted_label=q.predicted_label, model=model,
                              took_ms=round((time.perf_counter() - t0) * 1000, 3))

    async def search_one(engine: Engine, data: bytes, k: int, min_score: float | None, label: str | None,
                         filename: str | None) -> tuple[QueryResult, str]:
        """One uploaded image's search; with batching on, it shares a micro-batch with concurrent ones.

        Decoding runs in the pool (in parallel); waiting for the batch holds no pool slot.
        """
        if engine.batcher is None:
            out = await pooled(engine.search_images, [data], k, min_score, label, [filename])
            return out.queries[0], out.model
        with engine.batcher.announce() as ticket:
            snap, pixels = await pooled(engine.prepare_query, data, filename)
            try:
                future = engine.submit_search(snap, pixels, k, min_score, label, ticket)
            except QueueFull as exc:
                raise TooManyRequests(str(exc), headers={"Retry-After": "1"}) from exc
        return await mapped(asyncio.wrap_future(future)), snap.model_id

    @app.post("/search/batch", response_model=BatchSearchResponse, tags=["search"], dependencies=reader_deps,
              operation_id="search_batch", summary="Search with several images at once",
              responses=_errors(400, *read_auth_errors, 413, 415, 422))
    async def search_batch(
        engine: EngineDep,
        files: Annotated[list[UploadFile], File(description=f"Query images, 1 to {settings.max_batch_files}.")],
        k: K = settings.default_k,
        min_score: MinScore = None,
        label: LabelFilter = None,
    ) -> BatchSearchResponse:
        """Several query images in one request: one result list per image, in upload order."""
        t0 = time.perf_counter()
        if not files:
            raise BadRequest("no files", code="no_files")
        if len(files) > settings.max_batch_files:
            raise TooLarge(f"{len(files)} files, more than the {settings.max_batch_files} allowed in one batch",
                           code="too_many_files")
        datas = [await read_upload(f, named(f, f"file {i + 1}")) for i, f in enumerate(files)]
        out = await pooled(engine.search_images, datas, k, min_score, label, [f.filename for f in files])
        return BatchSearchResponse(
            queries=[BatchQueryResult(filename=f.filename, results=hits(q), predicted_label=q.predicted_label)
                     for f, q in zip(files, out.queries)],
            model=out.model, took_ms=round((time.perf_counter() - t0) * 1000, 3))

    @app.get("/images/{image_id}/similar", response_model=SearchResponse, tags=["search"], dependencies=reader_deps,
             operation_id="similar_images", summary="Find images similar to an indexed image",
             responses=_ok(200, "/results/0/id", "get_image", "get_image_file",
                           errors_=(*read_auth_errors, 404, 422)))
    async def similar(engine: EngineDep, image_id: ImageIdPath, k: K = settings.default_k, min_score: MinScore = None,
                      label: LabelFilter = None) -> SearchResponse:
        """Neighbours of an image already in the index (the image itself is left out)."""
        t0 = time.perf_counter()
        out = await pooled(engine.similar, image_id, k, min_score, label, image_id=image_id)
        q = out.queries[0]
        return SearchResponse(results=hits(q), predicted_label=q.predicted_label, model=out.model,
                              took_ms=round((time.perf_counter() - t0) * 1000, 3))

    # ------------------------------------------------------------------------- images

    @app.get("/images/{image_id}", response_model=ImageInfo, tags=["images"], dependencies=reader_deps,
             operation_id="get_image", summary="Metadata of an indexed image",
             responses=_ok(200, "/id", "get_image_file", "similar_images", errors_=(*read_auth_errors, 404, 422)))
    async def image_info(engine: EngineDep, image_id: ImageIdPath) -> ImageInfo:
        """Metadata of an indexed image."""
        try:
            rec = engine.record(image_id)
        except KeyError:
            raise NotFound(f"no image with id {image_id} in the index") from None
        return ImageInfo(id=rec.id, path=rec.path, label=rec.label, origin=rec.origin, size=rec.size, width=rec.width,
                         height=rec.height, mtime=rec.mtime, sha256=rec.sha256, image_url=f"/images/{rec.id}/file")

    @app.get("/images/{image_id}/file", tags=["images"], dependencies=reader_deps, response_class=Response,
             operation_id="get_image_file", summary="The image file, or a thumbnail",
             responses={200: {"content": {"image/*": {}, "image/jpeg": {}},
                              "description": "The image file, or a JPEG thumbnail with `size`."},
                        **_errors(*read_auth_errors, 404, 422)})
    async def image_file(
        engine: EngineDep,
        image_id: ImageIdPath,
        size: Annotated[int | None, Query(ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX,
                                          description="Longest side of a JPEG thumbnail (aspect kept).")] = None,
    ) -> Response:
        """The image itself (only for ids in the index), or a thumbnail of it."""
        headers = {"Cache-Control": "private, max-age=300"}
        if size is not None:
            data = await pooled(engine.thumbnail, image_id, size, image_id=image_id)
            return Response(data, media_type="image/jpeg", headers=headers)
        path = await pooled(engine.image_path, image_id, image_id=image_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers=headers)

    @app.post("/images", response_model=AddResponse, status_code=201, tags=["images"], dependencies=writer_deps,
              operation_id="add_image", summary="Add an image to the index",
              responses={**_ok(201, "/id", "get_image", "get_image_file", "similar_images", "delete_image",
                               errors_=(400, *auth_errors, 413, 415, 422, 503)),
                         200: {"model": AddResponse, "description": "The same image (and label) was already there: "
                               "nothing changed, or only its label"}})
    async def add_image(
        engine: EngineDep,
        response: Response,
        file: Annotated[UploadFile, File(description="The image to add.")],
        label: Annotated[str | None, Form(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$",
                                          description="Its label (class), if any.")] = None,
    ) -> AddResponse:
        """Embed an image and add it to the index; on disk (journalled and flushed) before the answer.

        201 when the image is new; 200 when it was already there (a re-upload changes nothing but
        its label). Searches see it as soon as the answer is sent.
        """
        data = await read_upload(file, named(file))
        out = await written(engine, engine.add_image, data, label, file.filename)
        if out.replaced:
            response.status_code = 200
        response.headers["Server-Timing"] = f"write;dur={out.write_s * 1000:.3f}"  # the part after the embedding
        rec = out.record
        return AddResponse(id=rec.id, path=rec.path, label=rec.label, replaced=out.replaced, count=out.count,
                           version=out.version, seq=out.seq, image_url=f"/images/{rec.id}/file")

    @app.delete("/images/{image_id}", response_model=DeleteResponse, tags=["images"], dependencies=writer_deps,
                operation_id="delete_image", summary="Remove an image from the index",
                responses=_errors(*auth_errors, 404, 422, 503))
    async def delete_image(engine: EngineDep, image_id: ImageIdPath, response: Response) -> DeleteResponse:
        """Remove an image from the index; on disk (journalled and flushed) before the answer. Its file is not touched."""
        out = await written(engine, engine.delete_image, image_id, image_id=image_id)
        response.headers["Server-Timing"] = f"write;dur={out.write_s * 1000:.3f}"
        return DeleteResponse(id=image_id, deleted=True, count=out.count, version=out.version, seq=out.seq)

    # -------------------------------------------------------------------------- admin

    @app.post("/admin/reload", response_model=ReloadResponse, tags=["admin"], dependencies=writer_deps,
              operation_id="reload", summary="Load the newest bundle version",
              responses=_errors(*auth_errors, 503))
    async def reload(engine: EngineDep) -> ReloadResponse:
        """Load the newest saved bundle version and swap it in; requests in flight finish on the old one."""
        out = await pooled(engine.reload)
        log.info("reloaded bundle version %s (was %s): %d images, model %s", out.version, out.previous_version,
                 out.count, out.model)
        return ReloadResponse(version=out.version, previous_version=out.previous_version, count=out.count,
                              model=out.model, model_changed=out.model_changed, took_ms=round(out.seconds * 1000, 3))

    @app.post("/admin/compact", response_model=CompactResponse, tags=["admin"], dependencies=writer_deps,
              operation_id="compact", summary="Fold the journal into a new bundle version now",
              responses=_errors(*auth_errors, 503))
    async def compact_now(engine: EngineDep) -> CompactResponse:
        """Write the journalled adds and deletes into a new bundle version now, instead of waiting for the
        background compaction. Searches and writes go on meanwhile."""
        out = await written(engine, engine.compact, "POST /admin/compact")
        return CompactResponse(version=out.version, previous_version=out.previous_version, count=out.images,
                               journal_seq=out.journal_seq, folded=out.folded, replayed=out.replayed,
                               took_ms=round(out.seconds * 1000, 3))

    @app.get("/healthz", response_model=Health, tags=["ops"],
             operation_id="healthz", summary="Liveness: the process is up")
    async def healthz() -> Health:
        """The process is up."""
        return Health()

    @app.get("/readyz", response_model=Ready, tags=["ops"],
             operation_id="readyz", summary="Readiness: the index is loaded",
             responses=_errors(503))
    async def readyz(request: Request) -> Ready:
        """The index bundle is loaded, its files passed their integrity check (or it is still running), and
        searches can be served."""
        engine = get_engine(request)
        bundle = engine.loaded.bundle
        if bundle.integrity_error:
            raise Unavailable(f"the bundle failed its integrity check: {bundle.integrity_error}", code="corrupt")
        return Ready(version=bundle.version, count=len(bundle), verified=bundle.verified)

    @app.get("/stats", response_model=Stats, tags=["ops"], dependencies=reader_deps,
             operation_id="stats", summary="Index statistics",
             responses=_errors(*read_auth_errors))
    async def stats(engine: EngineDep) -> Stats:
        """Size, dimension, index type, model and bundle version of the served index."""
        return Stats.model_validate(await pooled(engine.stats))

    @app.get("/metrics", tags=["ops"], response_class=Response, operation_id="metrics", summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
    async def prometheus() -> Response:
        """Prometheus metrics: requests and latency per route, decode, embed and search time."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    page = _page()

    @app.get("/", response_class=HTMLResponse, tags=["page"], operation_id="web_page", summary="The web page")
    async def index_page() -> HTMLResponse:
        """The web page: drop an image, see its neighbours."""
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    if docs_assets is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="imgsearch - API docs",
                                       swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-assets/swagger-ui.css",
                                       swagger_favicon_url="/docs-assets/favicon.png",
                                       oauth2_redirect_url="/docs/oauth2-redirect")

        @app.get("/docs/oauth2-redirect", include_in_schema=False)
        async def docs_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    return app


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
    return create_app(Settings())  # type: ignore[call-arg]
