"""Blocking work (decode, inference, FAISS search, writes) off the event loop, in bounded pools.

Searches share one `anyio.CapacityLimiter` (settings.pool_size slots); writes run in the engine's
own lower-priority write pool, so that queued adds never hold a search's slot. The engine's
exceptions pass through unchanged: service/errors.py maps them to HTTP answers.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from service.engine import Engine

T = TypeVar("T")


class Pool:
    """The bounded pool of the search side: at most `size` blocking jobs at once."""

    def __init__(self, size: int) -> None:
        # made in the lifespan (service/app.py), inside the event loop that will use it
        self.limiter = anyio.CapacityLimiter(size)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a thread of the pool; waits for a free slot first."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)


async def run_write(engine: Engine, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in the engine's write pool (its threads run at a lower CPU priority)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(engine.write_pool, functools.partial(fn, *args))
