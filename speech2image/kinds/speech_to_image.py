"""The speech-to-image kind: transcribe, turn the words into prompts, generate, link."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InvalidAudio
from ..image_service import ImageService
from ..jobs import Job
from ..jobs.kinds import JobKind, Schedule, pipeline_queue_name
from ..prompting import UnderstandSteps, understand_speech
from ..speech_service import SpeechService, TranscribeOptions
from ..storage import NewTranscript, keyed_id
from ._progress import elapsed, queued_seconds, store_retrying, transcribe_input

__all__ = ["SpeechToImageKind", "SpeechToImageWork", "clip_prompt"]


@dataclasses.dataclass(frozen=True)
class SpeechToImageWork:
    """An upload (the job's input) whose transcript becomes the prompt of an image request."""

    options: TranscribeOptions
    image_fields: dict[str, Any]  # the image request without its prompt
    understand: UnderstandSteps = dataclasses.field(default_factory=UnderstandSteps)


def clip_prompt(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, at a word boundary when there is one."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut.rsplit(" ", 1)[0].rstrip() or cut


class SpeechToImageKind(JobKind):
    """Speech in, images out, in one job."""

    name = "speech_to_image"
    takes_input = True

    def __init__(self, speech: SpeechService, images: ImageService) -> None:
        self.speech = speech
        self.images = images

    def schedule(self, work: SpeechToImageWork) -> Schedule:
        """Whisper first; never merged (its image request is known only after transcribing)."""
        return Schedule(model=self.speech.model_name)

    def estimate_usage(self, work: SpeechToImageWork) -> dict[str, float]:
        """Its images and pixel-steps (the audio's length is known only once decoded)."""
        fields, settings = work.image_fields, self.images.settings
        n = int(fields.get("num_images") or 1)
        width = int(fields.get("width") or settings.default_width or 512)
        height = int(fields.get("height") or settings.default_height or 512)
        steps = int(fields.get("steps") or settings.default_steps or 30)
        return {"images": n, "pixel_steps": width * height * steps * n}

    def dump(self, work: SpeechToImageWork) -> dict[str, Any]:
        """Options, image fields and the understanding steps."""
        return {
            "options": dataclasses.asdict(work.options),
            "image_fields": work.image_fields,
            "understand": dataclasses.asdict(work.understand),
        }

    def load(self, document: dict[str, Any]) -> SpeechToImageWork:
        """The work of a document."""
        return SpeechToImageWork(
            TranscribeOptions(**document["options"]),
            dict(document["image_fields"]),
            UnderstandSteps(**document.get("understand", {})),
        )

    def queue(self, job: Job, default_model: str) -> str:
        """Workers that serve Whisper and the image model the request may use."""
        chosen = str(job.work.image_fields.get("model") or "auto").strip()
        return pipeline_queue_name(None if chosen == "auto" else f"sd:{chosen}")

    def run(self, jobs: list[Job]) -> None:
        """Transcribe, turn the words into prompts, choose the model, generate, link images."""
        (job,) = jobs
        speech, images = self.speech, self.images
        work: SpeechToImageWork = job.work
        steps = work.understand
        options = work.options
        # `task=translate` asks for English: the original is transcribed and kept as well.
        english = steps.translate or options.task == "translate"
        if options.task == "translate":
            options = dataclasses.replace(options, task="transcribe")
        heard = transcribe_input(speech, job, options, english=english)
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
        # Long speech is truncated like a long typed prompt, never refused after the work.
        limit = images.settings.max_prompt_chars
        if images.moderation is not None:  # a spoken prompt is known only now
            images.moderation.check_prompt(spoken.prompt, "spoken prompt")
        prompt = clip_prompt(spoken.prompt, limit)
        negative = clip_prompt(spoken.negative_prompt, limit) if spoken.negative_prompt else None
        request = images.validate(
            {**work.image_fields, "prompt": prompt, "negative_prompt": negative}
        )
        item = images.prepare(request, lenient=True)  # a heard "without X" on FLUX is dropped
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
        timings = {
            **output.timings,
            "queue": queued_seconds(job),
            "transcription": heard.timings["total"],  # translation included
            **{k: v for k, v in heard.timings.items() if k == "translation"},
        }
        result = store_retrying(
            job,
            lambda: images.store(
                job.owner,
                item,
                output.images[0],
                truncated=output.truncated[0] or clipped,
                timings=timings,
                transcript=record,
                job_id=job.id,
            ),
            images.settings.storage_retry_seconds,
        )
        result.timings["total"] = elapsed(job)
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
