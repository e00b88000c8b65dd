"""The image store interface: where the PNG bytes of the history live.

Two implementations side by side: :mod:`.local` (a folder, the embedded default) and
:mod:`.s3` (any S3-compatible object store). Names are the history's file names
(``<32 hex>.png``); the history database says which exist and whose they are.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = ["ImageStore", "StoredObject"]


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One object in a store: its name, size and last change."""

    name: str
    size: int
    modified: dt.datetime


class ImageStore(Protocol):
    """What the history needs from a place that keeps image bytes."""

    kind: str

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` atomically (readers see all of it or nothing).

        Writing the same name again replaces it: storing is idempotent.
        """

    def delete(self, name: str) -> bool:
        """Remove ``name``; True if it existed."""

    def exists(self, name: str) -> bool:
        """True when ``name`` is stored."""

    def source(self, name: str) -> Path | BinaryIO | None:
        """What to serve for ``name``: a local file path or a readable stream; None if gone."""

    def presigned_url(self, name: str, expires_seconds: int) -> str | None:
        """A URL that serves ``name`` directly for a while, or None when the store has none."""

    def objects(self) -> Iterator[StoredObject]:
        """Every object in the store (for orphan cleanup), temporary ones included."""

    def location(self, name: str) -> str:
        """Where ``name`` lies, for people (a path or an s3:// URL)."""

    def check(self) -> None:
        """Raise when the store cannot be reached or written (for readiness)."""
