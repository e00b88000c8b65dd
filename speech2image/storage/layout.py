"""Where the SQLite history lives: apart from the images, moved there from older releases.

Earlier releases kept the default history at ``S2I_IMAGE_DIR/history.sqlite3``, beside the
images, so a disk filled by images also stopped the history (deletes included). Its default
place is now ``S2I_DATA_DIR/history.sqlite3``. A history found in the old place is moved at
start-up, safely: under SQLite's exclusive lock (no other process may use it meanwhile), copied
with SQLite's backup API (the write-ahead log included), synced, checked and renamed into place
before the old files go. When another process still has it open, or anything fails, it stays
where it is and keeps working there; the log says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url

from .space import spare_path

__all__ = ["LEGACY_NAME", "history_location"]

log = logging.getLogger(__name__)

LEGACY_NAME = "history.sqlite3"  # the old default: S2I_IMAGE_DIR/history.sqlite3


def history_location(database_url: str, image_dir: Path) -> str:
    """The history's URL: ``database_url``, or the old place's while a move is not possible.

    Only a SQLite file that does not exist yet is concerned, and only when an older
    release's history lies in ``image_dir``; every other URL comes back unchanged.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return database_url
    target = Path(url.database).resolve()
    legacy = (Path(image_dir) / LEGACY_NAME).resolve()
    if target == legacy or not legacy.is_file():
        return database_url
    if target.exists():
        log.warning(
            "an older history lies at %s and is not used: the history is %s", legacy, target
        )
        return database_url
    if _move(legacy, target):
        return database_url
    return url.set(database=str(legacy)).render_as_string(hide_password=False)


def _move(legacy: Path, target: Path) -> bool:
    """Move the SQLite database ``legacy`` to ``target``; False (nothing changed) if it cannot."""
    target.parent.mkdir(parents=True, exist_ok=True)
    copy = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    source = sqlite3.connect(legacy, timeout=0, isolation_level=None)
    try:
        # Take and keep SQLite's exclusive lock (the first read does, in this mode): no other
        # process may read or write the file until it is gone; one that has it open refuses.
        source.execute("PRAGMA locking_mode=EXCLUSIVE")
        source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        destination = sqlite3.connect(copy)
        try:
            source.backup(destination)  # a consistent copy, write-ahead log included
            (check,) = destination.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy does not check out: {check}")
        finally:
            destination.close()
        with open(copy, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(copy, target)
        _sync_folder(target.parent)
        for old in (legacy, *(legacy.with_name(legacy.name + x) for x in ("-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        with contextlib.suppress(FileNotFoundError):
            spare_path(legacy).unlink()  # the new place gets its own
        _sync_folder(legacy.parent)
    except (sqlite3.Error, OSError) as exc:
        with contextlib.suppress(OSError):
            copy.unlink()
        busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
        reason = "another process has it open" if busy else f"{type(exc).__name__}: {exc}"
        log.warning(
            "the history stays at %s, in the image folder (%s); stop the processes that use "
            "it and restart to move it to %s",
            legacy,
            reason,
            target,
        )
        return False
    finally:
        source.close()
    log.info("moved the history out of the image folder: %s -> %s", legacy, target)
    return True


def _sync_folder(folder: Path) -> None:
    """Make a rename or an unlink in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
