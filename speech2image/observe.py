"""Hooks that the model loader, the job runner and the services call as work happens.

They know nothing about Prometheus or Flask: :class:`Observer` does nothing, and
:class:`speech2image.metrics.Metrics` overrides it to count. Any process that builds these
objects (the API server, a Celery worker) passes in whichever observer it wants.
"""

from __future__ import annotations

__all__ = ["NULL_OBSERVER", "Observer"]


class Observer:
    """Receives events of model and job work; every method is a no-op here. Thread-safe."""

    def model_loaded(self, model: str, device: str, seconds: float, nbytes: int) -> None:
        """``model`` finished loading on ``device`` in ``seconds``, taking ``nbytes``."""

    def model_evicted(self, model: str, device: str, action: str) -> None:
        """``model`` left ``device``: ``action`` is ``demote`` (to CPU) or ``unload``."""

    def job_finished(self, kind: str, state: str, seconds: float) -> None:
        """A job of ``kind`` ended in ``state`` (succeeded, failed, cancelled)."""

    def batch_run(self, kind: str, jobs: int, images: int) -> None:
        """The runner handed one batch of ``jobs`` (``images`` in all) to a handler."""

    def denoised(self, model: str, steps: int, images: int, seconds: float) -> None:
        """A pipeline call ran ``steps`` denoising steps over ``images`` in ``seconds``."""

    def transcribed(self, model: str, audio_seconds: float, seconds: float) -> None:
        """``audio_seconds`` of audio were transcribed in ``seconds`` of inference."""


NULL_OBSERVER = Observer()
