"""The HTTP API against a real uvicorn server on a free port: every endpoint and every error."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service_helpers import LiveServer, class_image, jpeg, metric_value, png, settings_for, tiny_bundle
from tiny_model import pattern_image

MAX_UPLOAD = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict[str, Path]:
    return tiny_bundle(tmp_path_factory.mktemp("svc-api"))


@pytest.fixture(scope="module")
def server(bundle):
    settings = settings_for(bundle["index"], max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_batch_files=4)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def upload(data: bytes, name: str = "q.jpg", content_type: str = "image/jpeg") -> dict:
    return {"file": (name, data, content_type)}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"error", "detail"} and body["detail"], body
    if code is not None:
        assert body["error"] == code, body
    return body


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header announces width x height pixels (a decompression bomb)."""
    data = png(Image.new("RGB", (4, 4), (10, 20, 30)))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


# ---------------------------------------------------------------------------------- search


def test_search_returns_neighbours_of_the_query_class_best_first(client):
    r = client.post("/search", files=upload(class_image(1)), params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "predicted_label", "label_vote", "model", "took_ms"}
    results = body["results"]
    assert len(results) == 5
    assert [h["label"] for h in results] == ["class_1"] * 5
    scores = [h["score"] for h in results]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert scores[0] > 0.9
    assert all(h["path"].startswith("class_1/") and h["image_url"] == f"/images/{h['id']}/file" for h in results)
    assert body["predicted_label"] == "class_1"
    vote = body["label_vote"]  # all 5 neighbours are class_1: the whole vote, at their mean score
    assert vote["label"] == "class_1" and vote["share"] == pytest.approx(1.0)
    assert vote["mean_score"] == pytest.approx(sum(scores) / 5, abs=1e-6)
    assert body["model"].startswith("tiny@") and body["took_ms"] > 0


def test_search_default_k_label_filter_and_min_score(client):
    r = client.post("/search", files=upload(class_image(0)))
    assert len(r.json()["results"]) == 10  # default k
    r = client.post("/search", files=upload(class_image(0)), params={"k": 50, "label": "class_2"})
    body = r.json()
    assert len(body["results"]) == 5 and {h["label"] for h in body["results"]} == {"class_2"}
    r = client.post("/search", files=upload(class_image(0)), params={"k": 50, "min_score": 0.9})
    assert {h["label"] for h in r.json()["results"]} == {"class_0"}
    r = client.post("/search", files=upload(class_image(0)), params={"label": "no-such-label"})
    assert r.status_code == 200 and r.json()["results"] == [] and r.json()["predicted_label"] is None


def test_search_ignores_the_declared_content_type(client):
    r = client.post("/search", files=upload(png(pattern_image(2)), name="x.txt", content_type="text/plain"))
    assert r.status_code == 200 and r.json()["predicted_label"] == "class_2"


def test_batch_search_answers_each_file_in_order(client):
    files = [("files", (f"q{c}.jpg", class_image(c), "image/jpeg")) for c in (2, 0, 1)]
    r = client.post("/search/batch", files=files, params={"k": 3})
    assert r.status_code == 200, r.text
    queries = r.json()["queries"]
    assert [q["filename"] for q in queries] == ["q2.jpg", "q0.jpg", "q1.jpg"]
    assert [q["predicted_label"] for q in queries] == ["class_2", "class_0", "class_1"]
    assert all(len(q["results"]) == 3 for q in queries)


def test_batch_search_errors_name_the_file(client):
    files = [
        ("files", ("good.jpg", class_image(0), "image/jpeg")),
        ("files", ("bad.jpg", b"not an image", "image/jpeg")),
    ]
    body = assert_error(client.post("/search/batch", files=files), 415, "unsupported_image")
    assert "file 2 (bad.jpg)" in body["detail"]
    too_many = [("files", (f"q{i}.jpg", class_image(0), "image/jpeg")) for i in range(5)]
    assert_error(client.post("/search/batch", files=too_many), 413, "too_many_files")


def test_similar_excludes_the_image_itself(client):
    first = client.post("/search", files=upload(class_image(2)), params={"k": 1}).json()["results"][0]
    r = client.get(f"/images/{first['id']}/similar", params={"k": 4})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4 and first["id"] not in {h["id"] for h in results}
    assert {h["label"] for h in results} == {"class_2"} and r.json()["predicted_label"] == "class_2"


# ---------------------------------------------------------------------------------- images


def test_image_metadata_file_and_thumbnail(client, bundle):
    hit = client.post("/search", files=upload(class_image(0)), params={"k": 1}).json()["results"][0]
    meta = client.get(f"/images/{hit['id']}").json()
    assert meta["id"] == hit["id"] and meta["path"] == hit["path"] and meta["label"] == "class_0"
    assert meta["origin"] == "corpus" and meta["width"] == 64 and meta["height"] == 64
    r = client.get(meta["image_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (bundle["images"] / meta["path"]).read_bytes()
    r = client.get(meta["image_url"], params={"size": 32})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 32
    assert_error(client.get(meta["image_url"], params={"size": 5000}), 422)


def test_unknown_ids_get_404(client):
    for r in (
        client.get("/images/12345"),
        client.get("/images/12345/file"),
        client.get("/images/12345/file?size=64"),
        client.get("/images/12345/similar"),
        client.delete("/images/12345"),
    ):
        assert_error(r, 404, "not_found")


def test_files_are_served_only_by_id(client):
    for path in ("/images/..%2F..%2Fetc%2Fpasswd/file", "/images/-1/file", "/images/99999999999999999999/file"):
        assert client.get(path).status_code in (404, 422)
    r = client.get("/images/12345/file", params={"path": "/etc/passwd"})
    assert_error(r, 404)


def test_add_search_and_delete_an_image(client, bundle):
    new = jpeg(pattern_image(777, 64, noise=5.0, noise_seed=1))
    before = client.get("/stats").json()["count"]
    r = client.post("/images", files=upload(new, "new.jpg"), data={"label": "newcomer"})
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["label"] == "newcomer" and added["count"] == before + 1 and not added["replaced"]
    assert added["path"].startswith("uploads/") and added["version"]
    r = client.post("/search", files=upload(new), params={"k": 3})
    top = r.json()["results"][0]
    assert top["id"] == added["id"] and top["score"] > 0.999 and top["label"] == "newcomer"
    meta = client.get(f"/images/{added['id']}").json()
    assert meta["origin"] == "upload" and meta["sha256"]
    assert client.get(added["image_url"]).content == new
    assert client.post("/images", files=upload(new), data={"label": "newcomer"}).json()["replaced"] is True
    r = client.delete(f"/images/{added['id']}")
    assert r.status_code == 200 and r.json()["deleted"] and r.json()["count"] == before
    assert_error(client.get(f"/images/{added['id']}"), 404)
    ids = [h["id"] for h in client.post("/search", files=upload(new), params={"k": 20}).json()["results"]]
    assert added["id"] not in ids


def test_add_rejects_bad_input(client):
    assert_error(client.post("/images", files=upload(jpeg(pattern_image(5))[:400])), 400, "bad_image")
    assert_error(client.post("/images", files=upload(b"plain text here", "a.jpg")), 415)
    assert_error(client.post("/images", files=upload(class_image(0)), data={"label": "x" * 201}), 422)
    assert_error(client.post("/images", data={"label": "x"}), 422)


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"hello, I am text", 415, "unsupported_image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", 415, "unsupported_image"),
        (b"", 400, "empty_file"),
        (jpeg(pattern_image(1))[:300], 400, "bad_image"),
    ],
    ids=["text", "pdf", "empty", "truncated-jpeg"],
)
def test_bytes_that_are_not_a_usable_image(client, data, status, code):
    body = assert_error(client.post("/search", files=upload(data, "photo.jpg", "image/jpeg")), status, code)
    assert "photo.jpg" in body["detail"]


def test_too_many_pixels_is_refused_from_the_header(client):
    bomb = png_header_claiming(50_000, 50_000)  # 2.5 gigapixels announced in a few bytes
    assert len(bomb) < 200
    body = assert_error(client.post("/search", files=upload(bomb, "bomb.png", "image/png")), 413, "too_many_pixels")
    assert "pixels" in body["detail"]
    big = png(Image.new("RGB", (1100, 1000), (200, 10, 10)))  # over MAX_PIXELS, small in bytes
    assert len(big) < MAX_UPLOAD
    assert_error(client.post("/search", files=upload(big, "big.png", "image/png")), 413, "too_many_pixels")


def test_uploads_over_the_size_limit_get_413(client):
    huge = b"\xff\xd8" + bytes(MAX_UPLOAD * 3)
    assert_error(client.post("/search", files=upload(huge)), 413, "too_large")  # refused from Content-Length
    just_over = b"\xff\xd8" + bytes(MAX_UPLOAD)  # body under the form limit, the file over the file limit
    assert_error(client.post("/search", files=upload(just_over)), 413, "file_too_large")
    assert_error(client.post("/images", files=upload(huge)), 413)


def test_a_chunked_body_is_cut_off_at_the_limit(client):
    boundary = "testboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body():  # no Content-Length: the server must count while it reads
        yield head
        for _ in range(40):
            yield bytes(64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/search", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(r, 413, "too_large")


@pytest.mark.parametrize(
    "params",
    [{"k": 0}, {"k": 1001}, {"k": "ten"}, {"min_score": 2}, {"label": ""}],
    ids=["k0", "k1001", "k-text", "min-score", "empty-label"],
)
def test_bad_parameters_get_422(client, params):
    body = assert_error(client.post("/search", files=upload(class_image(0)), params=params), 422, "invalid_request")
    assert body["errors"] and body["errors"][0]["loc"][0] == "query"


def test_k_out_of_range_on_similar_and_missing_file(client):
    hit = client.post("/search", files=upload(class_image(0)), params={"k": 1}).json()["results"][0]
    assert_error(client.get(f"/images/{hit['id']}/similar", params={"k": 1001}), 422)
    body = assert_error(client.post("/search"), 422)
    assert "file" in body["detail"]


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/no/such/thing"), 404, "not_found")
    assert_error(client.put("/search"), 405, "method_not_allowed")


# -------------------------------------------------------------------------------- ops, docs


def test_health_ready_and_stats(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["count"] >= 15
    stats = client.get("/stats").json()
    assert stats["dimension"] == 16 and stats["index_type"] == "flat" and stats["count"] >= 15
    assert stats["model"]["backbone"] == "tiny" and stats["model"]["device"] == "cpu"
    assert stats["bundle_version"] == ready["version"]
    assert stats["labels"]["class_0"] == 5


def test_metrics_count_requests_and_stage_times(client):
    client.post("/search", files=upload(class_image(0)))
    client.get("/images/1")
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    # (... or 0): metric_value is None for a missing sample
    assert (metric_value(text, "imgsearch_http_requests_total", route="/search", method="POST", status="200") or 0) >= 1
    assert (
        metric_value(text, "imgsearch_http_requests_total", route="/images/{image_id}", method="GET", status="404") or 0
    ) >= 1
    assert (
        metric_value(text, "imgsearch_http_request_duration_seconds_bucket", route="/search", method="POST", le="+Inf")
        or 0
    ) >= 1
    assert (metric_value(text, "process_resident_memory_bytes") or 0) > 0  # the standard process collector
    for name in ("imgsearch_embed_seconds_count", "imgsearch_search_seconds_count", "imgsearch_decode_seconds_count"):
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert float(line.split()[-1]) >= 1
    assert "imgsearch_index_images " in text and "imgsearch_bundle_info{" in text


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    expected = {
        ("/search", "post"),
        ("/search/batch", "post"),
        ("/images/{image_id}/similar", "get"),
        ("/images/{image_id}", "get"),
        ("/images/{image_id}/file", "get"),
        ("/images", "post"),
        ("/images/{image_id}", "delete"),
        ("/admin/reload", "post"),
        ("/admin/compact", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/stats", "get"),
        ("/metrics", "get"),
        ("/", "get"),
    }
    assert {(p, m) for p, ops in spec["paths"].items() for m in ops} == expected
    json_routes = expected - {("/images/{image_id}/file", "get"), ("/metrics", "get"), ("/", "get")}
    for path, method in json_routes:
        op = spec["paths"][path][method]
        ok = next(v for s, v in op["responses"].items() if s.startswith("2"))
        assert "$ref" in ok["content"]["application/json"]["schema"], (path, method)
        assert op.get("description"), (path, method)
    k = next(p for p in spec["paths"]["/search"]["post"]["parameters"] if p["name"] == "k")
    assert k["schema"]["minimum"] == 1 and k["schema"]["maximum"] == 1000 and k["schema"]["default"] == 10
    assert spec["paths"]["/search"]["post"]["responses"]["413"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("/ErrorBody")
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # Swagger UI is served by the service itself: /docs works without internet.
    js = next(part.split('"')[0] for part in docs.text.split('src="')[1:] if "swagger-ui-bundle" in part)
    assert js.startswith("/") and client.get(js).status_code == 200


def test_the_web_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in r.text and 'id="results"' in r.text and "/docs" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text  # no CDN


def test_searches_run_while_images_are_added_and_deleted(client, server):
    failures: list[str] = []
    stop = threading.Event()

    def searcher(c: int) -> None:
        with server.client() as own:
            while not stop.is_set():
                r = own.post("/search", files=upload(class_image(c)), params={"k": 5})
                if r.status_code != 200 or r.json()["predicted_label"] != f"class_{c}":
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=searcher, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    try:
        added = []
        for i in range(4):
            r = client.post("/images", files=upload(jpeg(pattern_image(900 + i, 64))), data={"label": f"extra{i}"})
            assert r.status_code == 201, r.text
            added.append(r.json()["id"])
        for image_id in added:
            assert client.delete(f"/images/{image_id}").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert client.get("/stats").json()["uploads"] == 0
