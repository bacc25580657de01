"""Bad input at every door of a real `python -m service` process (its default limits).

Hostile uploads (random bytes, truncated and corrupt JPEG/PNG/GIF/WebP, pixel bombs, animated GIFs
with many frames, SVG, HTML, a zip, an empty file, a wrong field name, too many fields, a huge or
endless body), slow clients, and hostile ids on every route that takes an id. Each gets a 4xx with
a JSON body; the server keeps answering and its memory stays bounded (VmRSS of the process).
docs/reliability.md lists every case with its result.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import select
import shutil
import socket
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from indexer.bundle import open_bundle
from indexer.metadata import ImageRecord
from service_helpers import LiveServer, ServiceProcess, class_image, settings_for, tiny_bundle

MiB = 1 << 20


# ------------------------------------------------------------------------------ the bytes


def _encoded(fmt: str, seed: int = 0, size: int = 64, **kw) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header announces width x height pixels."""
    data = _encoded("PNG", size=4)
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def gif_claiming(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0, 0, 0)
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + b"\x02\x02\x44\x01\x00\x3b"
    )


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header announces width x height (at most 16384 each)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "WEBP", lossless=True)
    data = buf.getvalue()
    i = data.index(b"VP8L") + 9  # chunk name, chunk size, signature byte: then 14 + 14 bits of size
    bits = struct.unpack("<I", data[i : i + 4])[0] & ~((1 << 28) - 1) | (width - 1) | ((height - 1) << 14)
    return data[:i] + struct.pack("<I", bits) + data[i + 4 :]


def gif_with_frames(frames: int) -> bytes:
    """A valid animated GIF of `frames` 1x1 frames, written by hand (Pillow would take minutes)."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    )
    return head + frame * frames + b"\x3b"


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photo.jpg", _encoded("JPEG"))
    return buf.getvalue()


JPG, PNG, GIF, WEBP = _encoded("JPEG"), _encoded("PNG"), _encoded("GIF"), _encoded("WEBP")
_sof, _dht, _sos = JPG.index(b"\xff\xc0"), JPG.index(b"\xff\xc4"), JPG.index(b"\xff\xda")
_idat = PNG.index(b"IDAT")
_vp8 = WEBP.index(b"VP8")

# (case, bytes, filename, status, error code): every one a 4xx with a JSON body
BAD_UPLOADS = [
    ("random-bytes", _noise(4096), "x.jpg", 415, "unsupported_image"),
    ("empty-file", b"", "x.jpg", 400, "empty_file"),
    ("jpeg-truncated", JPG[: len(JPG) // 2], "x.jpg", 400, "bad_image"),
    ("jpeg-bad-huffman-table", JPG[: _dht + 5] + b"\xff" * 16 + JPG[_dht + 21 :], "x.jpg", 400, "bad_image"),
    ("jpeg-no-scan", JPG[:_sos] + b"\xff\xd9", "x.jpg", 400, "bad_image"),
    ("jpeg-zero-size", JPG[: _sof + 5] + bytes(4) + JPG[_sof + 9 :], "x.jpg", 415, "unsupported_image"),
    ("png-truncated", PNG[: len(PNG) // 2], "x.png", 400, "bad_image"),
    ("png-bad-crc", PNG[: _idat + 10] + bytes([PNG[_idat + 10] ^ 0xFF]) + PNG[_idat + 11 :], "x.png", 400, "bad_image"),
    ("gif-truncated", GIF[: len(GIF) // 2], "x.gif", 400, "bad_image"),
    ("gif-garbage", GIF[:30] + _noise(len(GIF) - 30, 2), "x.gif", 415, "unsupported_image"),
    ("webp-truncated", WEBP[: len(WEBP) // 2], "x.webp", 400, "bad_image"),
    ("webp-bad-frame", WEBP[: _vp8 + 11] + bytes(3) + WEBP[_vp8 + 14 :], "x.webp", 400, "bad_image"),
    ("png-bomb-50000x50000", png_claiming(50_000, 50_000), "bomb.png", 413, "too_many_pixels"),
    (
        "png-bomb-8000x8000",
        png_claiming(8000, 8000),
        "bomb.png",
        413,
        "too_many_pixels",
    ),  # over 50 M, under Pillow's own
    ("gif-bomb-65535x65535", gif_claiming(65_535, 65_535), "bomb.gif", 413, "too_many_pixels"),
    ("webp-bomb-8000x8000", webp_claiming(8000, 8000), "bomb.webp", 413, "too_many_pixels"),
    (
        "svg",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000">'
        b'<circle r="40"/></svg>',
        "x.svg",
        415,
        "unsupported_image",
    ),
    (
        "html",
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "x.html",
        415,
        "unsupported_image",
    ),
    ("zip", _zip(), "x.zip", 415, "unsupported_image"),
    ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "x.pdf", 415, "unsupported_image"),
]
# Noise in the compressed pixel data with intact headers: libjpeg/libwebp decode it to noise
# without an error. Such a file is either searched (200) or refused (400), never a 5xx.
NOISY_PIXELS = [
    ("jpeg-garbage-scan", JPG[: len(JPG) // 2] + _noise(len(JPG) // 2, 1), "x.jpg"),
    ("webp-garbage-data", WEBP[:30] + _noise(len(WEBP) - 30, 3), "x.webp"),
]


def rss(server: ServiceProcess, key: str = "VmRSS") -> int:
    """Resident memory of the server process in bytes (VmHWM: its peak)."""
    figures = server.memory()
    assert key in figures, f"no {key} for {server.pid}"
    return figures[key]


def assert_json_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.request.url, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["detail"] and body["error"], body
    if code is not None:
        assert body["error"] == code, body
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service as its own process (its memory measurable), default limits, a short body timeout."""
    b = tiny_bundle(tmp_path_factory.mktemp("inputs"))
    proc = ServiceProcess(
        ["--index", str(b["index"]), "--log-level", "warning"],
        env={"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_THREADS": "1", "IMGSEARCH_BODY_TIMEOUT": "2"},
    )
    try:
        proc.wait_ready()
        proc.bundle = b  # type: ignore[attr-defined]  # the bundle facts travel with the fixture
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def raw(url: str, request: bytes, timeout: float = 30) -> bytes:
    """Send exactly these bytes (no client-side normalisation) and return the whole answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


# ----------------------------------------------------------------------------- uploads


@pytest.mark.parametrize("route", ["/search", "/images"])
def test_every_bad_upload_gets_a_4xx_json_answer_and_memory_stays_bounded(server, client, route):
    assert client.post("/search", files={"file": ("q.jpg", class_image(0), "image/jpeg")}).status_code == 200
    before = rss(server)
    for _ in range(3):  # three rounds: a leak would grow with each
        for case, data, name, status, code in BAD_UPLOADS:
            r = client.post(route, files={"file": (name, data, "application/octet-stream")})
            body = assert_json_error(r, status, code)
            assert name in body["detail"] or case == "empty-file" or status == 413, (case, body)
        for case, data, name in NOISY_PIXELS:
            r = client.post(route, files={"file": (name, data, "application/octet-stream")})
            assert r.status_code in (200, 201, 400), (case, r.status_code, r.text[:200])
            if r.status_code == 201:
                assert client.delete(f"/images/{r.json()['id']}").status_code == 200
        # uploads the size of the limit, refused after the read
        big = b"\xff\xd8\xff" + _noise(20 * MiB - 3)
        assert_json_error(client.post(route, files={"file": ("big.jpg", big, "image/jpeg")}), 415, "unsupported_image")
        assert_json_error(client.post(route, files={"file": ("big.jpg", big + b"x", "image/jpeg")}), 413)
    after, peak = rss(server), rss(server, "VmHWM")
    print(f"{route}: RSS {before / MiB:.0f} MiB before, {after / MiB:.0f} MiB after, peak {peak / MiB:.0f} MiB")
    assert (after - before) < 96 * MiB, f"RSS grew by {(after - before) / MiB:.0f} MiB"
    assert (peak - before) < 256 * MiB, f"peak RSS {(peak - before) / MiB:.0f} MiB over the start"
    assert client.get("/stats").json()["count"] == 15  # nothing bad was added
    assert client.get("/healthz").status_code == 200


def test_animated_gifs_use_the_first_frame_without_walking_every_frame(client):
    """A valid animated GIF is an image: its first frame is searched (200). The frames are never
    counted, so half a million of them (11 MB) cost what one does."""
    for frames in (5_000, 500_000):
        data = gif_with_frames(frames)
        t0 = time.perf_counter()
        r = client.post("/search", files={"file": ("anim.gif", data, "image/gif")})
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 3.0, f"{frames} frames took {time.perf_counter() - t0:.1f} s"


def test_wrong_fields_and_forms(client):
    good = class_image(0)
    body = assert_json_error(client.post("/search", files={"image": ("q.jpg", good, "image/jpeg")}), 422)
    assert "file" in body["detail"]
    assert_json_error(client.post("/search", data={"file": "not a file"}), 422)
    assert_json_error(client.post("/images", files={"upload": ("q.jpg", good, "image/jpeg")}), 422)
    assert_json_error(client.post("/search/batch", files={"file": ("q.jpg", good, "image/jpeg")}), 422)
    # JSON instead of a form, a form without its boundary, a boundary that never comes
    assert_json_error(client.post("/search", json={"file": "x"}), 422)
    r = client.post("/search", content=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data"})
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    r = client.post(
        "/search", content=b"garbage without boundaries", headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    # thousands of fields or files in one form
    fields = [(f"f{i}", (None, "x")) for i in range(3000)] + [("file", ("q.jpg", good, "image/jpeg"))]
    assert "fields" in assert_json_error(client.post("/search", files=fields), 400)["detail"]
    files = [("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(1500)]
    assert "files" in assert_json_error(client.post("/search", files=files), 400)["detail"]
    assert client.post("/search", files={"file": ("q.jpg", good, "image/jpeg")}).status_code == 200


def test_a_huge_declared_body_is_refused_before_it_is_read(server):
    """100 MB announced in Content-Length: 413 at once, the body is never read."""
    head = (
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    t0 = time.perf_counter()
    answer = raw(server.url, head + b"--b\r\n")
    assert time.perf_counter() - t0 < 10
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line and b'"too_large"' in rest


def test_an_endless_chunked_body_is_cut_off_at_the_limit(server, client):
    """No Content-Length: the server counts while it reads, answers 413 at the limit (20 MiB + the
    form) and closes the connection, so the rest of an endless body is never read."""
    before = rss(server)
    parts = urlsplit(server.url)
    answer, sent = b"", 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(
            b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        head = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        block = bytes(MiB)
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            while sent < 200 * MiB:  # bounded: the test stops by itself if the server never does
                if select.select([s], [], [], 0)[0]:
                    break  # the answer is there
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
        except OSError:
            pass  # the server closed the connection: what it should do
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
    assert sent < 40 * MiB, f"the server read {sent // MiB} MiB"
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line and b'"too_large"' in rest and b"connection: close" in rest.lower(), answer[:300]
    assert rss(server) - before < 64 * MiB
    assert client.get("/healthz").status_code == 200


def test_slow_clients_do_not_block_others_and_a_stalled_body_times_out(server, client):
    parts = urlsplit(server.url)
    slow: list[socket.socket] = []
    stop = threading.Event()

    def dribble(s: socket.socket) -> None:
        try:
            while not stop.wait(0.5):
                s.sendall(b"x")  # one byte every half second: under the 2 s body timeout, never done
        except OSError:
            pass

    try:
        for i in range(20):
            s = socket.create_connection((parts.hostname, parts.port), timeout=30)
            if i % 2:  # headers that never end
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            else:  # a body that trickles in
                s.sendall(
                    b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                    b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
                )
            slow.append(s)
        threads = [threading.Thread(target=dribble, args=(s,), daemon=True) for s in slow[::2]]
        for t in threads:
            t.start()
        for _ in range(5):  # meanwhile, everyone else is served promptly
            t0 = time.perf_counter()
            r = client.post("/search", files={"file": ("q.jpg", class_image(1), "image/jpeg")})
            assert r.status_code == 200 and time.perf_counter() - t0 < 5
    finally:
        stop.set()
    # a body that stalls (nothing for longer than IMGSEARCH_BODY_TIMEOUT=2) gets a 408 JSON answer
    s = socket.create_connection((parts.hostname, parts.port), timeout=30)
    slow.append(s)
    s.sendall(
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; '
        b'filename="a.jpg"\r\n\r\n\xff\xd8'
    )
    t0 = time.perf_counter()
    answer = s.recv(65536)
    waited = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):  # the server closes the connection after the answer
            answer += chunk
    assert b" 408 " in answer.split(b"\r\n")[0] and b'"request_timeout"' in answer, answer[:300]
    assert 1.5 < waited < 15
    for s in slow:
        s.close()
    assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------------- ids

BAD_IDS = [
    "-1",
    "-9223372036854775808",
    "9223372036854775808",
    "99999999999999999999999999",
    "1e3",
    "0x10",
    "1.5",
    "abc",
    "%20",
    "%00",
    "%0a",
    "%D9%A1%D9%A2%D9%A3",
    "NaN",
    "inf",
    "..",
    "%2e%2e",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%252f..%252fetc%252fpasswd",
    "....%2f%2f....%2f%2fetc%2fpasswd",
    "%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
    "..%5c..%5cwindows%5cwin.ini",
    "%2fetc%2fpasswd",
    "~root",
    "0",
    "1",
    "00001",
    "+1",
    "1_000",  # well-formed numbers that are no image's id
]
ID_ROUTES = [
    ("GET", "/images/{}"),
    ("GET", "/images/{}/file"),
    ("GET", "/images/{}/file?size=64"),
    ("GET", "/images/{}/similar"),
    ("DELETE", "/images/{}"),
]


def test_hostile_ids_on_every_id_route_get_404_or_422_and_never_a_file(server):
    parts = urlsplit(server.url)
    secret = Path("/etc/passwd").read_bytes()[:16] if Path("/etc/passwd").is_file() else b"root:"
    seen = set()
    for method, template in ID_ROUTES:
        for bad in BAD_IDS + ["../../../../etc/passwd", "..\\..\\etc\\passwd"]:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                conn.request(method, template.format(bad))  # sent as written: no normalisation
                r = conn.getresponse()
                body = r.read()
            finally:
                conn.close()
            assert r.status in (404, 422), (method, template, bad, r.status, body[:200])
            assert r.getheader("content-type", "").startswith("application/json"), (method, template, bad)
            assert secret not in body and b"root:" not in body
            seen.add(r.status)
    assert seen == {404, 422}
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/stats").json()["count"] == 15


def test_no_file_outside_the_corpus_is_served(tmp_path):
    """A record whose path leads out of its root, and a corpus file swapped for a symlink out of
    the corpus after indexing: both get a 404, never the file."""
    b = tiny_bundle(tmp_path, per_class=2)
    bundle = open_bundle(b["index"])
    target = tmp_path / "outside-secret.jpg"
    shutil.copy(next(b["images"].rglob("*.jpg")), target)
    vec = bundle.vector(bundle.ids()[0])
    for image_id, path in (
        (42, "../outside-secret.jpg"),
        (43, "/etc/passwd"),
        (44, "uploads/../../outside-secret.jpg"),
    ):
        bundle.add(
            [
                (
                    ImageRecord(
                        image_id,
                        path,
                        None,
                        1,
                        0.0,
                        "0" * 64,
                        1,
                        1,
                        "upload" if path.startswith("uploads") else "corpus",
                    ),
                    vec,
                )
            ]
        )
    bundle.save()
    swapped = next(r for r in bundle.records() if r.origin == "corpus" and r.id not in (42, 43))
    (b["images"] / swapped.path).unlink()
    os.symlink(target, b["images"] / swapped.path)
    with LiveServer(settings_for(b["index"])) as server, server.client() as c:
        for image_id in (42, 43, 44, swapped.id):
            for suffix in ("/file", "/file?size=64"):
                r = c.get(f"/images/{image_id}{suffix}")
                assert_json_error(r, 404, "file_unavailable")
                assert target.read_bytes()[:64] not in r.content
        normal = next(i for i in bundle.ids() if i not in (42, 43, 44, swapped.id))
        assert c.get(f"/images/{normal}/file").status_code == 200  # a normal file still is


# -------------------------------------------------------------------------- security defaults


def test_cors_is_closed_unless_configured(tmp_path):
    b = tiny_bundle(tmp_path, per_class=2)
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with LiveServer(settings_for(b["index"])) as server, server.client() as c:
        r = c.options("/search", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = c.get("/stats", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with LiveServer(settings_for(b["index"], cors_origins=["https://app.example"])) as server, server.client() as c:
        r = c.options("/search", headers={**preflight, "Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/search", headers=preflight)
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
        r = c.get("/stats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_the_api_key_never_reaches_the_log_of_the_process(tmp_path):
    key = "k3y-that-must-not-leak-0042"
    b = tiny_bundle(tmp_path, per_class=2)
    proc = ServiceProcess(
        ["--index", str(b["index"]), "--log-level", "debug"], env={"IMGSEARCH_DEVICE": "cpu", "IMGSEARCH_API_KEY": key}
    )
    try:
        url = proc.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/admin/reload", headers={"X-API-Key": key + "x"}).status_code == 401
            assert c.post("/admin/reload", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert c.post("/admin/reload", headers={"X-API-Key": key}).status_code == 200
            assert c.delete("/images/1", headers={"X-API-Key": key[:-1]}).status_code == 401
    finally:
        proc.stop()  # and all it printed is read
    log = proc.output()
    assert "reload" in log or "POST" in log, log[-2000:]  # the debug log did record the requests
    assert key not in log and key[:-1] not in log
