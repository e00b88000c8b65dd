"""Audio in -> safe decode -> transcript (segments, language, timings). Knows no HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .audio import decode_audio
from .config import Settings
from .engines.whisper import Transcript, WhisperFactory, transcribe
from .errors import InvalidRequest
from .model_loader import ModelLoader
from .storage.space import storage_error

__all__ = [
    "SpeechService",
    "TranscribeOptions",
    "TranscriptionResult",
    "discard_upload",
    "get_speech_service",
]

log = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")
# Whisper reads at most 224 prompt tokens; 1000 characters is comfortably past that.
MAX_PROMPT_CHARS = 1000
WHISPER_LANGUAGES_HINT = "an ISO 639-1 code such as en, de, es"
# Whisper's language codes (faster_whisper.tokenizer._LANGUAGE_CODES), copied so that an API
# process validates `language` without importing faster-whisper and CTranslate2.
WHISPER_LANGUAGES = frozenset(
    {
        "af",
        "am",
        "ar",
        "as",
        "az",
        "ba",
        "be",
        "bg",
        "bn",
        "bo",
        "br",
        "bs",
        "ca",
        "cs",
        "cy",
        "da",
        "de",
        "el",
        "en",
        "es",
        "et",
        "eu",
        "fa",
        "fi",
        "fo",
        "fr",
        "gl",
        "gu",
        "ha",
        "haw",
        "he",
        "hi",
        "hr",
        "ht",
        "hu",
        "hy",
        "id",
        "is",
        "it",
        "ja",
        "jw",
        "ka",
        "kk",
        "km",
        "kn",
        "ko",
        "la",
        "lb",
        "ln",
        "lo",
        "lt",
        "lv",
        "mg",
        "mi",
        "mk",
        "ml",
        "mn",
        "mr",
        "ms",
        "mt",
        "my",
        "ne",
        "nl",
        "nn",
        "no",
        "oc",
        "pa",
        "pl",
        "ps",
        "pt",
        "ro",
        "ru",
        "sa",
        "sd",
        "si",
        "sk",
        "sl",
        "sn",
        "so",
        "sq",
        "sr",
        "su",
        "sv",
        "sw",
        "ta",
        "te",
        "tg",
        "th",
        "tk",
        "tl",
        "tr",
        "tt",
        "uk",
        "ur",
        "uz",
        "vi",
        "yi",
        "yo",
        "zh",
        "yue",
    }
)


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    """Validated options of one transcription."""

    language: str | None = None
    task: str = "transcribe"
    word_timestamps: bool = False
    prompt: str | None = None  # Whisper's initial prompt: spellings of names and jargon
    temperature: float | None = None  # None: the fallback ladder


@dataclasses.dataclass(frozen=True)
class TranscriptionResult:
    """A transcript plus where the time went; ``translation`` is Whisper's English, if asked."""

    transcript: Transcript
    model: str
    timings: dict[str, float]
    translation: Transcript | None = None


class SpeechService:
    """Transcribes uploads with the configured Whisper model through the model loader."""

    def __init__(self, settings: Settings, loader: ModelLoader) -> None:
        self.settings = settings
        self.loader = loader
        self.model_name = f"whisper:{settings.whisper_model}"
        self.upload_dir = Path(settings.upload_dir)
        self._active = 0
        self._lock = threading.Lock()
        loader.register(
            self.model_name,
            WhisperFactory(
                settings.whisper_model,
                cache_dir=Path(settings.model_cache_dir),
                device=settings.whisper_device,
                compute_type=settings.whisper_compute_type,
                cpu_threads=settings.whisper_cpu_threads,
                allow_download=settings.whisper_allow_download,
            ),
        )

    def init_app(self, app: Any) -> None:
        """Store the service on a Flask app as ``app.extensions['speech']``."""
        app.extensions["speech"] = self

    @property
    def active(self) -> int:
        """Transcriptions running now."""
        return self._active

    def validate_options(
        self,
        language: str | None,
        task: str | None,
        words: Any,
        prompt: str | None = None,
        temperature: Any = None,
    ) -> TranscribeOptions:
        """Check the request's options before any decoding or model work."""
        task = (task or "transcribe").strip().lower()
        if task not in TASKS:
            raise InvalidRequest(
                f"`task` must be one of {', '.join(TASKS)}, not {task!r}", details={"field": "task"}
            )
        lang = (language or "").strip().lower() or None
        if lang is not None and (not lang.isalpha() or not 2 <= len(lang) <= 3):
            raise InvalidRequest(
                f"`language` must be {WHISPER_LANGUAGES_HINT}, not {language!r}",
                details={"field": "language"},
            )
        if lang is not None and lang not in WHISPER_LANGUAGES:
            raise InvalidRequest(
                f"`language` {lang!r} is not a language Whisper knows",
                details={"field": "language"},
            )
        return TranscribeOptions(
            lang,
            task,
            _parse_bool("word_timestamps", words),
            self._check_prompt(prompt),
            _parse_temperature(temperature),
        )

    def _check_prompt(self, prompt: str | None) -> str | None:
        text = (prompt or "").strip()
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"`prompt` has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}",
                details={"field": "prompt"},
            )
        return text or None

    def store_upload(self, stream: BinaryIO) -> Path:
        """Write an upload under a server-made name (never the client's name or extension).

        The caller owns the file: the job that uses it removes it when it ends.
        """
        path = self.upload_dir / f"upload-{uuid.uuid4().hex}"
        try:
            self.upload_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as out:
                while chunk := stream.read(1 << 16):
                    out.write(chunk)
        except BaseException as exc:
            discard_upload(path)
            refusal = storage_error(exc, "the upload")  # a full or read-only S2I_UPLOAD_DIR
            if refusal is not None:
                raise refusal from None
            raise
        return path

    def check_upload(self, path: Path) -> None:
        """Decode a stored upload with every limit, only to refuse hostile audio early."""
        decode_audio(path, self.settings.max_audio_seconds)

    def transcribe_file(
        self,
        path: Path,
        options: TranscribeOptions,
        on_progress: Callable[[int, int], None] | None = None,
        *,
        english: bool = False,
        on_english_progress: Callable[[int, int], None] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> TranscriptionResult:
        """Decode ``path`` safely, then transcribe it with the leased Whisper model.

        ``on_progress(seconds_done, seconds_total)`` follows the decoded segments. With
        ``english``, speech in another language is also translated to English by a second pass
        over the same decoded audio (``on_english_progress`` follows it); English speech costs
        nothing more, since the first pass already detected its language.
        """
        with self._lock:
            self._active += 1
        try:
            started = time.perf_counter()
            audio = decode_audio(path, self.settings.max_audio_seconds)
            decoded = time.perf_counter()
            with self.loader.lease(self.model_name) as lease:
                model = lease.model
                if not model.model.is_multilingual:
                    _check_english_only(self.settings.whisper_model, options)
                inference_start = time.perf_counter()
                transcript = transcribe(
                    model,
                    audio.samples,
                    language=options.language,
                    task=options.task,
                    word_timestamps=options.word_timestamps,
                    beam_size=self.settings.whisper_beam_size,
                    vad=self.settings.whisper_vad,
                    initial_prompt=options.prompt,
                    temperature=options.temperature,
                    on_segment=_follow(on_progress, audio.duration),
                    on_text=on_text,
                    batch_size=self._batch_size(audio.duration),
                )
                inference_done = time.perf_counter()
                translation = None
                if (
                    english
                    and options.task == "transcribe"
                    and transcript.text
                    and transcript.language != "en"
                    and model.model.is_multilingual
                ):
                    translation = transcribe(
                        model,
                        audio.samples,
                        language=transcript.language,
                        task="translate",
                        word_timestamps=False,
                        beam_size=self.settings.whisper_beam_size,
                        vad=self.settings.whisper_vad,
                        on_segment=_follow(on_english_progress, audio.duration),
                        batch_size=self._batch_size(audio.duration),
                    )
            done = time.perf_counter()
            self.loader.observer.transcribed(
                self.model_name, audio.duration, inference_done - inference_start
            )
            timings = {
                "decode": decoded - started,
                "wait": lease.wait_seconds,
                "load": lease.load_seconds,
                "inference": inference_done - inference_start,
                "total": done - started,
            }
            if translation is not None:
                timings["translation"] = done - inference_done
            log.info(
                "transcribed %.1fs of %s audio in %.2fs (language %s)",
                audio.duration,
                audio.container,
                timings["total"],
                transcript.language,
            )
            return TranscriptionResult(
                transcript,
                self.model_name,
                {k: round(v, 4) for k, v in timings.items()},
                translation,
            )
        finally:
            with self._lock:
                self._active -= 1

    def _batch_size(self, duration: float) -> int:
        """Batch size for audio of ``duration`` seconds: 0 (sequential) up to the threshold."""
        threshold = self.settings.whisper_batch_seconds
        return self.settings.whisper_batch_size if 0 < threshold < duration else 0

    def result_json(self, result: TranscriptionResult, response_format: str = "json") -> dict:
        """The JSON answer of a transcription (``json`` or ``verbose_json``)."""
        transcript = result.transcript
        body: dict[str, Any] = {
            "text": transcript.text,
            "language": transcript.language,
            "language_probability": transcript.language_probability,
            "duration": transcript.duration,
            "task": transcript.task,
            "model": result.model,
            "processing_time": result.timings["total"],
            "timings": result.timings,
        }
        if response_format == "verbose_json":
            body["duration_after_vad"] = transcript.duration_after_vad
            body["batch_size"] = transcript.batch_size
            body["segments"] = [dataclasses.asdict(s) for s in transcript.segments]
            words = [w for s in transcript.segments for w in (s.words or [])]
            body["words"] = [dataclasses.asdict(w) for w in words] if words else None
        return body


def _follow(
    on_progress: Callable[[int, int], None] | None, duration: float
) -> Callable[[float], None] | None:
    """A segment callback that reports whole seconds done out of the audio's duration."""
    if on_progress is None:
        return None
    total = int(duration)
    return lambda end: on_progress(min(int(end), total), total)


def discard_upload(path: Path) -> None:
    """Remove an upload (missing is fine)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _check_english_only(model: str, options: TranscribeOptions) -> None:
    if options.task == "translate":
        raise InvalidRequest(
            f"Whisper model {model!r} is English-only and cannot translate; "
            "configure a multilingual model such as base"
        )
    if options.language not in (None, "en"):
        raise InvalidRequest(f"Whisper model {model!r} is English-only; `language` must be en")


def _parse_bool(field: str, value: Any) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"`{field}` must be true or false, not {value!r}")


def _parse_temperature(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0 <= number <= 1:  # also refuses NaN
        raise InvalidRequest(
            f"`temperature` must be a number from 0 to 1, not {value!r}",
            details={"field": "temperature"},
        )
    return number


def get_speech_service(app: Any) -> SpeechService:
    """The app's speech service."""
    return app.extensions["speech"]
