"""OpenAPI documentation helpers: the error answers and links that the routes declare.

They only shape `/openapi.json` and `/docs`; nothing here changes what a route answers.
"""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorBody

DESCRIPTION = """Serves an index bundle built with `python -m indexer build`.

Upload an image to `POST /search` and get its nearest neighbours by cosine similarity of the
model's embeddings. Every error answer is JSON: `{"error": "<code>", "detail": "<what was wrong>"}`.
When the service has an API key, send it as `X-API-Key: <key>` or `Authorization: Bearer <key>`.
"""

ERROR_TEXT = {
    400: "Not a readable image (corrupt, truncated, empty)",
    401: "Missing or wrong API key",
    404: "No such image",
    413: "Upload too large, or too many pixels",
    415: "Not an image, or an unsupported format",
    422: "Invalid parameter (e.g. `k` out of range)",
    503: "The index cannot be changed or loaded right now",
}
# the operation a link points to, and the name of the link in /docs
LINK_NAMES = {"get_image": "Metadata", "get_image_file": "File", "similar_images": "Similar", "delete_image": "Delete"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route: the JSON error body, with what each status means."""
    return {c: {"model": ErrorBody, "description": ERROR_TEXT.get(c, "Error")} for c in codes}


def links(pointer: str, *targets: str) -> dict[str, Any]:
    """OpenAPI links: where an id in this answer can be used next (for /docs and stateful API testing)."""
    suffix = "OfFirstResult" if "/results/" in pointer else ""
    return {
        f"{LINK_NAMES[t]}{suffix}": {"operationId": t, "parameters": {"image_id": f"$response.body#{pointer}"}}
        for t in targets
    }


def ok_with_links(
    status: int, pointer: str, *targets: str, errors: tuple[int, ...] = ()
) -> dict[int | str, dict[str, Any]]:
    """A success answer whose id (at `pointer`) links to `targets`, plus the error answers."""
    return {status: {"links": links(pointer, *targets)}, **error_responses(*errors)}
