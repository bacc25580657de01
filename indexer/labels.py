"""Labels for new images from their neighbours: the vote, how sure it is, and when to say nothing.

`vote` weighs each neighbour's label by its similarity. The winner comes with its share of the
votes and the mean score of its neighbours. `predict` gives no label (None) when that mean
score is below a threshold: an image of a kind the index has never seen still has nearest
neighbours, but they are further away than those of a known kind.

`calibrate` picks the threshold from the bundle's own labelled vectors, with no extra data. Each
sampled image is searched twice. Leave-one-out (its own class still in the index) gives the
scores of a known kind. Leave-one-class-out (its whole class removed) gives the scores of an
unseen kind. The threshold is the one that best separates the two (balanced accuracy) among those
that keep at least 90% of the known-kind labels: a label is dropped only where it is likely wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from indexer.live_index import Hit

CALIBRATION_QUERIES = 1000  # sampled labelled images (more adds little but time)
CALIBRATION_GALLERY = 50_000  # at most this many vectors are searched exactly
MIN_CLASSES, MIN_IMAGES = 4, 30  # below these a threshold would be noise: no calibration
MIN_KEPT = 0.9  # the threshold keeps at least this share of known-kind labels


@dataclass(frozen=True, slots=True)
class LabelVote:
    label: str
    share: float  # the winner's share of the similarity-weighted votes, 0-1
    mean_score: float  # mean cosine of the winner's neighbours among the hits


@dataclass(frozen=True, slots=True)
class Calibration:
    min_score: float  # predict a label only when the winner's mean score reaches this
    known: float  # share of known-kind images that keep their label at that threshold
    unseen: float  # share of unseen-kind images that get no label at that threshold
    queries: int


def vote(hits: Sequence[Hit]) -> LabelVote | None:
    """Similarity-weighted vote of the hits' labels (negative similarities do not vote)."""
    weights: dict[str, float] = {}
    scores: dict[str, list[float]] = {}
    for hit in hits:
        if hit.label is not None:
            weights[hit.label] = weights.get(hit.label, 0.0) + max(hit.score, 0.0) + 1e-9
            scores.setdefault(hit.label, []).append(hit.score)
    if not weights:
        return None
    label, weight = max(weights.items(), key=lambda kv: kv[1])
    return LabelVote(label, weight / sum(weights.values()), float(np.mean(scores[label])))


def predict(result: LabelVote | None, min_score: float | None) -> str | None:
    """The voted label, or None when there is no vote or it is below the threshold."""
    if result is None or (min_score is not None and result.mean_score < min_score):
        return None
    return result.label


def calibrate(vectors: np.ndarray, labels: Sequence[str | None], k: int = 10, seed: int = 0) -> Calibration | None:
    """The mean-score threshold that best tells known kinds from unseen ones (None: too few labelled images)."""
    lab = np.array([x if x is not None else "" for x in labels], dtype=object)
    has = lab != ""
    classes = np.unique(lab[has])
    if len(classes) < MIN_CLASSES or int(has.sum()) < MIN_IMAGES:
        return None
    rng = np.random.default_rng(seed)
    gallery = np.flatnonzero(has)
    if len(gallery) > CALIBRATION_GALLERY:
        gallery = rng.choice(gallery, CALIBRATION_GALLERY, replace=False)
    queries = rng.choice(gallery, min(CALIBRATION_QUERIES, len(gallery)), replace=False)
    g_vecs, g_lab = vectors[gallery], lab[gallery]
    known, unseen = [], []
    for start in range(0, len(queries), 256):
        rows = queries[start : start + 256]
        sims = vectors[rows] @ g_vecs.T
        sims[gallery[None, :] == rows[:, None]] = -np.inf  # leave the image itself out
        known += _winner_scores(sims, g_lab, k)
        sims[g_lab[None, :] == lab[rows][:, None]] = -np.inf  # leave its whole class out
        unseen += _winner_scores(sims, g_lab, k)
    known_arr, unseen_arr = np.array(known), np.array(unseen)
    best = (-1.0, 0.0, 0.0, 0.0)
    for t in np.unique(np.concatenate([known_arr, unseen_arr])):
        keep, refuse = float(np.mean(known_arr >= t)), float(np.mean(unseen_arr < t))
        if keep >= MIN_KEPT and (keep + refuse) / 2 > best[0]:
            best = ((keep + refuse) / 2, float(t), keep, refuse)
    return Calibration(min_score=best[1], known=best[2], unseen=best[3], queries=len(queries))


def _winner_scores(sims: np.ndarray, g_lab: np.ndarray, k: int) -> list[float]:
    """The voted label's mean score for each row of similarities."""
    k = min(k, sims.shape[1])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    out = []
    for row, idx in enumerate(top):
        hits = [Hit(0, float(sims[row, j]), "", str(g_lab[j])) for j in idx if np.isfinite(sims[row, j])]
        result = vote(hits)
        out.append(result.mean_score if result is not None else -1.0)
    return out
