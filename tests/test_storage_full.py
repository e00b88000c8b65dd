"""A full disk leaves nothing behind and answers 507 storage_full (issue 7, point 8)."""

from __future__ import annotations

import errno
import os

import pytest

from .test_images import generate, image_files


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
