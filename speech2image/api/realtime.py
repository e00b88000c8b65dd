"""GET /v1/realtime: a WebSocket session that transcribes speech while it is recorded.

The client sends audio as it records, in OpenAI's realtime shape
(``{"type": "input_audio_buffer.append", "audio": <base64 PCM16, mono, 24 kHz>}``); voice
activity detection cuts the stream into utterances, and each utterance becomes a transcribe
job (the same jobs, limits and history as an upload; in the distributed mode a worker runs it,
so this process never loads a model). The client receives OpenAI's transcription events:
``input_audio_buffer.speech_started`` / ``speech_stopped`` / ``committed``, then
``conversation.item.input_audio_transcription.delta`` per decoded segment and ``.completed``
with the utterance's transcript.

WebSockets come from ``simple-websocket`` (on wsproto): maintained, works inside a plain WSGI
view under gunicorn's threads and werkzeug alike (no eventlet/gevent), and is what
flask-sock is built on, without flask-sock's app-level route registry.

Limits: sessions at once (in all and per client), session length, audio per session, message
size. Bad input (not JSON, bad base64, odd byte counts, a message too large) is answered with
an ``error`` event and a clean close (1003/1007/1008/1009). Browsers cannot send headers: they
pass the API key as the subprotocol ``openai-insecure-api-key.<KEY>`` (OpenAI's convention).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import threading
import time
import uuid
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field
from werkzeug.exceptions import HTTPException

from ..errors import ServiceBusy, ServiceError, TooManyStreams
from ..jobs import Job, get_job_runner
from ..kinds import TranscribeWork
from ..speech_service import get_speech_service
from .identity import rate_limit_key
from .jobs import StreamSlots, submit
from .openai import OpenAIErrorBody
from .openapi import Content, endpoint

__all__ = ["EnergyVad", "RealtimeSlots", "bp"]

log = logging.getLogger(__name__)

bp = Blueprint("realtime", __name__)

INPUT_RATE = 24_000  # OpenAI's pcm16: 24 kHz mono little-endian
WHISPER_RATE = 16_000
MAX_MESSAGE_BYTES = 1024 * 1024  # one append: ~16 s of base64 PCM16 at 24 kHz
SUBPROTOCOLS = ["realtime"]


class UpgradeRequired(ServiceError):
    """A plain HTTP request to the WebSocket endpoint."""

    code = 426
    error = "upgrade_required"


class RealtimeSlots(StreamSlots):
    """Caps open realtime sessions in all and per client (each holds a server thread)."""

    def init_app(self, app: Any) -> None:
        """Store on the app as ``app.extensions['realtime_slots']``."""
        app.extensions["realtime_slots"] = self

    def acquire(self, client: str) -> None:
        """Take a session for ``client``; 429 past its own share, 503 when all are taken."""
        with self._lock:
            held = self._held.get(client, 0)
            if held >= self.per_client:
                raise TooManyStreams(
                    f"this client already has {held} realtime sessions open (the most one "
                    "client may hold); close one first",
                    retry_after=5,
                )
            if sum(self._held.values()) >= self.limit:
                raise ServiceBusy("too many realtime sessions are open", retry_after=5)
            self._held[client] = held + 1


class RealtimeQuery(BaseModel):
    """What the session is for (OpenAI's `intent`)."""

    model_config = ConfigDict(extra="forbid")

    intent: str = Field("transcription", pattern="^transcription$")


class EnergyVad:
    """Voice activity by frame energy: an utterance starts on speech and ends after
    ``silence_ms`` of quiet. Pure numpy, so an API process imports no model library; the
    worker's Whisper still trims silence inside each utterance with Silero VAD.
    """

    FRAME = 320  # 20 ms at 16 kHz
    START_FRAMES = 2  # 40 ms of speech starts an utterance
    PREROLL_FRAMES = 10  # 200 ms kept before the start
    MIN_LEVEL = 0.01  # RMS (-40 dBFS) below which nothing is speech

    def __init__(self, silence_ms: int) -> None:
        self.silence_frames = max(1, silence_ms // 20)
        self.noise = 0.0
        self.pending = np.zeros(0, dtype=np.float32)
        self.frames: list[np.ndarray] = []  # pre-roll, or the utterance so far
        self.speaking = False
        self.loud = 0
        self.quiet = 0
        self.position = 0  # frames seen

    def feed(self, samples: np.ndarray) -> Iterator[tuple[str, int, np.ndarray | None]]:
        """("start", ms, None) and ("stop", ms, utterance samples) as they happen."""
        self.pending = np.concatenate([self.pending, samples])
        while len(self.pending) >= self.FRAME:
            frame, self.pending = self.pending[: self.FRAME], self.pending[self.FRAME :]
            self.position += 1
            level = float(np.sqrt(np.mean(frame * frame)))
            speech = level > max(self.MIN_LEVEL, 3 * self.noise)
            if not speech:
                self.noise = 0.95 * self.noise + 0.05 * level
            self.frames.append(frame)
            if not self.speaking:
                self.loud = self.loud + 1 if speech else 0
                self.frames = self.frames[-self.PREROLL_FRAMES :]
                if self.loud >= self.START_FRAMES:
                    self.speaking, self.quiet = True, 0
                    yield "start", self._ms(len(self.frames)), None
                continue
            self.quiet = 0 if speech else self.quiet + 1
            if self.quiet >= self.silence_frames:
                yield "stop", self._ms(self.quiet), self.flush()

    def flush(self) -> np.ndarray:
        """End the utterance now; its samples."""
        audio = np.concatenate(self.frames) if self.frames else np.zeros(0, np.float32)
        self.frames, self.speaking, self.loud, self.quiet = [], False, 0, 0
        return audio

    def _ms(self, frames_back: int) -> int:
        return (self.position - frames_back) * 20


def _wav(samples: np.ndarray) -> bytes:
    """16 kHz mono samples as a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(WHISPER_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _to_whisper_rate(pcm: bytes) -> np.ndarray:
    """PCM16 at 24 kHz to float samples at 16 kHz (linear interpolation)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if not len(samples):
        return samples
    count = int(len(samples) * WHISPER_RATE / INPUT_RATE)
    return np.interp(
        np.arange(count) * (INPUT_RATE / WHISPER_RATE), np.arange(len(samples)), samples
    ).astype(np.float32)


class BadInput(Exception):
    """A message the session cannot take: answered with an error event, then a close."""

    def __init__(self, message: str, code: str, close: int) -> None:
        super().__init__(message)
        self.code = code
        self.close = close


class Session:
    """One realtime transcription session on an open WebSocket."""

    def __init__(self, ws: Any, settings: Any) -> None:
        self.ws = ws
        self.settings = settings
        self.vad = EnergyVad(settings.realtime_silence_ms)
        self.language: str | None = None
        self.prompt: str | None = None
        self.audio_seconds = 0.0
        self.items: list[str] = []
        self.followers: list[tuple[Job, threading.Thread]] = []
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        self.id = "sess_" + uuid.uuid4().hex[:20]

    def send(self, event: dict[str, Any]) -> None:
        """Send one event (from the session's thread or a transcription's)."""
        if self.closed.is_set():
            return
        with self._send_lock:
            try:
                self.ws.send(json.dumps({"event_id": "event_" + uuid.uuid4().hex[:20], **event}))
            except Exception:  # the client went away
                self.closed.set()

    def describe(self) -> dict[str, Any]:
        """The session as OpenAI's transcription_session object."""
        return {
            "id": self.id,
            "object": "realtime.transcription_session",
            "input_audio_format": "pcm16",
            "input_audio_transcription": {
                "model": "whisper-1",
                "language": self.language,
                "prompt": self.prompt,
            },
            "turn_detection": {
                "type": "server_vad",
                "silence_duration_ms": self.vad.silence_frames * 20,
            },
            "expires_at": int(time.time() + self.settings.realtime_max_seconds),
        }

    def run(self) -> None:
        """Receive until the client closes, the session expires, or input is bad."""
        self.send({"type": "transcription_session.created", "session": self.describe()})
        deadline = time.monotonic() + self.settings.realtime_max_seconds
        try:
            while not self.closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BadInput("the session reached its time limit", "session_expired", 1000)
                message = self.ws.receive(timeout=min(remaining, 1.0))
                if message is not None:
                    self.handle(message)
        except BadInput as exc:
            self.send(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": exc.code,
                        "message": str(exc),
                    },
                }
            )
            self.finish(wait=exc.close == 1000)
            self.closed.set()
            self.ws.close(exc.close, str(exc)[:120])
            return
        except Exception as exc:
            if type(exc).__name__ != "ConnectionClosed":
                raise
        self.closed.set()
        self.finish(wait=False)

    def finish(self, *, wait: bool) -> None:
        """Wait for (or stop) the transcriptions still running."""
        for job, thread in self.followers:
            if wait:
                thread.join(timeout=60)
            elif not job.done and job.abandon():
                get_job_runner(current_app).cancel(job.owner, job.id)

    def handle(self, message: str | bytes) -> None:
        """One client event."""
        if isinstance(message, bytes):
            raise BadInput("send JSON text messages, not binary ones", "invalid_message", 1003)
        try:
            event = json.loads(message)
        except ValueError:
            raise BadInput("a message is not JSON", "invalid_json", 1007) from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise BadInput("a message must be a JSON object with a `type`", "invalid_event", 1008)
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            self.append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            if self.vad.speaking:
                self.utterance(self.vad.flush())
        elif kind == "input_audio_buffer.clear":
            self.vad.flush()
            self.send({"type": "input_audio_buffer.cleared"})
        elif kind in ("transcription_session.update", "session.update"):
            self.update(event.get("session"))
        else:
            self.send(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "unknown_event",
                        "message": f"unknown event type {kind[:64]!r}",
                    },
                }
            )

    def update(self, session: Any) -> None:
        """Language, prompt and the silence that ends an utterance."""
        if not isinstance(session, dict):
            raise BadInput("`session` must be an object", "invalid_event", 1008)
        options = session.get("input_audio_transcription") or {}
        turn = session.get("turn_detection") or {}
        if not isinstance(options, dict) or not isinstance(turn, dict):
            raise BadInput("`session` fields must be objects", "invalid_event", 1008)
        try:
            checked = get_speech_service(current_app).validate_options(
                options.get("language") or None, "transcribe", False, options.get("prompt"), None
            )
        except HTTPException as exc:
            raise BadInput(exc.description or "invalid options", "invalid_value", 1008) from None
        self.language, self.prompt = checked.language, checked.prompt
        silence = turn.get("silence_duration_ms")
        if silence is not None:
            if not isinstance(silence, int) or not 100 <= silence <= 10_000:
                raise BadInput("`silence_duration_ms` must be 100 to 10000", "invalid_value", 1008)
            self.vad.silence_frames = silence // 20
        self.send({"type": "transcription_session.updated", "session": self.describe()})

    def append(self, audio: Any) -> None:
        """Audio in: decode, count against the limit, detect utterances."""
        if not isinstance(audio, str):
            raise BadInput("`audio` must be base64 PCM16 text", "invalid_audio", 1008)
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput("`audio` is not valid base64", "invalid_audio", 1007) from None
        if len(pcm) % 2:
            raise BadInput("PCM16 audio has an even number of bytes", "invalid_audio", 1007)
        self.audio_seconds += len(pcm) / 2 / INPUT_RATE
        if self.audio_seconds > self.settings.realtime_max_audio_seconds:
            raise BadInput(
                f"the session sent more than {self.settings.realtime_max_audio_seconds:g} s of "
                "audio",
                "audio_limit",
                1009,
            )
        for what, ms, samples in self.vad.feed(_to_whisper_rate(pcm)):
            if what == "start":
                self.items.append("item_" + uuid.uuid4().hex[:20])
                self.send(
                    {
                        "type": "input_audio_buffer.speech_started",
                        "audio_start_ms": ms,
                        "item_id": self.items[-1],
                    }
                )
            else:
                assert samples is not None
                self.send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "audio_end_ms": ms,
                        "item_id": self.items[-1],
                    }
                )
                self.utterance(samples)

    def utterance(self, samples: np.ndarray) -> None:
        """One utterance: committed, transcribed by a job, its transcript sent as it comes."""
        if not self.items:
            self.items.append("item_" + uuid.uuid4().hex[:20])
        item = self.items[-1]
        previous = self.items[-2] if len(self.items) > 1 else None
        self.send(
            {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": previous}
        )
        speech = get_speech_service(current_app)
        options = speech.validate_options(self.language, "transcribe", False, self.prompt, None)
        path = speech.store_upload(io.BytesIO(_wav(samples)))
        job = submit("transcribe", TranscribeWork(options), input=path)
        runner = get_job_runner(current_app)
        thread = threading.Thread(
            target=self._follow, args=(runner, job, item), name=f"realtime-{item}", daemon=True
        )
        self.followers.append((job, thread))
        thread.start()

    def _follow(self, runner: Any, job: Job, item: str) -> None:
        sent = ""
        with job.waiting():
            for snapshot in runner.watch(job, 15.0):
                if snapshot is None or (self.closed.is_set() and not job.done):
                    continue
                state = snapshot["state"]
                if state == "succeeded":
                    text = snapshot["result"]["text"]
                else:
                    text = ((snapshot.get("partial") or {}).get("text") or "").rstrip()
                if text.startswith(sent) and len(text) > len(sent):
                    self.send(
                        {
                            "type": "conversation.item.input_audio_transcription.delta",
                            "item_id": item,
                            "content_index": 0,
                            "delta": text[len(sent) :],
                        }
                    )
                    sent = text
                if state == "succeeded":
                    self.send(
                        {
                            "type": "conversation.item.input_audio_transcription.completed",
                            "item_id": item,
                            "content_index": 0,
                            "transcript": text,
                        }
                    )
                elif state in ("failed", "cancelled"):
                    error = snapshot.get("error") or {"message": "the transcription was cancelled"}
                    self.send(
                        {
                            "type": "conversation.item.input_audio_transcription.failed",
                            "item_id": item,
                            "content_index": 0,
                            "error": {
                                "type": "transcription_error",
                                "code": error.get("error"),
                                "message": error.get("message"),
                            },
                        }
                    )


@bp.get("/realtime")
@endpoint(
    query=RealtimeQuery,
    responses={
        101: Content({}, "Switching to the WebSocket protocol: a transcription session"),
        **{status: OpenAIErrorBody for status in (400, 401, 426, 429, 500, 503)},
    },
    tags=("openai",),
)
def realtime(query: RealtimeQuery) -> ResponseReturnValue:
    """A realtime transcription session (WebSocket): PCM16 audio in, transcripts out."""
    from simple_websocket import Server

    if "websocket" not in request.headers.get("Upgrade", "").lower():
        raise UpgradeRequired("connect with a WebSocket (Upgrade: websocket)")
    settings = current_app.config["S2I_SETTINGS"]
    slots: RealtimeSlots = current_app.extensions["realtime_slots"]
    holder = rate_limit_key()
    slots.acquire(holder)
    try:
        ws = Server(request.environ, subprotocols=SUBPROTOCOLS, max_message_size=MAX_MESSAGE_BYTES)
        Session(ws, settings).run()
        with contextlib.suppress(Exception):  # already closed
            ws.close()
    finally:
        slots.release(holder)
    return _closed_response(ws.mode)


def _closed_response(mode: str) -> Response:
    """What the view returns once the socket is done (the server must write nothing more)."""

    class WebSocketDone(Response):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if mode == "gunicorn":
                raise StopIteration()  # gunicorn: the connection is handled
            if mode == "werkzeug":
                return super().__call__(*args, **kwargs)
            return []

    return WebSocketDone()


# werkzeug routes WebSocket handshakes only to rules marked `websocket=True` (and plain
# requests only to others): the same view serves both, the plain one answering 426.
def _socket() -> ResponseReturnValue:
    return realtime()  # type: ignore[call-arg]  # @endpoint passes the query


_socket.__openapi__ = realtime.__openapi__  # type: ignore[attr-defined]  # the same operation
bp.add_url_rule("/realtime", endpoint="realtime_socket", view_func=_socket, websocket=True)
