"""Job kinds made for tests: a callback kind, and a toy kind added in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from speech2image.jobs import Job, JobKind, Schedule

__all__ = ["CallbackKind", "EchoKind"]


class CallbackKind(JobKind):
    """A kind whose batches go to ``handler``; work is a JSON dict, ``model`` from it."""

    def __init__(self, name: str, handler: Callable[[list[Job]], None]) -> None:
        self.name = name  # type: ignore[misc]
        self.handler = handler

    def schedule(self, work: Any) -> Schedule:
        model = work.get("model") if isinstance(work, dict) else None
        return Schedule(model=model)

    def dump(self, work: Any) -> dict[str, Any]:
        return {"work": work}

    def load(self, document: dict[str, Any]) -> Any:
        return document["work"]

    def run(self, jobs: list[Job]) -> None:
        self.handler(jobs)


class EchoKind(JobKind):
    """A toy kind: repeats a word; requests of the same word share one batch."""

    name = "echo"

    def schedule(self, work: dict[str, Any]) -> Schedule:
        return Schedule(model="toy:echo", batch_key=("echo", work["word"]), steps=work["steps"])

    def dump(self, work: dict[str, Any]) -> dict[str, Any]:
        return {"word": work["word"], "times": work["times"], "steps": work["steps"]}

    def load(self, document: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(document.get("word"), str):
            raise ValueError("an echo needs a word")
        return dict(document)

    def queue(self, job: Job, default_model: str) -> str:
        return "toy.echo"

    def run(self, jobs: list[Job]) -> None:
        import time

        steps = jobs[0].work["steps"]
        for step in range(1, steps + 1):
            time.sleep(0.01)
            for job in jobs:
                job.progress("echoing", step, steps)
        for job in jobs:
            work = job.work
            job.succeed({"echo": " ".join([work["word"]] * work["times"]), "batch": len(jobs)})
