"""Jobs over HTTP: submit-and-wait or 202 + Location, state, Server-Sent Events, cancel."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context, url_for
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, create_model
from werkzeug.exceptions import Conflict

from ..accounts import admit, deliveries_of, drop_callback, register_callback
from ..errors import (
    DATABASE_ERRORS,
    InvalidRequest,
    ResourceNotFound,
    ServiceBusy,
    ServiceError,
    TooManyStreams,
)
from ..jobs import Job, JobState, get_job_runner
from ..jobs.inputs import discard_file
from ..kinds import get_job_kinds
from .identity import client_owner, rate_limit_key
from .openapi import Content, endpoint
from .responses import JobPage, JobView

__all__ = ["StreamSlots", "bp", "idempotency_key", "new_job", "respond", "submit", "wants_async"]

bp = Blueprint("jobs", __name__)

JOB_ID = {"job_id": "The job's id, as the 202 answer gave it"}
MAX_JOBS_PAGE = 100
#: One Server-Sent Event: its name, and the job (JobView) as JSON text in `data`.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"enum": ["progress", "succeeded", "failed", "cancelled"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}
POLL_SECONDS = 0.25
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")  # visible ASCII, as Stripe and IETF's draft
KEEPALIVE_SECONDS = 15.0


class StreamSlots:
    """Caps open SSE streams in all and per client (API key, or address when auth is off).

    Each stream holds a thread while it is open, idle on its job's condition: the production
    server runs ``S2I_EVENT_STREAMS`` threads for them beside the ``S2I_THREADS`` request
    threads (see ``cli.gunicorn_options``), so streams never take the threads requests need.
    """

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def init_app(self, app: Any) -> None:
        """Store on the app as ``app.extensions['sse_slots']``."""
        app.extensions["sse_slots"] = self

    def acquire(self, client: str) -> None:
        """Take a slot for ``client``; 429 past its own share, 503 when all are taken."""
        with self._lock:
            held = self._held.get(client, 0)
            if held >= self.per_client:
                raise TooManyStreams(
                    f"this client already has {held} event streams open (the most one client "
                    "may hold); close one, or poll GET /jobs/<id> instead",
                    retry_after=5,
                )
            if sum(self._held.values()) >= self.limit:
                raise ServiceBusy(
                    "too many event streams are open; poll GET /jobs/<id> instead",
                    retry_after=5,
                )
            self._held[client] = held + 1

    def release(self, client: str) -> None:
        """Give ``client``'s slot back."""
        with self._lock:
            held = self._held.get(client, 0) - 1
            if held > 0:
                self._held[client] = held
            else:
                self._held.pop(client, None)


class JobCancelledConflict(ServiceError, Conflict):
    """The job this request waited for was cancelled."""

    error = "job_cancelled"


def wants_async(payload: dict[str, Any] | None = None) -> bool:
    """`"async": true` in the body, `async=true` in the form/query, or `Prefer: respond-async`."""
    if "respond-async" in request.headers.get("Prefer", "").lower():
        return True
    flag = (payload or {}).get("async", request.values.get("async"))
    return flag is True or str(flag).lower() in ("1", "true", "yes")


def idempotency_key() -> str | None:
    """The request's `Idempotency-Key` header: a client's retry with it makes no second job."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.match(key):
        raise InvalidRequest(
            "`Idempotency-Key` must be 1 to 128 visible ASCII characters",
            details={"field": "Idempotency-Key"},
        )
    return key


def new_job(kind: str, work: Any, *, input: Path | None = None) -> Job:
    """A job of ``kind`` for the caller, made by its kind from the validated ``work``."""
    return get_job_kinds(current_app).new(
        kind, client_owner(), work, input=input, idempotency_key=idempotency_key()
    )


def submit(kind: str, work: Any, *, input: Path | None = None) -> Job:
    """Make the caller's job and hand it to the runner, which removes the input when the
    job ends; if it is not accepted, the input is removed now."""
    delivery = None
    try:
        job = new_job(kind, work, input=input)
        admit(job)  # the key's models and quotas, before any model work
        delivery = register_callback(job)  # its webhook, written before the job is accepted
        return get_job_runner(current_app).submit(job)
    except BaseException:
        discard_file(input)
        with contextlib.suppress(Exception):
            drop_callback(delivery)
        raise


def _job_url(job: Job) -> str:
    return url_for("jobs.get_job", job_id=job.id)


def respond(job: Job) -> ResponseReturnValue:
    """202 with the job for async callers; otherwise wait and answer with the result."""
    if wants_async(request.get_json(silent=True) if request.is_json else None):
        body = job.snapshot() | {
            "url": _job_url(job),
            "events": url_for("jobs.job_events", job_id=job.id),
        }
        response = jsonify(body)
        response.status_code = 202
        response.headers["Location"] = _job_url(job)
        return response
    return jsonify(wait_for(job))


def wait_for(job: Job) -> dict[str, Any]:
    """Block until ``job`` ends; if the client goes away, cancel it unless others wait too."""
    with job.waiting():
        while not job.wait(POLL_SECONDS):
            if _client_gone():
                if job.abandon():
                    get_job_runner(current_app).cancel(job.owner, job.id)
                raise ClientGone()
    if job.state == JobState.SUCCEEDED:
        assert job.result is not None
        return job.result
    if job.state == JobState.CANCELLED:
        raise JobCancelledConflict("the job was cancelled before it finished")
    error = job.exception
    if isinstance(error, (ServiceError, *DATABASE_ERRORS)):  # answered 4xx/503 by handlers
        raise error
    raise RuntimeError(f"job {job.id} failed") from error


class ClientGone(ServiceError):
    """The client closed the connection while waiting (nginx's 499; nobody reads it)."""

    code = 499
    error = "client_closed_request"
    description = "the client closed the connection"


def _client_gone() -> bool:
    """True when the request's client is gone: its connection was reset or fully closed.

    Dev server and gunicorn. A FIN alone is ambiguous: the client closed the connection, or
    it only half-closed it (``shutdown(SHUT_WR)``) after sending its request and still waits
    for the answer. An HTTP/1.1 client is then asked once with an interim ``100 Continue``,
    which every HTTP/1.1 client must accept before the final answer: a closed socket answers
    it with a reset (gone at the next check), a half-closed one just reads it later. Unknown
    (no socket, TLS, HTTP/1.0, anything odd) counts as still connected: never cancel by doubt.
    """
    sock = request.environ.get("werkzeug.socket") or request.environ.get("gunicorn.socket")
    if type(sock) is not socket.socket:  # TLS sockets cannot peek
        return False
    peer_ended = getattr(select, "POLLRDHUP", 0)  # Linux: the peer sent its FIN
    asked = "speech2image.asked_if_gone"  # environ key: the 100 Continue was sent
    try:
        poller = select.poll()  # no FD_SETSIZE limit, unlike select.select
        poller.register(sock, select.POLLIN | peer_ended)
        events = poller.poll(0)
        if not events:
            return False
        flags = events[0][1]
        if flags & (select.POLLHUP | select.POLLERR):
            return True  # reset, or shut down both ways
        if peer_ended and not flags & peer_ended:
            return False  # bytes of a pipelined request, not an end
        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            return False
    except BlockingIOError:
        return False
    except (ConnectionError, OSError):
        return True
    except ValueError:
        return False
    if request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and not request.environ.get(asked):
        request.environ[asked] = True
        try:
            sock.send(b"HTTP/1.1 100 Continue\r\n\r\n", socket.MSG_DONTWAIT)
        except ConnectionError:
            return True
        except OSError:  # a full send buffer, or anything odd
            return False
    return False


def _owned(job_id: str) -> Job:
    job = get_job_runner(current_app).get(client_owner(), job_id)
    if job is None:
        raise ResourceNotFound("no such job")
    return job


def without_preview(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A snapshot without its preview frame (they go only to event streams that ask)."""
    partial = snapshot.get("partial")
    if partial and "preview" in partial:
        snapshot = snapshot | {"partial": {k: v for k, v in partial.items() if k != "preview"}}
    return snapshot


class EventsQuery(BaseModel):
    """Options of a job's event stream."""

    model_config = ConfigDict(extra="forbid")

    previews: bool = Field(
        False,
        description="Also send preview frames while an image denoises, as "
        "`partial.preview.b64_png` (a PNG) in `progress` events.",
    )


def _jobs_query(app: Any) -> type[BaseModel]:
    return create_model(
        "JobListQuery",
        __config__=ConfigDict(extra="forbid"),
        state=(
            JobState | None,
            Field(None, description="Only jobs in this state."),
        ),
        page=(Annotated[int, Field(ge=1, le=1_000_000)], Field(1, description="Page number.")),
        per_page=(
            Annotated[int, Field(ge=1, le=MAX_JOBS_PAGE)],
            Field(20, description="Jobs per page."),
        ),
    )


@bp.get("/jobs")
@endpoint(query=_jobs_query, responses={200: JobPage}, tags=("jobs",))
def list_jobs(query: Any) -> ResponseReturnValue:
    """The caller's jobs, newest first; `state` filters (queued, running, succeeded ...)."""
    jobs, total = get_job_runner(current_app).list_jobs(
        client_owner(),
        states=(query.state,) if query.state else (),
        limit=query.per_page,
        offset=(query.page - 1) * query.per_page,
    )
    return jsonify(
        jobs=[job.snapshot() | {"url": _job_url(job)} for job in jobs],
        page=query.page,
        per_page=query.per_page,
        total=total,
        pages=(total + query.per_page - 1) // query.per_page,
    )


@bp.get("/jobs/<job_id>")
@endpoint(responses={200: JobView}, errors=(404,), tags=("jobs",), path=JOB_ID)
def get_job(job_id: str) -> ResponseReturnValue:
    """State, progress (step, total, ETA) and, once done, the result or the error."""
    document = without_preview(_owned(job_id).snapshot())
    webhooks = deliveries_of(job_id)
    if webhooks:
        document["webhooks"] = webhooks
    return jsonify(document)


@bp.delete("/jobs/<job_id>")
@endpoint(
    responses={
        200: Content({"application/json": JobView}, "The job had ended, or is now cancelled"),
        202: Content({"application/json": JobView}, "Running: it stops at the next step"),
    },
    errors=(404,),
    tags=("jobs",),
    path=JOB_ID,
)
def cancel_job(job_id: str) -> ResponseReturnValue:
    """Cancel a queued job, or stop a running one between denoising steps."""
    job = get_job_runner(current_app).cancel(client_owner(), job_id)
    if job is None:
        raise ResourceNotFound("no such job")
    return jsonify(job.snapshot()), 200 if job.done else 202


@bp.get("/jobs/<job_id>/events")
@endpoint(
    responses={
        200: Content(
            {"text/event-stream": SSE_EVENT},
            "Server-Sent Events: `progress` per change, then `succeeded`, `failed` or "
            "`cancelled` with the job as JSON data",
        )
    },
    errors=(404, 429, 503),
    tags=("jobs",),
    path=JOB_ID,
    query=EventsQuery,
)
def job_events(job_id: str, query: EventsQuery) -> ResponseReturnValue:
    """Server-Sent Events: one `progress` event per change, then the final state; then close."""
    job = _owned(job_id)
    runner = get_job_runner(current_app)
    streams: StreamSlots = current_app.extensions["sse_slots"]
    holder = rate_limit_key()  # the key, or the address when auth is off
    streams.acquire(holder)

    def stream() -> Iterator[str]:
        with job.waiting():
            for snapshot in runner.watch(job, KEEPALIVE_SECONDS):
                if snapshot is None:
                    yield ": keep-alive\n\n"
                    continue
                if not query.previews:
                    snapshot = without_preview(snapshot)
                state = snapshot["state"]
                event = state if state in ("succeeded", "failed", "cancelled") else "progress"
                yield f"event: {event}\ndata: {json.dumps(snapshot)}\n\n"

    response = Response(
        stream_with_context(stream()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.call_on_close(lambda: streams.release(holder))  # also if it never started
    return response
