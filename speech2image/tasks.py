"""What each kind of job does: the glue between the job runner and the services.

Handlers receive a batch of jobs (one, except for merged image generations) and finish each
job with a result, an error or a cancellation. A distributed worker runs the same handlers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

from .engines.diffusers_sd import GenerationCancelled
from .errors import InvalidAudio, ServiceError
from .image_service import ImageRequest, ImageService, PreparedImage, model_key
from .jobs import InputGone, Job, JobCancelled
from .jobs.local import LocalJobRunner
from .prompting import UnderstandSteps, understand_speech
from .speech_service import (
    SpeechService,
    TranscribeOptions,
    TranscriptionResult,
    discard_upload,
)
from .storage import JobRecord, NewTranscript, keyed_id
from .style import StyleChoice

__all__ = [
    "SpeechToImageWork",
    "TranscribeWork",
    "job_payload",
    "job_work",
    "local_job",
    "register_tasks",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TranscribeWork:
    """A stored upload to transcribe; the job removes the file when it ends."""

    path: Path
    options: TranscribeOptions


@dataclasses.dataclass(frozen=True)
class SpeechToImageWork:
    """A stored upload whose transcript becomes the prompt of an image request."""

    path: Path
    options: TranscribeOptions
    image_fields: dict[str, Any]  # the image request without its prompt
    understand: UnderstandSteps = dataclasses.field(default_factory=UnderstandSteps)


def register_tasks(runner: LocalJobRunner, speech: SpeechService, images: ImageService) -> None:
    """Register the handler of every job kind, with how its work is saved and restored."""
    runner.register(
        "transcribe",
        partial(run_transcribe, speech),
        dump=dump_transcribe,
        restore=partial(restore_transcribe, speech),
    )
    runner.register(
        "generate",
        partial(run_generate, images),
        dump=dump_generate,
        restore=partial(restore_generate, images),
    )
    runner.register(
        "speech_to_image",
        partial(run_speech_to_image, speech, images),
        dump=dump_speech_to_image,
        restore=partial(restore_speech_to_image, speech),
    )


# --- work as JSON in the job row, and back --------------------------------------------------
def dump_generate(item: PreparedImage) -> dict[str, Any]:
    """The validated request (every default resolved, the seed too): enough to run it again."""
    return {"request": dataclasses.asdict(item.request), "model": item.choice.model}


def restore_generate(images: ImageService, record: JobRecord) -> Job:
    """A generation job from its row; the model is chosen again the same way."""
    item = images.prepare(ImageRequest(**record.work["request"]))
    return Job.restored(
        record,
        item,
        model=model_key(item.choice.model),
        batch_key=item.batch_key(),
        images=item.request.num_images,
        steps=item.request.steps,
    )


def dump_transcribe(work: TranscribeWork) -> dict[str, Any]:
    """The stored upload's path and the validated options."""
    return {"path": str(work.path), "options": dataclasses.asdict(work.options)}


def _stored_upload(speech: SpeechService, record: JobRecord) -> Path:
    path = Path(record.work["path"])
    if path.parent.resolve() != speech.upload_dir.resolve() or not path.is_file():
        raise InputGone("its uploaded audio is gone")
    return path


def restore_transcribe(speech: SpeechService, record: JobRecord) -> Job:
    """A transcription job from its row, if its upload is still there."""
    path = _stored_upload(speech, record)
    work = TranscribeWork(path, TranscribeOptions(**record.work["options"]))
    return Job.restored(record, work, cleanup=partial(discard_upload, path))


def dump_speech_to_image(work: SpeechToImageWork) -> dict[str, Any]:
    """The stored upload's path, the options and the image fields."""
    return {
        "path": str(work.path),
        "options": dataclasses.asdict(work.options),
        "image_fields": work.image_fields,
        "understand": dataclasses.asdict(work.understand),
    }


def restore_speech_to_image(speech: SpeechService, record: JobRecord) -> Job:
    """A speech-to-image job from its row, if its upload is still there."""
    path = _stored_upload(speech, record)
    data = record.work
    work = SpeechToImageWork(
        path,
        TranscribeOptions(**data["options"]),
        dict(data["image_fields"]),
        UnderstandSteps(**data.get("understand", {})),
    )
    return Job.restored(record, work, cleanup=partial(discard_upload, path))


def job_payload(job: Job) -> tuple[dict[str, Any], Path | None]:
    """A job's work as JSON for a distributed worker, and the upload it carries (if any)."""
    work = job.work
    if job.kind == "generate":
        return {
            "request": dataclasses.asdict(work.request),
            "choice": dataclasses.asdict(work.choice),
        }, None
    payload: dict[str, Any] = {"options": dataclasses.asdict(work.options)}
    if job.kind == "speech_to_image":
        payload["image_fields"] = work.image_fields
        payload["understand"] = dataclasses.asdict(work.understand)
    return payload, work.path


def job_work(kind: str, payload: dict[str, Any], upload: Path | None) -> Any:
    """Rebuild a job's work from :func:`job_payload` (on the worker)."""
    if kind == "generate":
        choice = dict(payload["choice"])
        choice["matched"] = {
            style: [tuple(cue) for cue in cues] for style, cues in choice["matched"].items()
        }
        return PreparedImage(ImageRequest(**payload["request"]), StyleChoice(**choice))
    assert upload is not None, f"a {kind} job needs its upload"
    options = TranscribeOptions(**payload["options"])
    if kind == "transcribe":
        return TranscribeWork(upload, options)
    steps = UnderstandSteps(**payload.get("understand", {}))
    return SpeechToImageWork(upload, options, payload["image_fields"], steps)


def local_job(
    job_id: str, kind: str, owner: str, payload: dict[str, Any], upload: Path | None
) -> Job:
    """The in-process job a worker runs for a delivered task (same id as the API's job)."""
    work = job_work(kind, payload, upload)
    if kind == "generate":
        return Job(
            kind=kind,
            owner=owner,
            work=work,
            model=model_key(work.choice.model),
            batch_key=work.batch_key(),
            images=work.request.num_images,
            steps=work.request.steps,
            id=job_id,
        )
    job = Job(kind=kind, owner=owner, work=work, id=job_id)
    job.cleanup = partial(discard_upload, work.path)  # also when cancelled before it ran
    return job


def _progress_all(jobs: list[Job], stage: str, done: int, total: int) -> None:
    """Report progress to every job of a batch; stop the batch only if all were cancelled."""
    for job in jobs:
        with contextlib.suppress(JobCancelled):
            job.progress(stage, done, total)
    if all(job.cancel_requested for job in jobs):
        raise GenerationCancelled()


def _elapsed(job: Job) -> float:
    return round(time.monotonic() - job.queued_at, 4)


def _transcribe_upload(
    speech: SpeechService,
    job: Job,
    path: Path,
    options: TranscribeOptions,
    *,
    english: bool = False,
) -> TranscriptionResult:
    """Transcribe a stored upload with progress.

    The file stays until the job ends (the job's cleanup removes it): a job interrupted by a
    crash can then run again from the start.
    """
    job.progress("transcribing", 0, 0)  # the stage is known before the audio is decoded
    return speech.transcribe_file(
        path,
        options,
        on_progress=lambda done, total: job.progress("transcribing", done, total),
        english=english,
        on_english_progress=lambda done, total: job.progress("translating", done, total),
    )


def run_transcribe(speech: SpeechService, jobs: list[Job]) -> None:
    """Transcribe one upload."""
    (job,) = jobs
    work: TranscribeWork = job.work
    result = _transcribe_upload(speech, job, work.path, work.options)
    job.succeed(speech.result_json(result, "verbose_json") | {"queued_seconds": _queued(job)})


def _queued(job: Job) -> float:
    return round((job.started_at or job.queued_at) - job.queued_at, 4)


def run_generate(images: ImageService, jobs: list[Job]) -> None:
    """Generate a batch of compatible requests in one pipeline call, then store each."""
    items: list[PreparedImage] = [job.work for job in jobs]
    try:
        _progress_all(jobs, "generating", 0, items[0].request.steps)  # stage known at once
        output = images.run_batch(
            items, on_step=lambda done, total: _progress_all(jobs, "generating", done, total)
        )
    except GenerationCancelled:
        for job in jobs:
            job.mark_cancelled()
        return
    for job, item, pictures, truncated, size, error in zip(
        jobs,
        items,
        output.images,
        output.truncated,
        output.batch_sizes,
        output.errors,
        strict=True,
    ):
        if job.cancel_requested:
            job.mark_cancelled()  # its images are dropped: no file, no row
            continue
        try:
            if error is not None:
                raise error  # this request alone failed; the others of its batch go on
            timings = {**output.timings, "queue": _queued(job)}
            result = images.store(
                job.owner, item, pictures, truncated=truncated, timings=timings, job_id=job.id
            )
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("job %s failed", job.id)
            job.fail(exc)
            continue
        result.timings["total"] = _elapsed(job)
        job.succeed(result.as_dict() | {"batch_size": size})


def clip_prompt(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, at a word boundary when there is one."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut.rsplit(" ", 1)[0].rstrip() or cut


def run_speech_to_image(speech: SpeechService, images: ImageService, jobs: list[Job]) -> None:
    """Transcribe, turn the words into prompts, choose the model, generate, link images."""
    (job,) = jobs
    work: SpeechToImageWork = job.work
    steps = work.understand
    options = work.options
    # `task=translate` asks for English: the original is transcribed and kept as well.
    english = steps.translate or options.task == "translate"
    if options.task == "translate":
        options = dataclasses.replace(options, task="transcribe")
    heard = _transcribe_upload(speech, job, work.path, options, english=english)
    transcript = heard.transcript
    if not transcript.text:
        raise InvalidAudio("no speech was recognised in the audio, so there is no prompt")
    spoken = understand_speech(
        transcript.text,
        transcript.language,
        translation=heard.translation.text if heard.translation is not None else None,
        clean=steps.clean,
        negatives=steps.negatives,
        negative_prompt=work.image_fields.get("negative_prompt"),
    )
    if not spoken.prompt:
        raise InvalidAudio(
            f"nothing to draw was heard in {transcript.text!r}, so there is no prompt"
        )
    # Long speech is truncated like a long typed prompt, never refused after the work is done.
    limit = images.settings.max_prompt_chars
    prompt = clip_prompt(spoken.prompt, limit)
    negative = clip_prompt(spoken.negative_prompt, limit) if spoken.negative_prompt else None
    request = images.validate({**work.image_fields, "prompt": prompt, "negative_prompt": negative})
    item = images.prepare(request)
    output = images.run_batch(
        [item], on_step=lambda done, total: job.progress("generating", done, total)
    )
    if job.cancel_requested:
        job.mark_cancelled()
        return
    # The row keeps what was said, in the language it was said in.
    record = NewTranscript(
        transcript.text,
        transcript.language,
        transcript.duration,
        id=keyed_id(job.id, "transcript"),
    )
    clipped = prompt != spoken.prompt or negative != spoken.negative_prompt
    result = images.store(
        job.owner,
        item,
        output.images[0],
        truncated=output.truncated[0] or clipped,
        timings={
            **output.timings,
            "queue": _queued(job),
            "transcription": heard.timings["total"],  # translation included
            **{k: v for k, v in heard.timings.items() if k == "translation"},
        },
        transcript=record,
        job_id=job.id,
    )
    result.timings["total"] = _elapsed(job)
    job.succeed(
        result.as_dict()
        | {
            "transcript": {
                "id": record.id,
                "text": transcript.text,
                "language": transcript.language,
                "duration": transcript.duration,
            },
            "prompt_from_speech": spoken.as_dict()
            | {"prompt": prompt, "negative_prompt": negative},
        }
    )
