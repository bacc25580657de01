"""Property-based run over the OpenAPI schema (schemathesis) against a live server: never a 5xx.

Besides `not_a_server_error`, the answers must match what /openapi.json documents (status codes,
content types, bodies, headers) and invalid input must be refused. Half of the generated image
ids are real ones, so the id routes are exercised past their 404s too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from service_helpers import LiveServer, class_image, settings_for, tiny_bundle

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,negative_data_rejection"
)


def schemathesis_cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("schemathesis")
    assert found, "schemathesis is missing: it is in the dev extra (pip install -e '.[dev]')"
    return [found]


def test_openapi_property_based_run_finds_no_server_error(tmp_path):
    cli = schemathesis_cli()
    b = tiny_bundle(tmp_path)
    settings = settings_for(b["index"], max_upload_bytes=100_000, max_pixels=1_000_000, max_batch_files=4)
    with LiveServer(settings) as server:
        with httpx.Client(base_url=server.url) as c:
            hits = c.post("/search", files={"file": ("q.jpg", class_image(0), "image/jpeg")}, params={"k": 15})
            ids = [h["id"] for h in hits.json()["results"]]
        config = tmp_path / "schemathesis.toml"
        config.write_text(
            f"[dictionaries.ids]\nvalues = {json.dumps(ids)}\n\n"
            '[parameters]\n"path.image_id" = { dictionary = "ids", probability = 0.5 }\n'
        )
        cmd = [
            *cli,
            "--config-file",
            str(config),
            "--no-color",
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--seed",
            "7",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/healthz").status_code == 200  # still up after the run
            metrics = c.get("/metrics").text
    output = proc.stdout + proc.stderr
    print(output[-5000:])
    assert proc.returncode == 0, output[-8000:]
    assert "14 selected" in output and " passed" in output, output[-4000:]
    server_errors = [
        ln for ln in metrics.splitlines() if ln.startswith("imgsearch_http_requests_total") and 'status="5' in ln
    ]
    assert server_errors == []
