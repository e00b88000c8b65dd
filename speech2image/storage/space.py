"""The disk under the history and the images: a free-space reserve and a spare file.

A full disk must not stop the service from freeing space. Two things see to it:

- **The reserve.** New work (a job row, an upload, a batch of images) is refused with 507
  ``storage_full`` before anything is written when a local place it writes to has less free
  space than ``S2I_DISK_RESERVE_BYTES``. The service's own writes stop there, so deleting
  and cleaning up always find room.
- **The spare file.** Another process may still fill the disk to the last byte. SQLite then
  cannot even delete a row: the write-ahead log (and, after a restart, its shared-memory
  index) needs a few pages. A SQLite history keeps a spare file of ``SPARE_BYTES`` beside it;
  a delete or a cleanup that fails for lack of space removes it and tries once more, and it
  is made again once there is room.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from ..errors import StorageFull, StorageReadOnly

__all__ = [
    "SPARE_BYTES",
    "SpareFile",
    "cannot_write",
    "check_room",
    "free_bytes",
    "out_of_space",
    "spare_path",
    "storage_error",
]

log = logging.getLogger(__name__)

SPARE_BYTES = 8 * 1024**2  # room for SQLite to delete rows on a disk filled by someone else
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)

T = TypeVar("T")


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on ``path``'s file system."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def out_of_space(exc: BaseException) -> bool:
    """True for a write that failed because the disk or a quota is full."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE
    # SQLite reports SQLITE_FULL as "database or disk is full".
    return isinstance(exc, OperationalError) and "disk is full" in str(exc.orig)


def cannot_write(exc: BaseException) -> bool:
    """True for a write refused by a read-only file system or by permissions."""
    if isinstance(exc, OSError):
        return exc.errno in _READ_ONLY
    return isinstance(exc, OperationalError) and "readonly database" in str(exc.orig)


def storage_error(exc: BaseException, what: str) -> StorageFull | StorageReadOnly | None:
    """The 507 or 503 that a failed write of ``what`` deserves, or None for other failures."""
    if out_of_space(exc):
        return StorageFull(
            f"no space left to store {what} (the disk or a quota is full); nothing was stored. "
            "Free space (DELETE /images/<id>, POST /cleanup), or lower S2I_IMAGE_MAX_BYTES / "
            "S2I_IMAGE_RETENTION_DAYS"
        )
    if cannot_write(exc):
        return StorageReadOnly(
            f"{what} cannot be written here (a read-only file system, or no permission); "
            "nothing was stored. The server's storage must be made writable again"
        )
    return None


def check_room(places: Iterable[Path], reserve: int) -> None:
    """Refuse new work (507) when a place has less than ``reserve`` bytes free; 503 if read-only.

    ``places`` are local folders new work writes to (the image folder, the SQLite history's).
    """
    seen: set[int] = set()
    for place in places:
        try:
            device = os.stat(place).st_dev
        except OSError:
            continue  # made again on the next write, which reports its own failure
        # Read-only is a property of a mount (a bind mount shares its device): ask each place.
        if not os.access(place, os.W_OK):
            raise StorageReadOnly(
                "the server's storage cannot be written (a read-only file system, or no "
                "permission): new work is refused until it is writable again"
            )
        if device in seen:
            continue
        seen.add(device)
        if reserve and free_bytes(place) < reserve:
            raise StorageFull(
                f"less than S2I_DISK_RESERVE_BYTES ({reserve // 1024**2} MiB) is free where "
                "images and the history are kept: new work is refused until space is freed "
                "(DELETE /images/<id>, POST /cleanup)"
            )


def spare_path(database: Path) -> Path:
    """Where the spare file of the SQLite history ``database`` lies: beside it."""
    return database.with_name(database.name + "-spare")


class SpareFile:
    """A file of ``size`` bytes kept beside a SQLite history, given up when the disk is full."""

    def __init__(self, path: Path, size: int = SPARE_BYTES) -> None:
        self.path = path
        self.size = size
        self._lock = threading.Lock()

    def ensure(self, reserve: int = 0) -> bool:
        """Make the file if it is missing and the disk keeps ``reserve`` bytes free after it."""
        with self._lock:
            if self.path.exists():
                return True
            temporary = self.path.with_name(self.path.name + ".tmp")
            try:
                if free_bytes(self.path.parent) - self.size < reserve:
                    return False
                with open(temporary, "wb") as out:
                    os.posix_fallocate(out.fileno(), 0, self.size)  # real blocks, not a hole
                    os.fsync(out.fileno())
                os.replace(temporary, self.path)
            except OSError as exc:
                log.warning("cannot keep a spare file at %s: %s", self.path, exc)
                with contextlib.suppress(OSError):
                    temporary.unlink()
                return False
            return True

    def release(self) -> bool:
        """Remove the file, giving its space to the history; True if there was one."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            log.warning("the disk is full: released %d spare bytes to free space", self.size)
            return True

    def with_room(self, work: Callable[[], T], *, reserve: int = 0) -> T:
        """Run ``work``; if it fails for lack of space, release the spare file and run it again."""
        try:
            return work()
        except (OSError, OperationalError) as exc:
            if not (self._looks_full(exc) and self.release()):
                raise
        result = work()
        self.ensure(reserve)  # made again only if the disk has room for it and the reserve
        return result

    def _looks_full(self, exc: BaseException) -> bool:
        if out_of_space(exc):
            return True
        # With no byte left SQLite cannot make its shared-memory index: "disk I/O error".
        if isinstance(exc, OperationalError) and "disk I/O error" in str(exc.orig):
            with contextlib.suppress(OSError):
                return free_bytes(self.path.parent) < self.size
        return False
