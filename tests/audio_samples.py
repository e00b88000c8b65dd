"""Builders of hostile and edge-case audio files for the tests."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np


def wav_bytes(samples: np.ndarray, rate: int, *, header_rate: int | None = None) -> bytes:
    """A 16-bit mono PCM WAV; ``header_rate`` lets the header lie about the sample rate."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    declared = header_rate if header_rate is not None else rate
    fmt = struct.pack("<HHIIHH", 1, 1, declared, min(declared * 2, 2**32 - 1), 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def silence_wav(path: Path, seconds: float, rate: int = 16_000) -> Path:
    """Digital silence."""
    path.write_bytes(wav_bytes(np.zeros(int(seconds * rate), dtype=np.float32), rate))
    return path


def flac_of_silence(path: Path, hours: float, rate: int = 8000) -> Path:
    """A tiny FLAC (about 2 MB for 3 hours) that decodes to hours of samples."""
    frame_samples = 4608 * 8
    zeros = np.zeros((1, frame_samples), dtype=np.int16)
    with av.open(str(path), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        total = int(hours * 3600 * rate)
        for pts in range(0, total, frame_samples):
            frame = av.AudioFrame.from_ndarray(zeros, format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = pts
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def hls_playlist(url: str) -> bytes:
    """An HLS playlist whose one segment is ``url``."""
    return (
        f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{url}\n"
        "#EXT-X-ENDLIST\n"
    ).encode()


def ffconcat_script(url: str) -> bytes:
    """An FFmpeg concat script that lists ``url``."""
    return f"ffconcat version 1.0\nfile '{url}'\n".encode()


def multipart_body(
    fields: dict[str, str], files: dict[str, tuple[str, bytes]]
) -> tuple[bytes, str]:
    """A pre-encoded multipart/form-data body and its content type.

    Flask's test client spools large multipart bodies into temporary files it never closes;
    tests that upload more than a few hundred KB send pre-encoded bytes instead.
    """
    boundary = "s2i-test-boundary"
    parts = []
    for name, value in fields.items():
        disposition = f'Content-Disposition: form-data; name="{name}"'
        parts.append(f"--{boundary}\r\n{disposition}\r\n\r\n{value}\r\n".encode())
    for name, (filename, data) in files.items():
        disposition = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'
        parts.append(f"--{boundary}\r\n{disposition}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def mp3_bytes(seconds: float, rate: int, layout: str) -> bytes:
    """An MP3 of a quiet tone (PyAV's bundled LAME encoder)."""
    import io

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout=layout)
        resampler = av.AudioResampler(
            format=stream.codec_context.format.name, layout=layout, rate=rate
        )
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
        frame.sample_rate = rate
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()
