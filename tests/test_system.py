"""Operators' endpoints, the JSON error shape, request logging, and faults injected on purpose."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .test_transcribe import post_audio


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_is_cheap_liveness(make_app) -> None:
    app = make_app()
    response = app.test_client().get("/health")
    assert response.status_code == 200
    assert response.json["status"] == "ok"
    assert "uptime_seconds" in response.json
    # Liveness loads nothing.
    assert all(not m["loaded"] for m in app.extensions["model_loader"].status())


def test_ready_reports_configured_models(make_app) -> None:
    good = make_app().test_client().get("/ready")
    assert good.status_code == 200
    assert good.json["ready"] is True
    assert good.json["models"][0]["name"] == "whisper:base"
    bad = make_app(whisper_model="/nonexistent/whisper").test_client().get("/ready")
    assert bad.status_code == 503
    assert bad.json["ready"] is False


def test_status_reports_resources_models_and_counts(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    assert post_audio(client, speech["english"]).status_code == 200
    client.get("/nope")
    body = client.get("/status").json
    system = body["system"]
    assert system["cpu_count"] >= 1
    assert system["memory"]["total"] > system["memory"]["available"] > 0
    assert system["disk"]["total"] > 0
    assert "gpu" in body  # null on a machine without CUDA
    model = next(m for m in body["models"] if m["name"] == "whisper:base")
    assert model["loaded"] is True
    assert model["device"] == "cpu"
    assert model["bytes"] > 10 * 1024 * 1024  # int8 base is ~70-160 MB resident
    assert model["loads"] == 1
    requests = body["requests"]
    assert requests["by_endpoint"]["speech.transcribe_audio"]["200"] == 1
    assert requests["by_endpoint"]["unknown"]["404"] == 1
    assert requests["total"] >= 2
    assert body["transcription"]["active"] == 0


def test_error_shape_for_404_and_405(client) -> None:
    missing = client.get("/no-such-thing")
    assert missing.status_code == 404
    error = missing.json["error"]
    assert error["status"] == 404 and error["code"] == "not_found"
    assert error["request_id"] == missing.headers["X-Request-ID"]
    wrong = client.get("/transcribe-audio")
    assert wrong.status_code == 405
    assert wrong.json["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]


def test_unexpected_failure_is_generic_500_with_traceback_only_in_log(
    make_app, speech, monkeypatch
) -> None:
    app = make_app()

    def explode(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("speech2image.speech_service.transcribe", explode)
    response = post_audio(app.test_client(), speech["english"])
    assert response.status_code == 500
    body = response.get_data(as_text=True)
    assert "secret internal detail" not in body and "Traceback" not in body
    assert response.json["error"]["code"] == "internal_error"
    log = (Path(app.config["S2I_SETTINGS"].log_dir) / "app.log").read_text()
    assert "Traceback" in log and "secret internal detail" in log
    assert response.json["error"]["request_id"] in log
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).iterdir()) == []


def test_missing_model_is_503_naming_it(make_app, speech) -> None:
    app = make_app(whisper_model="/nonexistent/whisper")
    response = post_audio(app.test_client(), speech["english"])
    assert response.status_code == 503
    assert response.json["error"]["code"] == "model_unavailable"
    # Named by its last part: a client learns which model, not the server's folders.
    assert ".../whisper" in response.json["error"]["message"]
    assert "/nonexistent" not in response.json["error"]["message"]
    assert app.test_client().get("/health").status_code == 200


def test_ready_and_model_unavailable_do_not_show_the_model_cache_path(make_app, model_cache):
    # Issue 18.8: both said "hub model Lykon/dreamshaper-8 is not in /<cache>/hub".
    app = make_app(style_models={"artistic": "dreamshaper", "photographic": "tiny-photo"})
    client = app.test_client()
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json["down"] == ["models"]
    (problem,) = [m["problem"] for m in ready.json["models"] if m["name"] == "sd:dreamshaper"]
    assert "Lykon/dreamshaper-8 is not in .../hub" in problem
    refused = client.post("/generate-image", json={"prompt": "a castle", "model": "dreamshaper"})
    assert refused.status_code == 503, refused.json
    assert refused.json["error"]["code"] == "model_unavailable"
    assert "pre-download it into .../hub" in refused.json["error"]["message"]
    for answer in (ready, refused):
        assert str(model_cache) not in answer.get_data(as_text=True)


def test_request_id_is_returned_and_logged(make_app) -> None:
    app = make_app()
    client = app.test_client()
    chosen = client.get("/health", headers={"X-Request-ID": "trace-abc.123"})
    assert chosen.headers["X-Request-ID"] == "trace-abc.123"
    made = client.get("/status", headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    log = (Path(app.config["S2I_SETTINGS"].log_dir) / "app.log").read_text()
    assert re.search(r"\[trace-abc\.123\] speech2image\.requests: GET /health 200 [\d.]+ms", log)
    assert f"[{made.headers['X-Request-ID']}]" in log


def test_log_rotates(make_app) -> None:
    app = make_app(log_max_bytes=2048, log_backup_count=2)
    client = app.test_client()
    for _ in range(60):
        client.get("/health")
    log_dir = Path(app.config["S2I_SETTINGS"].log_dir)
    assert (log_dir / "app.log.1").exists()
    assert not (log_dir / "app.log.3").exists()
    assert (log_dir / "app.log").stat().st_size <= 2048


def test_health_answers_while_a_transcription_runs(make_app, live_server, speech) -> None:
    app = make_app()
    base = live_server(app)
    result: dict = {}

    def transcribe() -> None:
        with open(speech["long"], "rb") as fh:
            body = fh.read()
        boundary = "XyZ"
        disposition = 'Content-Disposition: form-data; name="audio"; filename="a.wav"'
        payload = (
            f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            base + "/transcribe-audio",
            data=payload,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            result["status"] = response.status
            result["body"] = json.loads(response.read())

    worker = threading.Thread(target=transcribe)
    worker.start()
    deadline = time.monotonic() + 60
    while app.extensions["speech"].active == 0 and worker.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    answered_while_running = 0
    for _ in range(5):
        status, body = get_json(base + "/health")
        assert status == 200 and body["status"] == "ok"
        if app.extensions["speech"].active:
            answered_while_running += 1
    worker.join(120)
    assert answered_while_running >= 1
    assert result["status"] == 200
    assert "lighthouse" in result["body"]["text"].lower()


def test_job_log_lines_carry_the_request_id(make_app) -> None:
    app = make_app()
    client = app.test_client()
    response = client.post(
        "/generate-image",
        json={"prompt": "a castle", "steps": 1},
        headers={"X-Request-ID": "trace-gen-1"},
    )
    assert response.status_code == 200
    log = (Path(app.config["S2I_SETTINGS"].log_dir) / "app.log").read_text()
    assert "[trace-gen-1] speech2image.image_service: generated 1 image(s)" in log
    assert "[trace-gen-1] speech2image.model_loader: loaded model sd:tiny-art" in log


def test_request_log_cannot_be_forged_by_the_path(make_app) -> None:
    app = make_app()
    client = app.test_client()
    client.get("/images/x%0a2026-01-01%20FAKE%20LINE")
    client.get("/images/a%00.png")
    log = (Path(app.config["S2I_SETTINGS"].log_dir) / "app.log").read_text()
    assert not any(line.startswith("2026-01-01 FAKE") for line in log.splitlines())
    assert "%0A2026-01-01%20FAKE%20LINE 404" in log
    assert "\0" not in log and "/images/a%00.png 404" in log


def test_in_flight_count_survives_streamed_responses(make_app) -> None:
    app = make_app()
    client = app.test_client()
    job = client.post("/generate-image", json={"prompt": "x", "steps": 1, "async": True}).json
    for _ in range(3):
        with client.get(f"/jobs/{job['id']}/events") as stream:
            stream.get_data()
    assert client.get("/status").json["requests"]["in_flight"] == 1  # this request only
