"""`python -m loadtest --quick`: the load test itself runs, passes and writes its report.

The real run (`make loadtest`: 60 s, 16 clients, the embedded model on the demo corpus) writes
loadtest/results/report.md; this quick one uses the tiny model so that it takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

from service_helpers import REPO
from tiny_model import make_corpus, make_tiny_model


def test_quick_load_test_passes_and_reports(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=3, per_class=5)
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "--quick",
            "--model",
            str(model),
            "--images",
            str(images),
            "--out",
            str(out),
            "--server-env",
            "IMGSEARCH_THREADS=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["failures"] == []
    totals = report["totals"]
    assert totals["status_5xx"] == 0 and totals["lost_writes"] == 0 and totals["unexpected_status"] == 0
    assert totals["acked_adds"] > 0 and totals["acked_deletes"] > 0
    assert [p["ends_with"] for p in report["phases"]] == ["SIGTERM", "SIGKILL"]
    for phase in report["phases"]:
        assert phase["routes"]["search"]["latency"]["count"] > 0 and "p99_ms" in phase["latency_all"]
    for check in report["verification"]:
        assert check["missing_adds"] == 0 and check["resurrected_deletes"] == 0 and check["count_ok"]
        assert check["adds_searched"] > 0 and check["adds_not_found_by_search"] == 0
    md = (out / "report.md").read_text()
    assert "**PASS**" in md and "| sigkill |" in md and "p99" in md


def test_load_test_refuses_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--clients", "0"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "must be positive" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--quick", "--model", str(REPO / "no-such-model")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "not an exported model" in proc.stderr
