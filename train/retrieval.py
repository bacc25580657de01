"""Validation by retrieval: the validation images as queries against the training images.

The figures are the ones `python -m indexer eval --k all` reports for a bundle (cosine
similarity, mAP over the whole ranking, recall@1), computed here on in-memory vectors so that
training can measure every epoch without building an index. The whole-ranking mAP is the one the
dev-set figures use: mAP@10 only asks for 10 good hits, while a class has 30+ images to find.
"""

from __future__ import annotations

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    k: int | None = None,
) -> dict[str, float]:
    """{"map": mAP (over the whole ranking, or @k normalised by min(relevant, k)), "recall@1"}
    of cosine retrieval; queries whose class has no gallery image are left out (nothing to find)."""
    sims = unit_rows(queries) @ unit_rows(gallery).T
    k = len(gallery) if k is None else k
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    relevant = gallery_labels[order] == np.asarray(query_labels)[:, None]
    totals = np.array([np.sum(gallery_labels == q) for q in query_labels])
    scorable = totals > 0
    if not scorable.any():
        return {"map": float("nan"), "recall@1": float("nan")}
    relevant, totals = relevant[scorable], totals[scorable]
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    ap = (precision * relevant).sum(axis=1) / np.minimum(totals, k)
    return {"map": float(ap.mean()), "recall@1": float(relevant[:, 0].mean())}
