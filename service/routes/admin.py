"""Admin routes: load the newest bundle version, and fold the journal into a new one now."""

# No `from __future__ import annotations`, as in the other route modules.
import logging

from fastapi import APIRouter

from service.dependencies import Access, EngineDep, PoolDep
from service.openapi import error_responses
from service.pool import run_write
from service.schemas import CompactResponse, ReloadResponse

log = logging.getLogger("service")


def router(access: Access) -> APIRouter:
    api = APIRouter(tags=["admin"], dependencies=access.write)

    @api.post(
        "/admin/reload",
        response_model=ReloadResponse,
        operation_id="reload",
        summary="Load the newest bundle version",
        responses=error_responses(*access.write_errors, 503),
    )
    async def reload(engine: EngineDep, pool: PoolDep) -> ReloadResponse:
        """Load the newest saved bundle version and swap it in; requests in flight finish on the old one."""
        out = await pool.run(engine.reload)
        log.info(
            "reloaded bundle version %s (was %s): %d images, model %s",
            out.version,
            out.previous_version,
            out.count,
            out.model,
        )
        return ReloadResponse(
            version=out.version,
            previous_version=out.previous_version,
            count=out.count,
            model=out.model,
            model_changed=out.model_changed,
            took_ms=round(out.seconds * 1000, 3),
        )

    @api.post(
        "/admin/compact",
        response_model=CompactResponse,
        operation_id="compact",
        summary="Fold the journal into a new bundle version now",
        responses=error_responses(*access.write_errors, 503),
    )
    async def compact_now(engine: EngineDep) -> CompactResponse:
        """Write the journalled adds and deletes into a new bundle version now, instead of waiting for the
        background compaction. Searches and writes go on meanwhile."""
        out = await run_write(engine, engine.compact, "POST /admin/compact")
        return CompactResponse(
            version=out.version,
            previous_version=out.previous_version,
            count=out.images,
            journal_seq=out.journal_seq,
            folded=out.folded,
            replayed=out.replayed,
            took_ms=round(out.seconds * 1000, 3),
        )

    return api
