"""The transcribe kind: an upload in, a verbose transcript out."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..jobs import Job
from ..jobs.kinds import JobKind, Schedule
from ..speech_service import SpeechService, TranscribeOptions
from ._progress import queued_seconds, transcribe_input

__all__ = ["TranscribeKind", "TranscribeWork"]


@dataclasses.dataclass(frozen=True)
class TranscribeWork:
    """The validated options of a transcription (the audio is the job's input)."""

    options: TranscribeOptions


class TranscribeKind(JobKind):
    """Transcribe (or translate) one uploaded recording."""

    name = "transcribe"
    takes_input = True

    def __init__(self, speech: SpeechService) -> None:
        self.speech = speech

    def schedule(self, work: TranscribeWork) -> Schedule:
        """Whisper's queue; never merged."""
        return Schedule(model=self.speech.model_name)

    def dump(self, work: TranscribeWork) -> dict[str, Any]:
        """The validated options."""
        return {"options": dataclasses.asdict(work.options)}

    def load(self, document: dict[str, Any]) -> TranscribeWork:
        """Options from a document (rows of older releases also hold the upload's path)."""
        return TranscribeWork(TranscribeOptions(**document["options"]))

    def run(self, jobs: list[Job]) -> None:
        """Transcribe one upload."""
        (job,) = jobs
        work: TranscribeWork = job.work
        result = transcribe_input(self.speech, job, work.options)
        body = self.speech.result_json(result, "verbose_json")
        job.succeed(body | {"queued_seconds": queued_seconds(job)})
