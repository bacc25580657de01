"""ASGI middleware of the service: body limits (size and stall timeout) and request metrics.

Both are plain ASGI classes, not `BaseHTTPMiddleware`: they see the body as it streams, and they
never buffer a request or an answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.metrics import Metrics, method_label


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        # Connection: close, so that the rest of an endless body is not read and thrown away
        super().__init__(
            413,
            f"the request body is larger than the {limit} bytes this endpoint accepts",
            headers={"Connection": "close"},
        )


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"the client sent no part of the request body for {seconds:g} s", headers={"Connection": "close"}
        )


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
        declared = content_length(scope)
        if declared is not None and declared > limit:
            response = errors.json_error(
                413,
                "too_large",
                f"the request body ({declared} bytes) is larger than the {limit} bytes this endpoint accepts",
                headers={"Connection": "close"},
            )
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


def content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None when absent or not a number (chunked bodies are counted)."""
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
