"""A PCA projection (optionally whitening) learned from the corpus at build time.

It is part of the bundle's model: the bundle's `model.json` names `whitening.faiss` and its
sha256, and the `Embedder` of that model folder applies it after the ONNX model, so the corpus,
API uploads and queries all go through the same code path (`apply`). Vectors come out
L2-normalised, as the index needs for inner product = cosine.

The transform is FAISS's own `PCAMatrix` (mean-centred PCA, then eigenvalue ** `eigen_power`):
power 0 projects onto the top components without rescaling them, -0.5 is full PCA-whitening.
Measured on the dev sets (docs in README "Retrieval quality"): to 256-d with power 0 it is no
worse than the raw 1,280-d vectors on any set and 5x smaller; whitening (-0.5) helps
instance-level retrieval but costs mAP on class-level sets learned from a few hundred photos.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from indexer.atomic import link_or_copy
from indexer.model_card import MODEL_FILE, ModelCard, WhiteningSpec, file_sha256, write_card

WHITENING_FILE = "whitening.faiss"
DEFAULT_DIM = 256
DEFAULT_POWER = 0.0


class WhiteningError(ValueError):
    """The whitening cannot be learned (too few vectors) or its file does not match the model card."""


def parse_whiten(value: str) -> int | Literal["auto"]:
    """A `--whiten` value (indexer build, train improve): 'auto', 0 (none) or a dimension."""
    if value == "auto":
        return "auto"
    try:
        dim = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a dimension, got {value!r}") from None
    if dim < 0:
        raise argparse.ArgumentTypeError("the dimension must be 0 (none) or more")
    return dim


def can_learn(n: int, dim: int) -> bool:
    """Whether n corpus vectors are enough for a dim-d projection (more vectors than dimensions)."""
    return n > dim


def learn(vectors: np.ndarray, dim: int, eigen_power: float = DEFAULT_POWER) -> faiss.PCAMatrix:
    """Fit the projection to the corpus vectors (n x d_in) -> d_in to `dim`."""
    n, d_in = vectors.shape
    if not 0 < dim <= d_in:
        raise WhiteningError(f"whitening dimension {dim} must be between 1 and the model's {d_in}")
    if not can_learn(n, dim):
        raise WhiteningError(
            f"learning a {dim}-d whitening needs more than {dim} images, "
            f"the corpus has {n}; use a smaller --whiten or --whiten 0"
        )
    pca = faiss.PCAMatrix(d_in, dim, eigen_power, False)
    pca.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return pca


def apply(transform: faiss.VectorTransform, vectors: np.ndarray) -> np.ndarray:
    """Project and L2-normalise: float32 (n, d_in) -> (n, d_out)."""
    if len(vectors) == 0:
        return np.zeros((0, transform.d_out), dtype=np.float32)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    # one row at a time: a BLAS product over the whole batch rounds differently for different batch
    # sizes, and a micro-batched query must get exactly the vector it gets alone (service/batching.py)
    out = np.concatenate([transform.apply(x[i : i + 1]) for i in range(len(x))])
    faiss.normalize_L2(out)
    return out


def read(model_dir: Path, spec: WhiteningSpec) -> faiss.VectorTransform:
    """Load the model folder's whitening, checking it is the one its model card names."""
    path = Path(model_dir) / spec.file
    if not path.is_file():
        raise WhiteningError(f"{path}: missing (model.json names it)")
    if file_sha256(path) != spec.sha256:
        raise WhiteningError(f"{path}: its SHA-256 does not match model.json; the whitening was changed")
    transform = faiss.read_VectorTransform(str(path))
    if transform.d_in != spec.input_dim or transform.d_out != spec.dim:
        raise WhiteningError(
            f"{path}: maps {transform.d_in} -> {transform.d_out} dimensions, "
            f"model.json says {spec.input_dim} -> {spec.dim}"
        )
    return transform


def write_model_dir(
    base_dir: Path, card: ModelCard, transform: faiss.PCAMatrix, learned_from: int, out_dir: Path
) -> ModelCard:
    """A model folder for the bundle: the base model.onnx (linked) + whitening.faiss + its card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MODEL_FILE
    target.unlink(missing_ok=True)
    link_or_copy(Path(base_dir) / MODEL_FILE, target)
    faiss.write_VectorTransform(transform, str(out_dir / WHITENING_FILE))
    spec = WhiteningSpec(
        file=WHITENING_FILE,
        sha256=file_sha256(out_dir / WHITENING_FILE),
        input_dim=transform.d_in,
        dim=transform.d_out,
        eigen_power=float(transform.eigen_power),
        learned_from=int(learned_from),
    )
    whitened = card.model_copy(update={"whitening": spec})
    write_card(whitened, out_dir)
    return whitened
