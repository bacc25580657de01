"""Retrieval quality of a bundle: mAP@k, recall@1/5/10, precision@k and kNN label accuracy.

With k None (`--k all`) the mAP is over the whole ranking ("mAP", normalised by every relevant
image in the index), the figure the dev-set tables report; mAP@k only asks for k good hits.

A hit is relevant when it has the query's label (its class folder). Queries come from class
folders, or (`split`) are a seeded, per-class fraction of the indexed images themselves, each
excluded from its own results.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.bundle import Bundle, Hit, open_bundle
from indexer.corpus import list_images
from indexer.embedder import Device, Embedder
from indexer.images import ImageDecodeError, ImageTooLargeError, load_for_model
from indexer.query_expansion import QueryExpansion

RECALL_AT = (1, 5, 10)


@dataclass(frozen=True, slots=True)
class Query:
    name: str  # path relative to the queries folder, or of the held-out image in the corpus
    label: str
    exclude_id: int | None = None  # the query's own id when it is held out of the index


def evaluate(
    index_dir: Path,
    queries_dir: Path | None = None,
    *,
    split: float | None = None,
    k: int | None = 10,
    vote_k: int = 5,
    compare: Path | None = None,
    device: Device = "auto",
    batch_size: int = 32,
    seed: int = 0,
    expansion: QueryExpansion | None = None,
) -> dict[str, Any]:
    """Metrics as a JSON-ready dict; with `compare`, both bundles and their difference."""
    if (queries_dir is None) == (split is None):
        raise ValueError("give either a queries folder or --split FRACTION (not both)")
    if split is not None and not 0 < split < 1:
        raise ValueError("--split must be a fraction between 0 and 1")
    if (k is not None and k < 1) or vote_k < 1:
        raise ValueError("k and vote-k must be at least 1")
    bundles = [open_bundle(Path(index_dir))] + ([open_bundle(Path(compare))] if compare is not None else [])
    results = []
    held_out: list[Query] | None = None
    for bundle in bundles:
        if split is not None:
            held_out = held_out or split_queries(bundle, split, seed)
            queries, vectors, skipped = _held_out_vectors(bundle, held_out)
        else:
            assert queries_dir is not None
            queries, vectors, skipped = _folder_queries(bundle, Path(queries_dir), device, batch_size)
        results.append(
            _score(
                bundle, queries, vectors, k, vote_k, skipped, mode="split" if split else "folder", expansion=expansion
            )
        )
    if compare is None:
        return results[0]
    return {"index": results[0], "compare": results[1], "difference": _difference(results[1], results[0])}


def split_queries(bundle: Bundle, fraction: float, seed: int) -> list[Query]:
    """A seeded per-class sample of the labelled corpus images (at least one per class of 2+)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for rec in bundle.records():
        if rec.label is not None and rec.origin == "corpus":
            by_label[rec.label].append(rec.id)
    queries = []
    for label in sorted(by_label):
        ids = sorted(by_label[label])
        if len(ids) < 2:
            continue  # a lone image has nothing of its class left to find
        n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        for image_id in rng.choice(ids, size=n, replace=False).tolist():
            queries.append(Query(bundle.get(image_id).path, label, int(image_id)))
    if not queries:
        raise ValueError("no labelled class with at least two images to hold out")
    return queries


def _held_out_vectors(bundle: Bundle, held: list[Query]) -> tuple[list[Query], np.ndarray, list[dict[str, str]]]:
    """The stored vectors of the held-out images (matched by id, i.e. by relative path)."""
    present = [q for q in held if q.exclude_id in bundle]
    skipped = [{"path": q.name, "reason": "not in this index"} for q in held if q.exclude_id not in bundle]
    _, vectors = bundle.vectors([q.exclude_id for q in present if q.exclude_id is not None])  # all of present
    return present, vectors, skipped


def _folder_queries(
    bundle: Bundle, queries_dir: Path, device: Device, batch_size: int
) -> tuple[list[Query], np.ndarray, list[dict[str, str]]]:
    if not queries_dir.is_dir():
        raise ValueError(f"{queries_dir}: no such queries folder")
    files, listed_skips = list_images(queries_dir)
    skipped = [{"path": s.path, "reason": s.reason} for s in listed_skips]
    labelled = []
    for f in files:
        if f.label is None:
            skipped.append({"path": f.rel, "reason": "not in a class folder"})
        else:
            labelled.append(f)
    embedder = Embedder(bundle.model_dir, device=device)

    def load(path: Path) -> np.ndarray | str:
        try:
            return load_for_model(path, embedder.card)
        except (ImageDecodeError, ImageTooLargeError, OSError) as exc:
            return str(exc)

    queries: list[Query] = []
    pixels: list[np.ndarray] = []
    with ThreadPoolExecutor() as pool:
        for f, arr in zip(labelled, pool.map(load, [f.path for f in labelled])):
            if isinstance(arr, str):
                skipped.append({"path": f.rel, "reason": arr})
            else:
                queries.append(Query(f.rel, f.label or ""))
                pixels.append(arr)
    chunks = [embedder.embed(np.stack(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), dtype=np.float32)
    return queries, vectors, skipped


def _score(
    bundle: Bundle,
    queries: list[Query],
    vectors: np.ndarray,
    k: int | None,
    vote_k: int,
    skipped: list[dict[str, str]],
    mode: str,
    expansion: QueryExpansion | None = None,
) -> dict[str, Any]:
    label_counts = Counter(r.label for r in bundle.records() if r.label is not None)
    depth = max(len(bundle) if k is None else k, vote_k, max(RECALL_AT))
    per_query: list[tuple[str, dict[str, float]]] = []
    unknown: list[str] = []
    for query, vector in zip(queries, vectors):
        exclude = [query.exclude_id] if query.exclude_id is not None else None
        relevant_total = label_counts.get(query.label, 0) - (1 if exclude else 0)
        if relevant_total <= 0:
            unknown.append(query.name)  # no image of its class to find: not scorable
            continue
        (hits,) = bundle.search(vector[None], depth, exclude_ids=exclude, expansion=expansion)
        per_query.append((query.label, query_metrics(hits, query.label, relevant_total, k, vote_k)))
    if unknown:
        skipped += [{"path": name, "reason": "its class is not in the index"} for name in unknown]
    per_class: dict[str, dict[str, float]] = {}
    for label in sorted({lbl for lbl, _ in per_query}):
        per_class[label] = _mean([m for lbl, m in per_query if lbl == label])
    return {
        "index": str(bundle.path),
        "version": bundle.version,
        "model": {
            "backbone": bundle.card.backbone,
            "source": bundle.card.source,
            "sha256": bundle.card.onnx_sha256[:12],
        },
        "index_type": bundle.index_type,
        "mode": mode,
        "query_expansion": {"top": expansion.top, "alpha": expansion.alpha} if expansion else None,
        "k": "all" if k is None else k,
        "vote_k": vote_k,
        "queries": len(per_query),
        "overall": _mean([m for _, m in per_query]),
        "per_class": per_class,
        "skipped_queries": skipped,
    }


def query_metrics(hits: Sequence[Hit], label: str, relevant_total: int, k: int | None, vote_k: int) -> dict[str, float]:
    """Metrics of one query's ranked hits. AP@k is normalised by min(relevant in index, k);
    with k None, AP is over all the hits and normalised by every relevant image."""
    rel = [h.label == label for h in hits]
    found = precision_sum = 0.0
    for rank, is_rel in enumerate(rel if k is None else rel[:k], start=1):
        if is_rel:
            found += 1
            precision_sum += found / rank
    if k is None:
        metrics = {"mAP": precision_sum / relevant_total}
    else:
        metrics = {f"mAP@{k}": precision_sum / min(relevant_total, k)}
    for at in RECALL_AT:
        metrics[f"recall@{at}"] = float(any(rel[:at]))
    if k is not None:
        metrics[f"precision@{k}"] = sum(rel[:k]) / k
    metrics["knn_accuracy"] = float(knn_vote(hits[:vote_k]) == label)
    return metrics


def knn_vote(hits: Sequence[Hit]) -> str | None:
    """The most common label among the hits; ties go to the larger summed similarity."""
    votes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for h in hits:
        if h.label is not None:
            votes[h.label][0] += 1
            votes[h.label][1] += h.score
    if not votes:
        return None
    return max(votes.items(), key=lambda kv: (kv[1][0], kv[1][1]))[0]


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {"queries": 0}
    out: dict[str, float] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    out["queries"] = len(rows)
    return out


def _difference(other: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """compare - index, for the overall metrics and every class both have."""

    def sub(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {key: a[key] - b[key] for key in a if key != "queries" and key in b}

    return {
        "overall": sub(other["overall"], base["overall"]),
        "per_class": {
            c: sub(other["per_class"][c], base["per_class"][c]) for c in base["per_class"] if c in other["per_class"]
        },
    }
