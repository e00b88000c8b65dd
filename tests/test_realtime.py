"""GET /v1/realtime: a WebSocket transcription session, through gunicorn (embedded mode)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simple_websocket

from speech2image.audio import decode_audio

from .test_openai import words
from .test_server import Server

KEY = "realtime-test-key-0123456789"


def pcm24k(path: Path, silence_seconds: float = 1.0) -> bytes:
    """A recording as OpenAI's realtime audio: PCM16 mono at 24 kHz, then some silence."""
    samples = decode_audio(path, 600).samples
    count = int(len(samples) * 1.5)
    upsampled = np.interp(np.arange(count) / 1.5, np.arange(len(samples)), samples)
    upsampled = np.concatenate([upsampled, np.zeros(int(24_000 * silence_seconds))])
    return (np.clip(upsampled, -1, 1) * 32767).astype("<i2").tobytes()


class Client(simple_websocket.Client):
    """simple-websocket's client, keeping frames that arrive with the handshake's answer.

    Its handshake stops at the answer and leaves a frame read in the same ``recv`` (our
    ``transcription_session.created``, sent at once) in wsproto's buffer, where its reader
    thread sees it only when more data comes: the first event could wait forever."""

    def _thread(self) -> None:
        self.connected = self._handle_events()
        super()._thread()


def connect(server: Server, key: str | None = KEY) -> Any:
    protocols = ["realtime"] + ([f"openai-insecure-api-key.{key}"] if key else [])
    return Client.connect(
        f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription", subprotocols=protocols
    )


def close(ws: Any) -> None:
    """Close a client, and its socket even when the server closed first (simple-websocket
    leaves it open then)."""
    with contextlib.suppress(simple_websocket.ConnectionClosed):
        ws.close()
    with contextlib.suppress(OSError):
        ws.sock.close()


def handshake_status(server: Server, key: str | None = KEY) -> int:
    """The status a WebSocket handshake gets (a refusal is plain HTTP, before the upgrade)."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "realtime" + (f", openai-insecure-api-key.{key}" if key else ""),
    }
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/v1/realtime?intent=transcription", headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def receive(ws: Any, until: str, seconds: float = 90) -> list[dict[str, Any]]:
    """Events until one of type ``until`` (included)."""
    events = []
    while True:
        message = ws.receive(timeout=seconds)
        assert message is not None, f"no {until} within {seconds} s: {events}"
        events.append(json.loads(message))
        if events[-1]["type"] == until:
            return events


@pytest.fixture
def realtime_server(tmp_path: Path, tiny_models: dict[str, Path], model_cache: Path) -> Any:
    server = Server(
        tmp_path,
        tiny_models["tiny-art"],
        S2I_MODEL_CACHE_DIR=str(model_cache),
        S2I_PRELOAD_MODELS="",
        S2I_API_KEYS=KEY,
        S2I_REALTIME_SESSIONS_PER_KEY="1",
        S2I_REALTIME_MAX_AUDIO_SECONDS="30",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_realtime_transcription_session(realtime_server: Server, speech) -> None:
    server = realtime_server
    ws = connect(server)
    try:
        created = json.loads(ws.receive(timeout=30))
        assert created["type"] == "transcription_session.created"
        ws.send(
            json.dumps(
                {
                    "type": "transcription_session.update",
                    "session": {
                        "input_audio_transcription": {"language": "en"},
                        "turn_detection": {"silence_duration_ms": 500},
                    },
                }
            )
        )
        assert (
            receive(ws, "transcription_session.updated")[-1]["session"]["turn_detection"][
                "silence_duration_ms"
            ]
            == 500
        )
        # One session per key here: a second one is refused before the upgrade.
        assert handshake_status(server) == 429
        # The recording arrives in 100 ms chunks, as a microphone would send it.
        audio = pcm24k(speech["english"])
        for start in range(0, len(audio), 4800):
            chunk = base64.b64encode(audio[start : start + 4800]).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        events = receive(ws, "conversation.item.input_audio_transcription.completed")
        types = [e["type"] for e in events]
        assert (
            types.index("input_audio_buffer.speech_started")
            < types.index("input_audio_buffer.speech_stopped")
            < types.index("input_audio_buffer.committed")
        )
        deltas = [e["delta"] for e in events if e["type"].endswith("transcription.delta")]
        transcript = events[-1]["transcript"]
        assert deltas and "".join(deltas) == transcript
        assert {"fox", "forest", "sunrise"} <= words(transcript)
        assert len({e["item_id"] for e in events if "item_id" in e}) == 1
        # Bad input: an error event, then a clean close.
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}))
        error = receive(ws, "error")[-1]
        assert error["error"]["code"] == "invalid_audio"
        with pytest.raises(simple_websocket.ConnectionClosed) as closed:
            ws.receive(timeout=10)
        assert closed.value.reason == 1007
    finally:
        close(ws)

    # No key: refused before the upgrade. A plain GET: 426.
    assert handshake_status(server, key=None) == 401
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/v1/realtime", headers={"Authorization": f"Bearer {KEY}"})
    try:
        response = connection.getresponse()
        assert response.status == 426 and json.loads(response.read())["error"]["code"] == (
            "upgrade_required"
        )
    finally:
        connection.close()
