"""The history database: image and transcript rows with their files, job rows, migrations."""

from __future__ import annotations

from . import accounts, layout, migrate, space
from .base import Base, keyed_id, new_id, utcnow
from .history import (
    FILENAME_PATTERN,
    ORPHAN_GRACE_SECONDS,
    ImageRecord,
    NewImage,
    NewTranscript,
    Storage,
    TranscriptRecord,
    get_storage,
    make_engine,
)
from .jobs import ACTIVE_STATES, FINISHED_STATES, JobRecord, JobStore

__all__ = [
    "ACTIVE_STATES",
    "FILENAME_PATTERN",
    "FINISHED_STATES",
    "ORPHAN_GRACE_SECONDS",
    "Base",
    "ImageRecord",
    "JobRecord",
    "JobStore",
    "NewImage",
    "NewTranscript",
    "Storage",
    "TranscriptRecord",
    "accounts",
    "get_storage",
    "keyed_id",
    "layout",
    "make_engine",
    "migrate",
    "new_id",
    "space",
    "utcnow",
]
