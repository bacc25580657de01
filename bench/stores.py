"""Section e: vector stores that users pick instead of FAISS, on the same clustered vectors.

Run in its own process (`python -m bench.stores SPEC_JSON`). Stores that are not installed are
reported as skipped (they live in the `bench` extra, not in the service's dependencies). None
of them is given an embedding function: vectors go in as they are, nothing is downloaded.

- FAISS (the baseline): exact IndexFlatIP, and HNSW and IVF-PQ as the ANN comparisons, all made
  with `indexer.faiss_index` as a bundle holds them.
- LanceDB (embedded, files on disk): a table without an index (exact scan) and with an IVF-PQ
  index (its default index type), with and without re-ranking (refine_factor).
- Qdrant's Python client in local mode (`QdrantClient(":memory:")`, no server): exact search in
  numpy; the figures show what a prototype on local mode costs before a Qdrant server is needed.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.common import emit, log
from bench.synthetic import Clustered
from indexer import faiss_index
from indexer.faiss_index import IndexChoice

K = 10


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _recall(found: list[list[int]] | np.ndarray, truth: np.ndarray) -> float:
    return sum(len({int(i) for i in f if i >= 0} & set(t.tolist())) for f, t in zip(found, truth)) / truth.size


def _measure(
    search_batch: Callable[[np.ndarray], list[list[int]] | np.ndarray],
    search_one: Callable[[np.ndarray], list[int] | np.ndarray],
    q: np.ndarray,
    nq_single: int,
    truth: np.ndarray | None,
    faiss_single_threads: int | None = None,
) -> tuple[dict[str, Any], Any]:
    search_one(q[0])  # warm-up (lazy loading of index files, caches)
    t0 = time.perf_counter()
    ids = search_batch(q)
    batch_s = time.perf_counter() - t0
    threads = faiss.omp_get_max_threads()
    if faiss_single_threads:  # section c: one query per call runs far faster on 1 OpenMP thread here
        faiss.omp_set_num_threads(faiss_single_threads)
    t0 = time.perf_counter()
    for i in range(nq_single):
        search_one(q[i])
    single_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(threads)
    row = {
        "qps_batch": len(q) / batch_s,
        "qps_single": nq_single / single_s,
        "latency_ms_single": 1000 * single_s / nq_single,
        "queries_batch": len(q),
        "queries_single": nq_single,
        "recall_at_10": 1.0 if truth is None else _recall(ids, truth),
    }
    if faiss_single_threads:
        row["single_omp_threads"] = faiss_single_threads
    return row, ids


def _bundle_searchers(
    index: faiss.Index, params: dict[str, Any]
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """A batch and a single-query search of `index` as a bundle searches it."""
    return (
        lambda b: faiss_index.search(index, b, K, params)[1],
        lambda v: faiss_index.search(index, v[None], K, params)[1][0],
    )


def _faiss(x: np.ndarray, q: np.ndarray, nq_single: int) -> tuple[dict[str, Any], np.ndarray]:
    out: dict[str, Any] = {}
    ids_all = np.arange(len(x), dtype=np.int64)
    dim = x.shape[1]

    t0 = time.perf_counter()
    flat = faiss_index.new_index(IndexChoice("flat"), dim)
    faiss_index.add(flat, x, ids_all)
    build = time.perf_counter() - t0
    row, truth = _measure(
        *_bundle_searchers(flat, {}),
        q,
        nq_single,
        None,
        faiss_single_threads=1,
    )
    out["faiss_flat"] = {"store": "faiss", "index": "IndexFlatIP (exact)", "build_s": build, **row}
    del flat

    hp = {"M": 16, "efConstruction": 40, "efSearch": 64}
    t0 = time.perf_counter()
    hnsw = faiss_index.new_index(IndexChoice("hnsw", hp), dim)
    faiss_index.add(hnsw, x, ids_all)
    build = time.perf_counter() - t0
    row, _ = _measure(
        *_bundle_searchers(hnsw, hp),
        q,
        nq_single,
        truth,
        faiss_single_threads=1,
    )
    out["faiss_hnsw"] = {"store": "faiss", "index": "HNSW M=16 efConstruction=40, efSearch=64", "build_s": build, **row}
    del hnsw

    nlist = max(16, 2 ** round(math.log2(math.sqrt(len(x)))))
    t0 = time.perf_counter()
    ivf = faiss.index_factory(dim, f"IVF{nlist},PQ64x8np", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[np.random.default_rng(0).choice(len(x), min(len(x), max(40 * nlist, 10_000)), replace=False)])
    ivf.add_with_ids(x, ids_all)
    build = time.perf_counter() - t0
    sp = {"nprobe": 32}
    row, _ = _measure(
        lambda b: ivf.search(b, K, params=faiss.SearchParametersIVF(nprobe=32))[1],
        lambda v: ivf.search(v[None], K, params=faiss.SearchParametersIVF(nprobe=32))[1][0],
        q,
        nq_single,
        truth,
        faiss_single_threads=1,
    )
    out["faiss_ivfpq"] = {
        "store": "faiss",
        "index": f"IVF{nlist},PQ64x8, nprobe=32",
        "build_s": build,
        **row,
        "params": sp,
    }
    return out, truth


def _lancedb(x: np.ndarray, q: np.ndarray, nq_single: int, truth: np.ndarray, work: Path) -> dict[str, Any]:
    import lancedb
    import pyarrow as pa

    out: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="lancedb-", dir=work))
    try:
        db = lancedb.connect(str(folder))
        t0 = time.perf_counter()
        table = pa.table(
            {
                "id": pa.array(np.arange(len(x), dtype=np.int64)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
            }
        )
        tbl = db.create_table("vectors", table)
        build = time.perf_counter() - t0

        def batch(vs: np.ndarray, /, **kw: Any) -> list[list[int]]:
            query = tbl.search(vs).distance_type("dot").limit(K).select(["id"])
            for name, value in kw.items():
                query = getattr(query, name)(value)
            res = query.to_arrow()
            found: list[list[int]] = [[] for _ in range(len(vs))]
            for qi, i in zip(res.column("query_index").to_pylist(), res.column("id").to_pylist()):
                found[qi].append(i)
            return found

        def one(v: np.ndarray, /, **kw: Any) -> list[int]:
            query = tbl.search(v).distance_type("dot").limit(K).select(["id"])
            for name, value in kw.items():
                query = getattr(query, name)(value)
            return query.to_arrow().column("id").to_pylist()

        nq_flat = max(5, nq_single // 2)
        row, _ = _measure(lambda b: batch(b), lambda v: one(v), q, nq_flat, truth)
        out["lancedb_flat"] = {"store": "lancedb", "index": "no index (exact scan)", "build_s": build, **row}

        nlist = max(16, 2 ** round(math.log2(math.sqrt(len(x)))))
        t0 = time.perf_counter()
        tbl.create_index(metric="dot", index_type="IVF_PQ", num_partitions=nlist, num_sub_vectors=64)
        index_s = time.perf_counter() - t0
        for label, kw in (
            ("nprobes=32", {"nprobes": 32}),
            ("nprobes=32, refine_factor=10", {"nprobes": 32, "refine_factor": 10}),
        ):
            row, _ = _measure(partial(batch, **kw), partial(one, **kw), q, nq_single, truth)
            key = "lancedb_ivfpq" + ("_refine" if "refine_factor" in kw else "")
            out[key] = {
                "store": "lancedb",
                "index": f"IVF_PQ {nlist} partitions, 64 sub-vectors, {label}",
                "build_s": build + index_s,
                "index_s": index_s,
                **row,
            }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _qdrant(x: np.ndarray, q: np.ndarray, nq_single: int, truth: np.ndarray) -> dict[str, Any]:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    try:
        t0 = time.perf_counter()
        client.create_collection(
            "vectors", vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.DOT)
        )
        client.upload_collection("vectors", vectors=x, ids=list(range(len(x))), batch_size=1000)
        build = time.perf_counter() - t0

        def one(v: np.ndarray) -> list[int]:
            return [int(p.id) for p in client.query_points("vectors", query=v, limit=K).points]

        def batch(vs: np.ndarray) -> list[list[int]]:
            reqs = [models.QueryRequest(query=v.tolist(), limit=K) for v in vs]
            return [[int(p.id) for p in r.points] for r in client.query_batch_points("vectors", requests=reqs)]

        nq_b = min(len(q), max(10, nq_single * 2))  # local mode is slow: fewer queries
        row, _ = _measure(batch, one, q[:nq_b], min(nq_single, nq_b), truth[:nq_b])
        return {
            "qdrant_local": {
                "store": "qdrant-client",
                "index": "local mode :memory: (exact, numpy)",
                "build_s": build,
                **row,
            }
        }
    finally:
        client.close()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    n, dim, nq, nq_single = int(spec["n"]), int(spec["dim"]), int(spec["queries"]), int(spec["queries_single"])
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    gen = Clustered(dim)
    log(f"section e: {n} x {dim} clustered vectors")
    x = gen.base(n)
    q = gen.queries(nq)
    out: dict[str, Any] = {
        "title": f"Vector stores users pick instead, on {n:,} of the same clustered vectors (dim {dim})",
        "status": "done",
        "n": n,
        "dim": dim,
        "queries": nq,
        "queries_single": nq_single,
        "k": K,
        "baseline": "faiss_flat",
        "versions": {p: _version(p) for p in ("faiss-cpu", "lancedb", "pylance", "qdrant-client", "chromadb")},
        "rows": {},
        "skipped": {},
    }
    log("  faiss")
    rows, truth = _faiss(x, q, nq_single)
    out["rows"].update(rows)
    for name, fn in (
        ("lancedb", lambda: _lancedb(x, q, nq_single, truth, work)),
        ("qdrant-client", lambda: _qdrant(x, q, nq_single, truth)),
    ):
        if _version(name) is None:
            out["skipped"][name] = "not installed (pip install -e '.[bench]')"
            continue
        log(f"  {name}")
        try:
            out["rows"].update(fn())
        except Exception as exc:  # a store that fails must not lose the others' figures
            out["skipped"][name] = f"failed: {type(exc).__name__}: {exc}"[:500]
    if _version("chromadb") is None:
        out["skipped"]["chromadb"] = (
            "not installed: its dependencies add uvloop/httptools/watchfiles, which would change "
            "how uvicorn runs the service in a shared environment"
        )
    base = out["rows"]["faiss_flat"]
    for row in out["rows"].values():
        row["build_vs_baseline"] = row["build_s"] / base["build_s"] if base["build_s"] else None
        row["qps_batch_vs_baseline"] = row["qps_batch"] / base["qps_batch"]
        row["qps_single_vs_baseline"] = row["qps_single"] / base["qps_single"]
    return out


def main(argv: list[str]) -> int:
    emit(run(json.loads(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
