"""Section c: FAISS index types on N clustered synthetic vectors of the backbone's dimension.

Run in its own process (`python -m bench.faiss_bench SPEC_JSON`) so memory figures start clean.
The indexes are made by the project's own `indexer.faiss_index` (the ones a bundle holds) and
searched with its `search`, so the figures are the service's. For each type: build time, index
bytes (the serialised size), resident-memory growth, queries/s for a batch of queries and one
query at a time, and recall@10 against exact search, at several operating points.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.common import emit, log, rss_bytes
from bench.synthetic import CHUNK, Clustered
from indexer import faiss_index
from indexer.faiss_index import IndexChoice

K = 10
HNSW_CANDIDATES = [(32, 200), (32, 80), (16, 80), (16, 40), (12, 24)]  # (M, efConstruction); first = project default


class Data:
    """N base vectors cached in one float32 file; read back chunk by chunk into ordinary memory
    (not a memory map, whose resident pages would blur the index's own memory figure)."""

    def __init__(self, gen: Clustered, n: int, work: Path) -> None:
        self.gen, self.n, self.dim = gen, n, gen.dim
        self.path = work / f"synthetic-d{gen.dim}-c{gen.clusters}-r{gen.rank}-s{gen.seed}-n{n}.f32"
        self.generate_s = 0.0
        if not self.path.is_file() or self.path.stat().st_size != n * gen.dim * 4:
            log(f"section c: generating {n} x {gen.dim} clustered vectors -> {self.path}")
            t0 = time.perf_counter()
            tmp = self.path.with_suffix(".part")
            with open(tmp, "wb") as fh:
                for _, block in gen.chunks(n):
                    fh.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
            os.replace(tmp, self.path)
            self.generate_s = time.perf_counter() - t0

    def chunks(self, n: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        n = self.n if n is None else n
        with open(self.path, "rb") as fh:
            for start in range(0, n, CHUNK):
                m = min(CHUNK, n - start)
                yield start, np.fromfile(fh, dtype=np.float32, count=m * self.dim).reshape(m, self.dim)

    def head(self, n: int) -> np.ndarray:
        return np.concatenate([c for _, c in self.chunks(n)])


def _fill(index: faiss.Index, data: Data, n: int | None = None) -> None:
    for start, block in data.chunks(n):
        faiss_index.add(index, block, np.arange(start, start + len(block), dtype=np.int64))


def _index_bytes(index: faiss.Index, work: Path) -> tuple[int, float]:
    """Serialised size (what a bundle's index.faiss takes on disk) and the time to write it."""
    fd, name = tempfile.mkstemp(suffix=".faiss", dir=work)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        faiss_index.write(index, name)
        return os.path.getsize(name), time.perf_counter() - t0
    finally:
        os.unlink(name)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def _search_point(
    index: faiss.Index, q: np.ndarray, nq_single: int, params: dict[str, Any], truth: np.ndarray | None
) -> tuple[dict[str, Any], np.ndarray]:
    t0 = time.perf_counter()
    _, ids = faiss_index.search(index, q, K, params)
    batch_s = time.perf_counter() - t0
    single = q[:nq_single]
    threads = faiss.omp_get_max_threads()
    single_s: dict[int, float] = {}
    for omp in sorted({threads, 1}, reverse=True):  # one query at a time, as a service answers them
        faiss.omp_set_num_threads(omp)
        t0 = time.perf_counter()
        for i in range(len(single)):
            faiss_index.search(index, single[i : i + 1], K, params)
        single_s[omp] = time.perf_counter() - t0
    faiss.omp_set_num_threads(threads)
    row = {
        "qps_batch": len(q) / batch_s,
        "qps_single": len(single) / single_s[threads],
        "latency_ms_single": 1000 * single_s[threads] / len(single),
        "qps_single_1thread": len(single) / single_s[1],
        "queries_batch": len(q),
        "queries_single": len(single),
    }
    row["recall_at_10"] = 1.0 if truth is None else _recall(ids, truth)
    return row, ids


def _build(name: str, make, data: Data, work: Path) -> tuple[faiss.Index, dict[str, Any]]:
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index, extra = make()
    build_s = time.perf_counter() - t0
    rss1 = rss_bytes()
    nbytes, write_s = _index_bytes(index, work)
    log(f"  {name}: built in {build_s:.1f}s, {nbytes / 1e6:.0f} MB")
    return index, {
        "build_s": build_s,
        "index_bytes": nbytes,
        "rss_delta_bytes": max(0, rss1 - rss0),
        "write_s": write_s,
        "vectors": int(index.ntotal),
        **extra,
    }


def choose_hnsw(data: Data, budget_s: float, probe_n: int) -> tuple[int, int, list[dict[str, Any]]]:
    """The first (M, efConstruction) whose projected build time for all N fits the budget,
    projected from the insertion rate on a probe subset (insertion cost grows ~ log n)."""
    sample = data.head(min(probe_n, data.n))
    probes = []
    for m, efc in HNSW_CANDIDATES:
        index = faiss_index.new_index(IndexChoice("hnsw", {"M": m, "efConstruction": efc, "efSearch": 64}), data.dim)
        t0 = time.perf_counter()
        faiss_index.add(index, sample, np.arange(len(sample), dtype=np.int64))
        rate = len(sample) / (time.perf_counter() - t0)
        projected = data.n / rate * (math.log(max(data.n, 2)) / math.log(max(len(sample), 2)))
        probes.append(
            {
                "M": m,
                "efConstruction": efc,
                "probe_vectors": len(sample),
                "probe_rate_per_s": rate,
                "projected_build_s": projected,
            }
        )
        log(f"  hnsw probe M={m} efC={efc}: {rate:.0f} vectors/s, {data.n} projected {projected:.0f}s")
        del index
        if projected <= budget_s:
            return m, efc, probes
    return HNSW_CANDIDATES[-1][0], HNSW_CANDIDATES[-1][1], probes


def ivf_nlist(n: int) -> int:
    """A power of two near sqrt(n): k-means training stays within minutes on 2 cores.
    (indexer.faiss_index.choose_index asks for ~4 sqrt(n) lists trained on up to 256 per list,
    which at 1M vectors of 1280 dims is about an hour of k-means here.)"""
    return max(16, 2 ** round(math.log2(max(math.sqrt(n), 1))))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    n, dim, nq, nq_single = int(spec["n"]), int(spec["dim"]), int(spec["queries"]), int(spec["queries_single"])
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    gen = Clustered(dim)
    data = Data(gen, n, work)
    queries = gen.queries(nq)
    out: dict[str, Any] = {
        "title": f"FAISS index types on {n:,} clustered synthetic vectors (dim {dim})",
        "status": "done",
        "n": n,
        "dim": dim,
        "queries": nq,
        "queries_single": nq_single,
        "k": K,
        "data": {
            "generator": "bench.synthetic.Clustered",
            "clusters": gen.clusters,
            "rank": gen.rank,
            "spread": gen.spread,
            "noise": gen.noise,
            "seed": gen.seed,
            "generate_s": data.generate_s,
            "raw_bytes": n * dim * 4,
        },
        "omp_threads": faiss.omp_get_max_threads(),
        "baseline": "flat",
        "indexes": {},
    }

    # flat: exact search, the baseline and the ground truth
    def make_flat():
        index = faiss_index.new_index(IndexChoice("flat"), dim)
        _fill(index, data)
        return index, {"params": {}}

    log("section c: flat")
    index, info = _build("flat", make_flat, data, work)
    point, truth = _search_point(index, queries, max(10, nq_single // 2), {}, None)
    info["points"] = [{"setting": "exact", **point}]
    out["indexes"]["flat"] = info
    del index
    gc.collect()

    # HNSW
    log("section c: hnsw")
    m, efc, probes = choose_hnsw(data, float(spec["hnsw_budget_s"]), int(spec["hnsw_probe_n"]))

    def make_hnsw():
        index = faiss_index.new_index(IndexChoice("hnsw", {"M": m, "efConstruction": efc, "efSearch": 64}), dim)
        _fill(index, data)
        return index, {"params": {"M": m, "efConstruction": efc}, "probes": probes}

    index, info = _build("hnsw", make_hnsw, data, work)
    info["points"] = []
    for ef in (16, 64, 256):
        point, _ = _search_point(index, queries, nq_single, {"efSearch": ef}, truth)
        info["points"].append({"setting": f"efSearch={ef}", **point})
    out["indexes"]["hnsw"] = info
    del index
    gc.collect()

    # IVF: one k-means for both codecs (the second index gets the first one's centroids)
    nlist = ivf_nlist(n)
    train_n = min(n, max(40 * nlist, 10_000))  # PQ's 256 centroids per sub-vector want ~10k points
    training = gen.sample(train_n)
    pq_m = min(int(spec.get("pq_m", 64)), dim)
    while dim % pq_m:  # PQ needs sub-vectors of equal length
        pq_m -= 1
    centroids: list[np.ndarray] = []
    for codec in ("sq8", "pq"):
        log(f"section c: ivf-{codec}")
        params: dict[str, Any] = {"nlist": nlist, "codec": codec, "nprobe": 32, "train_size": train_n}
        if codec == "pq":
            params.update(m=pq_m, nbits=8)

        def make_ivf(params=params, codec=codec):
            t0 = time.perf_counter()
            if not centroids:
                index = faiss_index.new_index(IndexChoice("ivf", params), dim, training)
                ivf = faiss.extract_index_ivf(index)
                centroids.append(ivf.quantizer.reconstruct_n(0, ivf.nlist))
            else:  # same as new_index, with the coarse quantizer given instead of trained again
                # "np": no polysemous training (a slow code reordering that search does not use
                # unless polysemous_ht is set; index_factory does it by default for IVF-PQ)
                index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x8np", faiss.METRIC_INNER_PRODUCT)
                ivf = faiss.extract_index_ivf(index)
                ivf.quantizer.add(centroids[0])
                index.train(training)
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            train_s = time.perf_counter() - t0
            _fill(index, data)
            return index, {
                "params": params,
                "train_s": train_s,
                "note": ""
                if codec == "sq8"
                else "coarse centroids reused from ivf_sq8 (train_s excludes that k-means)",
            }

        index, info = _build(f"ivf_{codec}", make_ivf, data, work)
        info["points"] = []
        for nprobe in (8, 32, 128):
            point, _ = _search_point(index, queries, nq_single, {"nprobe": min(nprobe, nlist)}, truth)
            info["points"].append({"setting": f"nprobe={min(nprobe, nlist)}", **point})
        out["indexes"][f"ivf_{codec}"] = info
        del index
        gc.collect()

    flat = out["indexes"]["flat"]
    fq_b, fq_s = flat["points"][0]["qps_batch"], flat["points"][0]["qps_single"]
    for info in out["indexes"].values():
        info["build_vs_flat"] = info["build_s"] / flat["build_s"] if flat["build_s"] else None
        info["bytes_vs_flat"] = info["index_bytes"] / flat["index_bytes"]
        for p in info["points"]:
            p["qps_batch_vs_flat"] = p["qps_batch"] / fq_b
            p["qps_single_vs_flat"] = p["qps_single"] / fq_s
    if not spec.get("keep_data"):
        data.path.unlink(missing_ok=True)
    return out


def main(argv: list[str]) -> int:
    emit(run(json.loads(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
