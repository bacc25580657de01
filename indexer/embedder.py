"""The onnxruntime embedder: uint8 images in, L2-normalised float32 vectors out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from PIL import Image

from indexer import whitening
from indexer.images import prepare
from indexer.model_card import MODEL_FILE, ModelCard, read_card

Device = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EmbedderError(RuntimeError):
    """The model cannot be loaded or run as asked (missing CUDA, wrong input shape, ...)."""


def choose_providers(device: Device) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise EmbedderError(
                "--device cuda: onnxruntime has no CUDA provider here "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise EmbedderError(f"unknown device {device!r}; use auto, cpu or cuda")


class Embedder:
    """One onnxruntime session for one exported model folder (model.onnx + model.json).

    `embed` may be called from several threads at once: onnxruntime sessions are thread-safe.
    """

    def __init__(
        self, model_dir: Path, device: Device = "auto", threads: int | None = None, spinning: bool | None = None
    ) -> None:
        """`spinning`: whether onnxruntime's idle intra-op threads busy-wait for the next piece of work
        (None = onnxruntime's default, on). Off suits a server sharing few cores with decoding and
        HTTP: on 2 cores, spinning doubles the CPU time of each inference without making it faster."""
        self.model_dir = Path(model_dir)
        self.card: ModelCard = read_card(self.model_dir)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # onnxruntime's own warnings go to stderr otherwise
        try:
            self._session = ort.InferenceSession(
                str(self.model_dir / MODEL_FILE), sess_options=options, providers=choose_providers(device)
            )
        except EmbedderError:
            raise
        except Exception as exc:
            raise EmbedderError(f"{self.model_dir / MODEL_FILE}: onnxruntime cannot load it: {exc}") from exc
        self.providers: list[str] = self._session.get_providers()
        if device == "cuda" and CUDA not in self.providers:
            # onnxruntime falls back to the CPU silently when the CUDA libraries fail to load.
            raise EmbedderError("--device cuda: the CUDA provider failed to initialise (CUDA/cuDNN libraries?)")
        self._check_signature()
        try:
            # a bundle's model folder may add a whitening learned from its corpus: applied here,
            # so every vector (corpus, upload, query) goes through the same transform
            self._whitening = (
                whitening.read(self.model_dir, self.card.whitening) if self.card.whitening is not None else None
            )
        except whitening.WhiteningError as exc:
            raise EmbedderError(str(exc)) from exc

    @property
    def dim(self) -> int:
        return self.card.dim

    @property
    def device(self) -> str:
        return "cuda" if CUDA in self.providers else "cpu"

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if self.card.input.name not in inputs:
            raise EmbedderError(f"model has no input {self.card.input.name!r} (has {sorted(inputs)})")
        if self.card.output.name not in outputs:
            raise EmbedderError(f"model has no output {self.card.output.name!r} (has {sorted(outputs)})")
        if inputs[self.card.input.name].type != "tensor(uint8)":
            raise EmbedderError(f"model input must be uint8, is {inputs[self.card.input.name].type}")
        last = outputs[self.card.output.name].shape[-1]
        if isinstance(last, int) and last != self.card.output.dim:
            raise EmbedderError(f"model output has dimension {last}, model.json says {self.card.output.dim}")
        spec = self.card.whitening
        if spec is not None and spec.input_dim != self.card.output.dim:
            raise EmbedderError(
                f"the whitening takes {spec.input_dim}-d vectors, the model outputs {self.card.output.dim}"
            )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) prepared images -> float32 (N, dim) unit vectors."""
        h, w = self.card.input.height, self.card.input.width
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (h, w, 3):
            raise EmbedderError(f"expected uint8 (N, {h}, {w}, 3), got {batch.dtype} {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self._session.run([self.card.output.name], {self.card.input.name: np.ascontiguousarray(batch)})
        out = np.ascontiguousarray(out, dtype=np.float32)
        if out.shape != (len(batch), self.card.output.dim):
            raise EmbedderError(f"model returned shape {out.shape}, expected ({len(batch)}, {self.card.output.dim})")
        return whitening.apply(self._whitening, out) if self._whitening is not None else out

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded Pillow images (any size) -> float32 (N, dim), prepared per the model card."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed(np.stack([prepare(img, self.card) for img in images]))
