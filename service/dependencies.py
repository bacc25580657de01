"""What routes declare as dependencies: the engine, the search pool, and the API key check.

The engine and the pool are made in the lifespan (service/app.py) and kept on `app.state`; tests
can swap them with `app.dependency_overrides`, without patching globals.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.params import Depends as DependsParam
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine
from service.errors import Unauthorized, Unavailable
from service.pool import Pool
from service.settings import Settings


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise Unavailable("the index is not loaded yet")
    return engine


def get_pool(request: Request) -> Pool:
    pool = getattr(request.app.state, "pool", None)
    if pool is None:
        raise Unavailable("the index is not loaded yet")
    return pool


EngineDep = Annotated[Engine, Depends(get_engine)]
PoolDep = Annotated[Pool, Depends(get_pool)]

KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key.")
BEARER = HTTPBearer(auto_error=False, description="The service's API key as a bearer token.")


def key_checker(settings: Settings) -> Callable[..., Any]:
    """The dependency that requires the service's API key (X-API-Key header or bearer token)."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key is not None else b""

    async def require_api_key(
        key: Annotated[str | None, Security(KEY_HEADER)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
    ) -> None:
        given = key if key is not None else (bearer.credentials if bearer is not None else None)
        if given is None:
            raise Unauthorized()
        # compare_digest takes time independent of where the strings differ
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            raise Unauthorized("wrong API key")

    return require_api_key


@dataclass(frozen=True)
class Access:
    """Who may call what under these settings: the dependencies of reading and of writing routes,
    and the error statuses (401 or none) that their OpenAPI documentation lists."""

    read: list[DependsParam]
    write: list[DependsParam]
    read_errors: tuple[int, ...]
    write_errors: tuple[int, ...]


def access_for(settings: Settings) -> Access:
    """With an api_key, writes need it; with protect_search too, reads need it as well."""
    write = [Depends(key_checker(settings))] if settings.api_key is not None else []
    read = write if settings.protect_search else []
    return Access(read=read, write=write, read_errors=(401,) if read else (), write_errors=(401,) if write else ())
