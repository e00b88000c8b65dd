"""Image stores: the local folder and S3 (a real SeaweedFS) behave the same through the API."""

from __future__ import annotations

import hashlib
import urllib.request
import uuid
from typing import Any

import pytest

from speech2image.config import SettingsError, load_settings

from .test_images import fetch, generate, image_files

ALPHA = {"X-API-Key": "alpha"}
BETA = {"X-API-Key": "beta"}


@pytest.fixture(params=["local", "s3"])
def store(request) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Settings overrides for each image store (S3: a fresh bucket on the test SeaweedFS)."""
    if request.param == "local":
        return {}
    server = request.getfixturevalue("s3_server")
    return server.settings(server.new_bucket())


def _objects(app) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(item.name for item in app.extensions["storage"].images.objects())


def test_images_are_served_from_either_store_with_owner_check_and_caching(make_app, store):
    app = make_app(api_keys="alpha,beta", **store)
    client = app.test_client()
    response = client.post(
        "/generate-image", json={"prompt": "a castle", "steps": 1, "num_images": 2}, headers=ALPHA
    )
    assert response.status_code == 200, response.json
    body = response.json
    names = sorted(image["filename"] for image in body["images"])
    assert _objects(app) == names
    if store:  # in the bucket, not on the local disk
        assert image_files(app) == []
    url = body["images"][0]["url"]
    served = fetch(client, url, headers=ALPHA)
    assert served.status_code == 200 and served.mimetype == "image/png"
    assert served.data.startswith(b"\x89PNG")
    assert served.headers["ETag"].strip('"') == hashlib.sha256(served.data).hexdigest()
    assert served.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    again = fetch(client, url, headers={**ALPHA, "If-None-Match": served.headers["ETag"]})
    assert again.status_code == 304 and again.headers["ETag"] == served.headers["ETag"]
    assert fetch(client, url, headers=BETA).status_code == 404
    assert fetch(client, f"/images/{uuid.uuid4().hex}.png", headers=ALPHA).status_code == 404


def test_cleanup_byte_cap_and_orphans_work_on_either_store(make_app, store, monkeypatch):
    app = make_app(**store)
    client = app.test_client()
    ids = []
    for seed in range(3):
        response = generate(client, prompt="a castle", steps=1, seed=seed)
        assert response.status_code == 200, response.json
        ids.append(response.json["images"][0])
    capped = make_app(image_max_bytes=ids[2]["bytes"] + 10, **store)
    report = capped.test_client().post("/cleanup").json
    assert report["images_removed"] == 2 and report["files_removed"] == 2
    assert _objects(app) == [ids[2]["filename"]]
    assert [i["id"] for i in client.get("/images").json["images"]] == [ids[2]["id"]]

    storage = app.extensions["storage"]
    storage.images.put(f"{uuid.uuid4().hex}.png", b"left by a crash")
    assert storage.cleanup()["orphan_files_removed"] == 0  # young: maybe a save in flight
    monkeypatch.setattr("speech2image.storage.history.ORPHAN_GRACE_SECONDS", -60)
    assert storage.cleanup()["orphan_files_removed"] == 1
    assert _objects(app) == [ids[2]["filename"]]


def test_storing_a_jobs_images_twice_stores_them_once(make_app, store) -> None:
    from speech2image.image_service import get_image_service

    app = make_app(**store)
    service = get_image_service(app)
    item = service.prepare(service.validate({"prompt": "a castle", "steps": 1, "seed": 1}))
    output = service.run_batch([item])
    job_id = uuid.uuid4().hex
    first = service.store(
        "local", item, output.images[0], truncated=False, timings={}, job_id=job_id
    )
    again = service.store(
        "local", item, output.images[0], truncated=False, timings={}, job_id=job_id
    )
    assert [r.id for r in again.records] == [r.id for r in first.records]
    assert app.test_client().get("/images").json["total"] == 1
    assert _objects(app) == [first.records[0].filename]


def test_a_failed_save_leaves_no_object_and_no_row(make_app, store, monkeypatch) -> None:
    app = make_app(**store)
    images = app.extensions["storage"].images
    real_put = images.put
    calls = {"n": 0}

    def flaky_put(name: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first image is already stored: it must be removed too
            raise OSError("disk full")
        real_put(name, data)

    monkeypatch.setattr(images, "put", flaky_put)
    client = app.test_client()
    assert generate(client, prompt="a castle", num_images=3, steps=1).status_code == 500
    assert _objects(app) == [] and client.get("/images").json["total"] == 0


def test_presigned_redirect_serves_the_object_directly(make_app, s3_server) -> None:
    settings = s3_server.settings(s3_server.new_bucket())
    app = make_app(s3_presigned_redirect_seconds=120, **settings)
    client = app.test_client()
    image = generate(client, prompt="a castle", steps=1).json["images"][0]
    response = fetch(client, image["url"])
    assert response.status_code == 302
    assert response.headers["Cache-Control"] == "private, max-age=60"
    location = response.headers["Location"]
    assert location.startswith(s3_server.endpoint_url) and "Signature=" in location
    with urllib.request.urlopen(location, timeout=10) as direct:
        data = direct.read()
    record = app.extensions["storage"].get_image("local", image["filename"])
    assert hashlib.sha256(data).hexdigest() == record.sha256


def test_the_bucket_can_be_created_at_start_up(make_app, s3_server) -> None:
    bucket = "s2i-new-" + uuid.uuid4().hex[:8]
    app = make_app(s3_create_bucket=True, **s3_server.settings(bucket))
    image = generate(app.test_client(), prompt="a castle", steps=1).json["images"][0]
    listed = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == [f"images/{image['filename']}"]


def test_s3_store_needs_a_bucket() -> None:
    with pytest.raises(SettingsError, match="S2I_S3_BUCKET"):
        load_settings(image_store="s3")


def test_a_store_outage_is_retried_within_the_window_then_fails_with_a_reason(
    make_app, s3_server
) -> None:
    """A job that cannot store its images retries with back-off for S2I_STORAGE_RETRY_SECONDS:
    a store back within the window loses nothing; one that stays away fails the job with
    ``storage_unavailable`` and leaves no object and no row."""
    import threading
    import time
    from urllib.parse import urlparse

    from .distributed_cluster import TcpProxy
    from .test_jobs import submit, wait_state

    endpoint = urlparse(s3_server.endpoint_url)
    proxy = TcpProxy((endpoint.hostname or "127.0.0.1", endpoint.port or 80))
    proxy.start()
    settings = s3_server.settings(s3_server.new_bucket())
    settings["s3_endpoint_url"] = f"http://127.0.0.1:{proxy.port}"
    app = make_app(storage_retry_seconds=3, **settings)
    client = app.test_client()
    assert generate(client, prompt="a castle", steps=1).status_code == 200
    kept = _objects(app)
    try:
        proxy.stop()
        started = time.monotonic()
        lost = submit(client, prompt="a lost castle", steps=1).json["id"]
        failed = wait_state(client, lost, {"succeeded", "failed"}, timeout=60)
        assert failed["state"] == "failed" and time.monotonic() - started >= 1.5, failed
        assert failed["error"]["code"] == "storage_unavailable", failed
        back = submit(client, prompt="a patient castle", steps=1).json["id"]
        threading.Timer(1.0, proxy.start).start()
        done = wait_state(client, back, {"succeeded", "failed"}, timeout=60)
        assert done["state"] == "succeeded", done
    finally:
        proxy.stop()
        proxy.start()
    assert len(_objects(app)) == len(kept) + 1
    assert client.get("/images").json["total"] == 2
    proxy.stop()
