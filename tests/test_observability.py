"""Prometheus metrics at /metrics (and on their own port) and JSON logs, through the real app."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .test_transcribe import post_audio

ADMIN = {"Authorization": "Bearer admin-key"}


def scrape(client, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:  # type: ignore[no-untyped-def]
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain")
    return parse(response.get_data(as_text=True))


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def generate(client, prompt: str, model: str, num_images: int = 1) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": prompt, "model": model, "steps": 2, "num_images": num_images}
    response = client.post("/generate-image", json=body)
    assert response.status_code == 200, response.json


def test_generation_counts_requests_jobs_batches_steps_loads_and_evictions(make_app) -> None:
    app = make_app(max_models_in_memory=1)
    client = app.test_client()
    generate(client, "a painting", "tiny-art", num_images=2)
    samples = scrape(client)
    request = {"endpoint": "images.generate_image", "method": "POST", "status": "200"}
    assert value(samples, "s2i_http_requests_total", **request) == 1
    assert value(samples, "s2i_http_request_duration_seconds_count", **request) == 1
    assert value(samples, "s2i_jobs_finished_total", kind="generate", state="succeeded") == 1
    assert value(samples, "s2i_batch_jobs_count", kind="generate") == 1
    assert value(samples, "s2i_batch_images_sum", model="sd:tiny-art") == 2
    assert value(samples, "s2i_denoise_step_seconds_count", model="sd:tiny-art") == 1
    assert value(samples, "s2i_model_loads_total", model="sd:tiny-art", device="cpu") == 1
    assert value(samples, "s2i_model_load_seconds_count", model="sd:tiny-art", device="cpu") == 1
    assert value(samples, "s2i_model_resident_bytes", model="sd:tiny-art", device="cpu") > 0
    assert value(samples, "s2i_queue_depth") == 0
    assert value(samples, "s2i_http_requests_in_flight") == 1  # the scrape itself

    generate(client, "a photo", "tiny-photo")  # one model at most: tiny-art must go
    samples = scrape(client)
    evicted = {"model": "sd:tiny-art", "device": "cpu", "action": "unload"}
    assert value(samples, "s2i_model_evictions_total", **evicted) == 1
    assert value(samples, "s2i_model_resident_bytes", model="sd:tiny-art", device="cpu") is None
    assert value(samples, "s2i_model_resident_bytes", model="sd:tiny-photo", device="cpu") > 0
    metrics_request = {"endpoint": "metrics.metrics", "method": "GET", "status": "200"}
    assert value(samples, "s2i_http_requests_total", **metrics_request) == 1  # the first scrape


def test_transcription_real_time_factor(shared_app, speech) -> None:
    client = shared_app.test_client()
    before = value(scrape(client), "s2i_transcribed_audio_seconds_total", model="whisper:base")
    assert post_audio(client, speech["english"]).status_code == 200
    samples = scrape(client)
    after = value(samples, "s2i_transcribed_audio_seconds_total", model="whisper:base")
    assert 3.0 < after - (before or 0) < 6.0
    rtf_count = value(samples, "s2i_transcription_real_time_factor_count", model="whisper:base")
    rtf_sum = value(samples, "s2i_transcription_real_time_factor_sum", model="whisper:base")
    assert rtf_count >= 1 and rtf_sum > 0


def test_jobs_by_kind_and_state_and_queue_depth_are_live(make_app) -> None:
    app = make_app(job_workers=1)
    runner = app.extensions["jobs"]
    release = threading.Event()
    started = threading.Event()

    def blocking(jobs) -> None:  # type: ignore[no-untyped-def]
        started.set()
        release.wait(30)
        for job in jobs:
            job.succeed({})

    from .toy_kinds import CallbackKind

    runner.kinds.register(CallbackKind("probe", blocking))
    jobs = [runner.submit(runner.kinds.new("probe", "local", None)) for _ in range(3)]
    assert started.wait(30)
    client = app.test_client()
    samples = scrape(client)
    assert value(samples, "s2i_jobs", kind="probe", state="running") == 1
    assert value(samples, "s2i_jobs", kind="probe", state="queued") == 2
    assert value(samples, "s2i_queue_depth") == 2
    runner.cancel("local", jobs[2].id)  # cancelled while queued: counted too
    release.set()
    for job in jobs:
        assert job.wait(30)
    samples = scrape(client)
    assert value(samples, "s2i_jobs_finished_total", kind="probe", state="succeeded") == 2
    assert value(samples, "s2i_jobs_finished_total", kind="probe", state="cancelled") == 1
    assert value(samples, "s2i_queue_depth") == 0
    assert value(samples, "s2i_batch_jobs_count", kind="probe") == 2


def test_request_counts_are_exact_under_threads(make_app, live_server) -> None:
    app = make_app()
    base = live_server(app)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(25):
                with urllib.request.urlopen(base + "/health", timeout=30) as response:
                    response.read()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    samples = scrape(app.test_client())
    health = {"endpoint": "system.health", "method": "GET", "status": "200"}
    assert value(samples, "s2i_http_requests_total", **health) == 200
    assert value(samples, "s2i_http_request_duration_seconds_count", **health) == 200


def test_each_app_has_its_own_registry(make_app) -> None:
    first, second = make_app(), make_app()
    first.test_client().get("/health")
    health = {"endpoint": "system.health", "method": "GET", "status": "200"}
    assert value(scrape(first.test_client()), "s2i_http_requests_total", **health) == 1
    assert value(scrape(second.test_client()), "s2i_http_requests_total", **health) is None


def test_metrics_are_for_operators_when_auth_is_on(make_app) -> None:
    client = make_app(api_keys=["user-key"], admin_api_keys=["admin-key"]).test_client()
    assert client.get("/metrics").status_code == 401
    user = client.get("/metrics", headers={"Authorization": "Bearer user-key"})
    assert user.status_code == 403
    assert value(scrape(client, ADMIN), "s2i_queue_depth") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_on_their_own_port(make_app) -> None:
    app = make_app(metrics_port=_free_port(), api_keys=["user-key"])
    server = app.extensions["metrics_server"]
    try:
        app.test_client().get("/health")
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            samples = parse(response.read().decode())
        health = {"endpoint": "system.health", "method": "GET", "status": "200"}
        assert value(samples, "s2i_http_requests_total", **health) == 1
    finally:
        server.shutdown()
        server.server_close()


def _log_records(app) -> list[dict]:  # type: ignore[no-untyped-def]
    path = Path(app.config["S2I_SETTINGS"].log_dir) / "app.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_logs_one_object_per_line(make_app) -> None:
    app = make_app(log_format="json", api_keys=["user-key"])
    client = app.test_client()
    headers = {"Authorization": "Bearer user-key", "X-Request-ID": "trace-1"}
    assert client.get("/images", headers=headers).status_code == 200
    assert client.get("/images", headers={"X-Request-ID": "trace-2"}).status_code == 401
    records = _log_records(app)  # every line parses
    by_id = {r["request_id"]: r for r in records if r["logger"] == "speech2image.requests"}
    ok = by_id["trace-1"]
    assert ok["level"] == "INFO" and ok["message"].startswith("GET /images 200")
    assert ok["endpoint"] == "images.list_images" and ok["status"] == 200
    assert ok["owner"].startswith("key:") and "user-key" not in json.dumps(records)
    assert ok["duration_ms"] >= 0 and ok["method"] == "GET" and ok["path"] == "/images"
    assert ok["time"].startswith("20")
    refused = by_id["trace-2"]
    assert refused["status"] == 401 and refused["owner"] == "local"


@pytest.mark.parametrize("log_format", ["text", None])
def test_text_logs_stay_the_default(make_app, log_format) -> None:
    app = make_app(**({"log_format": log_format} if log_format else {}))
    app.test_client().get("/health", headers={"X-Request-ID": "trace-t"})
    text = (Path(app.config["S2I_SETTINGS"].log_dir) / "app.log").read_text()
    assert "[trace-t] speech2image.requests: GET /health 200" in text
    assert not text.lstrip().startswith("{")


@pytest.mark.redis
@pytest.mark.postgres
def test_distributed_metrics_read_the_broker_even_with_no_worker_alive(
    make_app, postgres_url: str
) -> None:
    """Queue depth from the broker (not from live workers), workers per model, and the health
    of each dependency; while the broker is away the depth is unknown, never 0."""
    import uuid

    from .distributed_cluster import REDIS_URL, free_port, redis_problem

    if redis_problem():
        pytest.skip(redis_problem())
    prefix = f"s2imetrics{uuid.uuid4().hex[:8]}"
    app = make_app(broker_url=REDIS_URL, queue_prefix=prefix, database_url=postgres_url)
    client = app.test_client()
    try:
        for prompt in ("a red fox", "a small boat", "a tall tree"):  # no worker: they wait
            body = {"prompt": prompt, "model": "tiny-art", "async": True}
            assert client.post("/generate-image", json=body).status_code == 202
        samples = scrape(client)
        assert value(samples, "s2i_queue_depth") == 3
        assert value(samples, "s2i_queue_depth_by_model", model="sd:tiny-art") == 3
        assert value(samples, "s2i_workers", model="sd:tiny-art") == 0
        assert value(samples, "s2i_workers", model="whisper:base") == 0
        for dependency in ("broker", "database", "image_store"):
            assert value(samples, "s2i_dependency_up", dependency=dependency) == 1
        status = client.get("/status").json["jobs"]
        assert (status["mode"], status["queued"], status["workers"]) == ("distributed", 3, [])
    finally:
        import redis

        client_redis = redis.Redis.from_url(REDIS_URL)
        keys = list(client_redis.scan_iter(match=f"{prefix}*"))
        if keys:
            client_redis.delete(*keys)
    dead = make_app(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        queue_prefix=prefix,
        database_url=postgres_url,
    )
    samples = scrape(dead.test_client())
    assert value(samples, "s2i_queue_depth") is None  # unknown, not 0
    assert value(samples, "s2i_dependency_up", dependency="broker") == 0
    assert value(samples, "s2i_dependency_up", dependency="database") == 1
    assert dead.test_client().get("/status").json["jobs"]["queued"] is None
