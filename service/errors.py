"""Errors: raised in the service, mapped to a status code and a short JSON body here.

Every error answer has the same shape, `{"error": "<short code>", "detail": "<what was wrong>"}`
(422s add `errors`, the list of invalid fields). The cause goes to the log, never to the client
for server-side failures.

The engine's own exceptions (bad uploads, unknown ids, a busy or unwritable bundle, a full batch
queue) are mapped here too, once, by `engine_error` and the handler `install` registers: routes
call the engine and let them propagate.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.bundle import BundleError, BundleWriteError, BusyError
from indexer.embedder import EmbedderError
from indexer.images import ImageDecodeError, ImageTooLargeError
from service.batching import QueueFull
from service.engine import ImageFileError, ImageInputError

log = logging.getLogger("service.errors")
_PATH_INT = TypeAdapter(int)  # how FastAPI reads an int path parameter (lax: "05", "5.0")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ServiceError(Exception):
    """An error with a status code, a short machine-readable code and a message for the client."""

    status = 500
    code = "internal_error"

    def __init__(
        self, detail: str, *, code: str | None = None, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str = "a valid API key is required (X-API-Key header or Authorization: Bearer)") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status, code = 404, "not_found"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


class UnsupportedImage(ServiceError):
    status, code = 415, "unsupported_image"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class TooManyRequests(ServiceError):
    status, code = 429, "too_many_requests"


def image_error(exc: Exception, what: str = "file") -> ServiceError:
    """The HTTP error for an image that cannot be used (from indexer.images' exceptions)."""
    if isinstance(exc, ImageTooLargeError):
        return TooLarge(f"{what}: {exc}", code="too_many_pixels")
    if isinstance(exc, ImageDecodeError):
        if isinstance(exc.__cause__, UnidentifiedImageError):
            return UnsupportedImage(
                f"{what}: not an image, or a format that is not supported (JPEG, PNG, WebP, BMP, GIF, TIFF)"
            )
        return BadRequest(f"{what}: {exc}", code="bad_image")
    return BadRequest(f"{what}: {exc}", code="bad_image")


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail, **extra}


def json_error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(code, detail, **extra), status_code=status, headers=headers)


# The exceptions of the engine (and of what it calls) that have an HTTP answer; `engine_error` maps them.
ENGINE_ERRORS: tuple[type[Exception], ...] = (
    ImageInputError,
    KeyError,
    ImageFileError,
    ImageDecodeError,
    ImageTooLargeError,
    BusyError,
    QueueFull,
    BundleError,
    EmbedderError,
)


def engine_error(exc: Exception, image_id: int | None = None) -> ServiceError | None:
    """The HTTP error for an exception of the engine, or None when it is not one with an HTTP answer.

    `image_id` is the id of the route's path, if it has one: only there is a KeyError an unknown id
    (404); anywhere else it is a bug, and gets the 500 of any unexpected error.
    """
    if isinstance(exc, ImageInputError):
        return image_error(exc.cause, exc.what)
    if isinstance(exc, KeyError):
        return None if image_id is None else NotFound(f"no image with id {image_id} in the index")
    if isinstance(exc, ImageFileError):
        return NotFound(f"image {image_id}: {exc}", code="file_unavailable")
    if isinstance(exc, (ImageDecodeError, ImageTooLargeError)):  # a stored file that cannot be read
        return NotFound(f"image {image_id}: the stored file cannot be decoded", code="file_unavailable")
    if isinstance(exc, BusyError):
        return Unavailable(str(exc), code="busy", headers={"Retry-After": f"{exc.retry_after:g}"})
    if isinstance(exc, QueueFull):
        return TooManyRequests(str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, BundleWriteError):  # disk full, read-only folder: say so, without paths
        return Unavailable(f"the change was not saved: {exc.reason}; the index is unchanged", code="write_failed")
    if isinstance(exc, (BundleError, EmbedderError)):
        return Unavailable("the index bundle could not be read or written; the cause is in the server log")
    return None


def path_image_id(request: Request) -> int | None:
    """The `{image_id}` of the route's path, if any, read as the route read it ("5.0" is 5)."""
    raw = request.path_params.get("image_id")
    if raw is None:
        return None
    try:
        return _PATH_INT.validate_python(raw)
    except ValidationError:
        return None


def _loc(loc: Any) -> str:
    return ".".join(str(part) for part in loc) if isinstance(loc, (list, tuple)) else str(loc)


async def service_error_response(request: Request, exc: ServiceError) -> JSONResponse:
    level = logging.ERROR if exc.status >= 500 else logging.INFO
    log.log(
        level,
        "%s %s -> %d %s: %s",
        request.method,
        request.url.path,
        exc.status,
        exc.code,
        exc.detail,
        exc_info=exc.__cause__ if exc.status >= 500 and exc.__cause__ else None,
    )
    return json_error(exc.status, exc.code, exc.detail, headers=exc.headers)


async def engine_error_response(request: Request, exc: Exception) -> JSONResponse:
    err = engine_error(exc, path_image_id(request))
    if err is None:
        raise exc  # not an answer the service knows: on to the 500 handler, which logs it
    err.__cause__ = exc
    return await service_error_response(request, err)


async def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
    return json_error(422, "invalid_request", detail, errors=errors)


async def http_error_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 413:
        detail = "the request body is larger than this endpoint accepts"
    return json_error(
        exc.status_code, _CODES.get(exc.status_code, "error"), detail, headers=getattr(exc, "headers", None)
    )


async def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s -> 500", request.method, request.url.path, exc_info=exc)
    return json_error(500, "internal_error", "internal error; the cause is in the server log")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the JSON shape above."""
    # The ignores: Starlette types every handler as taking Exception, not the class it is registered for.
    app.add_exception_handler(ServiceError, service_error_response)  # type: ignore[arg-type]
    for exc_type in ENGINE_ERRORS:
        app.add_exception_handler(exc_type, engine_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error_response)
