"""Query and path parameters shared by the routes (their limits and descriptions are the API's)."""

# No `from __future__ import annotations` in service/routes: FastAPI reads these Annotated types
# from the route functions' signatures, and `k_query` makes one per app.
from typing import Annotated, Any

from fastapi import Path, Query

from service.schemas import MAX_ID
from service.settings import Settings

MinScore = Annotated[
    float | None, Query(ge=-1.0, le=1.0, description="Drop neighbours with a lower cosine similarity.")
]
LabelFilter = Annotated[str | None, Query(min_length=1, max_length=200, description="Only neighbours with this label.")]
ImageIdPath = Annotated[int, Path(ge=0, le=MAX_ID, description="Image id.")]


def k_query(settings: Settings) -> Any:
    """The Query of `k` (`Annotated[int, k_query(settings)]`), 1 to settings.max_k (its default,
    settings.default_k, is the route's)."""
    return Query(ge=1, le=settings.max_k, description=f"Number of neighbours, 1 to {settings.max_k}.")
