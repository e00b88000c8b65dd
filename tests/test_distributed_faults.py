"""Faults of the distributed mode on real processes: nothing accepted is lost or done twice.

Two API processes and two workers on a private redis-server, PostgreSQL (the workers reach
it through a proxy that can cut them off) and SeaweedFS (everyone reaches it through a proxy
that can be cut). Faults: the broker killed and started empty, killed and restarted from its
data, frozen longer than a lease; an API process killed during submissions with client
retries; a job that kills every worker that runs it, batched with innocent ones; PostgreSQL
and the object store cut during jobs. Each counts accepted, succeeded, failed with a reason,
lost (none) and duplicated (none).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from .distributed_cluster import (
    Cluster,
    RedisServer,
    TcpProxy,
    http,
    multipart,
    postgres_problem,
    redis_problem,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

LEASE = 4  # S2I_JOB_LEASE_SECONDS of this cluster
BOUND = 120  # seconds after a fault by which every accepted job has ended
KEYS = [f"key-{i}" for i in range(8)]  # clients; each may have 4 jobs queued or running
OPS = {"X-API-Key": "ops"}  # the operators' key (/status, /metrics)


def _as(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A private, persistent redis-server (a test may wipe its data to start it empty)."""
    problem = redis_problem() or postgres_problem()
    if problem:
        pytest.skip(problem)
    server = RedisServer(tmp_path_factory.mktemp("broker"), persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxies(s3_server: Any):  # type: ignore[no-untyped-def]
    """Cuttable paths: the workers' to PostgreSQL, everyone's to the object store."""
    endpoint = urlparse(s3_server.endpoint_url)
    database = TcpProxy(("127.0.0.1", 5432))
    store = TcpProxy((endpoint.hostname or "127.0.0.1", endpoint.port or 80))
    database.start()
    store.start()
    yield {"database": database, "store": store}
    database.stop()
    store.stop()


@pytest.fixture(scope="module")
def cluster(
    broker: RedisServer,
    proxies: dict[str, TcpProxy],
    tmp_path_factory: pytest.TempPathFactory,
    model_cache: Path,
    tiny_models: dict[str, Path],
    s3_server: Any,
):  # type: ignore[no-untyped-def]
    """Worker `a` serves tiny-art and tiny-photo, `b` Whisper and tiny-art; two APIs."""
    root = tmp_path_factory.mktemp("faults")
    s3 = {
        f"S2I_{name.upper()}": value
        for name, value in s3_server.settings(s3_server.new_bucket()).items()
    }
    s3["S2I_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{proxies['store'].port}"
    settings = {
        **s3,
        "S2I_BROKER_URL": broker.url,
        "S2I_MODEL_CACHE_DIR": model_cache,
        "S2I_IMAGE_MODELS": json.dumps(
            {name: {"source": str(tiny_models[name])} for name in ("tiny-art", "tiny-photo")}
        ),
        "S2I_STYLE_MODELS": json.dumps({"artistic": "tiny-art", "photographic": "tiny-art"}),
        "S2I_DEFAULT_WIDTH": 64,
        "S2I_DEFAULT_HEIGHT": 64,
        "S2I_MODEL_IDLE_SECONDS": 0,
        "S2I_CLEANUP_INTERVAL_SECONDS": 0,
        "S2I_API_KEYS": ",".join(KEYS),
        "S2I_ADMIN_API_KEYS": "ops",
        "S2I_RATELIMIT_DEFAULT": "100000/minute",
        "S2I_RATELIMIT_TRANSCRIBE": "100000/minute",
        "S2I_RATELIMIT_GENERATE": "100000/minute",
        "S2I_JOB_WORKERS": 1,
        "S2I_WORKER_CONCURRENCY": 4,
        "S2I_BATCH_MAX_WAIT_MS": 400,
        "S2I_JOB_LEASE_SECONDS": LEASE,
        "S2I_RECONCILE_INTERVAL_SECONDS": 1,
        "S2I_JOB_MAX_ATTEMPTS": 2,
        "S2I_QUEUE_MAX_PER_OWNER": 4,
        "S2I_STORAGE_RETRY_SECONDS": 40,
    }
    cluster = Cluster(root, settings)
    cluster.s3_endpoint = s3_server.endpoint_url  # type: ignore[attr-defined]
    cluster.create_schema()
    via_proxy = cluster.database_url.replace(
        "127.0.0.1:5432", f"127.0.0.1:{proxies['database'].port}"
    )
    try:
        # a holds up to 8 tasks: a running job and a whole batch waiting behind it
        cluster.start_worker(name="a", S2I_DATABASE_URL=via_proxy, S2I_WORKER_CONCURRENCY=8)
        cluster.start_worker(
            name="b", S2I_DATABASE_URL=via_proxy, S2I_WORKER_MODELS="whisper,tiny-art"
        )
        cluster.start_api()
        cluster.start_api()
        cluster.wait_ready()  # every API ready (with the operators' key), both workers live
        yield cluster
    finally:
        cluster.stop()


def _burst(cluster: Cluster, speech: Path, n: int = 12) -> dict[str, dict[str, Any]]:
    """Accepted jobs by id: generations of varied length and a few transcriptions."""
    accepted: dict[str, dict[str, Any]] = {}
    urls = [api.url for api in cluster.apis]
    for i in range(n):
        url, key = urls[i % 2], KEYS[i % len(KEYS)]
        if i % 8 == 3:
            body, content_type = multipart({"async": "true"}, {"audio": speech})
            status, _, job = http(
                "POST",
                f"{url}/transcribe-audio",
                data=body,
                headers={"Content-Type": content_type, **_as(key)},
            )
        else:
            fields = {"async": True, "prompt": f"a lighthouse {i}", "seed": i, "steps": 2 + i % 9}
            fields["num_images"] = 1 + i % 2
            status, _, job = http("POST", f"{url}/generate-image", fields, headers=_as(key))
        assert status == 202, job
        accepted[job["id"]] = {"kind": job["kind"], "images": 1 + i % 2, "key": key}
    return accepted


def _wait_some_running(cluster: Cluster, jobs: dict[str, Any]) -> None:
    url = cluster.apis[0].url
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [
            http("GET", f"{url}/jobs/{job_id}", headers=_as(jobs[job_id]["key"]))[2]["state"]
            for job_id in list(jobs)[:6]
        ]
        if "running" in states and "queued" in states:
            return
        time.sleep(0.1)
    raise AssertionError("no job ran")


def _image_rows(cluster: Cluster) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(cluster.database_url)
    try:
        with engine.connect() as connection:
            return int(connection.scalar(text("select count(*) from images")) or 0)
    finally:
        engine.dispose()


def _settle(
    cluster: Cluster, jobs: dict[str, dict[str, Any]], since: float, images_before: int
) -> dict[str, Any]:
    """Wait for every job to end; check rows, API and stored images agree. Returns counts."""
    from sqlalchemy import create_engine, text

    urls = [api.url for api in cluster.apis]
    final: dict[str, dict[str, Any]] = {}
    while len(final) < len(jobs):
        assert time.monotonic() - since < BOUND, {
            j: http("GET", f"{urls[0]}/jobs/{j}", headers=_as(jobs[j]["key"]))[2].get("state")
            for j in jobs
            if j not in final
        }
        for job_id in jobs:
            if job_id in final:
                continue
            status, _, body = http(
                "GET",
                f"{urls[len(final) % 2]}/jobs/{job_id}",
                timeout=10,
                headers=_as(jobs[job_id]["key"]),
            )
            if status == 200 and body["state"] in ("succeeded", "failed", "cancelled"):
                final[job_id] = body
        time.sleep(0.2)
    took = time.monotonic() - since
    engine = create_engine(cluster.database_url)
    try:
        with engine.connect() as connection:
            rows = {
                r.id: r
                for r in connection.execute(
                    text("select id, state, error from jobs where id = any(:ids)"),
                    {"ids": list(jobs)},
                )
            }
            stored = int(connection.scalar(text("select count(*) from images")) or 0)
    finally:
        engine.dispose()
    counts = {"accepted": len(jobs), "succeeded": 0, "failed": 0, "lost": 0, "duplicated": 0}
    for job_id, body in final.items():
        assert rows[job_id].state == body["state"], (job_id, rows[job_id], body)
        counts[body["state"]] = counts.get(body["state"], 0) + 1
        if body["state"] == "failed":
            assert body["error"]["code"] and body["error"]["message"], body
        if body["state"] == "succeeded" and jobs[job_id]["kind"] == "generate":
            assert len(body["result"]["images"]) == jobs[job_id]["images"]
    # Each job's images once: the rows that appeared are exactly the images of the jobs.
    made = sum(
        jobs[job_id]["images"]
        for job_id, body in final.items()
        if body["state"] == "succeeded" and jobs[job_id]["kind"] == "generate"
    )
    counts["duplicated"] = stored - images_before - made
    counts["seconds"] = round(took, 1)
    # A job's stored input (its uploaded audio) is removed when the job ends.
    deadline = time.monotonic() + 15
    while left := _inputs_left(cluster, final):
        assert time.monotonic() < deadline, f"inputs outlived their jobs: {left}"
        time.sleep(0.3)
    return counts


def _bucket(cluster: Cluster) -> tuple[Any, str]:
    """A boto3 client straight to the object store (not through the proxy) and the bucket."""
    from tests.s3_server import S3Server

    server = S3Server(endpoint_url=cluster.s3_endpoint, stack=cluster)
    return server.client(), cluster.settings["S2I_S3_BUCKET"]


def _input_key(job_id: str) -> str:
    """The object that holds a job's upload (the store's key prefix, then its name)."""
    from speech2image.config import Settings
    from speech2image.jobs.inputs import StoreInputs

    return Settings.model_fields["s3_prefix"].default + StoreInputs.name(job_id)


def _inputs_left(cluster: Cluster, jobs: Any) -> list[str]:
    client, bucket = _bucket(cluster)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    keys = {_input_key(job_id) for job_id in jobs}
    return [o["Key"] for o in listed if o["Key"] in keys]


def _still_works(cluster: Cluster) -> None:
    """New work flows again through every API process, with no process restarted."""
    for api in cluster.apis:
        status, _, body = http(
            "POST",
            f"{api.url}/generate-image",
            {"prompt": "after", "steps": 1},
            headers=_as(KEYS[0]),
        )
        assert status == 200, body
    cluster.check_alive()


def _scenario(name: str, counts: dict[str, Any]) -> None:
    print(f"\nbroker fault {name}: {counts}")
    assert counts["succeeded"] == counts["accepted"], counts
    assert counts["lost"] == 0 and counts["duplicated"] == 0, counts


@pytest.mark.parametrize("data", ["lost", "kept"], ids=["started-empty", "restarted-from-its-data"])
def test_redis_killed_loses_no_job(
    cluster: Cluster, broker: RedisServer, speech: dict[str, Path], data: str
) -> None:
    """(a) killed and started empty (no persistence, or a failover to an empty replica);
    (b) killed and started again from its append-only file."""
    before = _image_rows(cluster)
    jobs = _burst(cluster, speech["english"])
    _wait_some_running(cluster, jobs)
    broker.stop()
    if data == "lost":
        for path in broker.root.glob("appendonly*"):
            if path.is_dir():
                for part in path.iterdir():
                    part.unlink()
            else:
                path.unlink()
    broker.start()
    since = time.monotonic()
    _scenario(f"killed, data {data}", _settle(cluster, jobs, since, before))
    _still_works(cluster)


def test_redis_frozen_longer_than_a_lease_loses_no_job(
    cluster: Cluster, broker: RedisServer, speech: dict[str, Path]
) -> None:
    before = _image_rows(cluster)
    jobs = _burst(cluster, speech["english"])
    _wait_some_running(cluster, jobs)
    broker.pause()
    try:
        url = cluster.apis[0].url

        def submit(key: str) -> tuple[int, str, str, float]:
            started = time.monotonic()
            status, headers, body = http(
                "POST", f"{url}/generate-image", {"prompt": "frozen"}, headers=_as(key)
            )
            code = body["error"]["code"] if status >= 400 else "accepted"
            return status, code, headers.get("Retry-After", ""), time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(submit, KEYS + KEYS[:4]))
        # Every submission is refused quickly with a short back-off: none is a 500, none waits.
        assert {(a[0], a[1], a[2]) for a in answers} == {(503, "service_busy", "2")}, answers
        assert max(a[3] for a in answers) < 8, answers
        started = time.monotonic()
        assert http("GET", f"{url}/health")[0] == 200
        assert time.monotonic() - started < 1
        time.sleep(max(0.0, 2 * LEASE - (time.monotonic() - started)))
    finally:
        broker.resume()
    since = time.monotonic()
    _scenario("(c) frozen for two leases", _settle(cluster, jobs, since, before))
    _still_works(cluster)


# --- issue: crashed submissions, poisoned batches, outages of PostgreSQL and the store ------


def _owner(key: str) -> str:
    import hashlib

    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _submit_until_accepted(url: str, key: str, idem: str, deadline: float) -> dict[str, Any]:
    """A client's retries of one submission (same Idempotency-Key) until it is accepted."""
    while True:
        try:
            status, headers, body = http(
                "POST",
                f"{url}/generate-image",
                {"async": True, "prompt": f"a harbour {idem}", "steps": 3},
                headers={**_as(key), "Idempotency-Key": idem},
                timeout=10,
            )
        except OSError:  # the process died under the request
            status, headers, body = 0, {}, {}
        if status == 202:
            return body
        assert status in (0, 429, 503), body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(float(headers.get("Retry-After", 0.5)))


def test_a_killed_api_process_leaks_no_job_slot_or_duplicate(
    cluster: Cluster, broker: RedisServer
) -> None:
    import redis
    from sqlalchemy import create_engine, text

    from speech2image.storage import JobStore

    survivor = cluster.apis[0].url
    victim = cluster.start_api()
    victim_url = victim.url
    cluster.wait_ready()
    clients = [(KEYS[i % 4], f"burst-{uuid.uuid4().hex[:8]}-{i}") for i in range(16)]
    answered = threading.Event()
    first: dict[str, Any] = {}
    before = _image_rows(cluster)

    def send(client: tuple[str, str]) -> None:
        key, idem = client
        try:
            status, _, body = http(
                "POST",
                f"{victim_url}/generate-image",
                {"async": True, "prompt": f"a harbour {idem}", "steps": 3},
                headers={**_as(key), "Idempotency-Key": idem},
                timeout=10,
            )
            if status == 202:
                first[idem] = body["id"]
                answered.set()
        except OSError:
            pass

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(send, client) for client in clients]
        assert answered.wait(30)
        victim.popen.kill()  # kill -9 in the middle of the burst: the first answers are out
        concurrent.futures.wait(futures)
    victim.popen.wait()
    cluster.apis.remove(victim)
    # What a crash may leave besides, injected on purpose: admission slots that were taken
    # and never given back (key-7 looks full), and a row whose task was never sent.
    client = redis.Redis.from_url(broker.url)
    leaked = {f"leak-{i}": time.time() for i in range(4)}
    client.zadd(f"{cluster.prefix}:active:{_owner('key-7')}", leaked)
    client.zadd(f"{cluster.prefix}:active", leaked)
    client.close()
    status, _, body = http(
        "POST", f"{survivor}/generate-image", {"prompt": "x", "async": True}, headers=_as("key-7")
    )
    assert status == 429 and body["error"]["code"] == "queue_full"  # the leaked slots count
    engine = create_engine(cluster.database_url)
    store = JobStore(engine)
    template = store.get(first[next(iter(first))]) if first else None
    unsent = uuid.uuid4().hex
    if template is not None:
        store.add(
            id=unsent,
            owner=_owner("key-5"),
            kind="generate",
            model=template.model,
            work=template.work,
            queue=template.queue,
            created_at=template.created_at,
        )
    # Every client retries on the surviving process with its key: one job each, never two.
    deadline = time.monotonic() + BOUND
    jobs = {idem: _submit_until_accepted(survivor, key, idem, deadline) for key, idem in clients}
    for idem, job_id in first.items():
        assert jobs[idem]["id"] == job_id  # the answer it missed, or had: the same job
    healed = _submit_until_accepted(survivor, "key-7", f"heal-{uuid.uuid4().hex}", deadline)
    accepted = {
        job["id"]: {"kind": "generate", "images": 1, "key": key}
        for (key, idem), job in ((c, jobs[c[1]]) for c in clients)
    }
    accepted[healed["id"]] = {"kind": "generate", "images": 1, "key": "key-7"}
    if template is not None:
        accepted[unsent] = {"kind": "generate", "images": 1, "key": "key-5"}
    counts = _settle(cluster, accepted, time.monotonic(), before)
    print(f"\nkilled API process: {counts} ({len(first)} of 16 answered before the kill)")
    assert counts["succeeded"] == counts["accepted"], counts
    with engine.connect() as connection:
        per_key = connection.execute(
            text(
                "select idempotency_key, count(*) from jobs where idempotency_key like 'burst-%' "
                "group by idempotency_key having count(*) > 1"
            )
        ).all()
    engine.dispose()
    assert per_key == []  # no duplicate job from a retry
    _still_works(cluster)


def _state(url: str, job_id: str, key: str) -> dict[str, Any]:
    return http("GET", f"{url}/jobs/{job_id}", headers=_as(key))[2]


def _rows(cluster: Cluster, ids: list[str]) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(cluster.database_url)
    try:
        with engine.connect() as connection:
            return {
                r.id: r
                for r in connection.execute(
                    text("select id, state, attempts, suspect from jobs where id = any(:ids)"),
                    {"ids": ids},
                )
            }
    finally:
        engine.dispose()


def _worker_name(cluster: Cluster, url: str, name: str) -> str | None:
    """The name the live worker process ``name`` announces (None while it starts)."""
    body = http("GET", f"{url}/status", headers=OPS)[2]
    pid = cluster.worker(name).popen.pid
    return next((w["name"] for w in body["jobs"].get("workers", []) if w["pid"] == pid), None)


def test_a_poison_job_fails_alone_and_its_batch_mates_are_not_charged(cluster: Cluster) -> None:
    """Worker `a` alone serves tiny-photo; it dies every time one job of a batch runs."""
    url = cluster.apis[0].url
    keys = KEYS[4:8]

    def submit(i: int) -> dict[str, Any]:
        fields = {"async": True, "prompt": f"a photo of a pier {i}", "seed": i}
        fields |= {"model": "tiny-photo", "steps": 40}
        status, _, body = http("POST", f"{url}/generate-image", fields, headers=_as(keys[i]))
        assert status == 202, body
        return body

    # A long job holds worker a while the four wait there: they then start as one batch.
    blocker = http(
        "POST",
        f"{url}/generate-image",
        {"async": True, "prompt": "a photo of a long road", "model": "tiny-photo", "steps": 60},
        headers=_as(KEYS[3]),
    )[2]
    deadline = time.monotonic() + BOUND
    while _state(url, blocker["id"], KEYS[3])["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    jobs = [submit(i) for i in range(4)]
    poison, innocents = jobs[0], jobs[1:]

    def states() -> list[str]:
        return [_state(url, j["id"], keys[i])["state"] for i, j in enumerate(jobs)]

    while states() != ["running"] * 4:
        assert time.monotonic() < deadline, states()
        time.sleep(0.05)
    kills = 0
    while (body := _state(url, poison["id"], keys[0]))["state"] not in ("failed", "succeeded"):
        assert time.monotonic() < deadline + 2 * BOUND, body
        if body["state"] == "running" and body.get("worker") == _worker_name(cluster, url, "a"):
            cluster.kill("a")  # the poison job takes its worker down, every time it runs
            kills += 1
            cluster.restart_worker("a")
        time.sleep(0.1)
    final = _state(url, poison["id"], keys[0])
    assert final["state"] == "failed" and final["error"]["code"] == "job_failed_repeatedly"
    for i, job in enumerate(innocents, start=1):
        while (body := _state(url, job["id"], keys[i]))["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline + 2 * BOUND, body
            time.sleep(0.2)
        assert body["state"] == "succeeded", body
    rows = _rows(cluster, [j["id"] for j in jobs])
    # The batch crash charged nobody; then each ran alone: the innocents once, the poison
    # until its bounded attempts were spent.
    assert [rows[j["id"]].attempts for j in innocents] == [1, 1, 1], rows
    assert all(rows[j["id"]].suspect for j in jobs), rows
    assert rows[poison["id"]].attempts == 2
    print(f"\npoison job: failed after {kills} kills; 3 of 3 batch-mates succeeded")
    cluster.wait_ready()


def test_postgresql_cut_from_the_workers_during_jobs(
    cluster: Cluster, proxies: dict[str, TcpProxy], speech: dict[str, Path]
) -> None:
    before = _image_rows(cluster)
    jobs = _burst(cluster, speech["english"], n=8)
    _wait_some_running(cluster, jobs)
    proxies["database"].stop()  # the workers lose PostgreSQL for longer than a lease
    try:
        time.sleep(LEASE + 2)
        job_id = next(iter(jobs))  # the API processes still answer from the rows
        assert (
            http("GET", f"{cluster.apis[1].url}/jobs/{job_id}", headers=_as(jobs[job_id]["key"]))[0]
            == 200
        )
    finally:
        proxies["database"].start()
    _scenario("PostgreSQL cut from the workers", _settle(cluster, jobs, time.monotonic(), before))
    _still_works(cluster)


def _metric(url: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    _, _, text = http("GET", f"{url}/metrics", headers=OPS)
    for family in text_string_to_metric_families(
        text.decode() if isinstance(text, bytes) else text
    ):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_object_store_down_during_jobs(
    cluster: Cluster, proxies: dict[str, TcpProxy], speech: dict[str, Path]
) -> None:
    url = cluster.apis[0].url
    status, _, made = http(
        "POST",
        f"{url}/generate-image",
        {"prompt": "a kept image", "steps": 1},
        headers=_as(KEYS[1]),
    )
    assert status == 200, made
    before = _image_rows(cluster)
    jobs = _burst(cluster, speech["english"], n=8)
    _wait_some_running(cluster, jobs)
    proxies["store"].stop()
    try:
        started = time.monotonic()
        status, headers, body = http(
            "GET", f"{url}{made['images'][0]['url']}", headers=_as(KEYS[1])
        )
        assert (status, body["error"]["code"]) == (503, "storage_unavailable"), body
        assert headers["Retry-After"] == "5" and time.monotonic() - started < 15
        deadline = time.monotonic() + 10
        while http("GET", f"{url}/ready", headers=OPS)[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2.1)  # admission's view of the store is at most 2 s old
        status, headers, body = http(
            "POST",
            f"{url}/generate-image",
            {"prompt": "refused", "async": True},
            headers=_as(KEYS[2]),
        )
        assert status == 503, body
        assert body["error"]["code"] == "storage_unavailable" and headers["Retry-After"] == "5"
        status, _, ready = http("GET", f"{url}/ready", headers=OPS)
        assert status == 503 and "image_store" in ready["down"], ready
        assert _metric(url, "s2i_dependency_up", dependency="image_store") == 0
        time.sleep(3)  # jobs that finish now wait for the store (they retry, bounded)
    finally:
        proxies["store"].start()
    _scenario("object store down", _settle(cluster, jobs, time.monotonic(), before))
    time.sleep(2.5)
    assert _metric(url, "s2i_dependency_up", dependency="image_store") == 1
    _still_works(cluster)


def test_a_queued_job_whose_input_vanished_with_the_broker_fails_with_a_reason(
    cluster: Cluster, broker: RedisServer, speech: dict[str, Path]
) -> None:
    """The broker loses its data while a transcription waits, and its stored audio is gone
    too: reconciliation fails the job `upload_expired` instead of leaving it queued."""
    import signal

    url = cluster.apis[1].url
    for name in ("a", "b"):  # the workers hold nothing and take nothing
        cluster.kill(name, signal.SIGSTOP)
    try:
        body, content_type = multipart({"async": "true"}, {"audio": speech["english"]})
        status, _, job = http(
            "POST",
            f"{url}/transcribe-audio",
            data=body,
            headers={"Content-Type": content_type, **_as(KEYS[5])},
        )
        assert status == 202, job
        client, bucket = _bucket(cluster)
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        assert _input_key(job["id"]) in {o["Key"] for o in listed}  # kept until the job ends
        client.delete_object(Bucket=bucket, Key=_input_key(job["id"]))
        broker.stop()
        for path in broker.root.glob("appendonly*"):
            for part in path.iterdir() if path.is_dir() else [path]:
                part.unlink()
        broker.start()
    finally:
        for name in ("a", "b"):
            cluster.kill(name, signal.SIGCONT)
    deadline = time.monotonic() + BOUND
    while (state := _state(url, job["id"], KEYS[5]))["state"] != "failed":
        assert state["state"] == "queued" and time.monotonic() < deadline, state
        time.sleep(0.3)
    assert state["error"]["code"] == "upload_expired", state
    assert _rows(cluster, [job["id"]])[job["id"]].state == "failed"
    _still_works(cluster)


def test_work_left_for_a_torn_down_broker_connection_does_not_stop_a_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis dies while a finished task's ack (or the periodic restore of unacked messages)
    waits in the worker's event loop: Celery tears the connection down, and kombu then raised
    AttributeError, which Celery treats as unrecoverable (the worker shut down). The worker's
    Celery app makes it a connection error, which those paths already handle."""
    import logging

    from kombu import Connection
    from kombu.transport import redis as kombu_redis

    from speech2image.jobs.celery.app import guard_a_torn_down_connection

    broker = RedisServer(tmp_path)
    broker.start()
    connection = Connection(broker.url, transport_options={"socket_timeout": 1})
    try:
        queue = connection.SimpleQueue("s2i-ack-test")
        queue.put({"job": 1})
        message = queue.get(timeout=5)
        broker.stop()
        with contextlib.suppress(Exception):
            connection.collect(socket_timeout=1)  # what Celery does on a connection error
        connection.close()
        channel = message.channel
        channel._disconnect_pools()  # the channel's half of the teardown
        logger = logging.getLogger("test")
        guarded = kombu_redis.Channel._connparams
        unguarded = getattr(guarded, "__wrapped__", guarded)
        kombu_redis.Channel._connparams = unguarded  # kombu as it is
        try:
            with pytest.raises(AttributeError):
                message.ack_log_error(logger, connection.connection_errors)
        finally:
            kombu_redis.Channel._connparams = guarded
        guard_a_torn_down_connection()
        guard_a_torn_down_connection()  # once is enough; twice changes nothing
        with caplog.at_level(logging.CRITICAL):
            message.ack_log_error(logger, connection.connection_errors)  # logged, not raised
        assert "Couldn't ack" in caplog.text and "torn down" in caplog.text
        with pytest.raises(connection.connection_errors):  # kombu's sweep skips its tick
            channel.qos.restore_visible(num=1, interval=1)
    finally:
        broker.stop()
