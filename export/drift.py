"""How far an int8 model's embeddings drift from the fp32 model's, on real check images.

Two figures, both over the check images: the mean cosine similarity of each image's int8 and
fp32 vectors, and the mean overlap of each image's top-k neighbours (among the other check
images) under int8 and under fp32. The cosine says the vectors stayed close; the overlap says
the ranking a search returns stayed the same, which is what a user sees.
"""

from __future__ import annotations

import numpy as np

# Thresholds below which an int8 export is refused, from measurement (bench/results/int8.md).
# EfficientNet-Lite0 with this package's recipe measures a mean cosine of 0.998 and a top-10
# overlap of 0.96-0.99 on six real-photo check sets (128 images each), and loses at most 0.003
# mAP@10 on the dev sets. Recipes that lost more than 0.01 mAP@10 on a dev set measured a mean
# cosine of 0.994-0.996 (no bias correction) and 0.982-0.991 with overlaps of 0.90-0.96 (the
# stem quantised too). The thresholds refuse the latter and leave the recipe some margin; they
# guard against a broken quantisation, they do not replace a dev-set check (export/compare.py).
MIN_MEAN_COSINE = 0.995
MIN_TOP10_OVERLAP = 0.93
NEIGHBOURS = 10
# Neighbour lists among fewer images say little: int8 exports need at least this many.
MIN_DRIFT_IMAGES = 32


class DriftError(RuntimeError):
    """The int8 model's embeddings drift too far from fp32's: it is not written."""


def run_model(onnx_bytes: bytes, images: np.ndarray, input_name: str, output_name: str, batch: int = 32) -> np.ndarray:
    """Embed uint8 images with an in-memory ONNX model on the CPU, a batch at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    parts = [session.run([output_name], {input_name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(parts).astype(np.float32)


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def top_k_overlap(reference: np.ndarray, other: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Per image: the share of its k nearest other images (by cosine) that both sets agree on."""
    n = len(reference)
    if n <= k:
        raise ValueError(f"top-{k} neighbours need more than {k} images, got {n}")
    lists = []
    for vectors in (unit(reference), unit(other)):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)  # an image is not its own neighbour
        lists.append(np.argpartition(-sims, k, axis=1)[:, :k])
    return np.array([len(np.intersect1d(a, b)) / k for a, b in zip(*lists)])


def measure_drift(fp32: np.ndarray, int8: np.ndarray, k: int = NEIGHBOURS) -> dict[str, float | int]:
    """Drift figures of int8 vectors against the fp32 vectors of the same images."""
    if fp32.shape != int8.shape:
        raise DriftError(f"int8 output shape {int8.shape} != fp32 {fp32.shape}")
    cosine = np.sum(unit(fp32) * unit(int8), axis=1)
    overlap = top_k_overlap(fp32, int8, k)
    return {
        "images": len(fp32),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        f"top{k}_overlap": float(overlap.mean()),
        "max_norm_error": float(np.abs(np.linalg.norm(int8, axis=1) - 1.0).max()),
    }


def check_drift(drift: dict[str, float | int], min_cosine: float, min_overlap: float, k: int = NEIGHBOURS) -> None:
    """Raise DriftError when the mean cosine or the mean top-k overlap is below its threshold."""
    failures = []
    if drift["mean_cosine"] < min_cosine:
        failures.append(f"mean cosine {drift['mean_cosine']:.4f} < {min_cosine}")
    if drift[f"top{k}_overlap"] < min_overlap:
        failures.append(f"mean top-{k} neighbour overlap {drift[f'top{k}_overlap']:.4f} < {min_overlap}")
    if failures:
        raise DriftError(
            f"the int8 model drifts too far from fp32 on {drift['images']} check images: "
            f"{'; '.join(failures)}; nothing was written"
        )
