"""Hostile uploads: every one is refused with a clear 4xx, nothing is fetched or left behind."""

from __future__ import annotations

import http.server
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from speech2image.audio import decode_audio
from speech2image.errors import AudioTooLong

from .audio_samples import ffconcat_script, flac_of_silence, hls_playlist, wav_bytes


@pytest.fixture(scope="module")
def long_silence_flac(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB on disk, 3 hours once decoded."""
    return flac_of_silence(tmp_path_factory.mktemp("flac") / "silence.flac", hours=3)


@pytest.fixture
def canary() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that records every request: nothing may ever reach it."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()
    server.server_close()


def multipart(payload: bytes, filename: str = "clip.wav") -> bytes:
    """A pre-encoded multipart body (the test client would spool large ones to a temp file)."""
    head = f'--B\r\nContent-Disposition: form-data; name="audio"; filename="{filename}"\r\n\r\n'
    return head.encode() + payload + b"\r\n--B--\r\n"


def upload(client, payload: bytes, filename: str = "clip.wav"):  # type: ignore[no-untyped-def]
    return client.post(
        "/transcribe-audio",
        data=multipart(payload, filename),
        content_type="multipart/form-data; boundary=B",
    )


def assert_error(response, status: int, code: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert error["status"] == status
    assert error["code"] == code
    assert needle in error["message"]
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.fixture
def app(make_app):  # type: ignore[no-untyped-def]
    return make_app(max_upload_bytes=256 * 1024, max_audio_seconds=60)


def uploads_left(app) -> list[Path]:  # type: ignore[no-untyped-def]
    folder = Path(app.config["S2I_SETTINGS"].upload_dir)
    return list(folder.iterdir()) if folder.exists() else []


def test_oversized_upload_is_413_and_not_stored(app) -> None:
    response = upload(app.test_client(), b"\0" * (400 * 1024))
    assert_error(response, 413, "payload_too_large", "")
    assert uploads_left(app) == []


@pytest.mark.parametrize("filename", ["playlist.m3u8", "clip.wav", "noext"])
def test_hls_playlist_is_refused_without_fetching(app, canary, filename) -> None:
    url, hits = canary
    response = upload(app.test_client(), hls_playlist(f"{url}/segment.wav"), filename)
    assert_error(response, 415, "unsupported_audio", "not a supported audio file")
    assert hits == []
    assert uploads_left(app) == []


@pytest.mark.parametrize("target", ["http", "file"])
def test_concat_script_is_refused_without_opening_targets(app, canary, speech, target) -> None:
    url, hits = canary
    listed = f"{url}/a.wav" if target == "http" else str(speech["english"])
    response = upload(app.test_client(), ffconcat_script(listed), "list.ffconcat")
    assert response.status_code == 415
    assert response.json["error"]["code"] == "unsupported_audio"
    assert hits == []


def test_flac_bomb_gets_422_through_the_api(make_app, long_silence_flac) -> None:
    app = make_app(max_audio_seconds=600)
    response = upload(app.test_client(), long_silence_flac.read_bytes(), "bomb.flac")
    assert_error(response, 422, "audio_too_long", "longer than the limit of 600 seconds")
    assert uploads_left(app) == []


def test_duration_cap_is_enforced_while_decoding(long_silence_flac) -> None:
    """Decoding stops at the cap: memory stays tiny instead of 3 h x 16 kHz x 4 B = 690 MB."""
    tracemalloc.start()
    try:
        with pytest.raises(AudioTooLong):
            decode_audio(long_silence_flac, max_seconds=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024


@pytest.mark.parametrize("declared", [1, 300, 1_000_000, 4_000_000_000])
def test_absurd_sample_rates_are_422(app, declared) -> None:
    payload = wav_bytes(np.zeros(16000, dtype=np.float32), 16000, header_rate=declared)
    response = upload(app.test_client(), payload)
    assert response.status_code in (415, 422), response.json
    if response.status_code == 422:
        assert response.json["error"]["code"] == "invalid_audio"
        assert "sample rate" in response.json["error"]["message"]
    assert uploads_left(app) == []


def test_low_declared_rate_is_422_sample_rate(app) -> None:
    payload = wav_bytes(np.zeros(16000, dtype=np.float32), 16000, header_rate=300)
    assert_error(upload(app.test_client(), payload), 422, "invalid_audio", "sample rate 300 Hz")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "empty"),
        (b"\x00\x01garbage\xff" * 500, "not a supported audio file"),
        (b"just some plain text, not audio at all\n" * 50, "not a supported audio file"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 2000, "not a supported audio file"),
    ],
    ids=["empty", "garbage", "text", "png-header"],
)
def test_non_audio_is_415_with_message(app, payload, needle) -> None:
    response = upload(app.test_client(), payload)
    assert_error(response, 415, "unsupported_audio", needle)
    assert uploads_left(app) == []


def test_truncated_wav_is_refused_cleanly(app, speech) -> None:
    data = speech["english"].read_bytes()[:60]  # header and a few samples only
    response = upload(app.test_client(), data)
    assert response.status_code in (415, 422)
    assert uploads_left(app) == []


def test_no_upload_left_after_success_or_failure(app, speech) -> None:
    client = app.test_client()
    assert upload(client, speech["english"].read_bytes()).status_code == 200
    assert upload(client, b"nonsense").status_code == 415
    assert uploads_left(app) == []


def test_client_filename_is_never_used_on_disk(app, speech, monkeypatch) -> None:
    seen: list[Path] = []
    service = app.extensions["speech"]
    original = service.transcribe_file

    def spy(path, options, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(Path(path))
        return original(path, options, **kwargs)

    monkeypatch.setattr(service, "transcribe_file", spy)
    response = upload(app.test_client(), speech["english"].read_bytes(), "../../evil.m3u8")
    assert response.status_code == 200
    (path,) = seen
    assert path.parent == Path(app.config["S2I_SETTINGS"].upload_dir)
    assert path.suffix == ""
    assert "evil" not in path.name


def test_format_changing_mid_stream_is_a_clean_422(app) -> None:
    """Two MP3s glued together: 44.1 kHz mono, then 22.05 kHz stereo (was a 500)."""
    from .audio_samples import mp3_bytes

    payload = mp3_bytes(1.0, 44_100, "mono") + mp3_bytes(1.0, 22_050, "stereo")
    response = upload(app.test_client(), payload, "glued.mp3")
    assert_error(response, 422, "invalid_audio", "could not be decoded")
    assert uploads_left(app) == []
