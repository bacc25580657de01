"""The optional API key: writes need it, searches stay open unless protect_search closes them too."""

from __future__ import annotations

import logging

import pytest

from service_helpers import LiveServer, class_image, jpeg, settings_for, tiny_bundle
from tiny_model import pattern_image

KEY = "s3cret-test-key-0123"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("svc-auth"), per_class=3)


def upload(data: bytes) -> dict:
    return {"file": ("q.jpg", data, "image/jpeg")}


def assert_401(r) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "unauthorized" and r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_writes_need_the_key_and_searches_stay_open(bundle, caplog):
    caplog.set_level(logging.DEBUG)
    with LiveServer(settings_for(bundle["index"], api_key=KEY)) as server, server.client() as c:
        new = jpeg(pattern_image(4242, 64))
        assert_401(c.post("/images", files=upload(new)))
        assert_401(c.post("/images", files=upload(new), headers={"X-API-Key": "wrong-key-wrong"}))
        assert_401(c.post("/images", files=upload(new), headers={"Authorization": f"Bearer {KEY}x"}))
        assert_401(c.post("/admin/reload"))
        assert_401(c.delete("/images/1"))
        assert c.get("/stats").json()["uploads"] == 0  # nothing changed

        r = c.post("/images", files=upload(new), headers={"X-API-Key": KEY})
        assert r.status_code == 201, r.text
        image_id = r.json()["id"]
        assert c.post("/admin/reload", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.delete(f"/images/{image_id}", headers={"X-API-Key": KEY}).status_code == 200

        # reads are open without a key
        assert c.post("/search", files=upload(class_image(0))).status_code == 200
        hit = c.post("/search", files=upload(class_image(0)), params={"k": 1}).json()["results"][0]
        for path in (f"/images/{hit['id']}", f"/images/{hit['id']}/file", f"/images/{hit['id']}/similar", "/stats"):
            assert c.get(path).status_code == 200, path

        spec = c.get("/openapi.json").json()
        assert spec["paths"]["/images"]["post"]["security"]  # /docs shows which routes need the key
        assert "security" not in spec["paths"]["/search"]["post"]
    assert KEY not in caplog.text


def test_protect_search_closes_reads_too(bundle):
    with LiveServer(settings_for(bundle["index"], api_key=KEY, protect_search=True)) as server, server.client() as c:
        assert_401(c.post("/search", files=upload(class_image(0))))
        assert_401(c.post("/search/batch", files=[("files", ("a.jpg", class_image(0), "image/jpeg"))]))
        assert_401(c.get("/stats"))
        r = c.post("/search", files=upload(class_image(0)), params={"k": 1}, headers={"X-API-Key": KEY})
        assert r.status_code == 200
        image_id = r.json()["results"][0]["id"]
        for path in (f"/images/{image_id}", f"/images/{image_id}/file", f"/images/{image_id}/similar"):
            assert_401(c.get(path))
            assert c.get(path, headers={"X-API-Key": KEY}).status_code == 200
        # health, readiness, metrics and the page stay open for probes and browsers
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            assert c.get(path).status_code == 200, path


def test_settings_never_show_the_key(bundle):
    s = settings_for(bundle["index"], api_key=KEY)
    assert KEY not in repr(s) and KEY not in str(s.describe()) and s.describe()["api_key"] == "set"


def test_bad_key_settings_fail_at_start(bundle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="protect_search needs an api_key"):
        settings_for(bundle["index"], protect_search=True)
    with pytest.raises(ValidationError, match="at least 8"):
        settings_for(bundle["index"], api_key="short")
    assert settings_for(bundle["index"], api_key="").api_key is None
