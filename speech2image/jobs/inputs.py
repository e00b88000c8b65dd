"""Where a queued job's input (an uploaded recording) waits until the job ends.

Embedded: the upload stays in the upload folder where the view stored it; the row names its
path. Distributed: the API process copies it into the image store (the bucket, or the shared
folder) under the job's id, so it outlives a broker that loses its data and any API process;
the worker that runs the job fetches a local copy. Either way the input is removed when the
job ends, and a job whose input is gone is failed with a clear reason instead of run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from ..imagestore import ImageStore

__all__ = ["FolderInputs", "JobInputs", "StoreInputs", "discard_file"]


def discard_file(path: Path | None) -> None:
    """Remove a local file (missing is fine)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class JobInputs(Protocol):
    """Keeps job inputs until their jobs end."""

    def keep(self, job_id: str, path: Path) -> str:
        """Keep the file at ``path`` for ``job_id``; returns the location its row records."""

    def fetch(self, job_id: str, location: str) -> Path | None:
        """A local file with the input (the caller removes it), or None when it is gone."""

    def discard(self, job_id: str, location: str | None) -> None:
        """Remove the kept input (the job ended)."""


class FolderInputs:
    """Inputs stay in the upload folder of this machine (the embedded mode)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def keep(self, job_id: str, path: Path) -> str:
        """The view already stored it here: its path is its location."""
        return str(path)

    def fetch(self, job_id: str, location: str) -> Path | None:
        """The file itself, if it is still there and lies in the upload folder."""
        path = Path(location)
        if path.parent.resolve() != self.folder.resolve() or not path.is_file():
            return None
        return path

    def discard(self, job_id: str, location: str | None) -> None:
        """Remove the upload."""
        if location:
            discard_file(Path(location))


class StoreInputs:
    """Inputs in the image store (bucket or shared folder) under the job's id (distributed)."""

    def __init__(self, store: ImageStore, scratch: Path) -> None:
        self.store = store
        self.scratch = Path(scratch)

    @staticmethod
    def name(job_id: str) -> str:
        """The object of a job's input (never taken for an orphaned image)."""
        return f"input-{job_id}.upload"

    def keep(self, job_id: str, path: Path) -> str:
        """Copy the local upload into the store."""
        name = self.name(job_id)
        self.store.put(name, path.read_bytes())
        return name

    def fetch(self, job_id: str, location: str) -> Path | None:
        """Download the input into a new file of the scratch folder."""
        source = self.store.source(location)
        if source is None:
            return None
        self.scratch.mkdir(parents=True, exist_ok=True)
        local = self.scratch / f"upload-{uuid.uuid4().hex}"
        try:
            if isinstance(source, Path):
                shutil.copyfile(source, local)
            else:
                try:
                    with open(local, "xb") as out:
                        shutil.copyfileobj(source, out)
                finally:
                    source.close()
        except BaseException:
            discard_file(local)
            raise
        return local

    def discard(self, job_id: str, location: str | None) -> None:
        """Delete the stored input."""
        self.store.delete(location or self.name(job_id))
