"""The production server's life: a probe listener beside gunicorn, and a graceful stop.

Gunicorn's threaded worker pins one request thread per connection, for as long as a slow
client takes to send its headers and as long as a synchronous generation runs. With every
thread held, a liveness probe on the main port waits in the queue and the process gets
restarted, losing its jobs. The probe listener answers ``/health`` on a port of its own
(``S2I_HEALTH_PORT``), in a thread of its own, and ``/ready`` in one more thread.

On SIGTERM the server refuses new work (503 ``shutting_down``), lets running and queued jobs
finish for up to ``S2I_SHUTDOWN_GRACE_SECONDS`` (gunicorn's ``graceful_timeout``), then stops.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import selectors
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, request

from . import __version__
from .config import Settings
from .errors import ShuttingDown

__all__ = ["ProbeServer", "ServerState", "gunicorn_hooks", "health_body", "start_probe_server"]

log = logging.getLogger("speech2image.server")

PROBE_READ_TIMEOUT = 5.0  # a probe that has not sent its request by then is dropped
MAX_PROBE_REQUEST = 8192
# The probe thread takes the GIL a few times per answer; while job threads run Python code
# (schedulers, small models) each take can wait a whole switch interval (5 ms by default).
GIL_SWITCH_INTERVAL = 0.001
DRAIN_MARGIN = 1.0  # stop draining this long before gunicorn's arbiter kills the worker
MAX_READY_WAITING = 8  # /ready probes waiting for the readiness thread; more get 503 at once


def health_body(app: Flask) -> dict[str, Any]:
    """The body of /health, on the main port and on the probe listener."""
    uptime = time.time() - app.config["S2I_STARTED_AT"]
    return {"status": "ok", "version": __version__, "uptime_seconds": round(uptime, 1)}


class ServerState:
    """Whether the server is stopping, and since when; refuses new work once it is."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.stopping_since: float | None = None

    def init_app(self, app: Flask) -> None:
        """Store as ``app.extensions['server_state']`` and refuse new work while stopping."""
        app.extensions["server_state"] = self
        app.before_request(self._refuse_new_work)

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self.stopping_since is not None

    def begin_stop(self) -> None:
        """Refuse new work from now on (idempotent)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            log.info("stopping: new work is refused; running jobs get %.0fs", self.grace_seconds)

    def deadline(self) -> float:
        """Monotonic time by which the jobs must be done."""
        start = self.stopping_since if self.stopping_since is not None else time.monotonic()
        return start + self.grace_seconds

    def drain(self, runner: Any, poll: float = 0.1) -> bool:
        """Wait until ``runner`` has no queued or running job, or the grace period ends."""
        end = self.deadline() - DRAIN_MARGIN
        if not runner.runs_jobs:
            return True  # the Celery runner's stats are the cluster's, not this process's
        while True:
            stats = runner.stats()
            if not stats.queued and not stats.running:
                return True
            if time.monotonic() >= end:
                log.warning(
                    "grace period over with %s job(s) queued and %s running",
                    stats.queued,
                    stats.running,
                )
                return False
            time.sleep(poll)

    def _refuse_new_work(self) -> None:
        if self.stopping and request.method not in ("GET", "HEAD", "OPTIONS"):
            raise ShuttingDown(
                "the server is stopping and takes no new work; retry on another instance",
                retry_after=max(1.0, self.grace_seconds),
            )


class ProbeServer:
    """A tiny listener that answers ``GET /health`` in one thread of its own, and ``/ready``.

    One selector loop, no thread per connection and no trip through the WSGI stack: few
    Python steps per probe, so it stays fast while request and job threads compete for the
    GIL. A client that never finishes its request is dropped after ``PROBE_READ_TIMEOUT``.
    ``/ready`` asks the database and the model files (bounded by their timeouts), so it runs
    in a readiness thread of its own, never in the loop that answers ``/health``; like
    ``/health`` here it needs no API key (keep the port private).
    """

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self._app = app
        self._listener = socket.create_server((host, port), backlog=64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._pending: dict[socket.socket, tuple[bytearray, float]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="probe-listener", daemon=True)
        self._readiness = ThreadPoolExecutor(1, thread_name_prefix="probe-ready")
        self._ready_waiting = 0
        self._ready_lock = threading.Lock()

    def start(self) -> ProbeServer:
        """Serve in a daemon thread."""
        self._thread.start()
        log.info("probe listener on port %d (GET /health, GET /ready)", self.port)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._stopping = True
        self._wake_writer.send(b"x")
        self._thread.join(5)
        self._readiness.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in self._selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is not self._wake_reader:
                        self._read(key.fileobj)  # type: ignore[arg-type]
                now = time.monotonic()
                for conn, (_, deadline) in list(self._pending.items()):
                    if deadline < now:
                        self._drop(conn)
        finally:
            for conn in list(self._pending):
                self._drop(conn)
            self._selector.close()
            self._listener.close()
            self._wake_reader.close()
            self._wake_writer.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.warning("probe listener: accept failed", exc_info=True)
                return
            conn.setblocking(False)
            self._pending[conn] = (bytearray(), time.monotonic() + PROBE_READ_TIMEOUT)
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        buffer, _ = self._pending[conn]
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buffer += chunk
        if not chunk or len(buffer) > MAX_PROBE_REQUEST:
            self._drop(conn)
        elif b"\r\n\r\n" in buffer or b"\n\n" in buffer:
            self._answer(conn, bytes(buffer))

    def _answer(self, conn: socket.socket, raw: bytes) -> None:
        method, _, rest = raw.partition(b" ")
        target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method in (b"GET", b"HEAD") and target == b"/ready":
            self._hand_to_readiness(conn, method)
            return
        if method in (b"GET", b"HEAD") and target == b"/health":
            status, body = "200 OK", json.dumps(health_body(self._app)).encode()
        else:
            status = "404 Not Found"
            body = b'{"error": "the probe port serves GET /health and GET /ready only"}'
        self._send(conn, method, status, body)
        self._drop(conn)

    def _hand_to_readiness(self, conn: socket.socket, method: bytes) -> None:
        """Leave the loop: the readiness thread answers ``conn`` and closes it."""
        self._pending.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        with self._ready_lock:
            busy = self._ready_waiting >= MAX_READY_WAITING
            if not busy:
                self._ready_waiting += 1
        if busy:
            body = b'{"ready": false, "problem": "too many readiness probes at once"}'
            self._send(conn, method, "503 Service Unavailable", body)
            conn.close()
            return
        try:
            self._readiness.submit(self._ready, conn, method)
        except RuntimeError:  # closing
            with self._ready_lock:
                self._ready_waiting -= 1
            conn.close()

    def _ready(self, conn: socket.socket, method: bytes) -> None:
        from .api.system import readiness  # the app's own /ready, outside any request

        try:
            body, code = readiness(self._app)
            status = "200 OK" if code == 200 else "503 Service Unavailable"
            self._send(conn, method, status, json.dumps(body).encode())
        except Exception:  # a probe must get an answer, never a hang
            log.exception("probe listener: /ready failed")
            problem = b'{"ready": false, "problem": "the readiness check failed; see the log"}'
            self._send(conn, method, "503 Service Unavailable", problem)
        finally:
            with self._ready_lock:
                self._ready_waiting -= 1
            conn.close()

    @staticmethod
    def _send(conn: socket.socket, method: bytes, status: str, body: bytes) -> None:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(head if method == b"HEAD" else head + body)
        except OSError:
            pass

    def _drop(self, conn: socket.socket) -> None:
        self._pending.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        conn.close()


def start_probe_server(app: Flask, settings: Settings) -> ProbeServer | None:
    """Start the probe listener configured by ``settings``, if any.

    A port set explicitly must bind, or start-up fails; the default (PORT+1) only warns.
    """
    port = settings.resolved_health_port()
    if not port:
        return None
    try:
        probe = ProbeServer(app, settings.host, port).start()
    except OSError as exc:
        if settings.health_port is not None:
            raise RuntimeError(f"S2I_HEALTH_PORT {port}: cannot listen: {exc}") from exc
        log.warning("no probe listener: port %d (PORT+1) is not free: %s", port, exc)
        return None
    app.extensions["probe_server"] = probe
    return probe


def _post_worker_init(worker: Any) -> None:
    """In the worker: start the probe listener; make SIGTERM refuse new work first."""
    app: Flask = worker.wsgi
    settings: Settings = app.config["S2I_SETTINGS"]
    if start_probe_server(app, settings) is not None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # Everything loaded so far (the app, preloaded models) lives as long as the process: keep
    # it out of the collector, or each full collection stops every thread, probes included.
    gc.freeze()
    state: ServerState = app.extensions["server_state"]
    stop_worker = worker.handle_exit

    def on_sigterm(signum: int, frame: Any) -> None:
        state.begin_stop()
        stop_worker(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _worker_exit(_arbiter: Any, worker: Any) -> None:
    """In the worker, once its connections are done: let queued and running jobs finish."""
    app: Flask | None = getattr(worker, "wsgi", None)
    if app is None or "server_state" not in getattr(app, "extensions", {}):
        return
    state: ServerState = app.extensions["server_state"]
    runner = app.extensions["jobs"]
    # Only a graceful stop (SIGTERM) waits for the jobs; SIGINT and SIGQUIT mean now.
    if state.stopping and state.drain(runner):
        log.info("all jobs finished; stopping")
    runner.shutdown()
    probe = app.extensions.get("probe_server")
    if probe is not None:
        probe.close()


def gunicorn_hooks() -> dict[str, Any]:
    """The gunicorn server hooks that start the probe listener and stop gracefully."""
    return {"post_worker_init": _post_worker_init, "worker_exit": _worker_exit}
