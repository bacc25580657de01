"""The in-memory index a search asks: the main index of a version, a delta and tombstones.

- `main`: the FAISS index read from the version. In live mode (the service) it is never
  changed, so a write costs the same at 1k and 1M vectors and no delete rebuilds an HNSW graph.
- `delta`: a small exact (flat) index of the vectors added since the version.
- `hidden`: ids whose vector in `main` is dead (deleted, or replaced by a newer one in the
  delta). Every main-index search hides them inside FAISS with an id selector, so k results
  still come back.

A search asks both indexes and merges by score. Compaction (compaction.py) folds the delta and
the hidden ids into the next version's main index with `fold`.

In build mode (`mutable_main=True`, an offline build that owns its copy) adds and removes go
straight into `main`, as a build has always done.

Thread safety: searches hold the read lock, changes the write lock (ReadWriteLock is fair).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from indexer import faiss_index
from indexer.journal import Entry
from indexer.locks import ReadWriteLock
from indexer.metadata import ImageRecord

# A label filter searches that label's vectors exactly when they are few enough for a brute-force
# scan to be cheap; above both limits, the label goes to FAISS as an id selector.
EXACT_LABEL_MAX_SHARE = 0.2
EXACT_LABEL_MAX_COUNT = 50_000
# An HNSW graph cannot drop nodes: compaction keeps dead ones hidden (stored with the version)
# and rebuilds the graph only once they are this share of it.
HNSW_REBUILD_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    score: float
    path: str
    label: str | None


def _ids(values: Iterable[int]) -> np.ndarray:
    return np.fromiter((int(v) for v in values), dtype=np.int64)


class LiveIndex:
    """Main index + delta + tombstones, with the records of every live id."""

    def __init__(
        self,
        dim: int,
        main: faiss.Index,
        params: dict[str, Any],
        records: dict[int, ImageRecord],
        deleted: dict[str, str],
        *,
        mutable_main: bool = False,
        hidden: Iterable[int] = (),
    ) -> None:
        self.dim = dim
        self.main = main
        self.params = dict(params)
        self.records = records
        self.deleted = deleted  # corpus path -> sha256 of corpus files deleted through the API
        self.mutable_main = mutable_main
        self.delta = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.delta_ids: set[int] = set()
        self.hidden: set[int] = set()
        self._hidden_arr = np.zeros(0, dtype=np.int64)
        self._hidden_sel: faiss.IDSelector | None = None  # built once per change, not once per search
        self._hide(list(hidden))
        self._base_hidden = len(self.hidden)  # dead ids the version already holds
        self._labels: dict[str | None, tuple[np.ndarray, np.ndarray | None]] = {}
        self.lock = ReadWriteLock()

    # ------------------------------------------------------------------ facts

    def __len__(self) -> int:
        return len(self.records)

    @property
    def index_type(self) -> str:
        return faiss_index.index_type_of(self.main)

    @property
    def pending(self) -> int:
        """Changes no version holds yet: delta vectors plus ids hidden since the version."""
        return len(self.delta_ids) + len(self.hidden) - self._base_hidden

    def hidden_share(self) -> float:
        return len(self.hidden) / max(1, int(self.main.ntotal))

    # ---------------------------------------------------------------- changing

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray) -> None:
        """Add or replace records with their vectors (the caller checked shapes and finiteness)."""
        ids = _ids(r.id for r in records)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.lock.write():
            if self.mutable_main:
                existing = _ids(i for i in ids.tolist() if i in self.records)
                if len(existing):
                    self.main, _ = faiss_index.remove(self.main, existing, self.params)
                faiss_index.add(self.main, vecs, ids)
            else:
                in_delta = _ids(i for i in ids.tolist() if i in self.delta_ids)
                if len(in_delta):
                    self.delta.remove_ids(in_delta)
                newly_hidden = [i for i in ids.tolist() if i in self.records and i not in self.delta_ids]
                self._hide(newly_hidden)
                self.delta.add_with_ids(vecs, ids)
                self.delta_ids.update(ids.tolist())
            for rec in records:
                old = self.records.get(rec.id)
                if old is not None:
                    self._labels.pop(old.label, None)
                self._labels.pop(rec.label, None)
                self.records[rec.id] = rec

    def remove(self, ids: Iterable[int], *, tombstone: bool = False) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed.

        `tombstone`: remember removed corpus files (path and content hash), so that an incremental
        build does not add them back (an API delete); a build's own removals do not.
        """
        with self.lock.write():
            present = [i for i in sorted({int(i) for i in ids}) if i in self.records]
            if not present:
                return 0
            if self.mutable_main:
                self.main, removed = faiss_index.remove(self.main, _ids(present), self.params)
                if removed != len(present):
                    raise RuntimeError(
                        f"index removed {removed} of {len(present)} vectors: index and metadata disagree"
                    )
            else:
                in_delta = [i for i in present if i in self.delta_ids]
                if in_delta:
                    self.delta.remove_ids(_ids(in_delta))
                    self.delta_ids.difference_update(in_delta)
                self._hide([i for i in present if i not in in_delta])
            for i in present:
                rec = self.records.pop(i)
                self._labels.pop(rec.label, None)
                if tombstone and rec.origin == "corpus":
                    self.deleted[rec.path] = rec.sha256
            return len(present)

    def update_records(self, records: Iterable[ImageRecord]) -> None:
        """Replace metadata of existing ids without touching their vectors (e.g. a new mtime)."""
        with self.lock.write():
            for rec in records:
                if rec.id not in self.records:
                    raise KeyError(rec.id)
                self._labels.pop(self.records[rec.id].label, None)
                self._labels.pop(rec.label, None)
                self.records[rec.id] = rec

    def apply(self, entry: Entry) -> None:
        """Apply one journal record (replay, another worker's write, or our own after its flush)."""
        if entry.op == "add":
            assert entry.record is not None and entry.vector is not None
            self.add([entry.record], entry.vector[None, :])
        else:
            self.remove([entry.id])
            if entry.tombstone is not None:
                with self.lock.write():
                    self.deleted[entry.tombstone[0]] = entry.tombstone[1]

    def _hide(self, ids: Sequence[int]) -> None:
        if ids:
            self.hidden.update(ids)
            # a new array, not an in-place change: a search in flight keeps the one it took
            self._hidden_arr = _ids(self.hidden)
            self._hidden_sel = faiss_index.selector_for(None, self._hidden_arr)

    # ---------------------------------------------------------------- reading

    def vector(self, image_id: int) -> np.ndarray:
        with self.lock.read():
            return self._vectors_locked(np.array([int(image_id)], dtype=np.int64))[0]

    def vectors(self, ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids, or for every live id."""
        with self.lock.read():
            arr = self._live_ids() if ids is None else np.asarray(ids, dtype=np.int64)
            return arr, self._vectors_locked(arr)

    def _live_ids(self) -> np.ndarray:
        main_ids = faiss_index.ids_of(self.main)
        if self.hidden:
            main_ids = main_ids[~np.isin(main_ids, self._hidden_arr)]
        return np.concatenate([main_ids, _ids(self.delta_ids)]) if self.delta_ids else main_ids

    def _vectors_locked(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        if len(ids) == 0:
            return out
        for i in ids.tolist():
            if i not in self.records:
                raise KeyError(i)
        in_delta = np.fromiter((i in self.delta_ids for i in ids.tolist()), dtype=bool, count=len(ids))
        if in_delta.any():
            out[in_delta] = faiss_index.reconstruct(self.delta, ids[in_delta])
        if (~in_delta).any():
            out[~in_delta] = faiss_index.reconstruct(self.main, ids[~in_delta])
        return out

    def search(
        self,
        q: np.ndarray,
        k: int,
        *,
        min_score: float | None = None,
        label: str | None = None,
        exclude: np.ndarray | None = None,
    ) -> list[list[Hit]]:
        """Top-k of each query over main + delta, hidden and excluded ids left out inside FAISS."""
        with self.lock.read():
            if label is not None:
                ids, vecs = self._label_members(label)
                if vecs is not None:
                    scores, found = _exact(q, ids, vecs, k, exclude)
                else:
                    scores, found = self._search_both(q, k, ids, exclude)
            else:
                scores, found = self._search_both(q, k, None, exclude)
            return [self._hits(row_s, row_i, min_score) for row_s, row_i in zip(scores, found)]

    def _search_both(
        self, q: np.ndarray, k: int, include: np.ndarray | None, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        hidden = self._hidden_arr
        main_exclude = hidden if exclude is None or len(exclude) == 0 else np.concatenate([hidden, exclude])
        main_include = include
        if include is not None and self.delta_ids:
            main_include = include[~np.isin(include, _ids(self.delta_ids))]
        if self.main.ntotal and (main_include is None or len(main_include)):
            if main_include is None and (exclude is None or len(exclude) == 0):
                selector = self._hidden_sel
            else:
                selector = faiss_index.selector_for(main_include, main_exclude if len(main_exclude) else None)
            kk = min(k, int(self.main.ntotal))
            parts.append(faiss_index.search(self.main, q, kk, self.params, selector))
        if self.delta.ntotal:
            delta_include = include[np.isin(include, _ids(self.delta_ids))] if include is not None else None
            if delta_include is None or len(delta_include):
                selector = faiss_index.selector_for(delta_include, exclude)
                parts.append(faiss_index.search(self.delta, q, min(k, int(self.delta.ntotal)), {}, selector))
        if not parts:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if len(parts) == 1:
            return parts[0]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        scores = np.where(ids < 0, -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _label_members(self, label: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The live ids of a label, and their vectors when the label is small enough to scan exactly."""
        cached = self._labels.get(label)
        if cached is not None:
            return cached
        ids = _ids(r.id for r in self.records.values() if r.label == label)
        vecs = None
        if len(ids) <= EXACT_LABEL_MAX_COUNT or len(ids) <= EXACT_LABEL_MAX_SHARE * len(self.records):
            vecs = self._vectors_locked(ids)
        # a benign race: two searches may both fill the cache; a change clears it under the write lock
        self._labels[label] = (ids, vecs)
        return ids, vecs

    def _hits(self, scores: np.ndarray, ids: np.ndarray, min_score: float | None) -> list[Hit]:
        hits = []
        for score, image_id in zip(scores.tolist(), ids.tolist()):
            if image_id < 0 or score == -np.inf:
                continue
            score = min(1.0, max(-1.0, score))  # SQ8/PQ decoding can overshoot by a hair
            if min_score is not None and score < min_score:
                continue
            rec = self.records.get(image_id)
            if rec is None:
                continue
            hits.append(Hit(image_id, score, rec.path, rec.label))
        return hits

    def range_search(self, q: np.ndarray, min_score: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query, (ids, scores) of every live vector scoring above min_score (unordered)."""
        with self.lock.read():
            out: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(q))]
            for index, params, selector in ((self.main, self.params, self._hidden_sel), (self.delta, {}, None)):
                if index.ntotal == 0:
                    continue
                lims, scores, ids = faiss_index.range_search(index, q, min_score, params, selector)
                for i in range(len(q)):
                    out[i].append((ids[lims[i] : lims[i + 1]], scores[lims[i] : lims[i + 1]]))
        return [
            (
                np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
                np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32),
            )
            for parts in out
        ]

    # --------------------------------------------------------------- compaction

    def fold_inputs(self, rebuild_share: float = HNSW_REBUILD_SHARE) -> FoldInputs:
        """What `fold` needs, taken at one instant (the caller holds the bundle's write mutex)."""
        with self.lock.read():
            delta_ids = _ids(self.delta_ids)
            return FoldInputs(
                self.main,
                dict(self.params),
                self._hidden_arr.copy(),
                delta_ids,
                faiss_index.reconstruct(self.delta, delta_ids),
                rebuild_share,
            )


@dataclass(frozen=True)
class FoldInputs:
    main: faiss.Index
    params: dict[str, Any]
    hidden: np.ndarray
    delta_ids: np.ndarray
    delta_vectors: np.ndarray
    rebuild_share: float = HNSW_REBUILD_SHARE


def fold(inputs: FoldInputs) -> tuple[faiss.Index, np.ndarray]:
    """A new main index with the delta folded in, and the dead ids it still holds (hidden).

    `inputs.main` itself is never changed. flat and plain ivf: a copy of main without the hidden
    ids, plus the delta; nothing stays hidden. hnsw cannot delete graph nodes (nor a refined ivf
    its entries): a copy of main plus the delta, the dead entries kept hidden, until they reach
    `rebuild_share` of it (or an id comes back whose old entry is still in it); then it is built
    again from the live vectors. All of it runs in the background, off every request path.
    """
    main, hidden = inputs.main, inputs.hidden
    kept = np.zeros(0, dtype=np.int64)
    if not faiss_index.deletes_in_place(main) and len(hidden):
        stored = faiss_index.ids_of(main)
        comes_back = bool(np.isin(inputs.delta_ids, stored).any())
        if comes_back or len(hidden) >= inputs.rebuild_share * max(1, len(stored)):
            keep = stored[~np.isin(stored, hidden)]
            fresh = faiss_index.rebuilt_with(main, keep, inputs.params)
        else:
            fresh = faiss_index.configure(faiss_index.copy(main), inputs.params)
            kept = hidden
    else:
        fresh = faiss_index.configure(faiss_index.copy(main), inputs.params)
        if len(hidden):
            fresh.remove_ids(hidden)
    faiss_index.add(fresh, inputs.delta_vectors, inputs.delta_ids)
    return fresh, kept


def _exact(
    q: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over a small set of vectors: what an exact search of that subset returns."""
    if exclude is not None and len(exclude):
        keep = ~np.isin(ids, exclude)
        ids, vecs = ids[keep], vecs[keep]
    if len(ids) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    # one matrix-vector product per query: a batch of queries scores exactly like single ones
    scores = np.stack([vecs @ row for row in q])
    kk = min(k, len(ids))
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    part_scores = np.take_along_axis(scores, part, 1)
    # ties broken by id, so that the order does not depend on how the vectors were stored
    order = np.lexsort((ids[part], -part_scores), axis=1)
    picked = np.take_along_axis(part, order, 1)
    return np.take_along_axis(scores, picked, 1).astype(np.float32), ids[picked]
