"""Errors: raised in the service, mapped to a status code and a short JSON body here.

Every error answer has the same shape, `{"error": "<short code>", "detail": "<what was wrong>"}`
(422s add `errors`, the list of invalid fields). The cause goes to the log, never to the client
for server-side failures.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.images import ImageDecodeError, ImageTooLargeError

log = logging.getLogger("service.errors")

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

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
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
            return UnsupportedImage(f"{what}: not an image, or a format that is not supported "
                                    "(JPEG, PNG, WebP, BMP, GIF, TIFF)")
        return BadRequest(f"{what}: {exc}", code="bad_image")
    return BadRequest(f"{what}: {exc}", code="bad_image")


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail, **extra}


def json_error(status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, detail, **extra), status_code=status, headers=headers)


def _loc(loc: Any) -> str:
    return ".".join(str(part) for part in loc) if isinstance(loc, (list, tuple)) else str(loc)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the JSON shape above."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        level = logging.ERROR if exc.status >= 500 else logging.INFO
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.detail,
                exc_info=exc.__cause__ if exc.status >= 500 and exc.__cause__ else None)
        return json_error(exc.status, exc.code, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        detail = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return json_error(422, "invalid_request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 413:
            detail = "the request body is larger than this endpoint accepts"
        return json_error(exc.status_code, _CODES.get(exc.status_code, "error"), detail,
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s -> 500", request.method, request.url.path, exc_info=exc)
        return json_error(500, "internal_error", "internal error; the cause is in the server log")
