"""The production server's life: a probe listener beside gunicorn, and a graceful stop.

Gunicorn's threaded worker pins one request thread per connection, for as long as a slow
client takes to send its headers and as long as a synchronous generation runs. With every
thread held, a liveness probe on the main port waits in the queue and the process gets
restarted, losing its jobs. The probe listener answers ``/health`` and ``/ready`` on a port
of its own (``S2I_HEALTH_PORT``), in its own threads, through the same app.

On SIGTERM the server refuses new work (503 ``shutting_down``), lets running and queued jobs
finish for up to ``S2I_SHUTDOWN_GRACE_SECONDS`` (gunicorn's ``graceful_timeout``), then stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from .config import Settings
from .errors import ShuttingDown

__all__ = ["ProbeServer", "ServerState", "gunicorn_hooks", "start_probe_server"]

log = logging.getLogger("speech2image.server")

PROBE_PATHS = frozenset({"/health", "/ready"})
PROBE_READ_TIMEOUT = 10.0  # a probe that has not sent its request by then is dropped
DRAIN_MARGIN = 1.0  # stop draining this long before gunicorn's arbiter kills the worker


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
        while True:
            stats = runner.stats()
            if not stats.get("queued") and not stats.get("running"):
                return True
            if time.monotonic() >= end:
                log.warning(
                    "grace period over with %s job(s) queued and %s running",
                    stats.get("queued"),
                    stats.get("running"),
                )
                return False
            time.sleep(poll)

    def _refuse_new_work(self) -> None:
        if self.stopping and request.method not in ("GET", "HEAD", "OPTIONS"):
            raise ShuttingDown(
                "the server is stopping and takes no new work; retry on another instance",
                retry_after=max(1.0, self.grace_seconds),
            )


class _QuietHandler(WSGIRequestHandler):
    """Werkzeug's handler with a read timeout and without its access log (the app logs)."""

    timeout = PROBE_READ_TIMEOUT

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """The app already logs each request with its id."""


class ProbeServer:
    """A small threaded HTTP listener that serves only the probe paths of ``app``."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        self._app = app
        self._server: BaseWSGIServer = make_server(
            host, port, self._dispatch, threaded=True, request_handler=_QuietHandler
        )
        self._server.daemon_threads = True
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )

    def start(self) -> ProbeServer:
        """Serve in a daemon thread."""
        self._thread.start()
        log.info("probe listener on port %d (/health, /ready)", self.port)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()

    def _dispatch(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in PROBE_PATHS:
            return self._app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"the probe port serves /health and /ready only\n"]


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
    start_probe_server(app, settings)
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
    state.begin_stop()
    runner = app.extensions["jobs"]
    if state.drain(runner):
        log.info("all jobs finished; stopping")
    runner.shutdown()
    probe = app.extensions.get("probe_server")
    if probe is not None:
        probe.close()


def gunicorn_hooks() -> dict[str, Any]:
    """The gunicorn server hooks that start the probe listener and stop gracefully."""
    return {"post_worker_init": _post_worker_init, "worker_exit": _worker_exit}
