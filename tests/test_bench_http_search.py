"""The HTTP search benchmark end to end in its quick mode: real servers, a real load generator."""

from __future__ import annotations

import json

from bench.http_search import render_markdown, run_http_search_bench
from tiny_model import make_corpus, make_tiny_model


def test_the_quick_http_bench_measures_both_batching_settings_without_errors(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "data" / "images", classes=3, per_class=4)
    make_corpus(tmp_path / "data" / "queries", classes=3, per_class=2, variant=1)

    result = run_http_search_bench(model, images, tmp_path / "out", quick=True)

    cfg = result["config"]
    assert cfg["quick"] and cfg["n_vectors"] == 2_000 and cfg["n_real"] == 12
    assert cfg["concurrencies"] == [1, 4]
    assert result["index"]["type"] == "flat"  # what `auto` picks at 2k vectors
    runs = {(r["batching"], r["concurrency"]): r for r in result["runs"]}
    assert set(runs) == {(False, 1), (False, 4), (True, 1), (True, 4)}
    for r in runs.values():
        assert r["errors"] == 0, r["error_samples"]
        assert r["requests"] > 0 and r["qps"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["server_cpu_ms_per_query"] > 0
    assert runs[(True, 1)]["mean_batch"] == 1.0 and runs[(False, 4)]["mean_batch"] is None
    assert set(result["batching_gain"]) == {"1", "4"}
    mem = result["memory"]
    assert mem["rss_start_mib"] > 0 and mem["rss_start_small_mib"] > 0 and "per_100k_mib" in mem
    assert result["targets"]["batching_on"]["errors"] == 0
    saved = json.loads((tmp_path / "out" / "http_search.json").read_text())
    assert saved["runs"] == result["runs"]
    md = render_markdown(result)
    assert "| on | 4 |" in md and "| off | 1 |" in md and "MiB per 100k vectors" in md

    # A second run reuses the bundles it built.
    again = run_http_search_bench(
        model, images, tmp_path / "out", quick=True, batching=(True,), concurrencies=(2,), memory_baseline=False
    )
    assert again["bundle"]["reused"] and [r["concurrency"] for r in again["runs"]] == [2]
