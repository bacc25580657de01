"""Search routes: by an uploaded image, by several at once, and by an image already indexed."""

# No `from __future__ import annotations`: the routes' parameter types are made per app (see params.py).
import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from service.dependencies import Access, EngineDep, PoolDep
from service.engine import Engine, QueryResult
from service.errors import BadRequest, TooLarge
from service.openapi import error_responses, ok_with_links
from service.pool import Pool
from service.routes.params import ImageIdPath, LabelFilter, MinScore, k_query
from service.routes.uploads import named, read_upload
from service.schemas import BatchQueryResult, BatchSearchResponse, SearchHit, SearchResponse, label_vote_out
from service.settings import Settings


def hits(result: QueryResult) -> list[SearchHit]:
    return [
        SearchHit(id=h.id, score=h.score, path=h.path, label=h.label, image_url=f"/images/{h.id}/file")
        for h in result.hits
    ]


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


async def search_one(
    engine: Engine, pool: Pool, data: bytes, k: int, min_score: float | None, label: str | None, filename: str | None
) -> tuple[QueryResult, str]:
    """One uploaded image's search; with batching on, it shares a micro-batch with concurrent ones.

    Decoding runs in the pool (in parallel); waiting for the batch holds no pool slot.
    """
    if engine.batcher is None:
        out = await pool.run(engine.search_images, [data], k, min_score, label, [filename])
        return out.queries[0], out.model
    with engine.batcher.announce() as ticket:
        snap, pixels = await pool.run(engine.prepare_query, data, filename)
        future = engine.submit_search(snap, pixels, k, min_score, label, ticket)  # QueueFull: 429
    return await asyncio.wrap_future(future), snap.model_id


def router(settings: Settings, access: Access) -> APIRouter:
    api = APIRouter(tags=["search"], dependencies=access.read)
    k_param = k_query(settings)
    upload_limit = settings.max_upload_bytes

    @api.post(
        "/search",
        response_model=SearchResponse,
        operation_id="search",
        summary="Find images similar to an uploaded image",
        responses=ok_with_links(
            200, "/results/0/id", "get_image", "similar_images", errors=(400, *access.read_errors, 413, 415, 422)
        ),
    )
    async def search(
        engine: EngineDep,
        pool: PoolDep,
        file: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, BMP, GIF or TIFF).")],
        k: Annotated[int, k_param] = settings.default_k,
        min_score: MinScore = None,
        label: LabelFilter = None,
    ) -> SearchResponse:
        """Nearest neighbours of an uploaded image, best first (score = cosine similarity)."""
        t0 = time.perf_counter()
        data = await read_upload(file, named(file), upload_limit)
        q, model = await search_one(engine, pool, data, k, min_score, label, file.filename)
        return SearchResponse(
            results=hits(q),
            predicted_label=q.predicted_label,
            label_vote=label_vote_out(q.label_vote),
            model=model,
            took_ms=ms_since(t0),
        )

    @api.post(
        "/search/batch",
        response_model=BatchSearchResponse,
        operation_id="search_batch",
        summary="Search with several images at once",
        responses=error_responses(400, *access.read_errors, 413, 415, 422),
    )
    async def search_batch(
        engine: EngineDep,
        pool: PoolDep,
        files: Annotated[list[UploadFile], File(description=f"Query images, 1 to {settings.max_batch_files}.")],
        k: Annotated[int, k_param] = settings.default_k,
        min_score: MinScore = None,
        label: LabelFilter = None,
    ) -> BatchSearchResponse:
        """Several query images in one request: one result list per image, in upload order."""
        t0 = time.perf_counter()
        if not files:
            raise BadRequest("no files", code="no_files")
        if len(files) > settings.max_batch_files:
            raise TooLarge(
                f"{len(files)} files, more than the {settings.max_batch_files} allowed in one batch",
                code="too_many_files",
            )
        datas = [await read_upload(f, named(f, f"file {i + 1}"), upload_limit) for i, f in enumerate(files)]
        out = await pool.run(engine.search_images, datas, k, min_score, label, [f.filename for f in files])
        return BatchSearchResponse(
            queries=[
                BatchQueryResult(
                    filename=f.filename,
                    results=hits(q),
                    predicted_label=q.predicted_label,
                    label_vote=label_vote_out(q.label_vote),
                )
                for f, q in zip(files, out.queries)
            ],
            model=out.model,
            took_ms=ms_since(t0),
        )

    @api.get(
        "/images/{image_id}/similar",
        response_model=SearchResponse,
        operation_id="similar_images",
        summary="Find images similar to an indexed image",
        responses=ok_with_links(
            200, "/results/0/id", "get_image", "get_image_file", errors=(*access.read_errors, 404, 422)
        ),
    )
    async def similar(
        engine: EngineDep,
        pool: PoolDep,
        image_id: ImageIdPath,
        k: Annotated[int, k_param] = settings.default_k,
        min_score: MinScore = None,
        label: LabelFilter = None,
    ) -> SearchResponse:
        """Neighbours of an image already in the index (the image itself is left out)."""
        t0 = time.perf_counter()
        out = await pool.run(engine.similar, image_id, k, min_score, label)  # KeyError: 404
        q = out.queries[0]
        return SearchResponse(
            results=hits(q),
            predicted_label=q.predicted_label,
            label_vote=label_vote_out(q.label_vote),
            model=out.model,
            took_ms=ms_since(t0),
        )

    return api
