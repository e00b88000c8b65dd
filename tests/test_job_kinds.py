"""A job kind is one object: a toy kind added in one place runs through both runners."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from speech2image.jobs import JobKinds

from .distributed_cluster import REDIS_URL, Cluster, postgres_problem, redis_problem
from .toy_kinds import EchoKind


def _echo(kinds: JobKinds, owner: str, times: int, steps: int = 3):  # type: ignore[no-untyped-def]
    return kinds.new(owner=owner, name="echo", work={"word": "hi", "times": times, "steps": steps})


def _edit_work(images):  # type: ignore[no-untyped-def]
    from PIL import Image

    from speech2image.editing import prepare_edit

    source, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    fields = {"prompt": "a fox at night", "seed": 3}
    return prepare_edit(images, fields, source, mask, strength=0.6, parent_id="a" * 32)[0]


def test_every_service_kind_round_trips_its_document(make_app) -> None:
    """One decoder for the row and the Celery payload: dump, JSON, load gives the same work."""
    from speech2image.kinds import SpeechToImageWork, TranscribeWork
    from speech2image.prompting import UnderstandSteps
    from speech2image.speech_service import TranscribeOptions

    app = make_app()
    kinds = app.extensions["job_kinds"]
    images = app.extensions["images"]
    works = {
        "transcribe": TranscribeWork(TranscribeOptions("de", "translate", True, "Namen", 0.2)),
        "generate": images.prepare(images.validate({"prompt": "a watercolor fox", "seed": 4})),
        "speech_to_image": SpeechToImageWork(
            TranscribeOptions(), {"steps": 2, "model": "tiny-photo"}, UnderstandSteps(clean=False)
        ),
        "edit": _edit_work(images),
    }
    works["draft"] = works["generate"]  # a draft's work is a prepared image request
    assert set(kinds.names()) == set(works)
    for name, work in works.items():
        document = json.loads(json.dumps(kinds[name].dump(work)))
        assert kinds[name].load(document) == work, name
    # The kind, not the view, says how a job is scheduled.
    job = kinds.new("generate", "me", works["generate"])
    assert (job.model, job.images, job.steps) == ("sd:tiny-art", 1, 4)
    assert job.batch_key == works["generate"].batch_key()
    assert kinds.new("transcribe", "me", works["transcribe"], input=Path("x")).batch_key is None
    draft = kinds.new("draft", "me", works["draft"])
    assert draft.priority < job.priority and draft.batch_key != job.batch_key
    with pytest.raises(ValueError, match="needs its input"):
        kinds.new("transcribe", "me", works["transcribe"])


def test_a_toy_kind_runs_through_the_local_runner(make_app) -> None:
    app = make_app(kinds=[EchoKind()], job_workers=1, batch_max_wait_ms=300)
    runner, kinds = app.extensions["jobs"], app.extensions["job_kinds"]
    jobs = [runner.submit(_echo(kinds, "local", times)) for times in (1, 2)]
    for job in jobs:
        assert job.wait(30)
    assert [job.result for job in jobs] == [
        {"echo": "hi", "batch": 2},
        {"echo": "hi hi", "batch": 2},
    ]
    row = app.extensions["storage"].jobs.get(jobs[1].id)
    assert (row.state, row.kind, row.batch_size) == ("succeeded", "echo", 2)
    assert row.work == {"word": "hi", "times": 2, "steps": 3}  # the document, as JSON
    snapshot = app.test_client().get(f"/jobs/{jobs[1].id}").json
    assert snapshot["kind"] == "echo" and snapshot["result"]["echo"] == "hi hi"


@pytest.mark.redis
@pytest.mark.postgres
def test_a_toy_kind_runs_through_celery_workers(make_app, tmp_path: Path) -> None:
    import threading

    from celery.contrib.testing.worker import start_worker

    problem = redis_problem() or postgres_problem()
    if problem:
        pytest.skip(problem)
    shared = Cluster(tmp_path, {})  # a private key prefix and schema; no process
    shared.create_schema()
    settings = {
        "broker_url": REDIS_URL,
        "queue_prefix": shared.prefix,
        "database_url": shared.database_url,
        "batch_max_wait_ms": 300,
        "worker_concurrency": 2,
    }
    apps = []
    try:
        api = make_app(role="api", kinds=[EchoKind()], **settings)
        timers = {t for t in threading.enumerate() if t.name == "cleanup-timer"}
        worker = make_app(
            role="worker", kinds=[EchoKind()], cleanup_interval_seconds=3600, **settings
        )
        apps += [api, worker]
        # A worker gets the job side and nothing else: no HTTP routes, no cleanup timer.
        assert {t for t in threading.enumerate() if t.name == "cleanup-timer"} <= timers
        assert "images.generate_image" not in worker.view_functions
        assert "images.generate_image" in api.view_functions
        assert "job_worker" in worker.extensions and "job_worker" not in api.extensions
        client = api.test_client()
        kinds, runner = api.extensions["job_kinds"], api.extensions["jobs"]
        jobs = [runner.submit(_echo(kinds, "local", times)) for times in (1, 2)]
        with start_worker(
            worker.extensions["celery"],
            pool="threads",
            concurrency=2,
            queues=["toy.echo"],
            perform_ping_check=False,
            shutdown_timeout=30,
        ):
            deadline = time.monotonic() + 60
            bodies = []
            for job in jobs:
                while (body := client.get(f"/jobs/{job.id}").json)["state"] not in (
                    "succeeded",
                    "failed",
                ):
                    assert time.monotonic() < deadline, body
                    time.sleep(0.1)
                bodies.append(body)
        assert [b["result"]["echo"] for b in bodies] == ["hi", "hi hi"], bodies
        assert all(b["result"]["batch"] in (1, 2) for b in bodies)
        row = api.extensions["storage"].jobs.get(jobs[0].id)
        assert (row.queue, row.deliveries, row.attempts) == ("toy.echo", 1, 1)
        assert row.work == {"word": "hi", "times": 1, "steps": 3}
    finally:
        for app in apps:
            app.extensions["reconciler"].stop()
            app.extensions["storage"].close()
        shared.stop()


def test_job_errors_are_domain_errors_with_one_json_body() -> None:
    import sqlalchemy.exc

    from speech2image import errors
    from speech2image.jobs import Job

    expected = {
        errors.JobTimeout("too long"): (504, "job_timeout"),
        errors.InputExpired("gone"): (410, "upload_expired"),
        errors.JobFailedRepeatedly("poison"): (500, "job_failed_repeatedly"),
        errors.JobInterrupted("stopped"): (503, "interrupted"),
        errors.StorageUnavailable("away"): (503, "storage_unavailable"),
        errors.InternalError(): (500, "internal_error"),
        RuntimeError("secret detail"): (500, "internal_error"),
        sqlalchemy.exc.OperationalError("select", {}, Exception("down")): (
            503,
            "database_unavailable",
        ),
    }
    for error, (status, code) in expected.items():
        body = errors.error_body(error)
        assert (body["status"], body["code"]) == (status, code), error
        assert "secret" not in body["message"]
        rebuilt = errors.error_from_body(body)
        assert (rebuilt.code, rebuilt.error, rebuilt.description) == (
            status,
            code,
            body["message"],
        )
        job = Job(kind="x", owner="o", work=None)
        job.fail(error)
        assert job.error == body  # a failed job carries the body an HTTP error has


def test_each_role_gets_what_it_needs_and_nothing_else(make_app) -> None:
    """The CLI and a worker have no HTTP routes and no cleanup timer; embedded has both."""
    import threading

    timers = {t for t in threading.enumerate() if t.name == "cleanup-timer"}
    embedded = make_app(cleanup_interval_seconds=3600)
    started = {t for t in threading.enumerate() if t.name == "cleanup-timer"} - timers
    assert len(started) == 1 and embedded.config["S2I_ROLE"] == "embedded"
    assert "images.generate_image" in embedded.view_functions
    for role in ("cli",):
        before = {t for t in threading.enumerate() if t.name == "cleanup-timer"}
        app = make_app(role=role, cleanup_interval_seconds=3600, job_recover_on_start=True)
        after = {t for t in threading.enumerate() if t.name == "cleanup-timer"}
        assert after == before, role  # no timer to switch off afterwards
        assert "images.generate_image" not in app.view_functions
        assert "maintenance" in app.extensions and "jobs" in app.extensions
    with pytest.raises(ValueError, match="role must be one of"):
        make_app(role="gateway")
