"""Image routes: metadata, the file or a thumbnail, and adding or removing an image."""

# No `from __future__ import annotations`: the routes' parameter types are made per app (see params.py).
import mimetypes
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse

from service.dependencies import Access, EngineDep, PoolDep
from service.openapi import error_responses, ok_with_links
from service.pool import run_write
from service.routes.params import ImageIdPath
from service.routes.uploads import named, read_upload
from service.schemas import AddResponse, DeleteResponse, ImageInfo
from service.settings import Settings

THUMBNAIL_MIN, THUMBNAIL_MAX = 16, 1024


def router(settings: Settings, access: Access) -> APIRouter:
    api = APIRouter(tags=["images"])
    upload_limit = settings.max_upload_bytes

    @api.get(
        "/images/{image_id}",
        response_model=ImageInfo,
        dependencies=access.read,
        operation_id="get_image",
        summary="Metadata of an indexed image",
        responses=ok_with_links(200, "/id", "get_image_file", "similar_images", errors=(*access.read_errors, 404, 422)),
    )
    async def image_info(engine: EngineDep, image_id: ImageIdPath) -> ImageInfo:
        """Metadata of an indexed image."""
        rec = engine.record(image_id)  # KeyError: 404
        return ImageInfo(
            id=rec.id,
            path=rec.path,
            label=rec.label,
            origin=rec.origin,
            size=rec.size,
            width=rec.width,
            height=rec.height,
            mtime=rec.mtime,
            sha256=rec.sha256,
            image_url=f"/images/{rec.id}/file",
        )

    @api.get(
        "/images/{image_id}/file",
        dependencies=access.read,
        response_class=Response,
        operation_id="get_image_file",
        summary="The image file, or a thumbnail",
        responses={
            200: {
                "content": {"image/*": {}, "image/jpeg": {}},
                "description": "The image file, or a JPEG thumbnail with `size`.",
            },
            **error_responses(*access.read_errors, 404, 422),
        },
    )
    async def image_file(
        engine: EngineDep,
        pool: PoolDep,
        image_id: ImageIdPath,
        size: Annotated[
            int | None,
            Query(ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX, description="Longest side of a JPEG thumbnail (aspect kept)."),
        ] = None,
    ) -> Response:
        """The image itself (only for ids in the index), or a thumbnail of it."""
        headers = {"Cache-Control": "private, max-age=300"}
        if size is not None:
            data = await pool.run(engine.thumbnail, image_id, size)
            return Response(data, media_type="image/jpeg", headers=headers)
        path = await pool.run(engine.image_path, image_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers=headers)

    @api.post(
        "/images",
        response_model=AddResponse,
        status_code=201,
        dependencies=access.write,
        operation_id="add_image",
        summary="Add an image to the index",
        responses={
            **ok_with_links(
                201,
                "/id",
                "get_image",
                "get_image_file",
                "similar_images",
                "delete_image",
                errors=(400, *access.write_errors, 413, 415, 422, 503),
            ),
            200: {
                "model": AddResponse,
                "description": "The same image (and label) was already there: nothing changed, or only its label",
            },
        },
    )
    async def add_image(
        engine: EngineDep,
        response: Response,
        file: Annotated[UploadFile, File(description="The image to add.")],
        label: Annotated[
            str | None,
            Form(
                min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$", description="Its label (class), if any."
            ),
        ] = None,
    ) -> AddResponse:
        """Embed an image and add it to the index; on disk (journalled and flushed) before the answer.

        201 when the image is new; 200 when it was already there (a re-upload changes nothing but
        its label). Searches see it as soon as the answer is sent.
        """
        data = await read_upload(file, named(file), upload_limit)
        out = await run_write(engine, engine.add_image, data, label, file.filename)
        if out.replaced:
            response.status_code = 200
        response.headers["Server-Timing"] = f"write;dur={out.write_s * 1000:.3f}"  # the part after the embedding
        rec = out.record
        return AddResponse(
            id=rec.id,
            path=rec.path,
            label=rec.label,
            replaced=out.replaced,
            count=out.count,
            version=out.version,
            seq=out.seq,
            image_url=f"/images/{rec.id}/file",
        )

    @api.delete(
        "/images/{image_id}",
        response_model=DeleteResponse,
        dependencies=access.write,
        operation_id="delete_image",
        summary="Remove an image from the index",
        responses=error_responses(*access.write_errors, 404, 422, 503),
    )
    async def delete_image(engine: EngineDep, image_id: ImageIdPath, response: Response) -> DeleteResponse:
        """Remove an image from the index; on disk (journalled and flushed) before the answer. Its file is not touched."""
        out = await run_write(engine, engine.delete_image, image_id)  # KeyError: 404
        response.headers["Server-Timing"] = f"write;dur={out.write_s * 1000:.3f}"
        return DeleteResponse(id=image_id, deleted=True, count=out.count, version=out.version, seq=out.seq)

    return api
