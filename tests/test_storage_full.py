"""Full and read-only disks: 507 storage_full or 503, nothing left behind, deletes still work.

Issue 7 point 8 (a failed save leaves nothing) and issue 18 point 1 (the reserve, the history
apart from the images, deleting and cleaning up on a full disk, read-only image folders).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from speech2image.config import load_settings
from speech2image.storage.space import SPARE_BYTES

from .test_images import fetch, generate, image_files
from .test_jobs import wait_state
from .test_transcribe import post_audio


def test_disk_full_part_way_through_a_batch_leaves_nothing(
    make_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    import speech2image.imagestore.local as storage_module

    app = make_app()
    client = app.test_client()
    real_fsync = os.fsync
    calls = {"n": 0}

    def full_disk(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the first image's temporary file is written; the second fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(storage_module.os, "fsync", full_disk)
    response = generate(client, prompt="a lighthouse at dusk", num_images=3, seed=3)
    assert response.status_code == 507, response.json
    error = response.json["error"]
    assert error["code"] == "storage_full"
    assert "no space left" in error["message"]
    assert image_files(app) == []  # no .png, no .png.tmp
    assert client.get("/images").json["total"] == 0

    monkeypatch.setattr(storage_module.os, "fsync", real_fsync)
    assert generate(client, prompt="a lighthouse at dusk", seed=3).status_code == 200
    assert len(image_files(app)) == 1


# --- issue 18.1: the reserve, the history apart from the images, full and read-only disks ----

MiB = 1024**2


def _job_rows(app) -> int:  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from speech2image.storage import JobRecord

    with app.extensions["storage"].engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(JobRecord)))


@contextlib.contextmanager
def _mounted(target: Path, *commands: list[str]) -> Iterator[Path]:
    """Run ``mount`` commands on ``target`` (root only: skipped elsewhere); unmount after."""
    target.mkdir(parents=True, exist_ok=True)
    mounted = 0
    try:
        for command in commands:
            result = subprocess.run(
                ["mount", *command, str(target)], capture_output=True, text=True
            )
            if result.returncode != 0:
                pytest.skip(f"cannot mount a test file system here: {result.stderr.strip()}")
            mounted += 1
        yield target
    finally:
        for _ in range(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def _fill(folder: Path) -> Path:
    """Another process fills the file system to the last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 512)
    return filler


def test_the_history_is_kept_apart_from_the_images_by_default(make_app, tmp_path) -> None:
    assert load_settings().resolved_database_url().endswith("/data/history.sqlite3")
    app = make_app()
    assert generate(app.test_client(), prompt="a lighthouse", steps=1).status_code == 200
    storage = app.extensions["storage"]
    assert storage.sqlite_path == tmp_path / "data" / "history.sqlite3"
    assert storage.sqlite_path.is_file()
    assert not [p for p in (tmp_path / "images").iterdir() if "sqlite" in p.name]


def test_an_older_history_in_the_image_folder_is_moved_out_with_its_rows(
    make_app, tmp_path
) -> None:
    legacy = tmp_path / "images" / "history.sqlite3"
    old = make_app(database_url=f"sqlite:///{legacy}")  # the layout of earlier releases
    old_client = old.test_client()
    image = generate(old_client, prompt="a lighthouse", steps=1).json["images"][0]
    job = old_client.post("/generate-image", json={"prompt": "a harbour", "async": True}).json
    done = wait_state(old_client, job["id"], {"succeeded"})["result"]["images"][0]
    old.extensions["jobs"].shutdown()
    old.extensions["storage"].close()  # the old server stops
    assert legacy.is_file()

    app = make_app()  # the default layout: the history goes to S2I_DATA_DIR
    client = app.test_client()
    assert app.extensions["storage"].sqlite_path == tmp_path / "data" / "history.sqlite3"
    listed = {row["id"] for row in client.get("/images").json["images"]}
    assert listed == {image["id"], done["id"]}
    assert fetch(client, image["url"]).status_code == 200
    assert client.get(f"/jobs/{job['id']}").json["state"] == "succeeded"  # job rows came too
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == sorted([image["filename"], done["filename"]])  # no history files left
    assert not list((tmp_path / "data").glob(".*.tmp"))


def test_an_older_history_another_process_has_open_keeps_working_where_it_is(
    make_app, tmp_path
) -> None:
    legacy = tmp_path / "images" / "history.sqlite3"
    old = make_app(database_url=f"sqlite:///{legacy}")
    image = generate(old.test_client(), prompt="a lighthouse", steps=1).json["images"][0]
    old.extensions["storage"].close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('SELECT count(*) FROM images').fetchone(); print('open', flush=True); "
            "sys.stdin.read()",
            str(legacy),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"  # type: ignore[union-attr]
        app = make_app()
        assert app.extensions["storage"].sqlite_path == legacy  # not moved under its feet
        assert app.test_client().get("/images").json["total"] == 1
        assert not (tmp_path / "data" / "history.sqlite3").exists()
        app.extensions["storage"].close()
    finally:
        holder.communicate("", timeout=30)
    moved = make_app()  # the next start, with the other process gone, moves it
    assert moved.extensions["storage"].sqlite_path == tmp_path / "data" / "history.sqlite3"
    assert moved.test_client().get("/images").json["images"][0]["id"] == image["id"]
    assert not legacy.exists()


def test_new_work_is_refused_below_the_reserve_before_a_job_row_is_written(
    make_app, tmp_path, speech
) -> None:
    first = make_app()
    image = generate(first.test_client(), prompt="a lighthouse", steps=1).json["images"][0]
    # The same folders, with a reserve larger than the free space: the disk is "full".
    app = make_app(disk_reserve_bytes=shutil.disk_usage(tmp_path).free + 1024 * MiB)
    client = app.test_client()
    rows = _job_rows(app)
    refusals = [
        generate(client, prompt="a castle", steps=1),
        client.post("/generate-image", json={"prompt": "a castle", "async": True}),
        post_audio(client, speech["english"]),
    ]
    for response in refusals:
        assert response.status_code == 507, response.json
        assert response.json["error"]["code"] == "storage_full"
        assert "S2I_DISK_RESERVE_BYTES" in response.json["error"]["message"]
    openai = client.post("/v1/images/generations", json={"prompt": "a castle"})
    assert openai.status_code == 507 and openai.json["error"]["code"] == "storage_full"
    assert _job_rows(app) == rows  # no row for a refused request
    assert list((tmp_path / "uploads").glob("*")) == []
    # Reading, deleting and cleaning up go on.
    assert client.get("/images").json["total"] == 1
    assert client.post("/cleanup").status_code == 200
    assert client.delete(f"/images/{image['id']}").status_code == 204
    assert image_files(app) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_image_folder_refusing_writes_is_503_and_leaves_nothing(
    make_app, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    import speech2image.imagestore.local as store_module

    app = make_app()
    client = app.test_client()

    def refuse(src, dst):  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store_module.os, "replace", refuse)
    response = generate(client, prompt="a lighthouse", num_images=2, steps=1)
    assert response.status_code == 503, response.json
    assert response.json["error"]["code"] == "storage_read_only"
    assert "nothing was stored" in response.json["error"]["message"]
    assert image_files(app) == [] and client.get("/images").json["total"] == 0


def test_a_read_only_image_folder_answers_503_with_a_message(make_app, tmp_path) -> None:
    app = make_app()
    client = app.test_client()
    image = generate(client, prompt="a lighthouse", steps=1).json["images"][0]
    folder = tmp_path / "images"
    if os.geteuid() == 0:  # root writes through permissions: make it a read-only mount
        context = _mounted(folder, ["--bind", str(folder)], ["-o", "remount,bind,ro"])
    else:
        context = _read_only_folder(folder)
    with context:
        for response in (
            generate(client, prompt="a castle", steps=1),
            client.post("/generate-image", json={"prompt": "a castle", "async": True}),
            client.delete(f"/images/{image['id']}"),  # its row stays with its file
        ):
            assert response.status_code == 503, response.json
            assert response.json["error"]["code"] == "storage_read_only"
            assert "read-only" in response.json["error"]["message"]
        assert client.get("/images").json["total"] == 1
        assert fetch(client, image["url"]).status_code == 200
        assert client.post("/cleanup").status_code == 200
        assert client.get("/ready").json["down"] == ["image_dir"]
    assert generate(client, prompt="a castle", steps=1).status_code == 200
    assert client.delete(f"/images/{image['id']}").status_code == 204


@contextlib.contextmanager
def _read_only_folder(folder: Path) -> Iterator[Path]:
    folder.chmod(0o500)
    try:
        yield folder
    finally:
        folder.chmod(0o700)


def test_a_full_disk_still_lets_images_be_deleted_and_cleaned_up(make_app, tmp_path) -> None:
    # Issue 18.1: with the SQLite history beside the images, refused requests wrote job rows
    # into the last bytes; then nothing could be written, deletes and cleanup included.
    with _mounted(tmp_path / "disk", ["-t", "tmpfs", "-o", "size=32m", "tmpfs"]) as disk:
        settings = {
            "image_dir": disk / "images",
            "data_dir": disk / "data",
            "disk_reserve_bytes": 2 * MiB,
            "image_max_count": 1,
        }
        app = make_app(**settings)
        client = app.test_client()
        images = [
            generate(client, prompt="a lighthouse", steps=1, seed=n).json["images"][0]
            for n in range(3)
        ]
        rows = _job_rows(app)
        filler = _fill(disk)  # someone else takes every byte
        assert os.statvfs(disk).f_bavail == 0

        refused = generate(client, prompt="a castle", steps=1)
        assert refused.status_code == 507 and refused.json["error"]["code"] == "storage_full"
        # Without the reserve the row insert itself hits the full disk: still 507.
        unreserved = make_app(**settings | {"disk_reserve_bytes": 0})
        refused = generate(unreserved.test_client(), prompt="a castle", steps=1)
        assert refused.status_code == 507, refused.json
        assert _job_rows(app) == rows

        assert client.delete(f"/images/{images[0]['id']}").status_code == 204
        report = client.post("/cleanup")
        assert report.status_code == 200, report.json
        assert report.json["images_removed"] == 1  # the older of the two left
        listing = client.get("/images").json
        assert [row["id"] for row in listing["images"]] == [images[2]["id"]]

        # Space again: work resumes, and the spare file is made again for the next time.
        filler.unlink()
        latest = generate(client, prompt="a castle", steps=1).json["images"][0]
        assert (disk / "data" / "history.sqlite3-spare").stat().st_size == SPARE_BYTES

        # A restart on a disk filled to the last byte: the history opens, deleting works.
        for stopped in (app, unreserved):
            stopped.extensions["jobs"].shutdown()
            stopped.extensions["storage"].close()
        filler = _fill(disk)
        again = make_app(**settings).test_client()
        for image in (images[2], latest):
            assert again.delete(f"/images/{image['id']}").status_code == 204
        assert again.get("/images").json["total"] == 0
        assert sorted(p.name for p in (disk / "images").iterdir()) == []

        filler.unlink()  # space again: work resumes
        assert generate(again, prompt="a castle", steps=1).status_code == 200
