"""`model.json`: the description of an exported embedding model.

Written by `export` next to `model.onnx`, read by the indexer and the service. It is the one
place that says how an image must be prepared for the model (size, resize rule, dtype), so that
no caller copies those constants. Normalisation (mean/std) lives inside the ONNX graph.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
FORMAT_VERSION: Final = 1


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "images"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[3] = 3
    # uint8 RGB, NHWC: callers send raw pixels, the graph casts and normalises them.
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"


class ResizeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "squash": resize the whole image to height x width, ignoring aspect ratio (what Keras'
    # image_dataset_from_directory does, and what training uses).
    method: Literal["squash"] = "squash"
    filter: Literal["bilinear"] = "bilinear"


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "embedding"
    dim: int = Field(gt=0)
    # L2-normalised inside the graph, so inner product = cosine similarity.
    normalized: Literal[True] = True


class WhiteningSpec(BaseModel):
    """A projection learned from a bundle's corpus, applied after the ONNX model (indexer/whitening.py)."""

    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str
    input_dim: int = Field(gt=0)  # the ONNX model's output dimension
    dim: int = Field(gt=0)  # the dimension of the vectors the index holds
    eigen_power: float  # 0: PCA projection only; -0.5: full PCA-whitening
    learned_from: int = Field(ge=0)  # corpus vectors it was fitted to


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = FORMAT_VERSION
    backbone: str
    source: Literal["pretrained", "fine-tuned"]
    input: InputSpec
    resize: ResizeSpec = ResizeSpec()
    output: OutputSpec
    class_names: list[str] | None = None
    onnx_sha256: str
    exported_at: str
    versions: dict[str, str] = {}
    parity: dict[str, float | int] = {}
    # how the backbone's feature map became one vector: global average or generalised-mean pooling
    pooling: Literal["gap", "gem"] = "gap"
    gem_p: float | None = None
    # "int8": statically quantised by `export --precision int8` (drift vs fp32 in parity's int8_* keys)
    precision: Literal["fp32", "int8"] = "fp32"
    # set in a bundle's copy of the card when the bundle was built with a whitening
    whitening: WhiteningSpec | None = None

    @property
    def dim(self) -> int:
        """The dimension of the vectors this model folder produces (after its whitening, if any)."""
        return self.whitening.dim if self.whitening is not None else self.output.dim

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the order Pillow's resize takes."""
        return (self.input.width, self.input.height)


class ModelCardError(ValueError):
    """model.json is missing, unreadable or does not match model.onnx."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_card(card: ModelCard, model_dir: Path) -> Path:
    """Write `model.json` atomically: a reader sees the old card or the new one, never half."""
    path = Path(model_dir) / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(card.model_dump(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_card(model_dir: Path, verify_hash: bool = True) -> ModelCard:
    """Read and validate `model.json`; with `verify_hash`, check it describes `model.onnx`."""
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise ModelCardError(f"{path}: missing; export a model with `python -m export` first")
    try:
        card = ModelCard.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ModelCardError(f"{path}: not a valid model card: {exc}") from exc
    onnx_path = model_dir / MODEL_FILE
    if not onnx_path.is_file():
        raise ModelCardError(f"{onnx_path}: missing")
    if verify_hash and file_sha256(onnx_path) != card.onnx_sha256:
        raise ModelCardError(f"{onnx_path}: its SHA-256 does not match {path}; the model was changed after export")
    return card
