"""Durable jobs: every accepted job is a row; restarts and kill -9 lose none of them."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update

from speech2image.jobs.local import MAX_ATTEMPTS
from speech2image.storage import JobRecord

from .test_jobs import sse_events, submit, wait_state

LONG = 24  # steps: long enough to be killed in the middle
ALPHA = {"X-API-Key": "alpha"}
BETA = {"X-API-Key": "beta"}


def test_jobs_answer_from_the_table_after_a_restart(make_app) -> None:
    first = make_app(api_keys="alpha,beta")
    job = submit(first.test_client(), ALPHA, prompt="a castle", seed=5, steps=2).json
    done = wait_state(first.test_client(), job["id"], {"succeeded"}, ALPHA)

    again = make_app(api_keys="alpha,beta")  # a new process on the same database
    client = again.test_client()
    body = client.get(f"/jobs/{job['id']}", headers=ALPHA).json
    assert body["state"] == "succeeded" and body["result"] == done["result"]
    assert body["progress"]["step"] == body["progress"]["total"] == 2
    assert body["created_at"] == done["created_at"]
    assert client.get(f"/jobs/{job['id']}", headers=BETA).status_code == 404
    listed = client.get("/jobs?state=succeeded", headers=ALPHA).json
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["total"] == 1
    assert client.get("/jobs", headers=BETA).json["jobs"] == []
    stream = client.get(f"/jobs/{job['id']}/events", headers=ALPHA)
    assert [event for event, _ in sse_events(stream.get_data(as_text=True))] == ["succeeded"]
    assert client.delete(f"/jobs/{job['id']}", headers=ALPHA).status_code == 200


def test_a_job_row_follows_the_job_and_expires(make_app) -> None:
    app = make_app()
    client = app.test_client()
    job = submit(client, prompt="a castle", seed=9, steps=3).json
    wait_state(client, job["id"], {"succeeded"})
    store = app.extensions["storage"].jobs
    row = store.get(job["id"])
    assert row is not None and row.state == "succeeded" and row.kind == "generate"
    assert row.attempts == 1 and row.worker.startswith("local:")
    assert row.step == row.total == 3 and row.stage == "generating"
    assert row.work["request"]["seed"] == 9 and row.work["request"]["steps"] == 3
    assert row.result["images"][0]["seed"] == 9 and row.error is None
    times = row.times()
    assert times["created_at"] <= times["started_at"] <= times["finished_at"]

    with store.engine.begin() as connection:  # finished two hours ago
        old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        connection.execute(update(JobRecord).values(finished_at=old))
    later = make_app(job_keep_seconds=3600, job_recover_on_start=False)
    assert later.test_client().get(f"/jobs/{job['id']}").status_code == 404
    assert later.test_client().post("/cleanup").json["jobs_expired"] == 1
    assert store.get(job["id"]) is None


def _dead_worker() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"local:{socket.gethostname()}:{process.pid}:1:deadbeef"


def test_start_up_reruns_or_fails_what_a_dead_process_left(make_app, tmp_path) -> None:
    app = make_app(api_keys="alpha")
    store = app.extensions["storage"].jobs
    dead = _dead_worker()
    request = {
        "prompt": "a lighthouse",
        "negative_prompt": None,
        "model": "auto",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.0,
        "seed": 11,
        "num_images": 1,
        "scheduler": "euler_a",
    }
    owner = "key:" + hashlib.sha256(b"alpha").hexdigest()[:16]
    ids = {name: uuid.uuid4().hex for name in ("rerun", "gone", "poison", "alive")}
    common = {"owner": owner, "worker": dead}
    store.add(
        id=ids["rerun"], kind="generate", work={"request": request}, state="running", **common
    )
    missing = str(Path(app.config["S2I_SETTINGS"].upload_dir) / f"upload-{uuid.uuid4().hex}")
    store.add(
        id=ids["gone"],
        kind="transcribe",
        work={"path": missing, "options": {"language": None}},
        **common,
    )
    store.add(
        id=ids["poison"],
        kind="generate",
        work={"request": request},
        state="running",
        attempts=MAX_ATTEMPTS,
        **common,
    )
    # An edit: its source image is the row's input, handed back to the rerun like audio is.
    from PIL import Image

    from speech2image.editing import prepare_edit

    work, packed = prepare_edit(
        app.extensions["images"],
        {"prompt": "a lighthouse at night", "seed": 11, "steps": 2},
        Image.new("RGB", (64, 64), "navy"),
        None,
        strength=0.5,
        parent_id="b" * 32,
    )
    upload_dir = Path(app.config["S2I_SETTINGS"].upload_dir)
    upload_dir.mkdir(parents=True, exist_ok=True)
    source = upload_dir / f"upload-{uuid.uuid4().hex}"
    source.write_bytes(packed)
    ids["edit"] = uuid.uuid4().hex
    store.add(
        id=ids["edit"],
        kind="edit",
        work=app.extensions["job_kinds"]["edit"].dump(work),
        input=str(source),
        state="running",
        **common,
    )
    living = app.extensions["jobs"].worker_name  # a process that still runs: not touched
    store.add(
        id=ids["alive"], kind="generate", work={"request": request}, owner=owner, worker=living
    )

    client = make_app(api_keys="alpha").test_client()
    rerun = wait_state(client, ids["rerun"], {"succeeded", "failed"}, ALPHA)
    assert rerun["state"] == "succeeded", rerun
    assert rerun["result"]["images"][0]["seed"] == 11
    edit = wait_state(client, ids["edit"], {"succeeded", "failed"}, ALPHA)
    assert edit["state"] == "succeeded", edit
    assert edit["result"]["parent_id"] == "b" * 32 and not source.exists()
    for name in ("gone", "poison"):
        body = client.get(f"/jobs/{ids[name]}", headers=ALPHA).json
        assert body["state"] == "failed" and body["error"]["code"] == "interrupted", body
    assert (
        "audio is gone"
        in client.get(f"/jobs/{ids['gone']}", headers=ALPHA).json["error"]["message"]
    )
    assert store.get(ids["alive"]).state == "queued"
    assert store.get(ids["rerun"]).attempts == 1


# --- a real server process, killed with SIGKILL mid-job --------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(base: str, method: str, path: str, body: bytes | None = None, headers=None) -> Any:  # type: ignore[no-untyped-def]
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "run.py"],
        cwd=Path(__file__).resolve().parent.parent,
        env={**env, "PORT": str(port)},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if _call(base, "GET", "/health")[0] == 200:
                return process, base
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start: " + log.read_text()[-3000:])


def _wait_job(base: str, job_id: str, states: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = _call(base, "GET", f"/jobs/{job_id}")
        if status == 200 and body["state"] in states:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_finishes_or_fails_every_job(
    tmp_path, model_cache, tiny_models
) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("S2I_") and key not in ("HOST", "PORT", "DEBUG")
    }
    env.update(
        S2I_IMAGE_DIR=str(tmp_path / "images"),
        S2I_DATA_DIR=str(tmp_path / "data"),
        S2I_LOG_DIR=str(tmp_path / "logs"),
        S2I_UPLOAD_DIR=str(tmp_path / "uploads"),
        S2I_MODEL_CACHE_DIR=str(model_cache),
        S2I_IMAGE_MODELS=json.dumps({n: {"source": str(p)} for n, p in tiny_models.items()}),
        S2I_STYLE_MODELS=json.dumps({"artistic": "tiny-art", "photographic": "tiny-photo"}),
        S2I_DEFAULT_WIDTH="64",
        S2I_DEFAULT_HEIGHT="64",
        S2I_JOB_WORKERS="1",
        S2I_MODEL_IDLE_SECONDS="0",
        S2I_CLEANUP_INTERVAL_SECONDS="0",
        S2I_RATELIMIT_ENABLED="false",
    )
    json_headers = {"Content-Type": "application/json"}
    log = tmp_path / "server.log"
    first, base = _start_server(env, log)
    try:
        long_job = _call(
            base,
            "POST",
            "/generate-image",
            json.dumps({"prompt": "a castle", "steps": LONG, "seed": 1, "async": True}).encode(),
            json_headers,
        )[1]
        short_job = _call(
            base,
            "POST",
            "/generate-image",
            json.dumps({"prompt": "a harbour", "steps": 2, "seed": 2, "async": True}).encode(),
            json_headers,
        )[1]
        boundary = "s2i" + uuid.uuid4().hex
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="async"\r\n\r\ntrue\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\nRIFF not really audio\r\n--{boundary}--\r\n"
        ).encode()
        audio_job = _call(
            base,
            "POST",
            "/transcribe-audio",
            form,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )[1]
        deadline = time.monotonic() + 120
        while True:  # kill it in the middle of the long generation
            body = _call(base, "GET", f"/jobs/{long_job['id']}")[1]
            if body["state"] == "running" and body["progress"]["step"] >= 1:
                break
            assert body["state"] in ("queued", "running") and time.monotonic() < deadline, body
            time.sleep(0.02)
        assert body["progress"]["step"] < LONG
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'history.sqlite3'}")
    with engine.connect() as connection:
        states = dict(connection.execute(text("SELECT id, state FROM jobs")).all())
    engine.dispose()
    assert states == {
        long_job["id"]: "running",
        short_job["id"]: "queued",
        audio_job["id"]: "queued",
    }
    (upload,) = (tmp_path / "uploads").iterdir()  # kept while its job waits
    upload.unlink()  # ... and lost with the machine's temporary files

    second, base = _start_server(env, log)
    try:
        finished = _wait_job(base, long_job["id"], {"succeeded", "failed"})
        assert finished["state"] == "succeeded", finished
        assert finished["progress"]["step"] == LONG
        short = _wait_job(base, short_job["id"], {"succeeded", "failed"})
        assert short["state"] == "succeeded", short
        audio = _wait_job(base, audio_job["id"], {"succeeded", "failed"})
        assert audio["state"] == "failed" and audio["error"]["code"] == "interrupted", audio
        listing = _call(base, "GET", "/images")[1]
        assert listing["total"] == 2
        files = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
        assert files == sorted(i["filename"] for i in listing["images"])
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
