"""Schema migrations: a fresh database equals the models; a release database upgrades in place."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from speech2image.api.identity import LOCAL_OWNER
from speech2image.cli import main
from speech2image.storage import Base, Storage, make_engine, migrate

from .test_images import fetch

V0_SQL = Path(__file__).parent / "data" / "history_v0.sql"
PNG = b"\x89PNG v0 file"


def _v0_statements(timestamp: str, owner: str) -> tuple[list[str], dict[str, str]]:
    ids = {"image_id": uuid.uuid4().hex, "transcript_id": uuid.uuid4().hex, "owner": owner}
    sql = V0_SQL.read_text().format(
        timestamp=timestamp, sha256=hashlib.sha256(PNG).hexdigest(), **ids
    )
    lines = [line for line in sql.splitlines() if not line.startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()], ids


def _schema_differences(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_migrations_build_exactly_the_models(tmp_path) -> None:
    storage = Storage(f"sqlite:///{tmp_path / 'h.sqlite3'}", tmp_path / "images")
    assert _schema_differences(storage.engine) == []
    with storage.engine.connect() as connection:
        assert migrate.current_revision(connection) == migrate.head_revision()
    storage.close()


def test_release_sqlite_history_upgrades_in_place(make_app, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    statements, ids = _v0_statements("DATETIME", LOCAL_OWNER)
    old = create_engine(f"sqlite:///{folder / 'history.sqlite3'}")
    with old.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    old.dispose()
    (folder / f"{ids['image_id']}.png").write_bytes(PNG)

    app = make_app()
    client = app.test_client()
    listing = client.get("/images").json
    assert listing["total"] == 1
    (image,) = listing["images"]
    assert image["id"] == ids["image_id"] and image["transcript_id"] == ids["transcript_id"]
    assert image["seed"] == 4294967295 and image["parameters"] == {"seed": 4294967295}
    assert image["created_at"] == "2026-11-01T08:00:01+00:00"
    served = fetch(client, image["url"])
    assert served.status_code == 200 and served.data == PNG
    engine = app.extensions["storage"].engine
    assert "jobs" in inspect(engine).get_table_names()
    assert _schema_differences(engine) == []
    job = client.post(
        "/generate-image",
        json={"prompt": "a castle", "steps": 1, "async": True},
    )
    assert job.status_code == 202


def test_db_upgrade_command_and_current(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("S2I_IMAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("S2I_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    before = runner.invoke(main, ["db", "current"])
    assert before.exit_code == 0 and "current: none" in before.output
    upgraded = runner.invoke(main, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"empty -> {migrate.head_revision()}" in upgraded.output
    again = runner.invoke(main, ["db", "upgrade"])
    assert f"{migrate.head_revision()} -> {migrate.head_revision()}" in again.output
    assert f"current: {migrate.head_revision()}" in runner.invoke(main, ["db", "current"]).output


@pytest.mark.postgres
def test_release_postgresql_history_upgrades_in_place(tmp_path, monkeypatch, postgres_url) -> None:
    url = postgres_url
    statements, ids = _v0_statements("TIMESTAMP WITH TIME ZONE", "alice")
    old = create_engine(url)
    with old.begin() as connection:
        connection.execute(text("SET TIME ZONE 'UTC'"))
        for statement in statements:
            connection.exec_driver_sql(statement)
    old.dispose()

    monkeypatch.setenv("S2I_DATABASE_URL", url)
    monkeypatch.setenv("S2I_IMAGE_DIR", str(tmp_path / "images"))
    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"{migrate.BASELINE} -> {migrate.head_revision()}" in result.output

    storage = Storage(url, tmp_path / "images", migrate_schema=False)
    try:
        rows, total = storage.list_images("alice")
        assert total == 1 and rows[0].id == ids["image_id"]
        assert rows[0].transcript_id == ids["transcript_id"] and rows[0].seed == 4294967295
        assert rows[0].as_dict()["created_at"] == "2026-11-01T08:00:01+00:00"
        assert _schema_differences(storage.engine) == []
        storage.jobs.add(id=uuid.uuid4().hex, owner="alice", kind="generate", work={})
        assert storage.jobs.count_active("alice") == {"queued": 1, "running": 0}
    finally:
        storage.close()
    engine = make_engine(url)
    with engine.connect() as connection:
        assert migrate.current_revision(connection) == migrate.head_revision()
    engine.dispose()
