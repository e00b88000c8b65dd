"""Jobs: async lifecycle, SSE progress, cancellation, batching, admission, speech-to-image."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from speech2image.jobs import Job, JobKinds
from speech2image.jobs.local import LocalJobRunner

from .audio_samples import multipart_body
from .test_images import generate, image_files, pixels
from .toy_kinds import CallbackKind

LONG = 60  # steps: a couple of seconds with the tiny model on 2 cores


def submit(client, headers=None, **body):  # type: ignore[no-untyped-def]
    response = client.post("/generate-image", json={"async": True, **body}, headers=headers)
    assert response.status_code == 202, response.json
    return response


def wait_state(client, job_id: str, states: set[str], headers=None, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/jobs/{job_id}", headers=headers).json
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def sse_events(data: str) -> list[tuple[str, dict]]:
    events = []
    for block in data.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_async_lifecycle(make_app) -> None:
    app = make_app()
    client = app.test_client()
    response = submit(client, prompt="a castle", seed=3, steps=8)
    job = response.json
    assert response.headers["Location"] == f"/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["kind"] == "generate"
    done = wait_state(client, job["id"], {"succeeded"})
    assert done["progress"]["step"] == done["progress"]["total"] == 8
    (image,) = done["result"]["images"]
    assert image["seed"] == 3
    assert image_files(app) == [image["filename"]]
    prefer = client.post(
        "/generate-image", json={"prompt": "x", "steps": 1}, headers={"Prefer": "respond-async"}
    )
    assert prefer.status_code == 202


def test_progress_streams_as_server_sent_events(make_app) -> None:
    client = make_app().test_client()
    job = submit(client, prompt="a castle", steps=10).json
    response = client.get(f"/jobs/{job['id']}/events")
    assert response.mimetype == "text/event-stream"
    events = sse_events(response.get_data(as_text=True))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "succeeded" and kinds.count("succeeded") == 1
    steps = [body["progress"]["step"] for kind, body in events if kind == "progress"]
    assert steps == sorted(steps) and max(steps) >= 5
    running = [
        body for kind, body in events if body["state"] == "running" and body["progress"]["step"]
    ]
    assert any(body["progress"]["eta_seconds"] is not None for body in running)
    assert events[-1][1]["result"]["images"]


def test_cancel_queued_and_running_jobs(make_app) -> None:
    app = make_app(job_workers=1)
    client = app.test_client()
    running = submit(client, prompt="a castle", steps=LONG, seed=1).json
    queued = submit(client, prompt="a tower", steps=LONG, seed=2, width=72).json
    wait_state(client, running["id"], {"running"})
    cancelled = client.delete(f"/jobs/{queued['id']}")
    assert cancelled.status_code == 200 and cancelled.json["state"] == "cancelled"
    stopping = client.delete(f"/jobs/{running['id']}")
    assert stopping.status_code in (200, 202)
    final = wait_state(client, running["id"], {"cancelled", "succeeded"})
    assert final["state"] == "cancelled"
    assert final["progress"]["step"] < LONG  # stopped between denoising steps
    assert image_files(app) == []
    assert client.get("/images").json["total"] == 0
    assert app.extensions["images"].state() == {"running": 0, "waiting": 0}
    art = next(r for r in app.extensions["model_loader"].status() if r["name"] == "sd:tiny-art")
    assert art["leases"] == 0  # the pipeline was released
    assert client.get(f"/jobs/{queued['id']}").json["state"] == "cancelled"


def test_jobs_belong_to_their_owner(make_app) -> None:
    client = make_app(api_keys="alpha,beta").test_client()
    job = submit(client, headers={"X-API-Key": "alpha"}, prompt="x", steps=1).json
    beta = {"X-API-Key": "beta"}
    assert client.get(f"/jobs/{job['id']}", headers=beta).status_code == 404
    assert client.delete(f"/jobs/{job['id']}", headers=beta).status_code == 404
    assert client.get(f"/jobs/{job['id']}/events", headers=beta).status_code == 404
    assert wait_state(client, job["id"], {"succeeded"}, headers={"X-API-Key": "alpha"})


def test_batching_merges_requests_and_matches_unbatched_images(make_app, monkeypatch) -> None:
    import speech2image.image_service as image_service

    calls: list[int] = []
    real_generate = image_service.generate

    def counting(pipe, spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(spec.prompts))
        return real_generate(pipe, spec, **kwargs)

    monkeypatch.setattr(image_service, "generate", counting)
    app = make_app(job_workers=1, batch_max_wait_ms=1500, batch_max_images=4)
    client = app.test_client()
    prompts = ["a red castle", "a blue tower", "a green bridge"]
    jobs = [submit(client, prompt=p, seed=10 + i, steps=5).json for i, p in enumerate(prompts)]
    results = [wait_state(client, j["id"], {"succeeded"})["result"] for j in jobs]
    assert calls == [3]  # one pipeline call for the three requests
    assert all(r["batch_size"] == 3 for r in results)
    assert app.extensions["jobs"].stats().batches_run == 1

    alone = make_app(job_workers=1, batch_max_images=1)
    solo = alone.test_client()
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        single = generate(solo, prompt=prompt, seed=10 + i, steps=5).json
        assert single["batch_size"] == 1
        batched = pixels(client, result["images"][0]["url"])
        unbatched = pixels(solo, single["images"][0]["url"])
        assert np.abs(batched - unbatched).mean() < 1
    assert calls[1:] == [1, 1, 1]


def test_incompatible_requests_are_not_merged(make_app) -> None:
    app = make_app(job_workers=1, batch_max_wait_ms=300)
    client = app.test_client()
    a = submit(client, prompt="a", steps=3).json
    b = submit(client, prompt="b", steps=4).json  # different steps: another batch
    for job in (a, b):
        assert wait_state(client, job["id"], {"succeeded"})["result"]["batch_size"] == 1


def test_queue_limits_answer_429_and_503_with_retry_after(make_app) -> None:
    app = make_app(job_workers=1, queue_max_per_owner=2, queue_max=2, api_keys="a,b,c")
    client = app.test_client()
    first = submit(client, headers={"X-API-Key": "a"}, prompt="x", steps=LONG).json
    wait_state(client, first["id"], {"running"}, headers={"X-API-Key": "a"})
    submit(client, headers={"X-API-Key": "a"}, prompt="y", steps=LONG, width=72)
    over_owner = client.post(
        "/generate-image", json={"prompt": "z", "async": True}, headers={"X-API-Key": "a"}
    )
    assert over_owner.status_code == 429
    assert over_owner.json["error"]["code"] == "queue_full"
    assert int(over_owner.headers["Retry-After"]) >= 1
    submit(client, headers={"X-API-Key": "b"}, prompt="w", steps=1, width=80)
    over_all = client.post(
        "/generate-image", json={"prompt": "v", "async": True}, headers={"X-API-Key": "c"}
    )
    assert over_all.status_code == 503
    assert over_all.json["error"]["code"] == "service_busy"
    assert int(over_all.headers["Retry-After"]) >= 1
    runner = app.extensions["jobs"]
    for owner in ("a", "b"):
        for job in list(runner._jobs.values()):  # test cleanup: stop the long jobs
            runner.cancel(owner, job.id)


def test_scheduler_prefers_resident_models_within_fairness_window() -> None:
    order: list[str] = []
    gate = threading.Event()

    def handler(jobs: list[Job]) -> None:
        gate.wait(10)
        for job in jobs:
            order.append(job.work["name"])
            job.succeed({})

    kinds = JobKinds([CallbackKind("x", handler)])

    def job(name: str, model: str) -> Job:
        return kinds.new("x", "o", {"name": name, "model": model})

    runner = LocalJobRunner(
        kinds, workers=1, fairness_seconds=60, is_resident=lambda m: m == "warm"
    )
    blocker = runner.submit(job("blocker", "warm"))
    time.sleep(0.05)  # the worker holds the blocker; the rest queue up
    for name, model in (
        ("cold-1", "cold"),
        ("warm-1", "warm"),
        ("cold-2", "cold"),
        ("warm-2", "warm"),
    ):
        runner.submit(job(name, model))
    gate.set()
    assert blocker.wait(10)
    deadline = time.monotonic() + 10
    while len(order) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert order == ["blocker", "warm-1", "warm-2", "cold-1", "cold-2"]
    runner.shutdown()

    unfair: list[str] = []
    order = unfair
    gate.clear()
    runner = LocalJobRunner(
        kinds, workers=1, fairness_seconds=0.0, is_resident=lambda m: m == "warm"
    )
    runner.submit(job("blocker", "warm"))
    time.sleep(0.05)
    runner.submit(job("cold-1", "cold"))
    runner.submit(job("warm-1", "warm"))
    gate.set()
    deadline = time.monotonic() + 10
    while len(unfair) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert unfair == ["blocker", "cold-1", "warm-1"]  # past the window: oldest first
    runner.shutdown()


def test_speech_to_image_end_to_end(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "3", "seed": "5"},
            content_type="multipart/form-data",
        )
    assert response.status_code == 200, response.json
    body = response.json
    assert "fox" in body["transcript"]["text"].lower()
    assert body["prompt"] == body["transcript"]["text"]
    assert body["model"] in ("tiny-art", "tiny-photo") and body["model_choice"]["reason"]
    (image,) = body["images"]
    assert image["seed"] == 5
    row = client.get("/images").json["images"][0]
    assert row["transcript_id"] == body["transcript"]["id"]
    assert row["prompt"] == body["transcript"]["text"]
    assert "transcription" in body["timings"]
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).iterdir()) == []


def test_speech_to_image_async_reports_stages(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    body, content_type = multipart_body(
        {"options": json.dumps({"steps": 4}), "async": "true"},
        {"audio": ("clip.wav", speech["long"].read_bytes())},
    )
    response = client.post("/speech-to-image", data=body, content_type=content_type)
    assert response.status_code == 202, response.json
    events = sse_events(client.get(f"/jobs/{response.json['id']}/events").get_data(as_text=True))
    stages = [body["progress"]["stage"] for _, body in events if body["progress"]["stage"]]
    assert "transcribing" in stages and "generating" in stages
    assert stages.index("transcribing") < stages.index("generating")
    assert events[-1][0] == "succeeded"
    assert "lighthouse" in events[-1][1]["result"]["transcript"]["text"].lower()


def test_speech_to_image_validates_before_decoding(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "options": json.dumps({"width": 100})},
            content_type="multipart/form-data",
        )
    assert response.status_code == 400
    assert "`options.width`" in response.json["error"]["message"]
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).glob("*")) == []


def test_client_disconnect_cancels_a_synchronous_job(make_app, live_server) -> None:
    app = make_app(job_workers=1)
    base = live_server(app)
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "a castle", "steps": LONG}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        runner = app.extensions["jobs"]
        deadline = time.monotonic() + 30
        while not runner.stats().running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    (job,) = runner._jobs.values()
    assert job.wait(30)
    assert job.state == "cancelled"
    assert job.step < LONG
    assert image_files(app) == []


@pytest.mark.parametrize("field", ["audio"])
def test_transcription_runs_as_a_job(client, speech, field) -> None:
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/transcribe-audio",
            data={field: (fh, "clip.wav"), "async": "true"},
            content_type="multipart/form-data",
        )
    assert response.status_code == 202
    done = wait_state(client, response.json["id"], {"succeeded"})
    assert "fox" in done["result"]["text"].lower()


def test_failed_speech_to_image_leaves_no_transcript_or_image(
    make_app, speech, monkeypatch
) -> None:
    from sqlalchemy import func, select

    import speech2image.imagestore.local as storage_module
    from speech2image.storage import TranscriptRecord

    def full_disk(src, dst):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(storage_module.os, "replace", full_disk)
    app = make_app()
    with open(speech["english"], "rb") as fh:
        response = app.test_client().post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "2"},
            content_type="multipart/form-data",
        )
    assert response.status_code == 500
    storage = app.extensions["storage"]
    with storage.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(TranscriptRecord)) == 0
    assert image_files(app) == []
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).iterdir()) == []


def test_long_speech_is_truncated_not_refused(make_app, speech) -> None:
    app = make_app(max_prompt_chars=20)
    with open(speech["english"], "rb") as fh:
        response = app.test_client().post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "1"},
            content_type="multipart/form-data",
        )
    assert response.status_code == 200, response.json
    body = response.json
    assert body["truncated"] is True
    assert len(body["prompt"]) <= 20 and body["transcript"]["text"].startswith(body["prompt"])


def test_disconnect_does_not_cancel_a_job_another_client_watches(make_app, live_server) -> None:
    import urllib.request

    app = make_app(job_workers=1)
    base = live_server(app)
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "a castle", "steps": 20}).encode()
    runner = app.extensions["jobs"]
    events: list[str] = []
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while not runner.stats().running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (job,) = runner._jobs.values()

        def watch() -> None:
            with urllib.request.urlopen(f"{base}/jobs/{job.id}/events", timeout=60) as stream:
                events.append(stream.read().decode())

        watcher = threading.Thread(target=watch)
        watcher.start()
        while job.waiters < 2:  # the synchronous request and the SSE stream
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert job.wait(60)
    watcher.join(60)
    assert job.state == "succeeded"
    assert "event: succeeded" in events[0]
    assert len(image_files(app)) == 1


def test_event_streams_are_capped_so_health_keeps_a_thread(make_app) -> None:
    app = make_app(event_streams=1)  # one stream slot
    client = app.test_client()
    job = submit(client, prompt="a castle", steps=LONG).json
    first = client.get(f"/jobs/{job['id']}/events", buffered=False)
    assert first.status_code == 200
    second = client.get(f"/jobs/{job['id']}/events")
    assert second.status_code == 503 and second.json["error"]["code"] == "service_busy"
    assert "poll GET /jobs" in second.json["error"]["message"]
    assert client.get("/health").status_code == 200
    first.close()  # the slot comes back when the stream closes
    client.delete(f"/jobs/{job['id']}")
    third = client.get(f"/jobs/{job['id']}/events")
    assert third.status_code == 200
    third.close()


def test_an_idempotency_key_makes_one_job_however_often_it_is_sent(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    key = {"Idempotency-Key": "order-7731-img"}
    first = client.post("/generate-image", json={"prompt": "a kite", "async": True}, headers=key)
    again = client.post("/generate-image", json={"prompt": "a kite", "async": True}, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json["id"] == again.json["id"]
    done = wait_state(client, first.json["id"], {"succeeded"})
    sync = client.post("/generate-image", json={"prompt": "a kite"}, headers=key)
    assert sync.status_code == 200 and sync.json == done["result"]  # the same images
    assert client.get("/images").json["total"] == 1
    with open(speech["english"], "rb") as audio:  # the key of another kind of request
        reused = client.post("/transcribe-audio", data={"audio": (audio, "a.wav")}, headers=key)
    assert reused.status_code == 409 and reused.json["error"]["code"] == "idempotency_key_reused"
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).iterdir()) == []  # no upload left
    bad = client.post("/generate-image", json={"prompt": "x"}, headers={"Idempotency-Key": "é"})
    assert bad.status_code == 400 and bad.json["error"]["details"]["field"] == "Idempotency-Key"
    other_owner = make_app(api_keys="alpha,beta").test_client()
    for api_key in ("alpha", "beta"):  # keys are per caller: the same key, two callers, two jobs
        body = {"prompt": "a kite", "async": True, "steps": 1}
        answer = other_owner.post(
            "/generate-image", json=body, headers={**key, "X-API-Key": api_key}
        )
        assert answer.status_code == 202
        wait_state(other_owner, answer.json["id"], {"succeeded"}, headers={"X-API-Key": api_key})
    assert other_owner.get("/jobs", headers={"X-API-Key": "alpha"}).json["total"] == 1
