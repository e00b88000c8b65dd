"""Typed settings read from the environment, validated once at start-up.

Every field reads ``S2I_<FIELD>`` (upper case) except the classic ``HOST``, ``PORT`` and
``DEBUG``. This module imports nothing heavy: never torch, never a model library.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engines.families import FAMILY_NAMES, SCHEDULERS, profile
from .style import DEFAULT_STYLE, DEFAULT_STYLE_MODELS, default_style_cues

__all__ = [
    "IMAGE_MODEL_PRESETS",
    "STYLE_MODEL_SETS",
    "ImageModelSpec",
    "Settings",
    "SettingsError",
    "StyleLora",
    "env_name",
    "exposure_warning",
    "load_settings",
]

ENV_PREFIX = "S2I_"
CLASSIC_NAMES = {"host": "HOST", "port": "PORT", "debug": "DEBUG"}

Device = Literal["auto", "cpu", "cuda"]
SCHEDULER_NAMES = tuple(SCHEDULERS)


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the environment variable."""


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return CLASSIC_NAMES.get(field, ENV_PREFIX + field.upper())


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "speech2image"


class ImageModelSpec(BaseModel):
    """Where an image checkpoint comes from, what family it is, and its own defaults."""

    model_config = {"extra": "forbid", "frozen": True}

    source: str = Field(description="Hub id, local diffusers folder, or single-file .safetensors")
    vae: str | None = Field(None, description="Hub id or local folder of a replacement VAE")
    config: str | None = Field(
        None, description="For a single file: a local diffusers folder with the configs"
    )
    family: Literal[FAMILY_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="sd1, sd2, sdxl, sd3 or flux; empty: detected from the files"
    )
    few_step: bool | None = Field(
        None,
        description="A distilled few-step model (Turbo, Lightning, LCM, schnell): trailing "
        "timesteps, 4 steps, guidance 0-2; empty: detected where the files say so",
    )
    width: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=64, le=4096, multiple_of=8)
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: Literal[SCHEDULER_NAMES] | None = None  # type: ignore[valid-type]
    max_sequence_length: int | None = Field(
        None, ge=1, le=4096, description="T5 tokens per prompt (FLUX, SD3)"
    )

    def defaults(self) -> dict[str, Any]:
        """The request defaults this model declares (None: its family's)."""
        return {
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "max_sequence_length": self.max_sequence_length,
        }


class StyleLora(BaseModel):
    """The LoRA a style cue turns on, and its weight."""

    model_config = {"extra": "forbid", "frozen": True}

    lora: str = Field(min_length=1, max_length=100, description="A LoRA in S2I_LORA_DIR")
    weight: float = Field(1.0, ge=-2, le=2, allow_inf_nan=False)


IMAGE_MODEL_PRESETS: dict[str, ImageModelSpec] = {
    # Stable Diffusion 1.5 (512 px): about 2.1 GB of float16 weights each.
    "dreamshaper": ImageModelSpec(source="Lykon/dreamshaper-8", family="sd1"),
    "realistic-vision": ImageModelSpec(
        source="SG161222/Realistic_Vision_V5.1_noVAE",
        vae="stabilityai/sd-vae-ft-mse",
        family="sd1",
    ),
    # Stable Diffusion XL (1024 px): about 6.9 GB of float16 weights each.
    "dreamshaper-xl": ImageModelSpec(source="Lykon/dreamshaper-xl-1-0", family="sdxl"),
    "dreamshaper-xl-lightning": ImageModelSpec(
        source="Lykon/dreamshaper-xl-lightning",
        family="sdxl",
        few_step=True,
        steps=4,
        guidance_scale=2.0,
        scheduler="dpmpp_2m",
    ),
    "realvis-xl": ImageModelSpec(
        source="SG161222/RealVisXL_V5.0", family="sdxl", scheduler="dpmpp_2m_karras"
    ),
    "realvis-xl-lightning": ImageModelSpec(
        source="SG161222/RealVisXL_V5.0_Lightning",
        family="sdxl",
        few_step=True,
        steps=5,
        guidance_scale=1.5,
        scheduler="dpmpp_2m_karras",
    ),
    # FLUX.1-schnell (1024 px, 4 steps, no negative prompt): about 33.7 GB of bfloat16 weights.
    "flux-schnell": ImageModelSpec(
        source="black-forest-labs/FLUX.1-schnell", family="flux", few_step=True
    ),
}

#: S2I_STYLE_MODEL_SET: the models automatic choice uses for each style, by preset set.
STYLE_MODEL_SETS: dict[str, dict[str, str]] = {
    "sd15": dict(DEFAULT_STYLE_MODELS),
    "sdxl": {"artistic": "dreamshaper-xl", "photographic": "realvis-xl"},
    "sdxl-lightning": {
        "artistic": "dreamshaper-xl-lightning",
        "photographic": "realvis-xl-lightning",
    },
    "flux": {"artistic": "flux-schnell", "photographic": "flux-schnell"},
}


class Settings(BaseSettings):
    """All configuration of the service. See the README's table for each variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )

    # --- server -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", validation_alias="HOST", description="Address to bind.")
    port: int = Field(5000, ge=1, le=65535, validation_alias="PORT", description="TCP port.")
    debug: bool = Field(False, validation_alias="DEBUG", description="Flask debug mode.")
    threads: int = Field(8, ge=1, le=256, description="Request threads (gunicorn / run.py).")
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Probe listener (/health, /ready) of `serve`; empty: PORT+1; 0: off.",
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, let running jobs finish this long."
    )
    event_streams: int = Field(
        32,
        ge=1,
        le=1024,
        description="Event streams open at once, in threads of their own beside S2I_THREADS.",
    )
    event_streams_per_key: int = Field(
        4, ge=1, le=1024, description="Event streams one client (key or address) may hold."
    )

    # --- files and logs -----------------------------------------------------------------
    log_dir: Path = Field(Path("logs"), description="Folder of app.log.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_max_bytes: ByteSize = Field(ByteSize(10 * 1024**2), description="Rotate app.log past this.")
    log_backup_count: int = Field(5, ge=0, le=1000)
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per record; json: one JSON object per line."
    )
    upload_dir: Path = Field(
        Path(tempfile.gettempdir()) / "speech2image-uploads",
        description="Where uploads wait while they are decoded; emptied after each request.",
    )
    model_cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where bundled models are assembled and hub downloads are kept.",
    )

    # --- request limits -----------------------------------------------------------------
    max_upload_bytes: ByteSize = Field(ByteSize(25 * 1024**2), description="Largest upload.")
    max_audio_seconds: float = Field(600.0, gt=0, le=24 * 3600, description="Decoded-audio cap.")
    max_image_pixels: int = Field(
        16 * 1024 * 1024, ge=64 * 64, le=2**31, description="Largest uploaded image to edit."
    )

    # --- speech recognition -------------------------------------------------------------
    whisper_model: str = Field(
        "base",
        description="faster-whisper model: bundled name (base, tiny.en), hub name or local path.",
    )
    whisper_device: Device = "auto"
    whisper_compute_type: str = Field(
        "auto", description="CTranslate2 compute type; auto: float16 on CUDA, int8 on CPU."
    )
    whisper_cpu_threads: int = Field(0, ge=0, le=256, description="0: let CTranslate2 choose.")
    whisper_beam_size: int = Field(5, ge=1, le=10)
    whisper_vad: bool = Field(True, description="Skip non-speech with Silero VAD.")
    whisper_allow_download: bool = Field(
        False, description="Let faster-whisper fetch hub models not found locally."
    )

    # --- live: long audio in batches, image previews --------------------------------------
    whisper_batch_seconds: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="Audio longer than this goes through faster-whisper's batched pipeline "
        "(VAD-cut segments decoded in batches); 0: never.",
    )
    whisper_batch_size: int = Field(8, ge=1, le=64, description="Segments per batched decode.")
    preview_every_steps: int = Field(
        1, ge=1, le=1000, description="A preview frame at most every N denoising steps."
    )
    preview_max_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Previews may take at most this fraction of a generation's time "
        "(measured); 0: no previews.",
    )
    realtime_sessions: int = Field(
        8, ge=0, le=1024, description="Realtime WebSocket sessions open at once (0: none)."
    )
    realtime_sessions_per_key: int = Field(
        2, ge=1, le=1024, description="Realtime sessions one client may hold at once."
    )
    realtime_max_seconds: float = Field(
        300.0, gt=0, le=24 * 3600, description="Longest realtime session (wall clock)."
    )
    realtime_max_audio_seconds: float = Field(
        240.0, gt=0, le=24 * 3600, description="Most audio one realtime session may send."
    )
    realtime_silence_ms: int = Field(
        600, ge=100, le=10_000, description="Silence that ends an utterance (voice activity)."
    )
    drafts_max_active: int = Field(
        2, ge=0, le=1024, description="Drafts queued or running at once, all clients (0: none)."
    )
    draft_steps: int = Field(4, ge=1, le=50, description="Denoising steps of a draft.")
    draft_size: int = Field(256, ge=64, le=1024, multiple_of=8, description="Draft side, px.")
    draft_seed: int = Field(1, ge=0, le=2**32 - 1, description="A draft's seed unless given.")
    preview_tiny_vaes: dict[str, str] = Field(
        default_factory=dict,
        description="JSON: family -> AutoencoderTiny folder (e.g. taesd) for sharper previews; "
        "without one a family's latent->RGB projection is used (no extra weights).",
    )

    # --- model residency ----------------------------------------------------------------
    max_models_in_memory: int = Field(4, ge=1, le=64)
    cpu_memory_budget: ByteSize = Field(
        ByteSize(0), description="Bytes of RAM for resident models; 0: 60% of system RAM."
    )
    gpu_memory_budget: ByteSize = Field(
        ByteSize(0), description="Bytes of GPU memory for resident models; 0: 85% of the card."
    )
    model_idle_seconds: float = Field(
        1800.0, ge=0, description="Unload a model unused this long; 0 keeps models resident."
    )
    preload_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated models to load at start-up."
    )

    # --- image generation --------------------------------------------------------------
    image_models: dict[str, ImageModelSpec] = Field(
        default_factory=dict,
        description="JSON {name: {source, vae?, config?, family?, few_step?, defaults?}} added "
        "to (or replacing) the presets.",
    )
    image_device: Device = "auto"
    image_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: the family's half precision on CUDA, float32 on CPU."
    )
    image_offload: Literal["auto", "none", "model", "group"] = Field(
        "auto",
        description="GPU offloading: auto when a model exceeds the GPU budget; model: one "
        "component at a time; group: groups of layers; none: never.",
    )
    image_allow_download: bool = Field(
        True, description="Fetch hub checkpoints not in the cache on first use."
    )
    image_dir: Path = Field(Path("generated_images"), description="Folder of generated PNGs.")
    data_dir: Path = Field(
        Path("data"), description="Folder of the default SQLite history, apart from the images."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL of the history; empty: SQLite in S2I_DATA_DIR."
    )
    # --- image store ------------------------------------------------------------------
    image_store: Literal["local", "s3"] = Field(
        "local", description="Where PNGs live: local (S2I_IMAGE_DIR) or s3 (an S3 bucket)."
    )
    s3_bucket: str = Field("", description="Bucket of the images (needed with s3).")
    s3_prefix: str = Field("images/", description="Key prefix of the images in the bucket.")
    s3_endpoint_url: str = Field(
        "", description="S3 API URL (MinIO, SeaweedFS, R2 ...); empty: AWS S3."
    )
    s3_region: str = Field("", description="Region; empty: boto3's default.")
    s3_access_key_id: str = Field("", description="Access key; empty: boto3's default chain.")
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="Secret key.")
    s3_create_bucket: bool = Field(False, description="Create the bucket at start-up if missing.")
    s3_presigned_redirect_seconds: int = Field(
        0,
        ge=0,
        le=7 * 24 * 3600,
        description="GET /images/<file> redirects to a presigned URL valid this long; 0: proxy.",
    )
    database_connect_timeout_seconds: float = Field(
        5.0, gt=0, le=600, description="Give up connecting to the database after this long."
    )
    database_statement_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="PostgreSQL statement timeout; SQLite busy timeout."
    )
    ready_min_free_bytes: ByteSize = Field(
        ByteSize(100 * 1024**2), description="/ready fails below this much free space for images."
    )
    disk_reserve_bytes: ByteSize = Field(
        ByteSize(100 * 1024**2),
        description="New work is refused (507) below this much free space; 0: no reserve.",
    )
    # The S2I_DEFAULT_* values apply to every model; empty: each model's own (its preset's,
    # else its family's: 512 px for SD 1.x, 1024 for SDXL and FLUX; 4 steps when few-step).
    default_width: int | None = Field(None, ge=64, le=4096)
    default_height: int | None = Field(None, ge=64, le=4096)
    max_width: int = Field(1024, ge=64, le=4096)
    max_height: int = Field(1024, ge=64, le=4096)
    default_steps: int | None = Field(None, ge=1, le=500)
    max_steps: int = Field(60, ge=1, le=500)
    max_num_images: int = Field(4, ge=1, le=64)
    max_prompt_chars: int = Field(1000, ge=10, le=100_000)
    default_guidance_scale: float | None = Field(None, ge=0, le=30)
    default_scheduler: Literal[SCHEDULER_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="See the README's scheduler list."
    )
    lora_dir: Path | None = Field(
        None, description="Folder of LoRA .safetensors files requests may name; empty: none."
    )
    max_loras: int = Field(4, ge=1, le=16, description="Most LoRAs in one request.")
    style_loras: dict[str, StyleLora] = Field(
        default_factory=dict,
        description='JSON {cue: {"lora": name, "weight": w}}: a cue in the prompt turns on a LoRA.',
    )
    style_model_set: Literal[tuple(STYLE_MODEL_SETS)] = Field(  # type: ignore[valid-type]
        "sd15",
        description="The preset models automatic choice uses: sd15, sdxl, sdxl-lightning, flux.",
    )
    style_cues: dict[str, dict[str, float]] = Field(
        default_factory=default_style_cues,
        description="JSON {style: {cue: weight}} for automatic model choice.",
    )
    style_models: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_STYLE_MODELS),
        description="JSON {style: model name}; empty: the models of S2I_STYLE_MODEL_SET.",
    )
    style_default: str = Field(DEFAULT_STYLE, description="Style when no cue decides.")
    image_retention_days: float = Field(30.0, ge=0, description="0 keeps images forever.")
    image_max_count: int = Field(0, ge=0, description="Keep at most this many images; 0: no cap.")
    image_max_bytes: ByteSize = Field(
        ByteSize(10 * 1024**3),
        description="Keep at most this many bytes of images (oldest go first); 0: no cap.",
    )
    cleanup_interval_seconds: float = Field(
        3600.0, ge=0, description="Run cleanup this often; 0: only on POST /cleanup."
    )

    # --- jobs, batching and admission ---------------------------------------------------
    job_workers: int = Field(2, ge=1, le=64, description="Threads running jobs.")
    batch_max_images: int = Field(4, ge=1, le=64, description="Most images in one pipeline call.")
    batch_max_wait_ms: float = Field(
        50.0, ge=0, le=10_000, description="How long a batch waits for compatible requests."
    )
    schedule_fairness_seconds: float = Field(
        10.0, ge=0, description="A job waiting this long runs next, resident model or not."
    )
    queue_max: int = Field(64, ge=1, description="Jobs waiting at most (503 beyond).")
    queue_max_per_owner: int = Field(16, ge=1, description="Jobs per client (429 beyond).")
    job_keep_seconds: float = Field(3600.0, ge=1, description="Keep finished jobs this long.")
    job_recover_on_start: bool = Field(
        True, description="At start-up, run again the jobs a crashed process left unfinished."
    )

    # --- distributed mode (Celery workers; empty broker: embedded) -----------------------
    broker_url: str = Field(
        "",
        description="Redis URL of the Celery broker; set it to run distributed (API + workers).",
    )
    queue_prefix: str = Field(
        "s2i",
        pattern=r"^[A-Za-z0-9_.-]{1,40}$",
        description="Prefix of queue names and Redis keys (several deployments share a Redis).",
    )
    worker_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated models a worker serves (whisper, image names); empty: all.",
    )
    worker_concurrency: int = Field(
        4, ge=1, le=64, description="Tasks a worker holds at once (batched together)."
    )
    broker_visibility_timeout: float = Field(
        3600.0, ge=1, description="Seconds before a dead worker's unacknowledged task is redone."
    )
    job_max_attempts: int = Field(
        3, ge=1, le=100, description="Deliveries of one job before it is failed as poison."
    )
    job_time_limit: float = Field(
        1800.0, ge=1, description="Seconds a distributed job may run before it is stopped."
    )
    job_lease_seconds: float = Field(
        15.0,
        ge=2,
        le=3600,
        description="A worker renews its jobs' leases every second; a job whose lease lapses "
        "this long (its worker died) is queued again.",
    )
    reconcile_interval_seconds: float = Field(
        5.0,
        ge=0.5,
        le=3600,
        description="How often rows and broker are reconciled (also at once after Redis "
        "restarts or loses its data).",
    )
    storage_retry_seconds: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="A job whose results cannot be stored (image store or database away) "
        "retries this long, then fails with storage_unavailable or database_unavailable.",
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="Every Redis call fails after this long (503 then)."
    )

    # --- identity and rate limits -------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; empty turns auth off (one local identity).",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys that may also use /status and POST /cleanup.",
    )
    ratelimit_enabled: bool = True
    auth_required: bool = Field(
        False,
        description="Require a key even when S2I_API_KEYS is empty (keys made with "
        "`speech2image keys create` or POST /admin/keys).",
    )
    moderation_prompts: bool = Field(
        True, description="Refuse prompts with the policy's words (400 moderation_blocked)."
    )
    moderation_terms: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated words or phrases the operator adds to the word list.",
    )
    moderation_images: bool = Field(
        True, description="Withhold images the safety checker flags (where its weights are)."
    )
    moderation_safety_checker: Path | None = Field(
        None,
        description="Folder with safety_checker/ and feature_extractor/ (an SD 1.x "
        "checkpoint's); empty: images are not checked.",
    )
    moderation_image_adjustment: float = Field(
        0.0, ge=-2.0, le=4.0, description="Added to the checker's scores: higher is stricter."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow callback URLs on private, loopback and link-local addresses."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Signs webhooks of keys without their own secret (S2I_API_KEYS, none)."
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60, description="Per delivery attempt.")
    webhook_max_attempts: int = Field(8, ge=1, le=50, description="Attempts before giving up.")
    webhook_retry_seconds: float = Field(
        2.0, gt=0, le=3600, description="First back-off of a failed delivery (doubles, to 1 h)."
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often due webhook deliveries are looked for."
    )
    quota_default: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Caps of every key without its own, as METRIC:PERIOD=CAP pairs, e.g. "
        "images:day=100,pixel_steps:month=5e9,audio_seconds:day=3600; empty: none.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins a browser may call from (or *); empty: no CORS.",
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Also serve /metrics, without auth, on this port; 0: off."
    )
    ratelimit_storage_uri: str = Field("memory://", description="memory:// or redis://host:port")
    ratelimit_default: str = Field("300/minute", description="Limit on every endpoint.")
    ratelimit_transcribe: str = Field("30/minute", description="Limit on POST /transcribe-audio.")
    ratelimit_generate: str = Field("10/minute", description="Limit on POST /generate-image.")
    ratelimit_auth_failures: str = Field(
        "20/minute", description="Failed authentications per address before 429."
    )
    trusted_proxies: int = Field(
        0,
        ge=0,
        le=10,
        description="Reverse proxies in front that set X-Forwarded-For/-Proto; 0: trust none.",
    )

    @field_validator("quota_default", mode="before")
    @classmethod
    def _parse_quotas(cls, value: Any) -> Any:
        if isinstance(value, str):
            from .accounts.quotas import parse_quotas

            return parse_quotas(value)
        return value

    @field_validator(
        "preload_models",
        "api_keys",
        "admin_api_keys",
        "worker_models",
        "cors_origins",
        "moderation_terms",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "ratelimit_default", "ratelimit_transcribe", "ratelimit_generate", "ratelimit_auth_failures"
    )
    @classmethod
    def _check_limit(cls, value: str) -> str:
        from limits import parse_many  # light: pure Python

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '10/minute': {value!r}") from exc
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"an origin looks like https://app.example.com, not {origin!r}")
        return [origin.rstrip("/") for origin in value]

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "redis+unix://")):
            raise ValueError("must be empty (embedded mode) or a redis:// URL")
        return value

    @field_validator("ratelimit_storage_uri")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if not value.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
            raise ValueError("must start with memory:// or redis://")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.max_upload_bytes < 1024:
            raise ValueError("S2I_MAX_UPLOAD_BYTES must be at least 1 KiB")
        for field in ("default_width", "default_height", "max_width", "max_height"):
            if (getattr(self, field) or 0) % 8:
                raise ValueError(f"{env_name(field)} must be a multiple of 8")
        if (self.default_width or 0) > self.max_width or (
            self.default_height or 0
        ) > self.max_height:
            raise ValueError("S2I_DEFAULT_WIDTH/HEIGHT must not exceed S2I_MAX_WIDTH/HEIGHT")
        if (self.default_steps or 0) > self.max_steps:
            raise ValueError("S2I_DEFAULT_STEPS must not exceed S2I_MAX_STEPS")
        if "style_models" not in self.model_fields_set:
            self.style_models = dict(STYLE_MODEL_SETS[self.style_model_set])
        if self.image_store == "s3" and not self.s3_bucket:
            raise ValueError("S2I_S3_BUCKET is required when S2I_IMAGE_STORE is s3")
        if self.health_port is not None and self.health_port == self.port:
            raise ValueError("S2I_HEALTH_PORT must differ from PORT")
        models = self.image_model_specs()
        for style, model in self.style_models.items():
            if model not in models:
                raise ValueError(f"S2I_STYLE_MODELS maps {style!r} to unknown model {model!r}")
        if self.style_default not in self.style_models:
            raise ValueError(f"S2I_STYLE_DEFAULT {self.style_default!r} is not in S2I_STYLE_MODELS")
        if self.style_loras and self.lora_dir is None:
            raise ValueError("S2I_STYLE_LORAS names LoRAs, so it needs S2I_LORA_DIR")
        for cue in self.style_loras:
            if not any(char.isalnum() for char in cue):
                raise ValueError(f"S2I_STYLE_LORAS: cue {cue!r} has no letters or digits")
        for name, spec in models.items():
            problem = _spec_problem(spec)
            if problem:
                raise ValueError(f"S2I_IMAGE_MODELS: model {name!r}: {problem}")
        return self

    @property
    def distributed(self) -> bool:
        """True when jobs go to Celery workers through S2I_BROKER_URL."""
        return bool(self.broker_url)

    def image_model_specs(self) -> dict[str, ImageModelSpec]:
        """The presets overlaid with S2I_IMAGE_MODELS."""
        return IMAGE_MODEL_PRESETS | self.image_models

    def resolved_health_port(self) -> int:
        """S2I_HEALTH_PORT, PORT+1 when unset, 0 when there is no probe listener."""
        if self.health_port is None:
            return self.port + 1 if self.port < 65535 else 0
        return self.health_port

    def resolved_database_url(self) -> str:
        """S2I_DATABASE_URL, or SQLite in S2I_DATA_DIR (see ``speech2image.storage.layout``)."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'history.sqlite3').resolve()}"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, *args, **kw):  # type: ignore[no-untyped-def]
        # Only explicit arguments and the environment: no .env file, no secrets dir.
        return (init_settings, env_settings)


def _spec_problem(spec: ImageModelSpec) -> str | None:
    """Why a model's declared defaults do not suit its declared family, or None."""
    if spec.family is None:
        return None
    fit = profile(spec.family, bool(spec.few_step))
    if spec.scheduler is not None and spec.scheduler not in fit.schedulers:
        return (
            f"scheduler {spec.scheduler!r} does not apply to {fit.label} "
            f"(use one of {', '.join(fit.schedulers)})"
        )
    low, high = fit.guidance_range
    if spec.guidance_scale is not None and not low <= spec.guidance_scale <= high:
        return f"guidance_scale must be from {low:g} to {high:g} for {fit.label}"
    for side in ("width", "height"):
        value = getattr(spec, side)
        if value is not None and value % fit.family.size_multiple:
            return f"{side} must be a multiple of {fit.family.size_multiple} for {fit.label}"
    return None


def _is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(settings: Settings, host: str | None = None) -> str | None:
    """A warning when the server listens beyond this machine with auth off, else None."""
    host = settings.host if host is None else host
    if settings.api_keys or settings.admin_api_keys or _is_loopback(host):
        return None
    return (
        f"listening on {host!r}, reachable from other machines, with authentication off: "
        "anyone who can connect may generate images, read every image and run cleanup. "
        "Set S2I_API_KEYS (and S2I_ADMIN_API_KEYS), or bind HOST=127.0.0.1"
    )


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (plus ``overrides``); raise SettingsError on bad input."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = error.get("loc") or ()
            if not loc:  # a check across fields: its message names the variables
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            field = str(loc[0])
            name = env_name(field) if field in Settings.model_fields else field
            value = error.get("input")
            shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
            problems.append(f"{name}: {error['msg']}{shown}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
