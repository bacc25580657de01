"""flat, hnsw and ivf indexes: choice, save/load round trip, agreement with exact search, edits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index
from indexer.build import BuildError, build_index
from indexer.bundle import new_bundle, open_bundle
from indexer.metadata import ImageRecord
from tiny_model import make_corpus, make_tiny_model


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _records(ids: np.ndarray) -> list[ImageRecord]:
    return [ImageRecord(int(i), f"c{int(i) % 5}/{int(i)}.jpg", f"c{int(i) % 5}", 1, 0.0, "0" * 64, 8, 8) for i in ids]


def recall_against(exact: list[list[int]], approx: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(e[:k]) & set(a[:k])) / k for e, a in zip(exact, approx)]))


def test_auto_choice_says_what_it_picked():
    assert faiss_index.choose_index("auto", 1000, 16).type == "flat"
    assert "auto" in faiss_index.choose_index("auto", 1000, 16).reason
    assert faiss_index.choose_index("auto", 60_000, 16).type == "hnsw"
    assert faiss_index.choose_index("auto", 3_000_000, 16).type == "ivf"


@pytest.mark.parametrize(
    "n,dim,budget",
    [
        (60_000, 1280, 600.0),
        (1_000_000, 1280, 600.0),
        (1_000_000, 256, 600.0),
        (1_000_000, 256, 60.0),
        (200_000, 1280, 30.0),
    ],
)
def test_auto_keeps_hnsw_builds_within_the_budget(n, dim, budget):
    choice = faiss_index.choose_index("auto", n, dim, budget_s=budget, cores=2)
    projected = faiss_index.hnsw_build_seconds(n, dim, cores=2)
    assert choice.type == ("hnsw" if projected <= budget else "ivf"), choice.reason
    assert "budget" in choice.reason
    if choice.type == "ivf":  # a k-means sample of tens of points per list, never the whole corpus
        assert choice.params["train_size"] <= max(64 * choice.params["nlist"], 10_000) < n


def test_the_projection_matches_the_measured_rate():
    # 1M HNSW insertions of 1,280-d vectors projected at 920 s on 2 cores
    assert faiss_index.hnsw_build_seconds(1_000_000, 1280, cores=2) == pytest.approx(920, rel=0.01)
    assert faiss_index.choose_index("auto", 1_000_000, 1280, cores=2).type == "ivf"  # 920 s > 600 s
    assert faiss_index.choose_index("auto", 1_000_000, 256, cores=2).type == "hnsw"  # 184 s
    assert faiss_index.choose_index("auto", 1_000_000, 256, cores=8).type == "hnsw"
    small = faiss_index.choose_index("ivf", 20, 16)
    assert small.params["nlist"] == 1 and "lowered" in small.reason
    assert faiss_index.choose_index("ivf", 100_000, 16).params["nlist"] == round(4 * 100_000**0.5)
    with pytest.raises(ValueError):
        faiss_index.choose_index("annoy", 10, 16)  # type: ignore[arg-type]  # not a type, on purpose


@pytest.mark.parametrize(
    "kind,codec,refine",
    [("flat", "sq8", None), ("hnsw", "sq8", None), ("ivf", "sq8", None), ("ivf", "pq", 0), ("ivf", "pq", None)],
)
def test_round_trip_and_agreement_with_exact_search(kind, codec, refine, tmp_path: Path):
    model = make_tiny_model(tmp_path / "model")
    rng = np.random.default_rng(0)
    n, d = 2000, 16
    vectors, ids = _unit(rng, n, d), rng.choice(2**62, n, replace=False).astype(np.int64)
    choice = faiss_index.choose_index(kind, n, d, codec, ivf_refine=refine)
    refined = bool(choice.params.get("refine"))
    assert refined == (codec == "pq" and refine is None)  # pq is re-scored from float vectors by default
    b = new_bundle(tmp_path / "index", model, faiss_index.new_index(choice, d, vectors), choice.params, None)
    b.add(_records(ids), vectors)
    b.save()
    loaded = open_bundle(tmp_path / "index")
    assert loaded.index_type == kind and len(loaded) == n and loaded.manifest["index"]["type"] == kind
    queries = _unit(rng, 50, d)
    exact_scores = queries @ vectors.T
    exact = [[int(ids[j]) for j in np.argsort(-row)[:10]] for row in exact_scores]
    got = [[h.id for h in hits] for hits in loaded.search(queries, 10)]
    recall = recall_against(exact, got, 10)
    coarse = codec == "pq" and not refined  # PQ codes' own scores
    assert recall >= {"flat": 1.0, "hnsw": 0.95, "ivf": 0.3 if coarse else 0.95}[kind], recall
    if refined:  # the re-scored candidates carry exact scores
        (top,) = loaded.search(queries[:1], 5)
        assert [h.score for h in top] == pytest.approx(np.sort(exact_scores[0])[::-1][:5].tolist(), abs=1e-5)
    # vectors come back (exactly, or decoded from their codes)
    exact_vectors = kind != "ivf" or refined
    assert np.allclose(loaded.vector(int(ids[3])), vectors[3], atol=1e-5 if exact_vectors else 0.6)
    all_ids, all_vectors = loaded.vectors()
    assert sorted(all_ids.tolist()) == sorted(ids.tolist()) and all_vectors.shape == (n, d)
    (only,) = loaded.search(queries[:1], 5, label="c1", exclude_ids=[int(i) for i in ids[:50]])
    assert len(only) == 5 and {h.label for h in only} == {"c1"} and not {h.id for h in only} & set(ids[:50].tolist())
    # removing keeps every other id pointing at its own vector
    loaded.remove(ids[:100])
    assert len(loaded) == n - 100
    (hits,) = loaded.search(vectors[500:501], 1)
    assert hits[0].id == int(ids[500]) or coarse
    assert int(ids[0]) not in {h.id for h in loaded.search(vectors[0:1], 20)[0]}
    loaded.save()
    assert len(open_bundle(tmp_path / "index")) == n - 100


def test_build_with_each_type_and_switching(tmp_path: Path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=4, per_class=5)
    index = tmp_path / "index"
    for kind in ("hnsw", "flat", "ivf"):
        report = build_index(model, images, index, index_type=kind, progress=False, workers=2)
        assert report.index_type == kind and open_bundle(index).index_type == kind
    with pytest.raises(BuildError, match="--rebuild"):
        build_index(model, images, index, index_type="flat", progress=False)
    report = build_index(model, images, index, index_type="auto", progress=False)
    assert report.index_type == "ivf" and "kept" in report.index_reason
    report = build_index(model, images, index, index_type="auto", rebuild=True, progress=False)
    assert report.index_type == "flat" and report.index_reason.startswith("auto")
