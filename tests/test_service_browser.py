"""The web page in headless Chromium (Debian's package), with the real embedded model.

A demo query photo is uploaded through the page's file input; the neighbours' thumbnails must
load and show the photo's class; clicking one searches by it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from indexer.build import build_index
from service_helpers import LiveServer, settings_for

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUERY_CLASS = "chelsea"  # the cat photo of scikit-image
K = 8

ALL_THUMBNAILS_LOADED = """(k) => {
  const imgs = [...document.querySelectorAll('#results .hit img.thumb')];
  return imgs.length === k && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory, default_model, demo_corpus) -> Path:
    index = tmp_path_factory.mktemp("svc-browser") / "index"
    build_index(default_model, demo_corpus / "images", index, progress=False, device="cpu")
    return index


def test_upload_a_photo_on_the_page_and_see_its_neighbours(tmp_path, real_bundle, demo_corpus):
    from playwright import sync_api

    assert CHROMIUM.is_file(), "Debian's chromium is missing: `make test` installs it (apt-get)"
    queries = sorted((demo_corpus / "queries" / QUERY_CLASS).glob("*.jpg"))
    assert queries, f"no demo queries for {QUERY_CLASS}"
    query = queries[0]

    with LiveServer(settings_for(real_bundle, threads=2)) as server, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            console_errors: list[str] = []
            page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
            page.on("response", lambda r: console_errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(server.url + "/")
            page.wait_for_function("() => /\\d+ images/.test(document.getElementById('stats').textContent)")
            page.fill("#k", str(K))
            page.set_input_files("#file-input", str(query))
            page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=K, timeout=60_000)

            labels = page.locator("#results .hit .label").all_text_contents()
            scores = [float(s) for s in page.locator("#results .hit .score").all_text_contents()]
            assert labels[0] == QUERY_CLASS and labels.count(QUERY_CLASS) >= K // 2, labels
            assert scores == sorted(scores, reverse=True) and scores[0] > 0.5
            assert QUERY_CLASS in (page.locator("#predicted").text_content() or "")
            assert query.name in (page.locator("#status").text_content() or "")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            shutil.copy(tmp_path / "page.png", Path("/tmp") / "imgsearch_page.png")

            # click a neighbour: the page searches by that image (itself left out)
            first_path = (page.locator("#results .hit").first.get_attribute("title") or "").split("\n")[0]
            page.locator("#results .hit").first.click()
            page.wait_for_function("(p) => document.getElementById('status').textContent.includes(p)", arg=first_path)
            page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=K, timeout=60_000)
            titles = [
                t.split("\n")[0] for t in page.locator("#results .hit").evaluate_all("els => els.map(e => e.title)")
            ]
            assert first_path not in titles
            assert page.locator("#results .hit .label").first.text_content() == QUERY_CLASS
            assert console_errors == []

            # the API docs page renders from the service's own files (no CDN, no internet)
            page.goto(server.url + "/docs")
            page.wait_for_selector("[data-path='/search/batch']", timeout=30_000)
            page.screenshot(path=str(Path("/tmp") / "imgsearch_docs.png"))
        finally:
            context.close()
