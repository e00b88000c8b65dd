"""The service's job kinds: transcribe, generate, speech-to-image, draft.

Each kind is one object (see :class:`~speech2image.jobs.kinds.JobKind`): how a job is made
from a validated request, its work as JSON, its queue, and how a batch of it runs.
``create_app`` builds them with the services and hands the registry to the job runner.
"""

from __future__ import annotations

from ..image_service import ImageService
from ..jobs.kinds import JobKind, JobKinds
from ..speech_service import SpeechService
from .draft import DraftKind
from .edit import EditKind
from .generate import GenerateKind
from .speech_to_image import SpeechToImageKind, SpeechToImageWork
from .transcribe import TranscribeKind, TranscribeWork

__all__ = [
    "DraftKind",
    "EditKind",
    "GenerateKind",
    "SpeechToImageKind",
    "SpeechToImageWork",
    "TranscribeKind",
    "TranscribeWork",
    "get_job_kinds",
    "service_kinds",
]


def service_kinds(
    speech: SpeechService, images: ImageService, extra: list[JobKind] | None = None
) -> JobKinds:
    """The registry of every kind this service runs (plus ``extra`` ones, e.g. in tests)."""
    return JobKinds(
        [
            TranscribeKind(speech),
            GenerateKind(images),
            SpeechToImageKind(speech, images),
            EditKind(images),
            DraftKind(images),
            *(extra or []),
        ]
    )


def get_job_kinds(app: object) -> JobKinds:
    """The app's job kinds."""
    return app.extensions["job_kinds"]  # type: ignore[attr-defined]
