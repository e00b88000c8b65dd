"""Helpers the kinds share: progress for a whole batch, queue and total times."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..engines.diffusers_sd import GenerationCancelled
from ..engines.previews import Previewer, b64, previews_to
from ..errors import DATABASE_ERRORS, DatabaseUnavailable, StorageUnavailable
from ..jobs import Job, JobCancelled
from ..speech_service import SpeechService, TranscribeOptions, TranscriptionResult

__all__ = [
    "elapsed",
    "previews_for",
    "progress_all",
    "queued_seconds",
    "store_retrying",
    "transcribe_input",
]

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.5  # the first back-off of a store that does not answer (doubles)
RETRY_MAX_SECONDS = 8.0


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
    heard: list[str] = []

    def show_text(text: str) -> None:  # the transcript so far, for streams (api/streams.py)
        heard.append(text)
        job.show(text="".join(heard).lstrip())

    return speech.transcribe_file(
        path,
        options,
        on_progress=lambda done, total: job.progress("transcribing", done, total),
        english=english,
        on_english_progress=lambda done, total: job.progress("translating", done, total),
        on_text=show_text,
    )


T = TypeVar("T")


def store_retrying(job: Job, store: Callable[[], T], seconds: float) -> T:
    """Store a job's results, retrying with back-off while the image store or the database
    does not answer; after ``seconds`` the job fails with ``storage_unavailable`` or
    ``database_unavailable`` (storing is idempotent: a retry never stores twice)."""
    deadline = time.monotonic() + seconds
    delay = RETRY_FIRST_SECONDS
    while True:
        try:
            return store()
        except (StorageUnavailable, *DATABASE_ERRORS) as exc:
            if time.monotonic() + delay > deadline or job.cancel_requested:
                if isinstance(exc, StorageUnavailable):
                    raise
                raise DatabaseUnavailable(
                    "the history database did not answer; the images were not stored",
                    retry_after=5,
                ) from None
            log.warning("job %s: storing failed (%s); retrying in %.1f s", job.id, exc, delay)
            with contextlib.suppress(JobCancelled):  # a waiting client sees why it waits
                job.progress("storing", 0, 0)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)


@contextlib.contextmanager
def previews_for(jobs: list[Job], items: list[Any], previewer: Previewer | None) -> Iterator[None]:
    """Around a kind's pipeline call: each job shows preview frames of its first image
    (``partial["preview"]``) while it denoises, within the previewer's time budget.

    ``items`` are the jobs' prepared requests (``PreparedImage``), in the same order. A frame
    goes to a job only when its own prompt and seeds are found in the call, so a job never
    shows another request's image.
    """
    if previewer is None or not previewer.enabled:
        yield
        return
    budget = previewer.budget()
    keys = [
        [(i.request.prompt, i.request.negative_prompt, seed) for seed in i.request.seeds()]
        for i in items
    ]

    def sink(pipe: Any, spec: Any, step: int, total: int, latents: Any) -> None:
        if not budget.due(step, total):
            return
        started = time.perf_counter()
        call = list(zip(spec.prompts, spec.negative_prompts, spec.seeds, strict=True))
        found = [
            (job, start)
            for job, key in zip(jobs, keys, strict=True)
            for start in range(len(call) - len(key) + 1)
            if call[start : start + len(key)] == key and not job.cancel_requested
        ]
        found = list({job.id: (job, start) for job, start in found}.values())  # first match
        if not found:
            return
        try:
            pngs, method = previewer.frames(pipe, spec, latents, [start for _, start in found])
        except Exception:
            log.warning("previews: a frame failed; none more for this call", exc_info=True)
            budget.max_fraction = 0
            return
        frame = budget.frames
        for (job, _), png in zip(found, pngs, strict=True):
            preview = {"b64_png": b64(png), "step": step, "total": total, "frame": frame}
            job.show(preview=preview | {"method": method})
        budget.spend(time.perf_counter() - started)

    with previews_to(sink):
        yield
    log.debug("previews: %s", budget.as_dict())
