"""CORS: preflights for every endpoint, credentials and exposed headers, off by default."""

from __future__ import annotations

import io
import re

import pytest

ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-request-id",
}


def concrete_paths(app) -> list[str]:  # type: ignore[no-untyped-def]
    """Every route of the app with its variables filled in."""
    paths = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        paths.add(re.sub(r"<(?:[^:>]+:)?[^>]+>", "x1", rule.rule))
    return sorted(paths)


def test_preflight_works_for_every_endpoint_without_auth_or_limits(make_app) -> None:
    app = make_app(
        cors_origins=[ORIGIN],
        api_keys=["user-key"],
        ratelimit_default="1/minute",
        ratelimit_transcribe="1/minute",
        ratelimit_generate="1/minute",
    )
    client = app.test_client()
    paths = concrete_paths(app)
    for required in ("/transcribe-audio", "/generate-image", "/jobs/x1/events", "/v1/models"):
        assert required in paths
    for path in paths:
        for _ in range(2):  # never counted against the 1/minute limit
            response = client.options(path, headers=PREFLIGHT)
            assert response.status_code == 200, (path, response.status_code)
            assert response.headers["Access-Control-Allow-Origin"] == ORIGIN, path
            assert response.headers["Access-Control-Allow-Credentials"] == "true"
            allowed = response.headers["Access-Control-Allow-Headers"].lower()
            assert {"authorization", "content-type", "x-request-id"} <= {
                h.strip() for h in allowed.split(",")
            }
            assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_answers_and_errors_expose_headers_to_the_allowed_origin(make_app) -> None:
    client = make_app(cors_origins=[ORIGIN], api_keys=["user-key"]).test_client()
    ok = client.get("/images", headers={"Origin": ORIGIN, "Authorization": "Bearer user-key"})
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"
    exposed = {h.strip().lower() for h in ok.headers["Access-Control-Expose-Headers"].split(",")}
    assert {
        "x-request-id",
        "retry-after",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "location",
    } <= exposed
    refused = client.get("/images", headers={"Origin": ORIGIN})  # no key: the page can read why
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_other_origins_get_no_cors_headers(make_app) -> None:
    client = make_app(cors_origins=[ORIGIN]).test_client()
    response = client.options(
        "/generate-image", headers={**PREFLIGHT, "Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in response.headers
    response = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_no_cors_headers_by_default(make_app) -> None:
    client = make_app().test_client()
    response = client.options("/generate-image", headers=PREFLIGHT)
    assert not [k for k, _ in response.headers.items() if k.lower().startswith("access-control-")]


def test_any_origin_without_credentials(make_app) -> None:
    # Issue 18.8: with "*" the origin was echoed back (with Vary); "*" says what is meant.
    client = make_app(cors_origins=["*"]).test_client()
    response = client.options("/transcribe-audio", headers=PREFLIGHT)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers
    answer = client.get("/images", headers={"Origin": ORIGIN})
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer.headers


@pytest.mark.parametrize("origins", [[ORIGIN], [ORIGIN, "http://localhost:3000"]])
def test_listed_origins_make_caches_vary_on_origin(make_app, origins) -> None:
    # Issue 18.8: one listed origin sent no Vary: Origin, so a shared cache could hand the
    # answer made for one origin (with its Allow-Origin) to a page of another, or none.
    client = make_app(cors_origins=origins).test_client()
    for headers in ({"Origin": ORIGIN}, {"Origin": "https://evil.example"}, {}):
        for response in (client.get("/images", headers=headers), client.get("/nope")):
            assert response.headers.getlist("Vary") == ["Origin"], (headers, response.headers)
    preflight = client.options("/generate-image", headers=PREFLIGHT)
    assert preflight.headers.getlist("Vary") == ["Origin"]


def test_a_cross_origin_upload_can_read_its_answer(make_app) -> None:
    client = make_app(cors_origins=[ORIGIN]).test_client()
    response = client.post(
        "/transcribe-audio",
        data={"audio": (io.BytesIO(b"not audio at all"), "a.wav")},
        content_type="multipart/form-data",
        headers={"Origin": ORIGIN},
    )
    assert response.status_code == 415
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]
