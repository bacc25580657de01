"""deploy/reload.py, the last step of every reindex job (compose, CronJob, RayJob).

Against the real service: a tiny real bundle built with `build_index`, served by `create_app`
under uvicorn on a free port; a rebuild writes a new bundle version and reload.py makes the
running service switch to it, as the reindex jobs do. Retries and unreachable services against a
small stub server.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import uvicorn

from deploy import reload as rl
from indexer.build import build_index
from service.app import create_app
from service.settings import Settings
from tiny_model import make_corpus, make_tiny_model

API_KEY = "deploy-test-key-0123"


class _Served:
    def __init__(self, settings: Settings) -> None:
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on", log_config=None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "the service stopped during start-up"
            assert time.monotonic() < deadline, "the service did not start in 60 s"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_reindex_then_reload_switches_the_running_service(tmp_path, monkeypatch, capsys):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=2, per_class=3)
    index = tmp_path / "bundles" / "default"
    build_index(model, images, index, progress=False)
    settings = Settings(index=index, api_key=API_KEY)
    with _Served(settings) as url:
        before = _get_json(f"{url}/readyz")
        assert before["count"] == 6
        # the reindex job: more images, an incremental build into the same folder, then the reload
        make_corpus(tmp_path / "more", classes=1, per_class=4, seed=5)
        (tmp_path / "more" / "class_0").rename(images / "class_new")
        build_index(model, images, index, progress=False)
        assert _get_json(f"{url}/readyz")["version"] == before["version"]  # not yet: no watcher here

        monkeypatch.setenv(rl.API_KEY_ENV, API_KEY)
        rc = rl.main(["--url", url, "--all-addresses", "--retries", "0"])
        out = capsys.readouterr()
        assert rc == 0, out
        line = json.loads(out.out.splitlines()[0])
        assert line["ok"] and line["target"].endswith("/admin/reload") and line["detail"].startswith("200")
        after = _get_json(f"{url}/readyz")
        assert after["count"] == 10 and after["version"] != before["version"]

        # a wrong key is refused by the service: exit 1, and a 4xx is not retried
        monkeypatch.setenv(rl.API_KEY_ENV, "wrong-key-wrong-key")
        t0 = time.monotonic()
        assert rl.main(["--url", url, "--retries", "3", "--backoff", "2"]) == 1
        assert time.monotonic() - t0 < 2
        assert '"ok": false' in capsys.readouterr().out


class _Stub(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[list[int]] = []
    seen: ClassVar[list[tuple[str, str, str | None, str | None]]] = []

    def do_POST(self) -> None:
        type(self).seen.append((self.command, self.path, self.headers.get(rl.API_KEY_HEADER), self.headers.get("Host")))
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        body = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def stub():
    _Stub.statuses, _Stub.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_5xx_is_retried_and_the_key_and_host_are_sent(stub, monkeypatch):
    monkeypatch.setenv(rl.API_KEY_ENV, API_KEY)
    _Stub.statuses = [503, 503]
    port = stub.server_address[1]
    outcomes = rl.reload_all(
        f"http://127.0.0.1:{port}", all_addresses=True, api_key=API_KEY, timeout=5, retries=3, backoff=0.01
    )
    assert [o.ok for o in outcomes] == [True]
    assert len(_Stub.seen) == 3
    assert all(s == ("POST", "/admin/reload", API_KEY, f"127.0.0.1:{port}") for s in _Stub.seen)


def test_no_key_sends_no_header(stub, monkeypatch):
    monkeypatch.delenv(rl.API_KEY_ENV, raising=False)
    assert rl.main(["--url", f"http://127.0.0.1:{stub.server_address[1]}"]) == 0
    assert _Stub.seen[0][2] is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_running_is_an_error_unless_skipped():
    url = f"http://127.0.0.1:{_closed_port()}"
    assert rl.main(["--url", url, "--retries", "1", "--backoff", "0.01"]) == 1
    assert rl.main(["--url", url, "--retries", "0", "--skip-unreachable"]) == 0
    # a headless Service with no ready pod has no addresses at all
    assert rl.resolve_all("no-such-host.invalid", 8000) == []
    assert rl.main(["--url", "http://no-such-host.invalid:8000", "--all-addresses", "--skip-unreachable"]) == 0
    assert rl.main(["--url", "http://no-such-host.invalid:8000", "--all-addresses"]) == 1
    assert rl.main(["--url", "ftp://x"]) == 2


def test_reload_path_and_header_are_the_services(tmp_path):
    from deploy.validate.common import RELOAD_SCRIPT_SRC
    from deploy.validate.facts import service_facts

    facts = service_facts()
    assert "POST" in facts.routes[rl.RELOAD_PATH]
    assert facts.api_key_header == rl.API_KEY_HEADER
    assert rl.API_KEY_ENV in facts.settings_fields
    assert Path(rl.__file__).name == Path(RELOAD_SCRIPT_SRC).name
