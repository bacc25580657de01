"""Clustered synthetic unit vectors: a stand-in for a large corpus of image embeddings.

Image embeddings are not uniform noise on the sphere: they sit in clusters (classes, near-
duplicates), and within a cluster they vary along a few directions. So each of `clusters`
centres (random unit vectors) gets its own low-rank basis; a point is

    normalise(centre + spread * (basis @ z) + noise * g),  z ~ N(0, I_rank / rank), g ~ N(0, I_dim / dim)

Points are generated in fixed-size chunks, each from its own seeded stream, so the same vectors
come back every time without holding all of them (1M x 1280 float32 is 5.1 GB): an index can be
filled chunk by chunk and the data regenerated for the next one. Queries come from a separate
stream: same distribution, never in the base set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHUNK = 50_000


@dataclass(frozen=True)
class Clustered:
    dim: int
    clusters: int = 1000
    rank: int = 16
    spread: float = 0.6
    noise: float = 0.25
    seed: int = 0

    def _model(self) -> tuple[np.ndarray, np.ndarray]:
        cached = getattr(self, "_cache", None)
        if cached is not None:
            return cached
        rng = np.random.default_rng([self.seed, 0])
        centres = rng.standard_normal((self.clusters, self.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        bases = rng.standard_normal((self.clusters, self.rank, self.dim), dtype=np.float32)
        bases /= np.linalg.norm(bases, axis=2, keepdims=True)
        object.__setattr__(self, "_cache", (centres, bases))
        return centres, bases

    def _points(self, n: int, stream: int) -> np.ndarray:
        centres, bases = self._model()
        rng = np.random.default_rng([self.seed, 1, stream])
        labels = rng.integers(0, self.clusters, n)
        z = rng.standard_normal((n, self.rank), dtype=np.float32) * np.float32(self.spread / np.sqrt(self.rank))
        out = rng.standard_normal((n, self.dim), dtype=np.float32)
        out *= np.float32(self.noise / np.sqrt(self.dim))
        out += centres[labels]
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.clusters + 1))
        for c in range(self.clusters):  # one small matmul per cluster present in the chunk
            rows = order[bounds[c] : bounds[c + 1]]
            if len(rows):
                out[rows] += z[rows] @ bases[c]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def chunks(self, n: int, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(start, vectors) for the first n base vectors, in order; the same on every call."""
        for i, start in enumerate(range(0, n, chunk)):
            m = min(chunk, n - start)
            block = self._points(chunk, stream=1_000_000 + i)  # whole chunks: a prefix of n is stable
            yield start, block[:m]

    def base(self, n: int) -> np.ndarray:
        return np.concatenate([c for _, c in self.chunks(n)]) if n else np.zeros((0, self.dim), np.float32)

    def queries(self, n: int) -> np.ndarray:
        return self._points(n, stream=0)

    def sample(self, n: int) -> np.ndarray:
        """Training vectors (IVF k-means, PQ): the same distribution, their own stream."""
        return self._points(n, stream=1)
