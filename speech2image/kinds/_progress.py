"""Helpers the kinds share: progress for a whole batch, queue and total times."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..engines.diffusers_sd import GenerationCancelled
from ..jobs import Job, JobCancelled
from ..speech_service import SpeechService, TranscribeOptions, TranscriptionResult

__all__ = ["elapsed", "progress_all", "queued_seconds", "transcribe_input"]


def progress_all(jobs: list[Job], stage: str, done: int, total: int) -> None:
    """Report progress to every job of a batch; stop the batch only if all were cancelled."""
    for job in jobs:
        with contextlib.suppress(JobCancelled):
            job.progress(stage, done, total)
    if all(job.cancel_requested for job in jobs):
        raise GenerationCancelled()


def elapsed(job: Job) -> float:
    """Seconds since the job was queued."""
    return round(time.monotonic() - job.queued_at, 4)


def queued_seconds(job: Job) -> float:
    """Seconds the job waited before it started."""
    return round((job.started_at or job.queued_at) - job.queued_at, 4)


def transcribe_input(
    speech: SpeechService,
    job: Job,
    options: TranscribeOptions,
    *,
    english: bool = False,
) -> TranscriptionResult:
    """Transcribe the job's stored upload with progress.

    The file stays until the job ends (the runner removes it): a job interrupted by a crash
    can then run again from the start.
    """
    path: Path | None = job.input
    assert path is not None, f"a {job.kind} job needs its upload"
    job.progress("transcribing", 0, 0)  # the stage is known before the audio is decoded
    return speech.transcribe_file(
        path,
        options,
        on_progress=lambda done, total: job.progress("transcribing", done, total),
        english=english,
        on_english_progress=lambda done, total: job.progress("translating", done, total),
    )
