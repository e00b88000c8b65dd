"""Schema migrations (Alembic) applied to the history database at start-up or by the CLI."""

from __future__ import annotations

import logging

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

__all__ = ["BASELINE", "alembic_config", "current_revision", "head_revision", "upgrade"]

log = logging.getLogger(__name__)

BASELINE = "0001_baseline"  # the schema the first release created without Alembic
# Any number of API processes and workers may start together: one migrates, the others wait.
_PG_LOCK_KEY = 0x5332_4944_4221  # "S2IDB!"


def alembic_config(connection: Connection | None = None, url: str | None = None):  # type: ignore[no-untyped-def]
    """An Alembic config for speech2image/migrations, bound to ``connection`` or ``url``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "speech2image:migrations")
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the database to ``revision``; returns (before, after).

    A database written before migrations existed (its tables are there, no version) is
    stamped as the baseline first, so its rows stay where they are.
    """
    from alembic import command

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        before = current_revision(connection)
        target = head_revision() if revision == "head" else revision
        if before == target:
            return before, target
        config = alembic_config(connection)
        if before is None and inspect(connection).has_table("images"):
            log.info("history database predates migrations: stamping it %s", BASELINE)
            command.stamp(config, BASELINE)
            before = BASELINE
        command.upgrade(config, revision)
        after = current_revision(connection)
    log.info("history database migrated from %s to %s", before, after)
    return before, after or target
