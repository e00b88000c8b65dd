"""The local folder image store (embedded default): one file per image, written atomically."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from .base import StoredObject

__all__ = ["LocalImageStore"]

TEMPORARY_SUFFIX = ".tmp"


class LocalImageStore:
    """Images as files in one folder; writes go to a temporary file, then rename into place."""

    kind = "local"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path | None:
        """The file of ``name``, only if it lies directly inside the folder."""
        path = (self.folder / name).resolve()
        return path if path.parent == self.folder else None

    def put(self, name: str, data: bytes) -> None:
        """Write ``data`` to a temporary file, fsync it, rename it over ``name``."""
        final = self._path(name)
        if final is None:
            raise ValueError(f"not a plain file name: {name!r}")
        # An operator may have removed the folder while the server runs: make it again.
        self.folder.mkdir(parents=True, exist_ok=True)
        # Unique even when the same job writes twice at once (a redelivered task).
        temporary = self.folder / f".{name}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}"
        try:
            with open(temporary, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise

    def delete(self, name: str) -> bool:
        """Remove the file of ``name``."""
        path = self._path(name)
        if path is None:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def exists(self, name: str) -> bool:
        """True when the file of ``name`` exists."""
        path = self._path(name)
        return path is not None and path.is_file()

    def source(self, name: str) -> Path | None:
        """The file's path (served with sendfile), or None."""
        path = self._path(name)
        return path if path is not None and path.is_file() else None

    def presigned_url(self, name: str, expires_seconds: int) -> None:
        """A folder has no URLs of its own."""
        return None

    def objects(self) -> Iterator[StoredObject]:
        """Every image file of the folder (the default SQLite history shares it)."""
        for path in self.folder.iterdir():
            if not path.name.endswith((".png", TEMPORARY_SUFFIX)):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # renamed or removed meanwhile
                continue
            if path.is_file():
                modified = dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC)
                yield StoredObject(path.name, stat.st_size, modified)

    def location(self, name: str) -> str:
        """The file's path."""
        return str(self.folder / name)

    def check(self) -> None:
        """The folder must exist and be writable."""
        if not os.access(self.folder, os.W_OK):
            raise OSError(f"the image folder {self.folder} is not writable")
