"""The page at `/` and its static files: types, security headers, auth; history transcripts.

The page itself is driven in a real browser by tests/test_web_browser.py.
"""

from __future__ import annotations

import re

import pytest

from speech2image.api.identity import client_owner
from speech2image.app import create_app
from speech2image.storage import NewImage, NewTranscript, get_storage

from .conftest import _test_settings
from .test_images import fetch

STATIC_FILES = {
    "/static/app.js": "text/javascript",
    "/static/app.css": "text/css",
}
PAGE_FILES = {"/": "text/html", **STATIC_FILES}


@pytest.fixture(scope="module")
def web_app(tmp_path_factory, model_cache, tiny_models):  # type: ignore[no-untyped-def]
    return create_app(_test_settings(tmp_path_factory.mktemp("web"), model_cache, tiny_models))


def test_page_is_served_with_a_strict_content_security_policy(web_app) -> None:
    response = fetch(web_app.test_client(), "/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    policy = response.headers["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no other origin
    assert "unsafe-inline" not in policy and "http" not in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Every script is an external file on this server, and the page loads nothing from elsewhere.
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts == [(' type="module" src="/static/app.js"', "")]
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    for needed in ('id="record"', 'id="stop"', 'id="level"', 'id="audio-file"', 'id="prompt"'):
        assert needed in html
    assert 'aria-live="polite"' in html and 'role="alert"' in html
    assert '<meta name="viewport"' in html


@pytest.mark.parametrize(("path", "mimetype"), STATIC_FILES.items())
def test_static_files_have_their_content_types(web_app, path: str, mimetype: str) -> None:
    client = web_app.test_client()
    response = fetch(client, path)
    assert response.status_code == 200
    assert response.mimetype == mimetype  # a module script as text/plain is refused
    assert response.headers["Cache-Control"] == "no-cache"
    again = fetch(client, path, headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


@pytest.mark.parametrize(("path", "mimetype"), PAGE_FILES.items())
def test_text_files_name_their_charset_once(web_app, path: str, mimetype: str) -> None:
    # Issue 18.8: the page went out as "text/html; charset=utf-8; charset=utf-8".
    response = fetch(web_app.test_client(), path)
    assert response.headers.getlist("Content-Type") == [f"{mimetype}; charset=utf-8"]


@pytest.mark.parametrize(
    "path",
    ["/static/nope.js", "/static/../api/web.py", "/static/%2e%2e/app.py", "/static//etc/passwd"],
)
def test_only_files_of_the_static_folder_are_served(web_app, path: str) -> None:
    response = web_app.test_client().get(path)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_page_loads_without_a_key_when_auth_is_on(make_app) -> None:
    client = make_app(api_keys="alpha").test_client()
    assert fetch(client, "/").status_code == 200
    for path in STATIC_FILES:
        assert fetch(client, path).status_code == 200
    # ... while the API behind it still wants the key.
    assert client.get("/images").status_code == 401
    assert client.get("/images", headers={"Authorization": "Bearer alpha"}).status_code == 200


def test_page_is_not_rate_limited_with_the_api(make_app) -> None:
    client = make_app(ratelimit_default="2/minute").test_client()
    for _ in range(4):
        assert fetch(client, "/").status_code == 200
    assert client.get("/images").status_code == 200
    assert client.get("/images").status_code == 200
    assert client.get("/images").status_code == 429


def _image(prompt: str) -> NewImage:
    return NewImage(
        png=b"\x89PNG fake",
        prompt=prompt,
        negative_prompt=None,
        model="tiny-art",
        model_reason="test",
        seed=1,
        steps=1,
        guidance_scale=7.0,
        scheduler="euler_a",
        width=64,
        height=64,
        parameters={},
    )


def test_history_rows_carry_the_transcript_they_came_from(make_app) -> None:
    app = make_app(api_keys="alpha,beta")
    storage = get_storage(app)
    with app.test_request_context("/images", headers={"X-API-Key": "alpha"}):
        app.preprocess_request()
        alpha = client_owner()
    heard = NewTranscript("a castle at dawn please", "en", 2.0)
    storage.save_images(alpha, [_image("a castle at dawn")], transcript=heard)
    storage.save_images(alpha, [_image("typed")])
    rows = app.test_client().get("/images", headers={"X-API-Key": "alpha"}).json["images"]
    by_prompt = {row["prompt"]: row for row in rows}
    assert by_prompt["a castle at dawn"]["transcript"] == {
        "id": heard.id,
        "text": "a castle at dawn please",
        "language": "en",
    }
    assert by_prompt["typed"]["transcript"] is None
    # Another owner never sees the transcript, even if a row of theirs named its id.
    assert storage.transcripts("key:someone-else", [heard.id]) == {}
