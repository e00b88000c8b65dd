"""Rate limits per client with Flask-Limiter: JSON 429, headers, /health exempt, Redis storage."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.audio_samples import silence_wav

REDIS_URL = os.environ.get("S2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def test_limit_reached_gives_json_429_with_headers(make_app) -> None:
    client = make_app(ratelimit_default="3/minute").test_client()
    for remaining in (2, 1, 0):
        response = client.get("/status")
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
    limited = client.get("/status")
    assert limited.status_code == 429
    assert limited.json["error"]["code"] == "rate_limited"
    assert "3 per 1 minute" in limited.json["error"]["message"]
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert "X-RateLimit-Reset" in limited.headers


def _silence_upload(tmp_path: Path) -> dict[str, Any]:
    return {"audio": (silence_wav(tmp_path / "quiet.wav", 0.5).open("rb"), "quiet.wav")}


def test_transcribe_has_its_own_limit(make_app, tmp_path) -> None:
    # A Whisper model that cannot be had: a valid request is answered 503, quickly, and counts.
    client = make_app(ratelimit_transcribe="1/minute", whisper_model="large-v3").test_client()
    first = client.post("/transcribe-audio", data=_silence_upload(tmp_path))
    assert first.status_code == 503
    second = client.post("/transcribe-audio", data=_silence_upload(tmp_path))
    assert second.status_code == 429
    assert client.get("/status").status_code == 200  # other endpoints unaffected


def test_invalid_requests_do_not_count_against_the_work_limits(make_app, tmp_path) -> None:
    client = make_app(ratelimit_generate="1/minute", ratelimit_transcribe="1/minute").test_client()
    for _ in range(3):  # a developer iterating on a form
        assert client.post("/generate-image", json={"prompt": ""}).status_code == 400
        assert client.post("/generate-image", json={"prompt": "x", "width": 9}).status_code == 400
        assert client.post("/transcribe-audio", data={}).status_code == 400
        assert client.post("/speech-to-image", data={}).status_code == 400
        bogus = {"audio": (io.BytesIO(b"not audio at all"), "notes.txt")}
        assert client.post("/transcribe-audio", data=bogus).status_code == 415
    valid = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1}
    first = client.post("/generate-image", json=valid)
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Remaining"] == "0"
    assert client.post("/generate-image", json=valid).status_code == 429


def test_health_is_exempt(make_app) -> None:
    client = make_app(ratelimit_default="1/minute").test_client()
    assert all(client.get("/health").status_code == 200 for _ in range(10))


def test_limits_are_per_client(make_app) -> None:
    client = make_app(ratelimit_default="1/minute").test_client()
    assert client.get("/status", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 200
    assert client.get("/status", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 429
    assert client.get("/status", environ_base={"REMOTE_ADDR": "10.0.0.2"}).status_code == 200


def test_api_keys_identify_clients(make_app) -> None:
    client = make_app(api_keys="alpha,beta", ratelimit_default="1/minute").test_client()
    assert client.get("/images").status_code == 401
    assert client.get("/images", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/health").status_code == 200  # liveness needs no key
    alpha = {"Authorization": "Bearer alpha"}
    assert client.get("/images", headers=alpha).status_code == 200
    assert client.get("/images", headers=alpha).status_code == 429
    assert client.get("/images", headers={"X-API-Key": "beta"}).status_code == 200


def test_operator_endpoints_need_an_admin_key(make_app) -> None:
    client = make_app(api_keys="alpha", admin_api_keys="root").test_client()
    user, admin = {"X-API-Key": "alpha"}, {"X-API-Key": "root"}
    for method, path in (("get", "/status"), ("post", "/cleanup")):
        refused = getattr(client, method)(path, headers=user)
        assert refused.status_code == 403
        assert "S2I_ADMIN_API_KEYS" in refused.json["error"]["message"]
        assert getattr(client, method)(path, headers=admin).status_code == 200
    assert client.get("/images", headers=admin).status_code == 200  # an admin is a user too
    open_client = make_app().test_client()  # auth off: the local identity is the operator
    assert open_client.post("/cleanup").status_code == 200


def _redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.mark.redis
@pytest.mark.skipif(not _redis_available(), reason=f"no Redis answers at {REDIS_URL}")
def test_redis_storage_shares_counters_between_apps(make_app) -> None:
    limit = f"2/{uuid.uuid4().int % 100_000 + 3600}second"  # a window (and key) unique to this run
    first = make_app(ratelimit_storage_uri=REDIS_URL, ratelimit_default=limit).test_client()
    second = make_app(ratelimit_storage_uri=REDIS_URL, ratelimit_default=limit).test_client()
    assert first.get("/status").status_code == 200
    assert second.get("/status").status_code == 200
    assert first.get("/status").status_code == 429  # the second app's hit counted in Redis


def test_non_ascii_api_key_is_401_not_500(make_app) -> None:
    client = make_app(api_keys="alpha").test_client()
    response = client.get("/status", headers={"X-API-Key": "café"})
    assert response.status_code == 401


def test_speech_to_image_counts_against_the_generation_limit(make_app, tmp_path) -> None:
    client = make_app(ratelimit_generate="1/minute", whisper_model="large-v3").test_client()
    first = client.post("/speech-to-image", data=_silence_upload(tmp_path))
    assert first.status_code == 503  # valid, counted, refused for the missing Whisper model
    assert first.headers["X-RateLimit-Limit"] == "1"
    assert client.post("/speech-to-image", data=_silence_upload(tmp_path)).status_code == 429


def test_retry_after_only_on_refusals(make_app) -> None:
    client = make_app(ratelimit_default="5/minute").test_client()
    ok = client.get("/images")
    assert ok.status_code == 200 and "X-RateLimit-Remaining" in ok.headers
    assert "Retry-After" not in ok.headers

    for response in (
        client.post("/generate-image", json={"prompt": ""}),  # 400
        client.get("/images/" + "0" * 32 + ".png"),  # 404
        client.post("/generate-image", data="x", content_type="text/plain"),  # 415
        client.post("/transcribe-audio", data={"audio": (io.BytesIO(b"no"), "a.txt")}),  # 415
    ):
        assert response.status_code in (400, 404, 415)
        assert "Retry-After" not in response.headers, response.status_code
    for _ in range(5):
        client.get("/images")
    limited = client.get("/images")
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0


def test_failed_authentication_is_limited_per_address(make_app) -> None:
    client = make_app(api_keys="alpha", ratelimit_auth_failures="5/minute").test_client()
    guesser = {"REMOTE_ADDR": "10.0.0.9"}
    for guess in range(5):
        refused = client.get(
            "/images", headers={"X-API-Key": f"guess{guess}"}, environ_base=guesser
        )
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Retry-After" not in refused.headers
    limited = client.get("/images", headers={"X-API-Key": "guess5"}, environ_base=guesser)
    assert limited.status_code == 429
    assert limited.json["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) > 0
    # Issue 18.5: the right key is not refused for the address's failures (behind a proxy or
    # a NAT, everyone shares it); wrong and missing ones still are.
    right = {"X-API-Key": "alpha"}
    assert client.get("/images", headers=right, environ_base=guesser).status_code == 200
    assert client.get("/images", environ_base=guesser).status_code == 429
    # Another address is not affected.
    other = {"REMOTE_ADDR": "10.0.0.10"}
    assert client.get("/images", headers=right, environ_base=other).status_code == 200
    assert client.get("/images", environ_base=other).status_code == 401


def test_behind_trusted_proxies_limits_see_each_clients_address(make_app) -> None:
    # Issue 18.5: behind a reverse proxy every client had the proxy's address, so one guesser
    # locked every client out. S2I_TRUSTED_PROXIES=1 reads the address the proxy appended.
    app = make_app(api_keys="alpha", ratelimit_auth_failures="3/minute", trusted_proxies=1)
    client = app.test_client()
    proxy = {"REMOTE_ADDR": "127.0.0.1"}

    def via_proxy(forwarded_for: str, key: str | None = None) -> int:
        headers = {"X-Forwarded-For": forwarded_for, **({"X-API-Key": key} if key else {})}
        return client.get("/images", headers=headers, environ_base=proxy).status_code

    # The guesser forges an address of its own; the proxy appends the real one, which counts.
    assert [via_proxy("10.9.9.9, 203.0.113.7", f"guess{n}") for n in range(4)] == [401] * 3 + [429]
    assert via_proxy("203.0.113.7", "guess") == 429
    assert via_proxy("203.0.113.7", "alpha") == 200  # a right key from there still works
    assert via_proxy("10.9.9.9", "wrong") == 401  # the forged address was never counted
    assert via_proxy("198.51.100.4", "wrong") == 401  # nor was any other client
    assert via_proxy("198.51.100.4", "alpha") == 200
    # Without the setting the header is the client's word, and it is ignored.
    plain = make_app(api_keys="alpha", ratelimit_auth_failures="1/minute").test_client()
    spoofed = {"X-API-Key": "wrong", "X-Forwarded-For": "198.51.100.99"}
    assert plain.get("/images", headers=spoofed, environ_base=proxy).status_code == 401
    spoofed["X-Forwarded-For"] = "198.51.100.100"
    assert plain.get("/images", headers=spoofed, environ_base=proxy).status_code == 429
