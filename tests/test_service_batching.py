"""Micro-batched POST /search: exactly the answers of one-by-one searches, batches that really form,
and reloads (of the bundle and of the model) while batched searches run."""

from __future__ import annotations

import random
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index
from indexer.build import build_index
from indexer.bundle import new_bundle
from indexer.embedder import Embedder
from indexer.images import decode_image, prepare
from indexer.metadata import ImageRecord
from service.batching import MicroBatcher, SearchJob, search_jobs
from service_helpers import LiveServer, class_image, jpeg, settings_for
from tiny_model import make_corpus, make_tiny_model, pattern_image

LABELS = ("a", "b", "c", None)


def upload(data: bytes, name: str = "q.jpg") -> dict:
    return {"file": (name, data, "image/jpeg")}


def without_timing(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "took_ms"}


def batch_counts(metrics_text: str) -> tuple[float, float, float]:
    """(batches, searches in them, batches of exactly one search) from /metrics."""

    def value(pattern: str) -> float:
        m = re.search(pattern, metrics_text, re.M)
        return float(m.group(1)) if m else 0.0

    return (
        value(r"^imgsearch_search_batch_size_count (\S+)$"),
        value(r"^imgsearch_search_batch_size_sum (\S+)$"),
        value(r'^imgsearch_search_batch_size_bucket\{le="1(?:\.0)?"\} (\S+)$'),
    )


# --------------------------------------------------------------------------- search_jobs, no HTTP


def vector_bundle(root: Path, kind: faiss_index.RequestedType, n: int = 20_000, dim: int = 32, seed: int = 0):
    """A bundle of clustered random vectors with labels, and exact duplicates (score ties)."""
    model = make_tiny_model(root / "model", dim=dim)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 12, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    vecs[n // 2 : n // 2 + 40] = vecs[:40]  # 40 pairs of identical vectors under other ids
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    records = [
        ImageRecord(
            id=1000 + 7 * i, path=f"x/{i}.jpg", label=LABELS[i % 4], size=1, mtime=0.0, sha256="0", width=1, height=1
        )
        for i in range(n)
    ]
    choice = faiss_index.choose_index(kind, n, dim)
    bundle = new_bundle(root / "index", model, faiss_index.new_index(choice, dim, vecs), choice.params, None)
    bundle.add(records, vecs)
    return bundle, vecs


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_jobs_gives_exactly_what_each_search_gives_alone(tmp_path, kind):
    bundle, vecs = vector_bundle(tmp_path, kind, n=4000 if kind == "hnsw" else 20_000)
    rng = random.Random(1)
    queries = np.concatenate([vecs[:20], vecs[300:310]])  # stored vectors: exact ties with their duplicates
    noisy = vecs[100:130] + 0.05 * np.random.default_rng(2).standard_normal((30, vecs.shape[1])).astype(np.float32)
    queries = np.concatenate([queries, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)]).astype(np.float32)
    # Stored vectors with a duplicate, unfiltered, small and large k together: the exact ties at
    # rank 1-2 must come out as a search of that k alone orders them.
    jobs = [SearchJob(None, np.zeros(0), k=[1, 50, 2, 700][i % 4]) for i in range(20)]
    jobs += [
        SearchJob(
            None,
            np.zeros(0),
            k=rng.choice([1, 2, 5, 10, 50, 700]),
            min_score=rng.choice([None, None, 0.3, 0.9]),
            label=rng.choice([None, None, "a", "b", "zzz"]),
            exclude=rng.choice([None, None, (1000, 1007, 1014)]),
        )
        for _ in range(len(queries) - 20)
    ]
    batched = search_jobs(bundle, queries, jobs)
    for q, job, got in zip(queries, jobs, batched):
        alone = bundle.search(q[None, :], job.k, min_score=job.min_score, label=job.label, exclude_ids=job.exclude)[0]
        assert got == alone  # ids, scores (float equality), paths, labels, order
    assert sum(len(hits) for hits in batched) > len(jobs)


# ------------------------------------------------------------------------- the batcher, no HTTP


def test_the_batcher_forms_batches_splits_snapshots_and_fails_only_its_batch():
    calls: list[tuple[str, int]] = []

    def run(snapshot, jobs):
        calls.append((snapshot, len(jobs)))
        if snapshot == "broken":
            raise ValueError("boom")
        return [job.k * 10 for job in jobs]

    batcher = MicroBatcher(run, max_batch=8, wait_s=1.0)
    try:
        # Nothing else is on its way: a lone search starts at once, whatever wait_s is.
        t0 = time.perf_counter()
        assert batcher.submit(SearchJob("old", np.zeros(0), k=1)).result(timeout=5) == 10
        assert time.perf_counter() - t0 < 0.5

        # Ten searches announced together: the worker holds the batch open until they arrive.
        tickets = [batcher.announce() for _ in range(10)]
        entered = [t.__enter__() for t in tickets]
        futures = []
        for i, ticket in enumerate(entered):
            snapshot = "broken" if i == 9 else ("old" if i % 2 else "new")
            futures.append(batcher.submit(SearchJob(snapshot, np.zeros(0), k=i + 1), ticket))
        for t in tickets:
            t.__exit__(None, None, None)
        assert [f.result(timeout=5) for f in futures[:9]] == [(i + 1) * 10 for i in range(9)]
        with pytest.raises(ValueError, match="boom"):
            futures[9].result(timeout=5)
        assert batcher.stats.largest == 8 and batcher.stats.searches == 11
        # each batch was split by snapshot: no call mixed them
        assert {s for s, _ in calls} == {"old", "new", "broken"}
        assert sum(n for _, n in calls) == 11
    finally:
        batcher.close()
    assert not any(t.is_alive() for t in batcher._threads)


# ------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching")
    model = make_tiny_model(root / "model")
    images = make_corpus(root / "images", classes=4, per_class=8, seed=3)
    # an exact duplicate under another class: its neighbours tie exactly
    shutil.copy(images / "class_0" / "img_0.jpg", images / "class_1" / "dup_of_0.jpg")
    return {"root": root, "model": model, "images": images}


def queries() -> list[tuple[bytes, dict]]:
    """Query images with a mix of k, label filters and min_score."""
    out = []
    for i in range(24):
        data = class_image(i % 4, variant=i, seed=3) if i % 6 else jpeg(pattern_image(555 + i, 64))
        params: dict = {"k": [1, 3, 10, 40][i % 4]}
        if i % 5 == 1:
            params["label"] = f"class_{i % 4}"
        if i % 7 == 2:
            params["label"] = "no_such_label"
        if i % 3 == 0:
            params["min_score"] = 0.5
        out.append((data, params))
    return out


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_batched_searches_equal_one_by_one_searches(corpus, tmp_path, kind):
    index = tmp_path / "index"
    build_index(corpus["model"], corpus["images"], index, index_type=kind, progress=False, device="cpu", workers=1)
    qs = queries()

    with LiveServer(settings_for(index, batching=False)) as live, live.client() as c:
        expected = []
        for data, params in qs:
            r = c.post("/search", files=upload(data), params=params)
            assert r.status_code == 200, r.text
            expected.append(without_timing(r.json()))
        assert batch_counts(c.get("/metrics").text) == (0, 0, 0)  # batching off: no micro-batches

    assert any(len(e["results"]) > 1 for e in expected) and any(not e["results"] for e in expected)
    settings = settings_for(index, batching=True, batch_wait_ms=200, pool_size=4, max_batch=16)
    with LiveServer(settings) as live:
        start = threading.Barrier(len(qs))

        def one(i: int) -> dict:
            data, params = qs[i]
            with live.client() as c:
                start.wait(timeout=30)
                r = c.post("/search", files=upload(data), params=params)
            assert r.status_code == 200, r.text
            return without_timing(r.json())

        for _ in range(2):
            with ThreadPoolExecutor(len(qs)) as pool:
                got = list(pool.map(one, range(len(qs))))
            assert got == expected  # ids, scores to float equality, paths, labels, order, predicted label
            start.reset()
        with live.client() as c:
            batches, searched, singles = batch_counts(c.get("/metrics").text)
    assert searched == 2 * len(qs)
    assert batches < searched and batches > singles, (batches, searched, singles)  # batches of 2+ formed


def test_reloads_and_a_model_change_while_batched_searches_run(corpus, tmp_path):
    index = tmp_path / "index"
    build_index(corpus["model"], corpus["images"], index, progress=False, device="cpu", workers=1)
    other_model = make_tiny_model(tmp_path / "other-model", seed=9)
    qs = [class_image(c, variant=v, seed=3) for c in range(4) for v in range(3)]
    settings = settings_for(index, batching=True, batch_wait_ms=20, pool_size=4, threads=1)
    failures: list[str] = []
    answered: list[str] = []
    stop = threading.Event()

    with LiveServer(settings) as live:

        def hammer(i: int) -> None:
            with live.client() as c:
                n = 0
                while not stop.is_set():
                    r = c.post("/search", files=upload(qs[(i + n) % len(qs)]), params={"k": 5})
                    n += 1
                    if r.status_code != 200 or len(r.json()["results"]) != 5:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        answered.append(r.json()["model"])

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            with live.client() as c:
                first_model = c.get("/stats").json()["model"]["id"]
                for i in range(3):
                    time.sleep(0.3)
                    added = c.post("/images", files=upload(jpeg(pattern_image(9000 + i, 64))), data={"label": "new"})
                    assert added.status_code == 201, added.text
                    r = c.post("/admin/reload")
                    assert r.status_code == 200, r.text
                time.sleep(0.3)
                # Another model rebuilds the bundle: the reload swaps bundle and embedder together.
                build_index(other_model, corpus["images"], index, progress=False, device="cpu", workers=1, rebuild=True)
                r = c.post("/admin/reload")
                assert r.status_code == 200 and r.json()["model_changed"], r.text
                time.sleep(0.5)
                second_model = c.get("/stats").json()["model"]["id"]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        with live.client() as c:
            batches, searched, _singles = batch_counts(c.get("/metrics").text)

    assert not failures, failures[:5]
    assert first_model != second_model
    assert first_model in answered and second_model in answered and set(answered) == {first_model, second_model}
    assert batches < searched  # searches were batched


# ---------------------------------------------------------------------- the real default model


def test_the_default_model_embeds_a_batch_bit_for_bit_like_single_images(default_model, demo_corpus, tmp_path):
    files = sorted((demo_corpus / "queries").rglob("*.jpg"))[:6]
    embedder = Embedder(default_model, device="cpu")
    pixels = np.stack([prepare(decode_image(f.read_bytes()), embedder.card) for f in files])
    one_by_one = np.concatenate([embedder.embed(pixels[i : i + 1]) for i in range(len(files))])
    assert np.array_equal(embedder.embed(pixels), one_by_one)

    # and end to end: a small bundle of two demo classes, served with and without batching
    images = tmp_path / "images"
    for label in sorted(p.name for p in (demo_corpus / "images").iterdir())[:2]:
        shutil.copytree(demo_corpus / "images" / label, images / label)
    index = tmp_path / "index"
    build_index(default_model, images, index, progress=False, device="cpu", workers=1)
    uploads = [(f.read_bytes(), {"k": 7}) for f in files]
    with LiveServer(settings_for(index, batching=False, threads=None)) as live, live.client() as c:
        expected = [without_timing(c.post("/search", files=upload(d), params=p).json()) for d, p in uploads]
    with LiveServer(settings_for(index, batching=True, batch_wait_ms=500, threads=None, pool_size=6)) as live:
        start = threading.Barrier(len(uploads))

        def one(i: int) -> dict:
            with live.client() as c:
                start.wait(timeout=30)
                return without_timing(c.post("/search", files=upload(uploads[i][0]), params=uploads[i][1]).json())

        with ThreadPoolExecutor(len(uploads)) as pool:
            got = list(pool.map(one, range(len(uploads))))
        with live.client() as c:
            batches, searched, _ = batch_counts(c.get("/metrics").text)
    assert got == expected
    assert len(expected[0]["results"]) == 7
    assert batches < searched
