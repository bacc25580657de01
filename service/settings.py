"""The service's settings: one pydantic-settings class, environment prefix `IMGSEARCH_`.

Every value can come from the environment (`IMGSEARCH_MAX_K=500`); `python -m service` lets the
command line override index, host, port and workers. Nothing else in the service reads
`os.environ`. Bad values fail when the settings are built, before the server starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "IMGSEARCH_"
MiB = 1 << 20


class Settings(BaseSettings):
    """Settings of the search service (environment variables `IMGSEARCH_<NAME>`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    index: Path = Field(description="Index bundle folder (built with `python -m indexer build`).")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all interfaces).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes, each with its own copy of the index.")
    max_upload_bytes: int = Field(20 * MiB, ge=1024, description="Largest accepted image file, in bytes (413 above).")
    max_pixels: int = Field(
        50_000_000, ge=1, description="Largest accepted image, in pixels, read from the header (413 above)."
    )
    max_batch_files: int = Field(32, ge=1, le=1000, description="Most files in one POST /search/batch.")
    body_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds a client may pause while sending a request "
        "body (408 after): a stalled upload does not hold its connection for ever.",
    )
    max_k: int = Field(1000, ge=1, le=100_000, description="Largest k a search may ask for (422 above).")
    default_k: int = Field(10, ge=1, description="k when a search does not give one.")
    api_key: SecretStr | None = Field(
        None, description="When set, add, delete and reload need it (X-API-Key header or Bearer token)."
    )
    protect_search: bool = Field(False, description="With an api_key: searches and image reads need it too.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="onnxruntime device.")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: onnxruntime's choice).")
    faiss_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="OpenMP threads of one FAISS search call. 1 (the "
        "default): concurrent requests already search in parallel, and idle OpenMP threads "
        "busy-wait, which triples the CPU time of a single-query HNSW search on 2 cores.",
    )
    ort_spinning: bool = Field(
        False,
        description="Let onnxruntime's idle threads busy-wait for work. Off by default: "
        "on a few cores shared with decoding and HTTP it doubles the CPU time per inference.",
    )
    pool_size: int = Field(
        4, ge=1, le=256, description="Most decode/embed/search jobs running at once (bounded thread pool)."
    )
    write_pool_size: int = Field(
        2,
        ge=1,
        le=64,
        description="Most adds/deletes being embedded or journalled at once: "
        "their own pool, so queued writes never take a search's slot.",
    )
    write_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="How much lower the CPU priority of the write threads is "
        "(their nice value above the process's): an add's embedding then gives way to searches. "
        "0 = the same priority.",
    )
    write_lock_timeout: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Seconds a write waits for the one before it; "
        "after that it gets 503 with Retry-After instead of a long wait.",
    )
    compact_delta: int = Field(
        20_000,
        ge=1,
        description="Compact in the background once this many vectors wait in "
        "the delta index (searched exactly, so it should stay small).",
    )
    compact_tombstone_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Compact in the background once this share of the main index is deleted or replaced.",
    )
    compact_lock_timeout: float = Field(
        0.0,
        ge=0,
        le=600,
        description="Seconds a compaction waits for another "
        "process (a build, another worker) that is publishing a version.",
    )
    limit_concurrency: int | None = Field(
        256, ge=1, description="Most connections and requests uvicorn holds at once (503 beyond); None = no limit."
    )
    max_batch_bytes: int = Field(
        64 * MiB, ge=1024, description="Largest POST /search/batch body, in bytes (413 above)."
    )
    max_batch_queue: int = Field(256, ge=1, description="Most searches waiting for a micro-batch (429 beyond).")
    batching: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Dynamic micro-batching of POST /search: concurrent single-image searches share one "
        "inference batch and one FAISS search, with the same results as searching one by one. auto = on when "
        "onnxruntime runs on a GPU, off on a CPU, where an image costs as much inside a batch as alone (more, once "
        "the batch's activations leave the cache) and one batch at a time leaves cores idle. true/false also work.",
    )
    batch_wait_ms: float = Field(
        3.0,
        ge=0,
        le=1000,
        description="Longest a batch is held open for searches that are "
        "still decoding (it never waits when none is on its way).",
    )
    max_batch: int = Field(32, ge=1, le=1024, description="Most searches in one micro-batch.")
    batch_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads running micro-batches (1 suits a CPU: each batch already uses every onnxruntime thread).",
    )
    watch_interval: float = Field(
        0.0,
        ge=0,
        description="Seconds between checks for a newer bundle version published by another process "
        "(a rebuild, another worker); 0 = off. Set to 2 automatically when workers > 1.",
    )
    query_expansion: int = Field(
        0,
        ge=0,
        le=100,
        description="Alpha query expansion: search again with the "
        "query plus its top N hits (0: off, the default). It raises mAP@10 on the dev sets "
        "(README, Retrieval quality), but scores become similarities to the expanded query "
        "(an image found by itself scores below 1, min_score filters on those) and each "
        "search runs twice, so it is a choice to make, not a default.",
    )
    query_expansion_alpha: float = Field(
        1.0, ge=0, le=10, description="Score exponent of the query expansion's weights."
    )
    label_min_score: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="predicted_label is null when the mean "
        "score of the winning label's neighbours is below this. Default: the "
        "threshold the build calibrated on the bundle's labelled images; -1: never null.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS (JSON list); empty = none."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None  # IMGSEARCH_API_KEY="" means no key
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("api_key must be at least 8 characters")
        return value

    @field_validator("batching", mode="before")
    @classmethod
    def _on_off(cls, value: object) -> object:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            value = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(value, value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is larger than max_k ({self.max_k})")
        if self.protect_search and self.api_key is None:
            raise ValueError("protect_search needs an api_key")
        if self.workers > 1 and self.watch_interval == 0:
            self.watch_interval = 0.5  # workers follow each other's journal records
        return self

    def describe(self) -> dict[str, object]:
        """The settings for a log line: the API key is never shown, only whether there is one."""
        out = self.model_dump(exclude={"api_key"})
        out["index"] = str(self.index)
        out["api_key"] = "set" if self.api_key is not None else "not set"
        return out


class MetricsEnvironment(BaseSettings):
    """prometheus_client's own variable (no prefix): `python -m service` sets it for several workers,
    and the library reads it too, to write and sum the workers' samples in that folder."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    prometheus_multiproc_dir: str | None = None
