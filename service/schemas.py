"""Response models: what each endpoint returns, as documented on /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from indexer.labels import LabelVote

MAX_ID = (1 << 63) - 1
ImageId = Field(ge=0, le=MAX_ID, description="Image id (63-bit integer, stable across rebuilds for corpus files).")


class FieldError(BaseModel):
    loc: list[str] = Field(description='Where the invalid value is, e.g. ["query", "k"].')
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str = Field(
        description="Short machine-readable code, e.g. `not_found`, `too_large`, `unsupported_image`.",
        examples=["not_found"],
    )
    detail: str = Field(description="What was wrong, for a person.", examples=["no image with id 42 in the index"])
    errors: list[FieldError] | None = Field(None, description="For 422: each invalid field.")


class SearchHit(BaseModel):
    id: int = ImageId
    score: float = Field(description="Cosine similarity to the query, in [-1, 1]; higher is more similar.")
    path: str = Field(description="Path of the image relative to the corpus root (or `uploads/...` for added images).")
    label: str | None = Field(description="Class of the image (its folder), if any.")
    image_url: str = Field(description="Where to fetch the image (`?size=N` for a thumbnail).")


class LabelVoteOut(BaseModel):
    label: str = Field(description="The label with the most similarity-weighted votes among the neighbours.")
    share: float = Field(description="Its share of the votes, 0-1.")
    mean_score: float = Field(description="Mean cosine similarity of its neighbours among the results.")


PredictedLabel = Field(
    description="The neighbours' voted label (`label_vote`); null when none has a label, or when "
    "the vote's mean_score is below the label threshold (an image of a kind the index has not "
    "seen): the bundle's calibrated one, or the `label_min_score` setting."
)
LabelVoteField = Field(None, description="The vote behind predicted_label, given even when it is below the threshold.")


def label_vote_out(vote: LabelVote | None) -> LabelVoteOut | None:
    return LabelVoteOut(label=vote.label, share=vote.share, mean_score=vote.mean_score) if vote is not None else None


class SearchResponse(BaseModel):
    results: list[SearchHit] = Field(description="Neighbours, best first.")
    predicted_label: str | None = PredictedLabel
    label_vote: LabelVoteOut | None = LabelVoteField
    model: str = Field(description="The model that embedded the query: `backbone@sha256-prefix`.")
    took_ms: float = Field(description="Time spent on this request in the service, in milliseconds.")


class BatchQueryResult(BaseModel):
    filename: str | None = Field(description="The uploaded file's name, as the client sent it.")
    results: list[SearchHit]
    predicted_label: str | None = PredictedLabel
    label_vote: LabelVoteOut | None = LabelVoteField


class BatchSearchResponse(BaseModel):
    queries: list[BatchQueryResult] = Field(description="One entry per uploaded file, in upload order.")
    model: str
    took_ms: float


class ImageInfo(BaseModel):
    id: int = ImageId
    path: str
    label: str | None
    origin: Literal["corpus", "upload"] = Field(
        description="`corpus`: indexed from the image folder; `upload`: added through the API."
    )
    size: int = Field(description="File size in bytes.")
    width: int
    height: int
    mtime: float = Field(description="Modification time (corpus) or time of upload, seconds since the epoch.")
    sha256: str
    image_url: str


class AddResponse(BaseModel):
    id: int = ImageId
    path: str
    label: str | None
    replaced: bool = Field(
        description="True when the same bytes were already in the index (the id is derived from "
        "them): the answer is then 200, not 201."
    )
    count: int = Field(description="Images in the index after the change.")
    version: str = Field(description="The bundle version the change is journalled on top of.")
    seq: int = Field(description="The journal record that holds the change (flushed to disk before this answer).")
    image_url: str


class DeleteResponse(BaseModel):
    id: int = ImageId
    deleted: bool
    count: int
    version: str
    seq: int = Field(description="The journal record that holds the delete (flushed to disk before this answer).")


class CompactResponse(BaseModel):
    version: str = Field(description="The new bundle version, holding every change journalled before it.")
    previous_version: str
    count: int = Field(description="Images in the new version.")
    journal_seq: int = Field(description="The last journal record the new version holds.")
    folded: int = Field(description="Delta vectors and deleted ids folded into the new main index.")
    replayed: int = Field(description="Writes that arrived during the compaction, carried over to the new index.")
    took_ms: float


class ReloadResponse(BaseModel):
    version: str = Field(description="The bundle version now served.")
    previous_version: str
    count: int
    model: str
    model_changed: bool
    took_ms: float


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    version: str
    count: int
    verified: bool = Field(description="True once the background check of the bundle's file hashes has passed.")


class ModelInfo(BaseModel):
    id: str = Field(description="`backbone@sha256-prefix`, as in search answers.")
    backbone: str
    source: str
    dim: int
    sha256: str
    input_size: list[int] = Field(description="[width, height]")
    class_names: int | None = Field(description="Number of classes the model was fine-tuned on, if any.")
    device: str = Field(description="Where onnxruntime runs it: cpu or cuda.")


class Stats(BaseModel):
    count: int = Field(description="Images in the index.")
    dimension: int
    index_type: str = Field(description="flat, hnsw or ivf.")
    index_params: dict[str, float | int | str]
    model: ModelInfo
    bundle_version: str
    bundle_created_at: str | None
    labels: dict[str, int] = Field(description="Images per label.")
    uploads: int = Field(description="Images added through the API.")
    uptime_s: float
    journal: dict[str, int] = Field(
        description="The write-ahead journal: the last record applied, the last one the "
        "served version holds, and what waits for the next compaction (delta vectors, "
        "tombstones)."
    )
