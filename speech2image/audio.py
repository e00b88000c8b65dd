"""Hardened audio decoding with PyAV: a demuxer allow-list and limits enforced while decoding.

Uploads are hostile. FFmpeg will happily follow an HLS playlist or a concat script to other
files and URLs, and a 2 MB FLAC of silence decodes to hours of samples. So:

- only demuxers on an allow-list may open the file (FFmpeg's own ``format_whitelist``), and
  only the ``file`` protocol (``protocol_whitelist``), so a playlist can never fetch anything;
- the stream's declared sample rate must be plausible;
- samples are counted while decoding and decoding stops as soon as the cap is passed;
- every failure becomes an :class:`AudioError` with an HTTP status (415 or 422).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Final

import numpy as np

from .errors import AudioTooLong, InvalidAudio, UnsupportedAudio

__all__ = [
    "ALLOWED_DEMUXERS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "TARGET_SAMPLE_RATE",
    "DecodedAudio",
    "decode_audio",
]

TARGET_SAMPLE_RATE: Final = 16_000
MIN_SAMPLE_RATE: Final = 4_000
MAX_SAMPLE_RATE: Final = 384_000
# Demuxer names as FFmpeg knows them. Deliberately absent: hls, concat, image2, lavfi, and
# every other demuxer that reads lists of files or URLs.
ALLOWED_DEMUXERS: Final = (
    "wav",
    "w64",
    "flac",
    "ogg",
    "mp3",
    "aac",
    "aiff",
    "caf",
    "mov",
    "mp4",
    "m4a",
    "3gp",
    "matroska",
    "webm",
)
_OPEN_OPTIONS: Final = {
    "format_whitelist": ",".join(ALLOWED_DEMUXERS),
    "protocol_whitelist": "file",
    "probesize": str(5 * 1024 * 1024),
}


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    """Mono float32 samples at 16 kHz, ready for Whisper."""

    samples: np.ndarray
    sample_rate: int
    container: str
    codec: str
    source_sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


def decode_audio(path: str | os.PathLike[str], max_seconds: float) -> DecodedAudio:
    """Decode ``path`` to 16 kHz mono float32, refusing unsafe or oversized input."""
    import av  # PyAV is light, but keep `import speech2image` free of FFmpeg too.

    if os.path.getsize(path) == 0:
        raise UnsupportedAudio("the uploaded file is empty")
    try:
        container = av.open(os.fspath(path), mode="r", options=dict(_OPEN_OPTIONS))
    except av.error.PermissionError as exc:  # e.g. a concat script asking for unsafe paths
        raise UnsupportedAudio(
            "the file refers to other files; only plain audio is accepted"
        ) from exc
    except av.error.FFmpegError as exc:  # unknown format, or a demuxer not on the allow-list
        raise UnsupportedAudio(
            "not a supported audio file (accepted containers: WAV, FLAC, OGG/Opus, MP3, AAC, "
            "AIFF, CAF, MP4/M4A, WebM/Matroska)"
        ) from exc

    with container:
        if not container.streams.audio:
            raise UnsupportedAudio("the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate or 0
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise InvalidAudio(
                f"sample rate {rate} Hz is outside the accepted range "
                f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
            )
        samples = _decode_stream(av, container, stream, max_seconds)
        return DecodedAudio(
            samples=samples,
            sample_rate=TARGET_SAMPLE_RATE,
            container=container.format.name,
            codec=stream.codec_context.name,
            source_sample_rate=rate,
            channels=stream.codec_context.channels,
        )


def _decode_stream(av, container, stream, max_seconds: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Decode and resample, counting source samples; stop as soon as the cap is passed.

    A stream may change its sample rate or channel layout mid-way (concatenated MP3s do):
    each change gets a resampler of its own.
    """
    chunks: list[np.ndarray] = []
    decoded_seconds = 0.0
    resampler = None
    shape: tuple[str, str, int] | None = None

    def drain(active) -> None:  # type: ignore[no-untyped-def]
        for out in active.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))

    try:
        for frame in container.decode(stream):
            frame_rate = frame.sample_rate
            if not MIN_SAMPLE_RATE <= frame_rate <= MAX_SAMPLE_RATE:
                raise InvalidAudio(
                    f"sample rate {frame_rate} Hz changes mid-stream to an absurd value"
                )
            decoded_seconds += frame.samples / frame_rate
            if decoded_seconds > max_seconds:
                raise AudioTooLong(
                    f"audio is longer than the limit of {max_seconds:g} seconds "
                    "(stopped decoding at the limit)"
                )
            frame_shape = (frame.format.name, frame.layout.name, frame_rate)
            if frame_shape != shape:
                if resampler is not None:
                    drain(resampler)
                resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_SAMPLE_RATE)
                shape = frame_shape
            frame.pts = None  # the resampler wants monotonic pts; we only need the samples
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        if resampler is not None:
            drain(resampler)
    except (av.error.FFmpegError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidAudio(
            f"the audio stream is corrupt and could not be decoded: {reason}"
        ) from exc
    if not chunks:
        raise InvalidAudio("the audio stream contains no samples")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
