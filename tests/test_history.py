"""Image history: listing, filters, owners, safe file serving, caching, cleanup, PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import update

from speech2image.storage import ImageRecord, NewImage, NewTranscript, Storage

from .test_images import fetch, generate, image_files

ALPHA = {"X-API-Key": "alpha"}
BETA = {"X-API-Key": "beta"}


@pytest.fixture
def app(make_app):  # type: ignore[no-untyped-def]
    return make_app(api_keys="alpha,beta")


def make_images(client, n: int, headers=ALPHA, **body):  # type: ignore[no-untyped-def]
    ids = []
    for i in range(n):
        response = client.post(
            "/generate-image", json={"prompt": f"castle {i}", "steps": 1, **body}, headers=headers
        )
        assert response.status_code == 200, response.json
        ids.append(response.json["images"][0]["id"])
    return ids


def test_listing_is_newest_first_paginated_and_filtered(app) -> None:
    client = app.test_client()
    art = make_images(client, 3)
    photo = make_images(client, 2, model="tiny-photo")
    everything = client.get("/images", headers=ALPHA).json
    assert everything["total"] == 5
    assert [i["id"] for i in everything["images"]] == list(reversed(art + photo))
    page2 = client.get("/images?per_page=2&page=2", headers=ALPHA).json
    assert [i["id"] for i in page2["images"]] == [art[2], art[1]]
    assert page2["pages"] == 3 and page2["per_page"] == 2
    only_photo = client.get("/images?model=tiny-photo", headers=ALPHA).json
    assert {i["id"] for i in only_photo["images"]} == set(photo)
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    assert client.get("/images", query_string={"since": future}, headers=ALPHA).json["total"] == 0
    assert client.get("/images", query_string={"until": past}, headers=ALPHA).json["total"] == 0
    in_range = client.get("/images", query_string={"since": past, "until": future}, headers=ALPHA)
    assert in_range.json["total"] == 5


@pytest.mark.parametrize(
    ("query", "needle"),
    [("page=0", "`page`"), ("per_page=1000", "`per_page`"), ("since=yesterday", "`since`")],
)
def test_bad_listing_arguments_are_400(app, query, needle) -> None:
    response = app.test_client().get(f"/images?{query}", headers=ALPHA)
    assert response.status_code == 400
    assert needle in response.json["error"]["message"]


def test_owners_see_and_fetch_only_their_images(app) -> None:
    client = app.test_client()
    (alpha_id,) = make_images(client, 1, headers=ALPHA)
    assert client.get("/images", headers=BETA).json["total"] == 0
    assert fetch(client, f"/images/{alpha_id}.png", headers=BETA).status_code == 404
    assert fetch(client, f"/images/{alpha_id}.png", headers=ALPHA).status_code == 200
    assert fetch(client, f"/images/{alpha_id}.png").status_code == 401


def test_file_serving_has_cdn_caching_headers(make_app) -> None:
    client = make_app().test_client()
    url = generate(client, prompt="a castle", steps=1).json["images"][0]["url"]
    response = fetch(client, url)
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    etag = response.headers["ETag"]
    assert etag.strip('"')
    assert fetch(client, url, headers={"If-None-Match": etag}).status_code == 304


TRAVERSALS = [
    "../history.sqlite3",
    "..%2fhistory.sqlite3",
    "%2e%2e%2fhistory.sqlite3",
    "%252e%252e%252fhistory.sqlite3",
    "..%252fhistory.sqlite3",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "..\\history.sqlite3",
    "..%5chistory.sqlite3",
    "{name}%00.txt",
    "{name}%00",
    "./{name}",
    "{name}/",
    "{name}/..",
    "../images/{name}",
    "{stem}.PNG",
    "{stem}",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "....//....//etc/passwd",
]


@pytest.mark.parametrize("variant", TRAVERSALS)
def test_path_traversal_variants_are_404(make_app, variant) -> None:
    app = make_app()
    client = app.test_client()
    name = generate(client, prompt="a castle", steps=1).json["images"][0]["filename"]
    (Path(app.config["S2I_SETTINGS"].image_dir).parent / "secret.txt").write_text("secret")
    path = "/images/" + variant.format(name=name, stem=name.removesuffix(".png"))
    response = fetch(client, path)
    assert response.status_code == 404, (path, response.status_code)
    assert response.json["error"]["code"] == "not_found"
    assert b"secret" not in response.data


def test_unrecorded_file_in_the_folder_is_not_served(make_app) -> None:
    app = make_app()
    stray = uuid.uuid4().hex + ".png"
    (Path(app.config["S2I_SETTINGS"].image_dir) / stray).write_bytes(b"\x89PNG not recorded")
    assert fetch(app.test_client(), f"/images/{stray}").status_code == 404


def _age_images(app, ids: list[str], days: float) -> None:  # type: ignore[no-untyped-def]
    storage = app.extensions["storage"]
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    with storage.engine.begin() as connection:
        connection.execute(
            update(ImageRecord).where(ImageRecord.id.in_(ids)).values(created_at=old)
        )


def test_cleanup_removes_expired_rows_and_files_together(make_app) -> None:
    app = make_app(image_retention_days=7)
    client = app.test_client()
    ids = make_images(client, 3, headers={})
    _age_images(app, ids[:2], days=8)
    sizes = {i["id"]: i["bytes"] for i in client.get("/images").json["images"]}
    report = client.post("/cleanup").json
    assert report["images_removed"] == 2 and report["files_removed"] == 2
    assert report["bytes_removed"] == sizes[ids[0]] + sizes[ids[1]]
    remaining = client.get("/images").json["images"]
    assert [i["id"] for i in remaining] == [ids[2]]
    assert image_files(app) == [f"{ids[2]}.png"]
    assert client.get("/status").json["cleanup"]["last_run"]["images_removed"] == 2


def test_cleanup_enforces_count_and_bytes_caps(make_app) -> None:
    app = make_app(image_max_count=2)
    client = app.test_client()
    ids = make_images(client, 4, headers={})
    assert client.post("/cleanup").json["images_removed"] == 2
    assert image_files(app) == sorted(f"{i}.png" for i in ids[2:])
    one_image = client.get("/images").json["images"][0]["bytes"]
    capped = make_app(image_max_bytes=one_image + 10)
    assert capped.test_client().post("/cleanup").json["images_removed"] == 1
    assert len(image_files(capped)) == 1


def test_cleanup_removes_stale_orphans_and_unloads_idle_models(make_app) -> None:
    app = make_app(model_idle_seconds=3600)
    client = app.test_client()
    make_images(client, 1, headers={})
    folder = Path(app.config["S2I_SETTINGS"].image_dir)
    orphan = folder / (uuid.uuid4().hex + ".png")
    orphan.write_bytes(b"left by a crash")
    fresh_orphan = folder / (uuid.uuid4().hex + ".png")
    fresh_orphan.write_bytes(b"a save in progress")
    old = dt.datetime.now().timestamp() - 3600
    os.utime(orphan, (old, old))
    loader = app.extensions["model_loader"]
    loader._clock = lambda: 10**9  # time travel: every model is idle now
    report = client.post("/cleanup").json
    assert report["orphan_files_removed"] == 1
    assert not orphan.exists() and fresh_orphan.exists()
    assert report["models_unloaded"] == ["sd:tiny-art"]
    assert report["images_removed"] == 0 and len(client.get("/images").json["images"]) == 1


def test_scheduled_cleanup_runs_on_a_timer(make_app) -> None:
    app = make_app(image_retention_days=1, cleanup_interval_seconds=0.05)
    client = app.test_client()
    ids = make_images(client, 1, headers={})
    _age_images(app, ids, days=2)
    maintenance = app.extensions["maintenance"]
    try:
        for _ in range(200):
            if not image_files(app):
                break
            threading_wait(0.02)
        assert image_files(app) == []
        assert client.get("/images").json["total"] == 0
    finally:
        maintenance.stop()


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


@pytest.mark.postgres
def test_storage_works_on_postgresql(tmp_path, postgres_url) -> None:
    storage = Storage(postgres_url, tmp_path / "images")
    try:
        transcript = NewTranscript("a castle at dawn", "en", 2.5)
        image = NewImage(
            png=b"\x89PNG fake",
            prompt="a castle at dawn",
            negative_prompt=None,
            model="tiny-art",
            model_reason="test",
            seed=2**32 - 1,
            steps=4,
            guidance_scale=7.0,
            scheduler="euler_a",
            width=64,
            height=64,
            parameters={"seed": 2**32 - 1},
        )
        (record,) = storage.save_images("alice", [image], transcript=transcript)
        rows, total = storage.list_images("alice")
        assert total == 1 and rows[0].id == record.id and rows[0].transcript_id == transcript.id
        assert rows[0].seed == 2**32 - 1
        assert storage.get_image("bob", record.filename) is None
        assert storage.stats() == {"count": 1, "bytes": len(image.png)}
        report = storage.cleanup(max_age=dt.timedelta(seconds=0))
        assert report["images_removed"] == 1 and storage.stats()["count"] == 0
    finally:
        storage.close()


def test_date_filters_respect_utc_offsets(make_app) -> None:
    client = make_app().test_client()
    make_images(client, 1, headers={})
    now = dt.datetime.now(dt.UTC)
    plus_two = dt.timezone(dt.timedelta(hours=2))
    minus_five = dt.timezone(dt.timedelta(hours=-5))
    since = (now - dt.timedelta(minutes=30)).astimezone(plus_two).isoformat()
    until = (now + dt.timedelta(minutes=30)).astimezone(minus_five).isoformat()
    assert client.get("/images", query_string={"since": since}).json["total"] == 1
    assert client.get("/images", query_string={"until": until}).json["total"] == 1
