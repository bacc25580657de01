"""Keras embedding model -> ONNX, checked against Keras before anything is written.

The exported graph takes a batch of uint8 RGB pixels (batch, H, W, 3) and returns L2-normalised
embeddings (batch, dim): the cast, the backbone's normalisation and the L2 norm are all inside
it, so callers only decode and resize (the rule is in model.json).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from indexer.model_card import (
    MODEL_FILE,
    InputSpec,
    ModelCard,
    OutputSpec,
    file_sha256,
    write_card,
)

MIN_COSINE = 0.9999
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


Precision = Literal["fp32", "int8"]


class ParityError(RuntimeError):
    """ONNX and Keras disagree on a check image: the model is not written."""


def _versions() -> dict[str, str]:
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": str(OPSET),
    }


def _rename_io(model_proto) -> None:
    """Give the graph stable input/output names, whatever tf2onnx called them."""
    graph = model_proto.graph
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    graph.input[0].name = INPUT_NAME
    graph.output[0].name = OUTPUT_NAME


def convert_to_onnx(embedding_model, input_size: int):
    """tf2onnx conversion of `embedding_model` (float pixels -> unit vectors), uint8 input."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, input_size, input_size, 3), tf.uint8, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def embed(images):
        return embedding_model(tf.cast(images, tf.float32), training=False)

    model_proto, _ = tf2onnx.convert.from_function(embed, input_signature=spec, opset=OPSET)
    _rename_io(model_proto)
    return model_proto


def parity_check(embedding_model, onnx_bytes: bytes, images: np.ndarray) -> dict[str, float]:
    """Cosine similarity of ONNX vs Keras embeddings per image; raises below MIN_COSINE."""
    import onnxruntime as ort

    if len(images) == 0:
        raise ParityError("no check images: the export cannot be verified")
    keras_out = np.asarray(embedding_model(images.astype(np.float32), training=False))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if onnx_out.shape != keras_out.shape:
        raise ParityError(f"ONNX output shape {onnx_out.shape} != Keras {keras_out.shape}")
    norms = np.linalg.norm(onnx_out, axis=1) * np.linalg.norm(keras_out, axis=1)
    cosine = np.sum(onnx_out * keras_out, axis=1) / np.maximum(norms, 1e-12)
    worst = float(cosine.min())
    if worst < MIN_COSINE:
        raise ParityError(
            f"ONNX differs from Keras: cosine {worst:.6f} < {MIN_COSINE} on image "
            f"{int(cosine.argmin())}; nothing was written"
        )
    return {
        "images": len(images),
        "min_cosine": worst,
        "max_abs_diff": float(np.abs(onnx_out - keras_out).max()),
        "max_norm_error": float(np.abs(np.linalg.norm(onnx_out, axis=1) - 1.0).max()),
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the service may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def int8_model(
    onnx_bytes: bytes,
    check_images: np.ndarray,
    calibration_images: np.ndarray,
    *,
    method: str,
    min_cosine: float,
    min_overlap: float,
) -> tuple[bytes, dict[str, float | int]]:
    """Quantise the (parity-checked) fp32 model, then measure its drift on the check images.

    Raises DriftError when it drifts past either threshold, ValueError when there are too few
    check images for the neighbour comparison to mean anything.
    """
    from export.drift import MIN_DRIFT_IMAGES, check_drift, measure_drift, run_model
    from export.quantize import WEIGHT_BITS, quantize_int8

    if len(check_images) < MIN_DRIFT_IMAGES:
        raise ValueError(
            f"int8: the drift check needs at least {MIN_DRIFT_IMAGES} check images, "
            f"got {len(check_images)} (--check-images DIR, --check-count N)"
        )
    int8_bytes = quantize_int8(onnx_bytes, calibration_images, input_name=INPUT_NAME, method=method)
    drift = measure_drift(
        run_model(onnx_bytes, check_images, INPUT_NAME, OUTPUT_NAME),
        run_model(int8_bytes, check_images, INPUT_NAME, OUTPUT_NAME),
    )
    check_drift(drift, min_cosine, min_overlap)
    return int8_bytes, {**drift, "calibration_images": len(calibration_images), "weight_bits": WEIGHT_BITS}


def pooling_label(pooling: str, gem_p: float | None) -> str:
    """The pooling's label: "gap", or "gem" with its exponent, e.g. "gem(p=3)"."""
    return f"gem(p={gem_p:g})" if pooling == "gem" and gem_p is not None else pooling


def export_embedding_model(
    embedding_model,
    out_dir: Path,
    *,
    backbone: str,
    source: str,
    input_size: int,
    check_images: np.ndarray,
    class_names: list[str] | None = None,
    pooling: str = "gap",
    gem_p: float | None = None,
    precision: Precision = "fp32",
    calibration_images: np.ndarray | None = None,
    calibration_method: str = "minmax",
    min_cosine: float | None = None,
    min_overlap: float | None = None,
) -> ModelCard:
    """Convert, verify against Keras on `check_images` (uint8 NHWC), then write the model folder.

    Nothing is written unless every check image passes, so a bad conversion never replaces a
    good model. `pooling` / `gem_p` describe how the backbone's features were pooled; they
    are recorded in model.json.

    `precision="int8"`: the checked fp32 model is quantised (calibrated on `calibration_images`,
    default the check images) and written instead, unless its embeddings drift from fp32's on
    the check images below `min_cosine` (mean cosine) or `min_overlap` (mean top-10 neighbour
    overlap); the defaults are export.drift's MIN_MEAN_COSINE and MIN_TOP10_OVERLAP.
    """
    if precision not in ("fp32", "int8"):
        raise ValueError(f"unknown precision {precision!r}: fp32 or int8")
    proto = convert_to_onnx(embedding_model, input_size)
    onnx_bytes = proto.SerializeToString()
    parity = parity_check(embedding_model, onnx_bytes, check_images)
    dim = int(embedding_model.output_shape[-1])
    if precision == "int8":
        from export.drift import MIN_MEAN_COSINE, MIN_TOP10_OVERLAP

        onnx_bytes, drift = int8_model(
            onnx_bytes,
            check_images,
            check_images if calibration_images is None else calibration_images,
            method=calibration_method,
            min_cosine=MIN_MEAN_COSINE if min_cosine is None else min_cosine,
            min_overlap=MIN_TOP10_OVERLAP if min_overlap is None else min_overlap,
        )
        # parity keeps fp32-vs-Keras; the int8-vs-fp32 figures sit beside it, prefixed
        parity.update({f"int8_{key}": value for key, value in drift.items()})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_FILE
    _atomic_write_bytes(onnx_path, onnx_bytes)
    card = ModelCard(
        backbone=backbone,
        source=source,
        input=InputSpec(name=INPUT_NAME, height=input_size, width=input_size),
        output=OutputSpec(name=OUTPUT_NAME, dim=dim),
        class_names=class_names,
        onnx_sha256=file_sha256(onnx_path),
        exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        parity=parity,
        versions=_versions(),
        pooling=pooling,
        gem_p=gem_p if pooling == "gem" else None,
        precision=precision,
    )
    # Card last: between the two writes a reader sees a hash mismatch, which read_card refuses.
    write_card(card, out_dir)
    return card
