"""Response models: what the endpoints answer, for the OpenAPI description (never enforced)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Cleanup",
    "Generation",
    "Health",
    "HeardTranscript",
    "ImagePage",
    "ImageRow",
    "JobAccepted",
    "JobPage",
    "JobView",
    "PromptChange",
    "PromptFromSpeech",
    "Ready",
    "ReadyCheck",
    "ServerConfig",
    "ServerStatus",
    "TranscriptRow",
    "Transcription",
]

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Open(BaseModel):
    # Answers may gain fields; clients must ignore what they do not know.
    model_config = ConfigDict(extra="allow")


class Health(_Open):
    """The process is alive."""

    status: Literal["ok"]
    version: str
    uptime_seconds: float


class ReadyModel(_Open):
    """One model the server may need."""

    name: str
    required: bool
    loaded: bool
    available: bool
    problem: str | None = None


class ReadyCheck(_Open):
    """One dependency: whether it works, and what is wrong if not."""

    ok: bool
    problem: str | None = None


class Ready(_Open):
    """Whether this instance can serve: database, image folder, models, rate-limit storage."""

    ready: bool
    down: list[str] = Field(description="Checks that fail (503): what is down")
    degraded: list[str] = Field(description="Checks that fail without stopping service")
    checks: dict[str, ReadyCheck]
    models: list[ReadyModel]


class ServerStatus(_Open):
    """Resources, resident models, jobs and request counts (for operators)."""

    version: str
    uptime_seconds: float


class Cleanup(_Open):
    """What a cleanup removed."""

    images_removed: int = 0
    models_unloaded: list[str] = Field(default_factory=list)


class GeneratedImage(_Open):
    """One image of a generation."""

    id: str
    filename: str
    url: str
    width: int
    height: int
    seed: int
    bytes: int


class TranscriptSummary(_Open):
    """The transcript a speech-to-image prompt came from."""

    id: str
    text: str
    language: str | None
    duration: float | None


class PromptChange(_Open):
    """One edit spoken-prompt understanding made: the rule, the words before and after, why."""

    rule: Literal["translate", "filler", "framing", "negative"]
    before: str
    after: str
    why: str


class PromptFromSpeech(_Open):
    """How a transcript became the image prompt and negative prompt (/speech-to-image)."""

    transcript: str = Field(description="What was said, in the language it was said in.")
    language: str | None
    translated: bool = Field(description="Whisper translated the speech to English.")
    changes: list[PromptChange]
    prompt: str
    negative_prompt: str | None = Field(
        description="The caller's negative prompt, then the spoken negatives."
    )


class Generation(_Open):
    """Images made from one prompt, with the model choice and every parameter used."""

    images: list[GeneratedImage]
    model: str
    model_choice: dict[str, Any]
    prompt: str
    truncated: bool
    parameters: dict[str, Any]
    timings: dict[str, float]
    batch_size: int | None = None
    transcript: TranscriptSummary | None = None
    prompt_from_speech: PromptFromSpeech | None = Field(
        None, description="/speech-to-image: how the transcript became the prompt."
    )


class JobProgress(_Open):
    """Where a job is: stage, step of total, estimated seconds left."""

    stage: str | None
    step: int | None
    total: int | None
    eta_seconds: float | None


class JobView(_Open):
    """A job: state, progress and, once done, its result or error."""

    id: str
    kind: str
    state: JobStateName
    created_at: str
    progress: JobProgress
    model: str | None = None
    queued_seconds: float | None = None
    partial: dict[str, Any] | None = Field(
        None,
        description="What the job has so far: `text` (the transcript), and in event streams "
        "asked with `previews=true`, `preview` (a frame: `b64_png`, `step`, `total`).",
    )
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class JobAccepted(JobView):
    """Accepted: poll `url` (also in `Location`) or follow `events` (Server-Sent Events)."""

    url: str
    events: str


class JobPage(_Open):
    """One page of the caller's jobs, newest first."""

    jobs: list[JobView]
    page: int
    per_page: int
    total: int
    pages: int


class Transcription(_Open):
    """A transcript (`json`; `verbose_json` adds segments, words, duration_after_vad)."""

    text: str
    language: str | None
    language_probability: float | None = None
    duration: float | None
    task: str
    model: str
    processing_time: float
    timings: dict[str, float]
    duration_after_vad: float | None = None
    segments: list[dict[str, Any]] | None = None
    words: list[dict[str, Any]] | None = None


class HeardTranscript(_Open):
    """The transcript an image was made from (listings only)."""

    id: str
    text: str
    language: str | None


class ImageRow(_Open):
    """A stored image and every parameter it was made with."""

    id: str
    filename: str
    url: str
    prompt: str
    negative_prompt: str | None
    model: str
    model_reason: str | None
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    width: int
    height: int
    parameters: dict[str, Any] | None
    bytes: int
    created_at: str
    transcript_id: str | None
    transcript: HeardTranscript | None = None


class ImagePage(_Open):
    """One page of the caller's images, newest first."""

    images: list[ImageRow]
    page: int
    per_page: int
    total: int
    pages: int


class TranscriptRow(_Open):
    """A stored transcript and the images made from it (newest first)."""

    id: str
    text: str
    language: str | None
    duration: float | None
    created_at: str
    images: list[ImageRow]


class Limit(_Open):
    """A numeric range a form needs."""

    min: int | float | None = None
    max: int | float
    default: int | float | None = None
    multiple_of: int | None = None


class ModelInfo(_Open):
    """A configured model; an image model also says its family, defaults and limits."""

    name: str
    source: str | None = None
    family: str | None = Field(None, description="sd1, sd2, sdxl, sd3 or flux")
    family_label: str | None = None
    few_step: bool | None = Field(None, description="A distilled few-step model")
    defaults: dict[str, Any] | None = Field(
        None, description="width, height, steps, guidance_scale, scheduler when left out"
    )
    schedulers: list[str] | None = Field(None, description="The schedulers it takes")
    guidance_scale: dict[str, float] | None = Field(None, description="min and max")
    negative_prompt: bool | None = Field(None, description="Whether it takes one")
    size_multiple: int | None = Field(None, description="Width and height are multiples of it")


class LoraInfo(_Open):
    """A LoRA requests may name, and the family it is for (null: not stated in the file)."""

    name: str
    family: str | None = None


class ModelLists(_Open):
    """The configured models."""

    image: list[ModelInfo]
    whisper: list[ModelInfo]
    default_image: str


class ServerConfig(_Open):
    """What a client needs to build its forms: models, schedulers, limits, whether auth is on."""

    models: ModelLists
    loras: list[LoraInfo] = Field(default_factory=list, description="From S2I_LORA_DIR")
    schedulers: list[str]
    limits: dict[str, Limit]
    auth: dict[str, bool]
