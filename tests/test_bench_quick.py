"""`python -m bench` in its tiniest mode: sections a and c on a few images, a tiny model and a
few thousand vectors. Checks the shape of report.json and that every figure is a positive number."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    model = make_tiny_model(tmp / "model")
    out = tmp / "results"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--sections",
        "a,c,f",
        "--auto-n",
        "3000",
        "--auto-dims",
        "32",
        "--auto-extra",
        "ivf:pq:8@32",
        "--model",
        str(model),
        "--work",
        str(tmp / "work"),
        "--out",
        str(out),
        "--copies",
        "1",
        "--no-keras",
        "--faiss-n",
        "2000",
        "--faiss-queries",
        "50",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), out


def test_report_structure(quick_report):
    report, md, _ = quick_report
    assert report["mode"] == "quick"
    m = report["machine"]
    assert m["cpu"] and _positive(m["cores"]) and _positive(m["ram_bytes"]) and m["os"]
    for pkg in ("python", "numpy", "onnxruntime", "faiss-cpu", "pillow"):
        assert report["versions"][pkg], pkg
    assert list(report["sections"]) == ["a", "b", "c", "d", "e", "f"]
    assert report["sections"]["b"]["status"] == "not run" and report["sections"]["d"]["status"] == "not run"
    assert report["sections"]["e"]["status"] == "not run"
    for heading in (
        "## Machine",
        "## Targets",
        "## a. Corpus embedding",
        "## b. Search over HTTP",
        "## c. FAISS index types",
        "## f. What `--index-type auto` builds",
        "(baseline)",
    ):
        assert heading in md, heading


def test_section_a_figures(quick_report):
    report, _, _ = quick_report
    a = report["sections"]["a"]
    assert a["status"] == "done" and a["baseline"] == "keras_tfdata" and a["ceiling"] == "ort_inference"
    small = a["corpora"]["small"]
    assert small["stats"]["images"] == 19
    rows = small["rows"]
    for key in ("indexer", "ort_inference"):
        row = rows[key]
        assert _positive(row["images_per_s"]) and _positive(row["seconds"]), row
        assert _positive(row["vs_ceiling"])
    assert rows["indexer"]["images"] == 19
    assert all(_positive(v["images_per_s"]) for v in rows["ort_inference"]["by_batch"].values())
    assert "skipped" in rows["keras_tfdata"]  # --no-keras
    cos = small["cosine"]["gap2.0"]  # the tiny model is no semantic model: only the range is checked here
    assert 0.0 < cos["min"] <= cos["mean"] <= 1.0 + 1e-5 and cos["drafted"] >= 0
    names = [t["name"] for t in report["targets"]]
    assert any("onnxruntime" in n for n in names) and any("draft" in n for n in names)
    assert all(isinstance(t["reached"], bool) for t in report["targets"])


def test_section_c_figures(quick_report):
    report, _, _ = quick_report
    c = report["sections"]["c"]
    assert c["status"] == "done" and c["n"] == 2000 and c["baseline"] == "flat"
    assert set(c["indexes"]) == {"flat", "hnsw", "ivf_sq8", "ivf_pq"}
    for name, info in c["indexes"].items():
        assert _positive(info["build_s"]) and _positive(info["index_bytes"]) and info["vectors"] == 2000, name
        points = info["points"]
        assert len(points) == (1 if name == "flat" else 3)
        for p in points:
            for key in ("qps_batch", "qps_single", "qps_single_1thread", "latency_ms_single", "qps_batch_vs_flat"):
                assert _positive(p[key]), (name, key, p)
            assert 0.0 <= p["recall_at_10"] <= 1.0
    assert c["indexes"]["flat"]["points"][0]["recall_at_10"] == 1.0
    assert c["indexes"]["hnsw"]["points"][-1]["recall_at_10"] >= 0.9  # efSearch=256 on 2000 vectors


def test_merge_keeps_other_sections(quick_report, tmp_path):
    """A later run of one section (the lead's b) can be merged into the report."""
    report, _, _out = quick_report
    target = tmp_path / "results"
    target.mkdir()
    (target / "report.json").write_text(json.dumps(report))
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--sections",
        "b",
        "--merge",
        "--out",
        str(target),
        "--work",
        str(tmp_path / "w"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((target / "report.json").read_text())
    assert merged["sections"]["a"]["status"] == "done" and merged["sections"]["a"]["from_run"] == report["generated_at"]
    assert merged["sections"]["c"]["status"] == "done"
    assert merged["targets"]  # recomputed from the kept section a


def test_section_f_builds_what_auto_picks_and_a_refined_ivf(quick_report):
    report, _, _ = quick_report
    f = report["sections"]["f"]
    assert f["status"] == "done"
    auto, refined = f["rows"]
    assert auto["requested"] == "auto" and auto["type"] == "flat" and auto["recall_at_10"] == 1.0  # 3,000 < 50k
    assert refined["type"] == "ivf" and refined["params"]["codec"] == "pq" and refined["params"]["refine"] == 8
    for row in (auto, refined):
        assert row["n"] == 3000 and row["dim"] == 32
        assert _positive(row["build_s"]) and _positive(row["qps_single_1thread"]) and _positive(row["index_mib"])
    assert refined["recall_at_10"] >= 0.9, refined  # PQ codes alone rank far worse; the float re-scoring fixes it
