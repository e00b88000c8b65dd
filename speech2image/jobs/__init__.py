"""Job execution: submit, progress, result, cancel; local (threads) or distributed (Celery).

:mod:`.base` declares the interface (Job, states, the JobRunner Protocol, typed stats),
:mod:`.kinds` what a kind of job is and the registry both runners share, :mod:`.records` every
mapping of a job to its row and events, :mod:`.inputs` where a job's upload waits. The two
runners sit side by side: :mod:`.local` (threads in this process, the embedded mode) and the
:mod:`.celery` package (API side and worker side of the distributed mode).
"""

from __future__ import annotations

from .base import (
    TERMINAL,
    InputGone,
    Job,
    JobCancelled,
    JobListener,
    JobRunner,
    JobState,
    RunnerStats,
    get_job_runner,
)
from .kinds import JobKind, JobKinds, Schedule

__all__ = [
    "TERMINAL",
    "InputGone",
    "Job",
    "JobCancelled",
    "JobKind",
    "JobKinds",
    "JobListener",
    "JobRunner",
    "JobState",
    "RunnerStats",
    "Schedule",
    "get_job_runner",
]
