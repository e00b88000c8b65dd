"""What outside checkers found: spec-conformance gaps and hostile requests that must stay 4xx."""

from __future__ import annotations

import io
import shutil

import pytest

from speech2image.api.openapi import build_spec

KEY = "k-user"


def test_auth_failure_lockout_is_documented_on_every_keyed_route(make_app) -> None:
    # /metrics is exempt from the request limits but not from the failed-authentication
    # limit: schemathesis saw an undocumented 429 there.
    app = make_app(api_keys=[KEY], admin_api_keys=["k-admin"], ratelimit_auth_failures="2/minute")
    client = app.test_client()
    statuses = [
        client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code
        for _ in range(3)
    ]
    assert statuses == [401, 401, 429]
    with app.app_context():
        paths = build_spec(app)["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if operation.get("security") == []:
                continue  # public: no key, no lockout
            assert "429" in operation["responses"], (method, path)


def test_errors_do_not_echo_huge_client_names_or_values(client) -> None:
    # A 60 KB unknown field name came back four times (a 240 KB answer to a 60 KB request).
    huge = "n" * 60_000
    response = client.post(
        "/generate-image", json={"prompt": "a", huge: 1, "scheduler": "s" * 60_000}
    )
    assert response.status_code == 400
    assert len(response.data) < 4000
    fields = [e["field"] for e in response.json["error"]["details"]["errors"]]
    assert "scheduler" in fields and any(f.startswith("nnnn") for f in fields)
    form = client.post(
        "/transcribe-audio",
        data={huge: "v"},
        content_type="multipart/form-data",
    )
    assert form.status_code == 400 and len(form.data) < 4000


ODD_IDS = ("%00", "x%00.png", "%ff%fe", "%ed%a0%80", "..%2f..%2fetc%2fpasswd", "%E2%98%83")
ID_ROUTES = ("/jobs/{}", "/jobs/{}/events", "/images/{}", "/transcripts/{}")


@pytest.mark.postgres
def test_odd_path_ids_are_404_on_postgresql(make_app, postgres_url) -> None:
    # A NUL in a path id reached PostgreSQL ("cannot contain NUL characters"): a 500.
    app = make_app(database_url=postgres_url)
    try:
        client = app.test_client()
        wrong = []
        for route in ID_ROUTES:
            for odd in ODD_IDS:
                path = route.format(odd)
                for method in ("GET", "DELETE"):
                    answer = client.open(path, method=method)
                    if not (400 <= answer.status_code < 500 and answer.is_json):
                        wrong.append((method, path, answer.status_code))
        assert wrong == [], wrong
    finally:
        app.extensions["storage"].close()


class _BadChunks(io.BytesIO):
    """A request body as gunicorn reads it when the client sends a bad chunk size."""

    def read(self, size: int | None = -1) -> bytes:
        from gunicorn.http.errors import InvalidChunkSize

        raise InvalidChunkSize(b"zz")

    readline = readinto = read1 = read  # type: ignore[assignment]


@pytest.mark.parametrize("path", ["/generate-image", "/transcribe-audio", "/v1/images/generations"])
def test_a_malformed_chunked_body_is_400_not_500(client, path) -> None:
    # Under gunicorn: `Transfer-Encoding: chunked` with the chunk size "zz" answered 500.
    content_type = "multipart/form-data; boundary=x" if "audio" in path else "application/json"
    answer = client.post(
        path,
        input_stream=_BadChunks(b"x" * 20),
        headers={"Content-Type": content_type, "Content-Length": "20"},
    )
    assert answer.status_code == 400 and b"malformed" in answer.data, answer.data
    assert answer.is_json


def test_an_image_folder_removed_while_serving_is_made_again(make_app, tmp_path) -> None:
    # rm -rf of the image folder under a running server made every generation a 500.
    app = make_app(database_url=f"sqlite:///{tmp_path / 'history.sqlite3'}")
    client = app.test_client()
    shutil.rmtree(tmp_path / "images")
    made = client.post("/generate-image", json={"prompt": "a cat", "steps": 1})
    assert made.status_code == 200, made.json
    filename = made.json["images"][0]["filename"]
    assert (tmp_path / "images" / filename).is_file()
    served = client.get(f"/images/{filename}")
    served.close()
    assert served.status_code == 200
