"""Distributed mode on real processes: `speech2image serve` APIs and `speech2image worker`s.

One cluster per module (two API processes, two workers) on the machine's Redis and
PostgreSQL; skipped with the reason when either does not answer.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from speech2image.storage import Storage

from .distributed_cluster import (
    Cluster,
    free_port,
    http,
    multipart,
    postgres_problem,
    redis_problem,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

HEAVY = ("torch", "ctranslate2", "faster_whisper", "diffusers", "transformers")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    model_cache: Path,
    tiny_models: dict[str, Path],
    s3_server: Any,
):  # type: ignore[no-untyped-def]
    """Worker `a` serves every model; worker `b` only Whisper and tiny-art; two APIs.

    Images go to SeaweedFS and each process has its own folders: nothing on a shared disk.
    """
    problem = redis_problem() or postgres_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("cluster")
    s3 = {
        f"S2I_{name.upper()}": value
        for name, value in s3_server.settings(s3_server.new_bucket()).items()
    }
    settings = {
        **s3,
        "S2I_MODEL_CACHE_DIR": model_cache,
        "S2I_IMAGE_MODELS": json.dumps(
            {name: {"source": str(path)} for name, path in tiny_models.items()}
        ),
        "S2I_STYLE_MODELS": json.dumps({"artistic": "tiny-art", "photographic": "tiny-photo"}),
        "S2I_DEFAULT_WIDTH": 64,
        "S2I_DEFAULT_HEIGHT": 64,
        "S2I_DEFAULT_STEPS": 4,
        "S2I_MAX_STEPS": 500,
        "S2I_MODEL_IDLE_SECONDS": 0,
        "S2I_CLEANUP_INTERVAL_SECONDS": 0,
        "S2I_RATELIMIT_DEFAULT": "10000/minute",
        "S2I_RATELIMIT_TRANSCRIBE": "10000/minute",
        "S2I_RATELIMIT_GENERATE": "10000/minute",
        "S2I_JOB_WORKERS": 1,
        "S2I_BATCH_MAX_WAIT_MS": 100,
        "S2I_BROKER_VISIBILITY_TIMEOUT": 6,
        "S2I_JOB_MAX_ATTEMPTS": 2,
        "S2I_JOB_LEASE_SECONDS": 4,  # a dead worker's job is queued again within seconds
        "S2I_RECONCILE_INTERVAL_SECONDS": 1,
        "S2I_WEBHOOK_ALLOW_PRIVATE": "true",  # the test's receiver is on loopback
        "S2I_WEBHOOK_SECRET": "cluster-webhook-secret",
        "S2I_WEBHOOK_POLL_SECONDS": 0.2,
    }
    cluster = Cluster(root, settings)
    cluster.create_schema()
    Storage(cluster.database_url, root / "images").engine.dispose()  # tables before the processes
    try:
        cluster.start_worker(name="a", S2I_METRICS_PORT=free_port())  # its own /metrics
        cluster.start_worker(name="b", S2I_WORKER_MODELS="whisper,tiny-art")
        cluster.start_api()
        cluster.start_api()
        cluster.wait_ready()  # every API ready, both workers live
        yield cluster
    finally:
        cluster.stop()


def _urls(cluster: Cluster) -> tuple[str, str]:
    return cluster.apis[0].url, cluster.apis[1].url


def _wait_job(url: str, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, body = http("GET", f"{url}/jobs/{job_id}")
        assert status == 200, body
        if body["state"] in states:
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {body['state']}")


def _submit(url: str, **fields: Any) -> dict[str, Any]:
    status, headers, body = http("POST", f"{url}/generate-image", {"async": True, **fields})
    assert status == 202, body
    assert headers["Location"] == f"/jobs/{body['id']}"
    return body


def test_generate_sync_and_async_through_workers_from_any_api(cluster: Cluster) -> None:
    first, second = _urls(cluster)
    status, _, body = http("POST", f"{first}/generate-image", {"prompt": "a red fox", "seed": 3})
    assert status == 200, body
    (image,) = body["images"]
    assert body["model"] == "tiny-art"
    status, _, png = http("GET", f"{second}{image['url']}")
    assert status == 200 and png.startswith(b"\x89PNG")

    job = _submit(second, prompt="a photo of a harbour", num_images=2)
    assert job["state"] == "queued" and job["model"] == "sd:tiny-photo"
    done = _wait_job(first, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert len(done["result"]["images"]) == 2
    assert done["worker"] in cluster.worker_names(first).values()
    status, _, listing = http("GET", f"{second}/images?per_page=10")
    assert {i["id"] for i in done["result"]["images"]} <= {i["id"] for i in listing["images"]}
    # GET /jobs on either API process lists it, newest first, filtered by state.
    status, _, jobs = http("GET", f"{first}/jobs?state=succeeded")
    assert status == 200, jobs
    assert jobs["jobs"][0]["id"] == job["id"] and jobs["total"] >= 1
    status, _, queued = http("GET", f"{first}/jobs?state=queued")
    assert job["id"] not in {j["id"] for j in queued["jobs"]}


def test_a_worker_serves_its_own_metrics(cluster: Cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    api, _ = _urls(cluster)
    body = {"prompt": "a photo of a harbour", "model": "tiny-photo", "steps": 1}
    status, _, answer = http("POST", f"{api}/generate-image", body)
    assert status == 200, answer
    port = cluster.worker("a").env["S2I_METRICS_PORT"]  # only worker a serves tiny-photo
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    done = ("s2i_jobs_finished_total", (("kind", "generate"), ("state", "succeeded")))
    assert samples[done] >= 1
    resident = ("s2i_model_resident_bytes", (("device", "cpu"), ("model", "sd:tiny-photo")))
    assert samples[resident] > 0
    steps = ("s2i_denoise_step_seconds_count", (("model", "sd:tiny-photo"),))
    assert samples[steps] >= 1


def test_api_process_never_imports_model_libraries(
    cluster: Cluster, speech: dict[str, Path]
) -> None:
    """Every route, audio and spec included, is served without a model library here."""
    script = f"""
import json, sys
from speech2image.app import create_app
app = create_app()
assert app.config["S2I_ROLE"] == "api"
client = app.test_client()
audio = {str(speech["english"])!r}
def upload(path, **fields):
    return {{**fields, "file": (open(path, "rb"), "clip.wav")}}
answers = {{
    "generate": client.post("/generate-image", json={{"prompt": "a small boat", "steps": 1}}),
    "openapi": client.get("/openapi.json"),
    "docs": client.get("/docs/"),
    "page": client.get("/"),
    "config": client.get("/config"),
    "models": client.get("/v1/models"),
    "transcribe": client.post(
        "/transcribe-audio", data=upload(audio, **{{"async": "true", "language": "EN"}})
    ),
    "speech": client.post("/speech-to-image", data=upload(audio, steps="1", **{{"async": "true"}})),
    "v1-audio": client.post(
        "/v1/audio/transcriptions", data=upload(audio, model="whisper-1", language="en")
    ),
    "v1-images": client.post(
        "/v1/images/generations", json={{"prompt": "a boat", "size": "64x64", "steps": 1}}
    ),
    "jobs": client.get("/jobs"),
}}
bad = {{k: (a.status_code, a.get_data(as_text=True)[:200]) for k, a in answers.items()
       if a.status_code >= 400}}
assert not bad, bad
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_transcription_runs_on_a_worker_and_hostile_audio_is_refused_at_the_api(
    cluster: Cluster, speech: dict[str, Path], tmp_path: Path
) -> None:
    first, second = _urls(cluster)
    body, content_type = multipart({}, {"audio": speech["english"]})
    status, _, answer = http(
        "POST", f"{first}/transcribe-audio", data=body, headers={"Content-Type": content_type}
    )
    assert status == 200, answer
    assert "fox" in answer["text"].lower()

    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    before = http("GET", f"{second}/status")[2]["jobs"]["queued"]
    body, content_type = multipart({"async": "true"}, {"audio": playlist})
    status, _, answer = http(
        "POST", f"{second}/transcribe-audio", data=body, headers={"Content-Type": content_type}
    )
    assert status == 415, answer
    assert answer["error"]["code"] == "unsupported_audio"
    assert http("GET", f"{second}/status")[2]["jobs"]["queued"] == before


def test_jobs_of_a_model_go_only_to_workers_that_serve_it_and_batch_across_apis(
    cluster: Cluster,
) -> None:
    first, second = _urls(cluster)
    names = cluster.worker_names(first)
    serving_photo = {
        w["name"]
        for w in http("GET", f"{first}/status")[2]["jobs"]["workers"]
        if "sd:tiny-photo" in w["models"]
    }
    assert serving_photo == {names[cluster.worker("a").popen.pid]}
    # Occupy worker a, then send two compatible requests through the two API processes:
    # they wait in the worker together and run as one pipeline call.
    blocker = _submit(first, prompt="a photo of a long road", model="tiny-photo", steps=60)
    _wait_job(first, blocker["id"], ("running",))
    jobs = [
        _submit(url, prompt=f"a photo of a cat {i}", model="tiny-photo", steps=2, seed=i)
        for i, url in enumerate((first, second))
    ]
    results = [_wait_job(second, j["id"], ("succeeded", "failed")) for j in jobs]
    for done in results:
        assert done["state"] == "succeeded", done
        assert done["result"]["batch_size"] == 2
        assert done["worker"] in serving_photo
    assert _wait_job(first, blocker["id"], ("succeeded",))["worker"] in serving_photo


def _events(url: str, job_id: str):  # type: ignore[no-untyped-def]
    """Yield (event, data) from a job's SSE stream."""
    with urllib.request.urlopen(f"{url}/jobs/{job_id}/events", timeout=120) as stream:
        event = None
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, json.loads(line[6:])


def test_progress_relayed_by_another_api_and_cancel_stops_a_running_job(
    cluster: Cluster,
) -> None:
    first, second = _urls(cluster)
    job = _submit(first, prompt="a photo of a mountain", model="tiny-photo", steps=400)
    _wait_job(first, job["id"], ("running",))
    queued = _submit(first, prompt="a photo of a lake", model="tiny-photo", steps=399)
    time.sleep(0.5)  # the worker holds it behind the running job
    seen = []
    asked = False
    for event, data in _events(second, job["id"]):
        seen.append((event, data["state"], data["progress"]["step"]))
        if event == "progress" and data["progress"]["step"] >= 2 and not asked:
            asked = True  # once: later progress events may still arrive before it stops
            # The second job waits behind it: cancelling it is immediate.
            status, _, body = http("DELETE", f"{second}/jobs/{queued['id']}")
            assert (status, body["state"]) == (200, "cancelled")
            status, _, body = http("DELETE", f"{first}/jobs/{job['id']}")
            # 202 while it stops; 200 when the worker stopped it before this answer.
            assert (status, body["state"]) in ((202, "running"), (200, "cancelled")), body
        if event in ("succeeded", "failed", "cancelled"):
            break
    assert seen[-1][0] == "cancelled", seen
    assert 2 <= seen[-1][2] < 400
    assert _wait_job(second, queued["id"], ("cancelled",))["state"] == "cancelled"
    # The worker is free again.
    after = _submit(second, prompt="a photo of a tree", model="tiny-photo", steps=1)
    assert _wait_job(first, after["id"], ("succeeded",))["state"] == "succeeded"
    # Their rows say how they ended too.
    assert _row_states(cluster, job["id"], queued["id"]) == ["cancelled", "cancelled"]


def test_speech_to_image_goes_to_a_worker_that_serves_whisper_and_the_image_models(
    cluster: Cluster, speech: dict[str, Path]
) -> None:
    first, second = _urls(cluster)
    workers = {w["pid"]: w for w in http("GET", f"{first}/status")[2]["jobs"]["workers"]}
    a, b = workers[cluster.worker("a").popen.pid], workers[cluster.worker("b").popen.pid]
    assert "pipeline.auto" in a["queues"] and "pipeline.sd:tiny-photo" in a["queues"]
    # b lacks tiny-photo, which the automatic choice may pick: it never takes such a job.
    assert "pipeline.auto" not in b["queues"] and "pipeline.sd:tiny-art" in b["queues"]
    body, content_type = multipart({"async": "true"}, {"audio": speech["english"]})
    status, _, job = http(
        "POST", f"{second}/speech-to-image", data=body, headers={"Content-Type": content_type}
    )
    assert status == 202, job
    done = _wait_job(first, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert "fox" in done["result"]["transcript"]["text"].lower()
    assert done["worker"] == a["name"]


def test_admission_and_rate_limits_count_across_api_processes(
    make_app, live_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from .distributed_cluster import REDIS_URL, Cluster

    problem = redis_problem() or postgres_problem()
    if problem:
        pytest.skip(problem)
    shared = Cluster(tmp_path, {})  # for its prefix, schema and clean-up; no process
    shared.create_schema()
    try:
        urls = [
            live_server(
                make_app(
                    broker_url=REDIS_URL,
                    queue_prefix=shared.prefix,
                    database_url=shared.database_url,
                    queue_max_per_owner=2,
                    ratelimit_generate="3/minute",
                )
            )
            for _ in range(2)
        ]
        # No worker consumes this prefix: the jobs stay queued and keep counting.
        assert _submit(urls[0], prompt="one")["state"] == "queued"
        assert _submit(urls[1], prompt="two")["state"] == "queued"
        status, headers, body = http("POST", f"{urls[0]}/generate-image", {"prompt": "three"})
        assert (status, body["error"]["code"]) == (429, "queue_full"), body
        assert int(headers["Retry-After"]) >= 1
        # Three generation requests were counted, wherever they arrived: the fourth is limited.
        status, _, body = http("POST", f"{urls[1]}/generate-image", {"prompt": "four"})
        assert (status, body["error"]["code"]) == (429, "rate_limited"), body
    finally:
        shared.stop()


def test_status_lists_workers_models_and_queues(cluster: Cluster) -> None:
    first, _ = _urls(cluster)
    jobs = http("GET", f"{first}/status")[2]["jobs"]
    assert jobs["mode"] == "distributed"
    assert {"sd:tiny-art", "sd:tiny-photo", "whisper:base"} <= set(jobs["queues"])
    for worker in jobs["workers"]:
        assert {"name", "models", "resident_bytes", "running", "pid"} <= set(worker)


def test_ready_checks_broker_database_and_a_worker_per_model(cluster: Cluster) -> None:
    first, _ = _urls(cluster)
    status, _, body = http("GET", f"{first}/ready")
    assert status == 200, body
    assert {name for name, check in body["checks"].items() if check["ok"]} == {
        "broker",
        "database",
        "image_store",
        "workers",
    }
    assert {m["name"] for m in body["models"]} == {"whisper:base", "sd:tiny-art", "sd:tiny-photo"}


# --- faults on real processes ----------------------------------------------------------------


def _row(cluster: Cluster, job_id: str) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(cluster.database_url)
    with engine.connect() as connection:
        row = connection.execute(
            text("select state, attempts, worker, deliveries from jobs where id = :id"),
            {"id": job_id},
        ).one()
    engine.dispose()
    return dict(row._mapping)


def _deliveries(cluster: Cluster, job_id: str) -> int:
    """How many times a worker took the job's task (its row counts them)."""
    return int(_row(cluster, job_id)["deliveries"])


def _running_on(cluster: Cluster, url: str, job_id: str) -> str:
    """The cluster name (a or b) of the live worker running ``job_id``, once it runs."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = _wait_job(url, job_id, ("running",))
        names = {name: pid for pid, name in cluster.worker_names(url).items()}
        for worker in cluster.workers:
            if worker.alive() and names.get(body.get("worker", "")) == worker.popen.pid:
                return worker.name
        time.sleep(0.2)  # still the record of a worker that died: wait for the redelivery
    raise AssertionError(f"job {job_id} is not running on a live worker")


def _stored_objects(cluster: Cluster, s3_server: Any) -> list[str]:
    bucket = cluster.settings["S2I_S3_BUCKET"]
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_a_job_longer_than_the_visibility_timeout_runs_once(cluster: Cluster) -> None:
    first, second = _urls(cluster)
    job = _submit(first, prompt="a long painting", model="tiny-art", steps=200)
    started = time.monotonic()
    done = _wait_job(second, job["id"], ("succeeded", "failed"), timeout=240)
    assert done["state"] == "succeeded", done
    assert time.monotonic() - started > 6 * 1.5  # well past S2I_BROKER_VISIBILITY_TIMEOUT
    time.sleep(3)  # a wrongly restored copy would be delivered by now
    assert _deliveries(cluster, job["id"]) == 1
    assert _row(cluster, job["id"])["attempts"] == 1


def test_kill_9_mid_generation_redelivers_to_another_worker_without_duplicates(
    cluster: Cluster, s3_server: Any
) -> None:
    first, second = _urls(cluster)
    job = _submit(first, prompt="a painted sky", model="tiny-art", steps=60, num_images=2)
    victim = _running_on(cluster, second, job["id"])
    killed_name = _wait_job(second, job["id"], ("running",))["worker"]
    time.sleep(1)  # in the middle of the denoising steps
    cluster.kill(victim)
    done = _wait_job(first, job["id"], ("succeeded", "failed"), timeout=240)
    assert done["state"] == "succeeded", done
    assert done["worker"] != killed_name
    row = _row(cluster, job["id"])
    assert (row["state"], row["attempts"]) == ("succeeded", 2)
    ids = [i["id"] for i in done["result"]["images"]]
    listing = http("GET", f"{second}/images?per_page=100")[2]["images"]
    assert sorted(i["id"] for i in listing if i["id"] in ids) == sorted(ids)
    objects = _stored_objects(cluster, s3_server)
    assert sorted(k for k in objects if any(i in k for i in ids)) == sorted(
        f"images/{i}.png" for i in ids
    )
    cluster.restart_worker(victim)
    cluster.wait_ready()


def test_sigterm_finishes_the_running_job_and_leaves_queued_work_queued(
    cluster: Cluster,
) -> None:
    import signal

    first, second = _urls(cluster)
    running = _submit(first, prompt="a photo of a field", model="tiny-photo", steps=40)
    _wait_job(first, running["id"], ("running",))
    waiting = _submit(second, prompt="a photo of a river", model="tiny-photo", steps=3)
    time.sleep(1.0)  # worker a holds it behind the running job
    cluster.kill("a", signal.SIGTERM)
    assert cluster.worker("a").popen.wait(timeout=120) == 0
    assert _wait_job(first, running["id"], ("succeeded", "failed"))["state"] == "succeeded"
    assert http("GET", f"{second}/jobs/{waiting['id']}")[2]["state"] == "queued"
    cluster.restart_worker("a")
    assert _wait_job(first, waiting["id"], ("succeeded", "failed"))["state"] == "succeeded"
    assert _deliveries(cluster, waiting["id"]) == 2
    cluster.wait_ready()


def test_redis_unreachable_gives_503_keeps_history_readable_and_recovers(
    cluster: Cluster, make_app, live_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from .distributed_cluster import RedisServer

    broker = RedisServer(tmp_path)
    broker.start()
    try:
        app = make_app(
            broker_url=broker.url,
            database_url=cluster.database_url,
            queue_prefix=cluster.prefix + "x",
        )
        url = live_server(app)
        job = _submit(url, prompt="never run: no worker on this broker")
        status, _, body = http("DELETE", f"{url}/jobs/{job['id']}")
        assert (status, body["state"]) == (200, "cancelled")
        broker.stop()
        status, headers, body = http("POST", f"{url}/generate-image", {"prompt": "a cat"})
        assert status == 503, body
        assert body["error"]["code"] == "service_busy" and int(headers["Retry-After"]) >= 1
        status, _, body = http("GET", f"{url}/jobs/{job['id']}")
        assert (status, body["state"]) == (200, "cancelled")  # from the job row
        assert http("GET", f"{url}/images")[0] == 200
        assert http("GET", f"{url}/ready")[0] == 503
        assert http("GET", f"{url}/health")[0] == 200
        broker.start()
        assert _submit(url, prompt="after the broker came back")["state"] == "queued"
    finally:
        broker.stop()


def test_postgresql_unreachable_gives_503_and_recovers_without_restart(
    cluster: Cluster, make_app, live_server
) -> None:  # type: ignore[no-untyped-def]
    from .distributed_cluster import TcpProxy

    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.start()
    try:
        url_db = cluster.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        app = make_app(
            broker_url=cluster.settings["S2I_BROKER_URL"],
            database_url=url_db,
            queue_prefix=cluster.prefix,
        )
        url = live_server(app)
        assert http("GET", f"{url}/images")[0] == 200
        proxy.stop()
        status, headers, body = http("POST", f"{url}/generate-image", {"prompt": "a dog"})
        assert status == 503, body
        assert "Retry-After" in headers
        status, _, body = http("GET", f"{url}/images")
        assert status == 503, body
        assert http("GET", f"{url}/ready")[0] == 503
        proxy.start()
        assert http("GET", f"{url}/images")[0] == 200
        status, _, body = http("POST", f"{url}/generate-image", {"prompt": "a dog", "steps": 1})
        assert status == 200, body
    finally:
        proxy.stop()


def _row_states(cluster: Cluster, *job_ids: str) -> list[str | None]:
    from sqlalchemy import create_engine

    from speech2image.storage import JobStore

    engine = create_engine(cluster.database_url)
    try:
        store = JobStore(engine)
        return [getattr(store.get(job_id), "state", None) for job_id in job_ids]
    finally:
        engine.dispose()


def test_every_distributed_job_is_a_row_that_answers_after_redis_forgets_it(
    cluster: Cluster,
) -> None:
    import redis
    from sqlalchemy import create_engine

    from speech2image.storage import JobStore

    from .distributed_cluster import REDIS_URL

    first, second = _urls(cluster)
    job = _submit(first, prompt="a red fox", seed=8, steps=2)
    done = _wait_job(second, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    engine = create_engine(cluster.database_url)
    try:
        row = JobStore(engine).get(job["id"])
        assert row is not None and row.state == "succeeded" and row.kind == "generate"
        assert row.work["request"]["seed"] == 8 and row.attempts == 1
        assert row.worker in cluster.worker_names(first).values()
        assert row.result == done["result"]
    finally:
        engine.dispose()
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(f"{cluster.prefix}:job:{job['id']}")  # expired, or Redis lost its data
    client.close()
    status, _, body = http("GET", f"{second}/jobs/{job['id']}")
    assert status == 200, body
    assert body["state"] == "succeeded" and body["result"] == done["result"]


def test_realtime_session_on_an_api_process_transcribes_on_a_worker(
    cluster: Cluster, speech: dict[str, Path]
) -> None:
    """The API process (no model library) cuts utterances; a worker's Whisper transcribes."""

    from .test_realtime import Client, close, pcm24k, receive

    url = cluster.apis[1].url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    ws = Client.connect(url, subprotocols=["realtime"])
    try:
        assert json.loads(ws.receive(timeout=30))["type"] == "transcription_session.created"
        audio = pcm24k(speech["english"])
        for start in range(0, len(audio), 9600):
            chunk = base64.b64encode(audio[start : start + 9600]).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        completed = receive(ws, "conversation.item.input_audio_transcription.completed")[-1]
        assert {"fox", "forest"} <= set(re.findall(r"[a-z]+", completed["transcript"].lower()))
    finally:
        close(ws)


def test_usage_rows_are_written_by_the_worker_and_read_by_any_api(cluster: Cluster) -> None:
    first, second = _urls(cluster)
    # Earlier tests' jobs of the same (local) owner must not end while this one counts.
    deadline = time.monotonic() + 120
    while any(
        http("GET", f"{second}/jobs?state={state}")[2]["total"] for state in ("queued", "running")
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    status, _, before = http("GET", f"{second}/usage")
    assert status == 200, before
    status, _, body = http(
        "POST", f"{first}/generate-image", {"prompt": "a lighthouse", "steps": 2, "seed": 5}
    )
    assert status == 200, body
    status, _, after = http("GET", f"{second}/usage")
    assert after["usage"]["images"] - before["usage"]["images"] == 1
    assert after["usage"]["pixel_steps"] - before["usage"]["pixel_steps"] == 64 * 64 * 2
    assert after["usage"]["device_seconds"] > before["usage"]["device_seconds"]
    status, _, text = http("GET", f"{second}/metrics")
    assert b's2i_usage_images_total{key="local"}' in text


def test_a_webhook_is_sent_by_the_api_when_a_worker_ends_the_job(cluster: Cluster) -> None:
    from .test_webhooks import Receiver

    first, second = _urls(cluster)
    receiver = Receiver()
    receiver.failures_left = 0
    try:
        status, _, job = http(
            "POST",
            f"{first}/generate-image",
            {"prompt": "a windmill", "steps": 1, "async": True},
            headers={"Callback-URL": receiver.url},
        )
        assert status == 202, job
        receiver.wait_for(1, timeout=120)
        headers, body = receiver.received[0]
        document = json.loads(body)
        assert document["id"] == job["id"] and document["state"] == "succeeded"
        assert headers["X-S2I-Signature"].startswith("t=")
        status, _, seen = http("GET", f"{second}/jobs/{job['id']}")
        assert seen["webhooks"][0]["url"] == receiver.url
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_an_edit_runs_on_a_worker_with_its_source_image_as_input(cluster: Cluster) -> None:
    first, second = _urls(cluster)
    status, _, made = http("POST", f"{first}/generate-image", {"prompt": "a red fox", "seed": 5})
    assert status == 200, made
    parent = made["images"][0]["id"]
    fields = {"image_id": parent, "prompt": "a red fox at night", "seed": "5", "strength": "0.5"}
    body, content_type = multipart(fields, {})
    status, _, edited = http(
        "POST", f"{second}/edit-image", data=body, headers={"Content-Type": content_type}
    )
    assert status == 200, edited  # the image input is not checked as audio, the worker gets it
    assert edited["parent_id"] == parent and edited["edit"]["mode"] == "img2img"
    status, _, lineage = http("GET", f"{first}/lineage/{edited['images'][0]['id']}")
    assert [a["id"] for a in lineage["ancestors"]] == [parent]
