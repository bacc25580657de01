"""Operations routes: liveness, readiness, index statistics and Prometheus metrics."""

# No `from __future__ import annotations`, as in the other route modules.
from fastapi import APIRouter, Request, Response

from service.dependencies import Access, EngineDep, PoolDep, get_engine
from service.errors import Unavailable
from service.metrics import CONTENT_TYPE, Metrics
from service.openapi import error_responses
from service.schemas import Health, Ready, Stats


def router(access: Access, metrics: Metrics) -> APIRouter:
    api = APIRouter(tags=["ops"])

    @api.get("/healthz", response_model=Health, operation_id="healthz", summary="Liveness: the process is up")
    async def healthz() -> Health:
        """The process is up."""
        return Health()

    @api.get(
        "/readyz",
        response_model=Ready,
        operation_id="readyz",
        summary="Readiness: the index is loaded",
        responses=error_responses(503),
    )
    async def readyz(request: Request) -> Ready:
        """The index bundle is loaded, its files passed their integrity check (or it is still running), and
        searches can be served."""
        engine = get_engine(request)
        bundle = engine.loaded.bundle
        if bundle.integrity_error:
            raise Unavailable(f"the bundle failed its integrity check: {bundle.integrity_error}", code="corrupt")
        return Ready(version=bundle.version, count=len(bundle), verified=bundle.verified)

    @api.get(
        "/stats",
        response_model=Stats,
        dependencies=access.read,
        operation_id="stats",
        summary="Index statistics",
        responses=error_responses(*access.read_errors),
    )
    async def stats(engine: EngineDep, pool: PoolDep) -> Stats:
        """Size, dimension, index type, model and bundle version of the served index."""
        return Stats.model_validate(await pool.run(engine.stats))

    @api.get(
        "/metrics",
        response_class=Response,
        operation_id="metrics",
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    )
    async def prometheus() -> Response:
        """Prometheus metrics: requests and latency per route, decode, embed and search time."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return api
