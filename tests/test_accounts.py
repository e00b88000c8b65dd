"""Keys made at run time, usage per key, quotas (issue 17), in the embedded mode."""

from __future__ import annotations

import re
import uuid

import pytest
from click.testing import CliRunner

from speech2image.cli import main
from speech2image.storage.accounts import UsageRecord

ONE_STEP = {"prompt": "a quiet harbour at dawn", "steps": 1, "width": 64, "height": 64}


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_keys_at_run_time_usage_and_metrics(make_app, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("S2I_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("S2I_IMAGE_DIR", str(tmp_path / "images"))
    made = CliRunner().invoke(main, ["keys", "create", "ops", "--scope", "admin"])
    assert made.exit_code == 0, made.output
    admin = re.search(r"secret: (\S+)", made.output).group(1)

    app = make_app(auth_required=True, api_keys=["env-key-1234567890"])
    client = app.test_client()
    assert client.get("/images").status_code == 401
    assert client.get("/images", headers=_bearer("env-key-1234567890")).status_code == 200

    created = client.post(
        "/admin/keys",
        json={"name": "alice", "scopes": ["generate"]},
        headers=_bearer(admin),
    )
    assert created.status_code == 201, created.json
    alice = created.json["secret"]
    assert created.json["prefix"] == alice[:12]
    assert client.post("/admin/keys", json={"name": "alice"}, headers=_bearer(admin)).json["error"][
        "code"
    ] == ("key_name_taken")
    bad = client.post("/admin/keys", json={"name": "x", "scopes": ["fly"]}, headers=_bearer(admin))
    assert bad.status_code == 400
    # Only the hash is kept; lists show the prefix, never the secret.
    listed = client.get("/admin/keys", headers=_bearer(admin)).json["keys"]
    assert [k["name"] for k in listed] == ["ops", "alice"] and alice not in str(listed)
    assert client.get("/admin/keys", headers=_bearer(alice)).status_code == 403

    generated = client.post("/generate-image", json=ONE_STEP, headers=_bearer(alice))
    assert generated.status_code == 200, generated.json
    # A scope it lacks: 403 before any work.
    refused = client.post(
        "/transcribe-audio", data={"file": (b"RIFF", "a.wav")}, headers=_bearer(alice)
    )
    assert refused.status_code == 403 and "transcribe" in refused.json["error"]["message"]

    used = client.get("/usage", headers=_bearer(alice)).json
    assert used["key"] == "alice" and used["usage"]["images"] == 1
    assert used["usage"]["pixel_steps"] == 64 * 64 * 1 and used["usage"]["jobs"] == 1
    assert used["usage"]["device_seconds"] > 0
    assert client.get("/usage?key=ops", headers=_bearer(alice)).status_code == 403
    by_admin = client.get("/usage?key=alice&period=month", headers=_bearer(admin)).json
    assert by_admin["usage"]["images"] == 1
    metrics = client.get("/metrics", headers=_bearer(admin)).text
    assert 's2i_usage_images_total{key="alice"} 1.0' in metrics
    assert alice not in metrics

    renamed = client.patch(
        f"/admin/keys/{created.json['id']}", json={"name": "alice2"}, headers=_bearer(admin)
    )
    assert renamed.json["name"] == "alice2"
    revoked = client.delete("/admin/keys/alice2", headers=_bearer(admin))
    assert revoked.status_code == 200 and revoked.json["revoked_at"]
    assert client.get("/images", headers=_bearer(alice)).status_code == 401
    listing = CliRunner().invoke(main, ["keys", "list"])
    assert "alice2" in listing.output and "revoked" in listing.output
    assert CliRunner().invoke(main, ["keys", "rename", "ops", "ops2"]).exit_code == 0
    assert CliRunner().invoke(main, ["keys", "revoke", "ops2"]).exit_code == 0
    assert client.get("/admin/keys", headers=_bearer(admin)).status_code == 401
    assert CliRunner().invoke(main, ["keys", "revoke", "nobody"]).exit_code != 0


def test_quotas_refuse_before_any_work(make_app) -> None:
    app = make_app(quota_default={"images:day": 1})
    client = app.test_client()
    assert client.post("/generate-image", json=ONE_STEP).status_code == 200
    refused = client.post("/generate-image", json=ONE_STEP)
    assert refused.status_code == 429
    error = refused.json["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"]["quota"] == "images:day" and error["details"]["cap"] == 1
    assert error["details"]["used"] == 1 and "resets_at" in error["details"]
    openai = client.post("/v1/images/generations", json={"prompt": "a boat", "size": "64x64"})
    assert openai.status_code == 429 and openai.json["error"]["code"] == "insufficient_quota"
    # Nothing ran for the refused requests: one job, one usage row.
    assert client.get("/jobs").json["total"] == 1


def test_usage_row_is_written_once_with_the_job(make_app) -> None:
    storage = make_app().extensions["storage"]
    job_id = uuid.uuid4().hex
    storage.jobs.add(id=job_id, owner="key:x", kind="generate", work={})
    use = {"images": 2, "pixel_steps": 8}
    assert storage.jobs.finish(job_id, "succeeded", usage=use)
    assert not storage.jobs.finish(job_id, "succeeded", usage=use)  # a redelivery's end
    from sqlalchemy.orm import Session

    with Session(storage.engine) as session:
        rows = session.query(UsageRecord).filter_by(job_id=job_id).all()
    assert [(r.images, r.pixel_steps, r.owner) for r in rows] == [(2, 8, "key:x")]


@pytest.mark.redis
@pytest.mark.postgres
def test_keys_and_quotas_across_api_processes(make_app, live_server, tmp_path) -> None:
    from .distributed_cluster import REDIS_URL, Cluster, http, postgres_problem, redis_problem

    problem = redis_problem() or postgres_problem()
    if problem:
        pytest.skip(problem)
    shared = Cluster(tmp_path, {})  # for its prefix, schema and clean-up; no process
    shared.create_schema()
    apps = []
    try:
        for _ in range(2):
            apps.append(
                make_app(
                    broker_url=REDIS_URL,
                    queue_prefix=shared.prefix,
                    database_url=shared.database_url,
                    admin_api_keys=["ops-secret-0123456789"],
                )
            )
        first, second = (live_server(app) for app in apps)
        ops = _bearer("ops-secret-0123456789")
        status, _, made = http(
            "POST",
            f"{first}/admin/keys",
            {"name": "alice", "quotas": {"images:day": 2}},
            headers=ops,
        )
        assert status == 201, made
        alice = _bearer(made["secret"])
        # No worker consumes this prefix: the jobs stay queued, their reservations count.
        for url in (first, second):
            status, _, body = http(
                "POST", f"{url}/generate-image", {**ONE_STEP, "async": True}, headers=alice
            )
            assert status == 202, body
        status, _, body = http("POST", f"{first}/generate-image", ONE_STEP, headers=alice)
        assert (status, body["error"]["code"]) == (429, "quota_exceeded"), body
        assert body["error"]["details"]["used"] == 2
        # Revoked on one API process, refused at the next request on the other.
        status, _, _ = http("DELETE", f"{second}/admin/keys/alice", headers=ops)
        assert status == 200
        status, _, body = http("GET", f"{first}/jobs", headers=alice)
        assert status == 401, body
    finally:
        for app in apps:  # nothing of theirs runs on after the schema is gone
            app.extensions["reconciler"].stop()
            app.extensions["storage"].close()
        shared.stop()
