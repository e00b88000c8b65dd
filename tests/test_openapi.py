"""OpenAPI: generated from the validating models, served with offline docs; validation at once."""

from __future__ import annotations

import json
import re

import pytest

from speech2image.api.openapi import build_spec

# Routes that are not API operations: the docs UI's own files.
UNDESCRIBED = {"static", "docs.show"}


def test_every_route_is_described(make_app) -> None:
    app = make_app()
    missing = [
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in UNDESCRIBED
        and not hasattr(app.view_functions[rule.endpoint], "__openapi__")
    ]
    assert missing == [], "describe these routes with @endpoint (see api/openapi.py)"
    paths = build_spec(app)["paths"]
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDESCRIBED:
            continue
        path = rule.rule.replace("<path:", "<").replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], (path, method)


def test_spec_is_openapi_31_with_the_settings_ranges(make_app) -> None:
    app = make_app(max_width=768, default_width=128, max_steps=12, max_num_images=3)
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    spec = response.json
    assert spec["openapi"] == "3.1.0"
    body = spec["paths"]["/generate-image"]["post"]["requestBody"]["content"]
    ref = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = spec["components"]["schemas"][ref]["properties"]
    width = {k: fields["width"][k] for k in ("maximum", "minimum", "multipleOf", "default")}
    assert width == {"maximum": 768, "minimum": 64, "multipleOf": 8, "default": 128}
    assert fields["steps"]["maximum"] == 12
    assert fields["num_images"]["maximum"] == 3
    assert fields["prompt"]["maxLength"] == 1000
    assert "tiny-art" in fields["model"]["enum"] and "auto" in fields["model"]["enum"]
    assert spec["components"]["schemas"][ref]["required"] == ["prompt"]
    responses = spec["paths"]["/generate-image"]["post"]["responses"]
    assert {"200", "202", "400", "413", "429", "500", "503"} <= set(responses)
    error = responses["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/ErrorBody")


def test_uploads_are_multipart_with_a_binary_file(make_app) -> None:
    spec = build_spec(make_app())
    content = spec["paths"]["/transcribe-audio"]["post"]["requestBody"]["content"]
    ref = content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    schema = spec["components"]["schemas"][ref]
    form = schema["properties"]
    assert {k: form["audio"][k] for k in ("type", "format")} == {
        "type": "string",
        "format": "binary",
    }
    assert schema["anyOf"] == [{"required": ["audio"]}, {"required": ["file"]}]
    assert "en" in form["language"]["enum"]
    assert set(form["response_format"]["enum"]) == {"json", "text", "srt", "vtt", "verbose_json"}
    pipeline = spec["paths"]["/speech-to-image"]["post"]["requestBody"]["content"]
    assert pipeline["multipart/form-data"]["encoding"] == {
        "options": {"contentType": "application/json"}
    }


def test_auth_shows_in_the_spec_when_keys_are_configured(make_app) -> None:
    spec = build_spec(make_app(api_keys=["k1"], admin_api_keys=["a1"]))
    assert "bearer" in spec["components"]["securitySchemes"]
    assert "401" in spec["paths"]["/images"]["get"]["responses"]
    assert "403" in spec["paths"]["/status"]["get"]["responses"]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]


def test_spec_and_docs_need_no_key(make_app) -> None:
    client = make_app(api_keys=["k1"]).test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs/").status_code == 200
    assert client.get("/images").status_code == 401


def test_docs_page_is_served_from_the_package(client) -> None:
    page = client.get("/docs/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and all(link.startswith("/docs/") for link in links), links
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert f"/docs/{name}" in html
        with client.get(f"/docs/{name}") as asset:
            assert asset.status_code == 200 and len(asset.data) > 10_000


def test_a_request_gets_all_its_errors_at_once(client) -> None:
    response = client.post(
        "/generate-image",
        json={"prompt": "", "width": 100, "steps": 0, "num_images": 99, "colour": "red"},
    )
    assert response.status_code == 400
    error = response.json["error"]
    fields = [e["field"] for e in error["details"]["errors"]]
    assert set(fields) == {"prompt", "width", "steps", "num_images", "colour"}
    assert error["details"]["field"] == fields[0]
    for item in error["details"]["errors"]:
        assert f"`{item['field']}`" in item["message"]
        assert item["message"] in error["message"]


def test_query_errors_come_together_and_name_the_field(client) -> None:
    response = client.get("/images?page=0&per_page=1000&since=yesterday")
    assert response.status_code == 400
    fields = {e["field"] for e in response.json["error"]["details"]["errors"]}
    assert fields == {"page", "per_page", "since"}


# --- issue 7.1(a): text that is not clean Unicode is refused before any model work ----------

BAD_TEXT = [
    ("x \ud800", "lone surrogate"),
    ("a\x00b", "U+0000"),
    ("bell\x07", "U+0007"),
    ("esc\x1b[31m", "U+001B"),
    ("del\x7f", "U+007F"),
    ("c1\x85 in the middle", "U+0085"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_TEXT)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_json_text_fields_refuse_bad_characters(make_app, field, text, needle) -> None:
    app = make_app()
    body = {"prompt": "a cat", field: text}
    # Sent as raw JSON text: "\ud800" escapes arrive as lone surrogates, like a client's.
    raw = json.dumps(body)
    response = app.test_client().post("/generate-image", data=raw, content_type="application/json")
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["details"]["field"] == field
    assert needle in error["message"]
    assert not any(m["loaded"] for m in app.extensions["model_loader"].status())


def test_tabs_and_newlines_stay_allowed_in_prompts(client) -> None:
    response = client.post(
        "/generate-image", json={"prompt": "a cat\non a mat\twith a hat", "steps": 1, "seed": 1}
    )
    assert response.status_code == 200, response.json
    assert response.json["prompt"] == "a cat\non a mat\twith a hat"


def test_form_and_options_text_refuse_bad_characters(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    cases = [
        ({"negative_prompt": "a\x00b"}, "negative_prompt"),
        ({"options": json.dumps({"negative_prompt": "x \ud800"})}, "options.negative_prompt"),
        ({"options": json.dumps({"negative_prompt": "ok\x01"})}, "options.negative_prompt"),
        ({"options": "{\x00}"}, "options"),
    ]
    for extra, field in cases:
        with open(speech["english"], "rb") as fh:
            response = client.post(
                "/speech-to-image",
                data={"audio": (fh, "clip.wav"), **extra},
                content_type="multipart/form-data",
            )
        assert response.status_code == 400, (extra, response.json)
        assert response.json["error"]["details"]["field"] == field, response.json
    assert list(app.config["S2I_SETTINGS"].upload_dir.glob("upload-*")) == []


def test_language_field_refuses_control_characters(client, speech) -> None:
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/transcribe-audio",
            data={"audio": (fh, "clip.wav"), "language": "e\x00n"},
            content_type="multipart/form-data",
        )
    assert response.status_code == 400
    assert response.json["error"]["details"]["field"] == "language"


# --- issue 7.3: no input gives 500 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=0001-01-01T00:00:00%2B01:00", "since"),
        ("until=9999-12-31T23:59:59-01:00", "until"),
    ],
)
def test_dates_that_overflow_in_utc_are_400(client, query, field) -> None:
    response = client.get(f"/images?{query}")
    assert response.status_code == 400, response.json
    assert response.json["error"]["details"]["field"] == field


def test_dates_at_the_edges_that_fit_still_work(client) -> None:
    response = client.get("/images?since=0001-01-01T00:00:00-01:00&until=9999-12-31T00:00:00Z")
    assert response.status_code == 200, response.json


def test_deeply_nested_json_body_is_400(client) -> None:
    response = client.post("/generate-image", data="[" * 100_000, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["details"]["field"] == "body"


def test_deeply_nested_options_are_400(client, speech) -> None:
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "options": "[" * 60_000},
            content_type="multipart/form-data",
        )
    assert response.status_code == 400
    assert response.json["error"]["details"]["field"] == "options"


@pytest.mark.postgres
def test_nul_in_a_prompt_is_refused_before_postgresql_sees_it(make_app, postgres_url) -> None:
    app = make_app(database_url=postgres_url)
    try:
        client = app.test_client()
        for body in ({"prompt": "a\x00b"}, {"prompt": "a cat", "negative_prompt": "x\x00"}):
            refused = client.post("/generate-image", json={**body, "steps": 1})
            assert refused.status_code == 400, refused.json
            assert refused.json["error"]["details"]["field"] in ("prompt", "negative_prompt")
        assert not any(m["loaded"] for m in app.extensions["model_loader"].status())
        for query in ("since=0001-01-01T00:00:00%2B01:00", "until=9999-12-31T23:59:59-01:00"):
            assert client.get(f"/images?{query}").status_code == 400
        made = client.post("/generate-image", json={"prompt": "a cat\ton a mat", "steps": 1})
        assert made.status_code == 200, made.json
        listed = client.get("/images").json
        assert listed["total"] == 1 and listed["images"][0]["prompt"] == "a cat\ton a mat"
    finally:
        app.extensions["storage"].close()


def test_form_errors_come_together_and_name_each_field(client, speech) -> None:
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/transcribe-audio",
            data={
                "audio": (fh, "clip.wav"),
                "task": "summarise",
                "response_format": "pdf",
                "language": "klingon",
            },
            content_type="multipart/form-data",
        )
    assert response.status_code == 400
    fields = {e["field"] for e in response.json["error"]["details"]["errors"]}
    assert fields == {"task", "response_format", "language"}


def test_a_poisoned_prompt_among_good_ones_fails_alone(make_app) -> None:
    import threading

    app = make_app(api_keys=["good", "evil"], batch_max_wait_ms=500)
    results: dict[str, int] = {}

    def send(name: str, key: str, prompt: str) -> None:
        response = app.test_client().post(
            "/generate-image",
            json={"prompt": prompt, "steps": 1, "seed": 1},
            headers={"Authorization": f"Bearer {key}"},
        )
        results[name] = response.status_code

    threads = [
        threading.Thread(target=send, args=(f"good{i}", "good", f"a castle {i}")) for i in range(3)
    ]
    threads.append(threading.Thread(target=send, args=("evil", "evil", "x \ud800")))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert results == {"good0": 200, "good1": 200, "good2": 200, "evil": 400}


def test_concurrent_first_requests_for_the_spec_all_get_it(make_app, live_server) -> None:
    # Issue 18.4: two threads built the request models at once, and most of a dozen concurrent
    # first requests after a start answered 500 (a KeyError in build_spec).
    import concurrent.futures
    import threading
    import urllib.request

    base = live_server(make_app())  # a fresh app: nothing built yet
    start = threading.Barrier(12)

    def fetch(_: int) -> tuple[int, bytes]:
        start.wait(10)
        with urllib.request.urlopen(f"{base}/openapi.json", timeout=60) as response:
            return response.status, response.read()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(fetch, range(12)))
    assert [status for status, _ in answers] == [200] * 12
    assert len({body for _, body in answers}) == 1  # one document, built once
    assert json.loads(answers[0][1])["openapi"] == "3.1.0"
