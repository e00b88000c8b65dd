"""Job kinds: what one kind of job is, in one object, and the registry both runners share.

A kind says how a job is made from a validated request (its model, batch key, image count
and steps: :meth:`JobKind.schedule`), how its work is written to JSON and read back (one
document for the job row and the Celery payload, so crash recovery and redelivery run the
same decoder), which queue it goes to in the distributed mode, and how a batch of it runs.
``create_app`` registers the kinds once and hands the registry to the runner.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from .base import Job

__all__ = [
    "JobKind",
    "JobKinds",
    "Schedule",
    "pipeline_queue_name",
    "pipeline_queues",
    "queue_name",
    "usage_from_result",
]


def queue_name(model: str) -> str:
    """The distributed queue of a model (its loader name, e.g. ``sd:dreamshaper``)."""
    return f"model.{model}"


def pipeline_queue_name(image_model: str | None) -> str:
    """The queue of jobs that need Whisper plus an image model named by the request
    (``sd:<name>``), or plus every model the automatic choice may pick (None)."""
    return f"pipeline.{image_model or 'auto'}"


def pipeline_queues(models: list[str], whisper: str, auto_models: list[str]) -> list[str]:
    """The speech-to-image queues a worker serving ``models`` can take."""
    if whisper not in models:
        return []
    queues = [pipeline_queue_name(m) for m in models if m.startswith("sd:")]
    if all(m in models for m in auto_models):
        queues.append(pipeline_queue_name(None))
    return queues


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the runners treat a job: the model it needs and what it may be merged with."""

    model: str | None = None
    batch_key: Hashable | None = None  # equal keys may share one pipeline call; None: alone
    images: int = 1  # how much of a batch it takes
    steps: int = 1  # expected denoising steps (for wait estimates)
    priority: int = 0  # the runner starts higher first; drafts are below everything else


class JobKind(abc.ABC):
    """One kind of job. Subclasses set ``name`` and implement dump, load and run."""

    name: ClassVar[str]
    #: True when the job needs an uploaded file (``Job.input``) that travels with it.
    takes_input: ClassVar[bool] = False
    #: True when that input is audio (checked as such before a distributed job is accepted).
    input_is_audio: ClassVar[bool] = True

    def schedule(self, work: Any) -> Schedule:
        """Model, batch key, image count and steps of a job with this ``work``."""
        return Schedule()

    @abc.abstractmethod
    def dump(self, work: Any) -> dict[str, Any]:
        """The work as one JSON document (the job row's ``work`` and the task payload)."""

    @abc.abstractmethod
    def load(self, document: dict[str, Any]) -> Any:
        """The work a :meth:`dump` document describes (raise InputGone if it cannot run)."""

    def queue(self, job: Job, default_model: str) -> str:
        """The distributed queue of ``job``: its model's, by default."""
        return queue_name(job.model or default_model)

    @abc.abstractmethod
    def run(self, jobs: list[Job]) -> None:
        """Run a batch (one job unless the schedule gave a batch key) and finish each job."""

    def prompts(self, work: Any) -> list[str]:
        """The prompts of a job with this ``work`` that moderation checks at admission."""
        return []

    def estimate_usage(self, work: Any) -> dict[str, float]:
        """The most a job of this ``work`` may use (``images``, ``pixel_steps``,
        ``audio_seconds``): quotas reserve it at admission. Default: nothing known."""
        return {}

    def usage(self, job: Job, result: dict[str, Any] | None) -> dict[str, float]:
        """What the finished ``job`` used (its usage row); by default read from its result."""
        return usage_from_result(result)


def usage_from_result(result: dict[str, Any] | None) -> dict[str, float]:
    """Images, pixel-steps and audio seconds a job's result shows (an image or speech result)."""
    if not result:
        return {}
    images = [i for i in result.get("images") or [] if isinstance(i, dict)]
    steps = int((result.get("parameters") or {}).get("steps") or 0)
    transcript = result.get("transcript") if isinstance(result.get("transcript"), dict) else {}
    audio = result.get("duration", (transcript or {}).get("duration")) or 0.0
    return {
        "images": len(images),
        "pixel_steps": sum(int(i.get("width", 0)) * int(i.get("height", 0)) for i in images)
        * steps,
        "audio_seconds": float(audio),
    }


class JobKinds:
    """The registry of job kinds, by name."""

    def __init__(self, kinds: list[JobKind] | None = None) -> None:
        self._kinds: dict[str, JobKind] = {}
        for kind in kinds or []:
            self.register(kind)

    def register(self, kind: JobKind) -> None:
        """Add (or replace) a kind."""
        self._kinds[kind.name] = kind

    def __getitem__(self, name: str) -> JobKind:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[JobKind]:
        return iter(self._kinds.values())

    def names(self) -> list[str]:
        """The registered kinds' names."""
        return list(self._kinds)

    def new(
        self,
        name: str,
        owner: str,
        work: Any,
        *,
        input: Path | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """A new job of kind ``name`` for a validated request, scheduled by its kind."""
        kind = self._kinds[name]
        if kind.takes_input and input is None:
            raise ValueError(f"a {name} job needs its input file")
        return Job(
            kind=name,
            owner=owner,
            work=work,
            input=input,
            idempotency_key=idempotency_key,
            **dataclasses.asdict(kind.schedule(work)),
        )

    def document(self, job: Job) -> dict[str, Any]:
        """The job's work as JSON."""
        return self._kinds[job.kind].dump(job.work)

    def rebuild(
        self,
        name: str,
        owner: str,
        document: dict[str, Any],
        *,
        id: str,
        input: Path | None = None,
        created_at: dt.datetime | None = None,
        request_id: str | None = None,
        alone: bool = False,
    ) -> Job:
        """The job a document describes, ready to run (after a restart, or on a worker).

        ``alone``: never merge it with other jobs (it was in a batch that crashed).
        """
        job = self.new(name, owner, self._kinds[name].load(document), input=input)
        job.id = id
        job.request_id = request_id
        if created_at is not None:
            job.created_at = created_at
        if alone:
            job.batch_key = None
        return job

    def queue(self, job: Job, default_model: str) -> str:
        """The distributed queue of ``job``."""
        return self._kinds[job.kind].queue(job, default_model)

    def run(self, jobs: list[Job]) -> None:
        """Run a batch of jobs of one kind."""
        self._kinds[jobs[0].kind].run(jobs)

    def prompts(self, job: Job) -> list[str]:
        """The prompts of ``job`` that moderation checks at admission."""
        return self._kinds[job.kind].prompts(job.work)

    def estimate_usage(self, job: Job) -> dict[str, float]:
        """The most ``job`` may use (its kind's estimate)."""
        return self._kinds[job.kind].estimate_usage(job.work)

    def usage(self, job: Job, result: dict[str, Any] | None) -> dict[str, float]:
        """What the finished ``job`` used (its kind's account)."""
        kind = self._kinds.get(job.kind)
        return kind.usage(job, result) if kind is not None else usage_from_result(result)
