"""A tiny real ONNX embedding model for tests (built with onnx.helper; no TensorFlow).

uint8 (N, S, S, 3) -> float -> average-pool to 8x8 -> flatten -> centre each vector -> seeded
random projection -> L2 normalisation -> float32 (N, dim). Different pictures give different
vectors, and small changes (re-encoding, a little noise) give nearby ones.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from indexer.model_card import MODEL_FILE, InputSpec, ModelCard, OutputSpec, file_sha256, write_card

if TYPE_CHECKING:
    from PIL import Image


def make_tiny_model(out_dir: Path, *, seed: int = 0, dim: int = 16, size: int = 32) -> Path:
    """Write model.onnx + model.json into out_dir and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = size // 8
    features = 3 * 8 * 8
    weights = np.random.default_rng(seed).standard_normal((features, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["x_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x_float"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["x_nchw"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "weights"], ["projected"]),
        helper.make_node("LpNormalization", ["projected"], ["embedding"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests.tiny_model")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out_dir / MODEL_FILE)
    card = ModelCard(
        backbone="tiny",
        source="pretrained",
        input=InputSpec(height=size, width=size),
        output=OutputSpec(dim=dim),
        onnx_sha256=file_sha256(out_dir / MODEL_FILE),
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_card(card, out_dir)
    return out_dir


def pattern_image(seed: int, size: int = 64, noise: float = 0.0, noise_seed: int = 0) -> Image.Image:
    """A blocky random colour pattern (8x8 blocks) for class `seed`, with optional pixel noise."""
    from PIL import Image

    base = np.random.default_rng(seed).integers(0, 256, (8, 8, 3)).astype(np.float64)
    arr = np.kron(base, np.ones((size // 8, size // 8, 1)))
    if noise:
        arr = arr + np.random.default_rng(noise_seed).normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_corpus(
    root: Path, classes: int = 3, per_class: int = 5, *, seed: int = 0, size: int = 64, variant: int = 0
) -> Path:
    """`root/class_<c>/img_<i>.jpg`: noisy copies of one pattern per class (easy to tell apart).

    The patterns depend on `seed`; `variant` changes only the noise (other copies of the same classes).
    """
    root = Path(root)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = pattern_image(
                seed * 1000 + c, size, noise=12.0, noise_seed=seed * 100_000 + c * 1000 + i + 7919 * variant
            )
            img.save(folder / f"img_{i}.jpg", quality=92)
    return root
