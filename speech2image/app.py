"""create_app(settings): the Flask app factory."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections import Counter
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g, request
from flask_cors import CORS
from flask_limiter import Limiter

from .accounts import Accounts
from .api import accounts as accounts_api
from .api import conversations as conversations_api
from .api import (
    drafts,
    errors,
    identity,
    images,
    jobs,
    openai,
    openapi,
    realtime,
    speech,
    system,
    web,
)
from .api import edit as edit_api
from .api import metrics as metrics_api
from .config import Settings, load_settings
from .dependencies import Dependencies
from .image_service import ImageService
from .imagestore import make_image_store
from .jobs import JobKind, JobKinds
from .jobs.inputs import FolderInputs
from .jobs.local import LocalJobRunner
from .kinds import service_kinds
from .logging_setup import configure_logging
from .maintenance import Maintenance
from .metrics import Metrics, start_metrics_server
from .model_loader import ModelLoader
from .moderation import Moderation
from .server import ServerState
from .speech_service import SpeechService
from .storage import Storage
from .style import StyleChooser

__all__ = ["counts_against_work_limits", "create_app"]

log = logging.getLogger("speech2image.requests")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small text fields
# Response headers a browser script on another origin may read.
CORS_EXPOSED_HEADERS = [
    "X-Request-ID",
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Location",
    "ETag",
    "Content-Disposition",
]
# Refusals of the request itself (invalid, too large, not audio, undecodable audio).
INVALID_REQUEST_STATUSES = frozenset({400, 413, 415, 422})


class RequestStats:
    """Counts of requests served, by endpoint and status, and requests in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0

    def started(self) -> None:
        """A request began."""
        with self._lock:
            self.in_flight += 1

    def finished(self, endpoint: str, status: int) -> None:
        """A request ended with ``status``."""
        with self._lock:
            self.in_flight -= 1
            self._counts[(endpoint, status)] += 1

    def snapshot(self) -> dict[str, Any]:
        """Totals for /status."""
        with self._lock:
            by_endpoint: dict[str, dict[str, int]] = {}
            for (endpoint, status), n in sorted(self._counts.items()):
                by_endpoint.setdefault(endpoint, {})[str(status)] = n
            return {
                "total": sum(self._counts.values()),
                "in_flight": self.in_flight,
                "by_endpoint": by_endpoint,
            }


def _memory_budgets(settings: Settings) -> dict[str, int]:
    import psutil

    budgets = {"cpu": int(settings.cpu_memory_budget) or int(psutil.virtual_memory().total * 0.6)}
    # The GPU budget is resolved lazily by the engines that use CUDA; 0 means "85% of the card".
    budgets["cuda"] = int(settings.gpu_memory_budget)
    return budgets


ROLES = ("embedded", "api", "worker", "cli")


def create_app(
    settings: Settings | None = None,
    role: str | None = None,
    *,
    kinds: list[JobKind] | None = None,
) -> Flask:
    """Build the app for one role, with what that role needs and nothing else.

    ``role`` is ``embedded`` (the HTTP API, jobs run in this process), ``api`` (the HTTP
    API of the distributed mode: jobs go to Celery workers; this process never imports a
    model library), ``worker`` (a Celery worker: jobs, no HTTP) or ``cli`` (a command that
    runs jobs here: no HTTP, no timers, no crash recovery). By default: ``api`` when
    S2I_BROKER_URL is set, else ``embedded``. ``kinds`` adds job kinds to the service's own.
    """
    settings = settings or load_settings()
    role = role or ("api" if settings.distributed else "embedded")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    # No app-wide static route: the web blueprint serves speech2image/static/ itself.
    app = Flask(__name__, static_folder=None)
    app.config.update(
        S2I_SETTINGS=settings,
        S2I_STARTED_AT=time.time(),
        S2I_ROLE=role,
        MAX_CONTENT_LENGTH=int(settings.max_upload_bytes) + FORM_OVERHEAD,
        DEBUG=settings.debug,
    )
    app.json.sort_keys = False  # answers keep the order the README shows (JSON_SORT_KEYS is gone)
    configure_logging(
        settings.log_dir,
        settings.log_level,
        int(settings.log_max_bytes),
        settings.log_backup_count,
        settings.log_format,
    )

    metrics = Metrics()
    metrics.init_app(app)
    loader = ModelLoader(
        budgets=_memory_budgets(settings),
        max_models=settings.max_models_in_memory,
        idle_seconds=settings.model_idle_seconds,
        observer=metrics,
    )
    loader.init_app(app)
    storage = Storage(
        settings.resolved_database_url(),
        settings.image_dir,
        images=make_image_store(settings),
        connect_timeout=settings.database_connect_timeout_seconds,
        statement_timeout=settings.database_statement_timeout_seconds,
    )
    storage.init_app(app)
    speech_service = SpeechService(settings, loader)
    speech_service.init_app(app)
    chooser = StyleChooser(settings.style_cues, settings.style_models, settings.style_default)
    image_service = ImageService(settings, loader, storage, chooser)
    image_service.init_app(app)
    moderation = Moderation(settings, metrics.registry)
    moderation.init_app(app)
    image_service.moderation = moderation
    job_kinds = service_kinds(speech_service, image_service, kinds)
    app.extensions["job_kinds"] = job_kinds
    maintenance = Maintenance(settings, storage, loader)
    maintenance.init_app(app)
    if role in ("embedded", "api") and settings.cleanup_interval_seconds > 0:
        maintenance.start(settings.cleanup_interval_seconds)

    accounts = Accounts(settings, storage, redis=_quota_redis(settings) if role == "api" else None)
    accounts.init_app(app)
    if role in ("embedded", "api"):
        from .accounts.metrics import UsageCollector

        metrics.registry.register(UsageCollector(accounts))
        accounts.resume_deliveries()  # webhooks an earlier process left unsent

    dependencies = Dependencies({"database": storage.ping, "image_store": storage.images.check})
    dependencies.init_app(app)
    if role == "api":
        _init_api_jobs(app, settings, job_kinds, speech_service, storage, loader)
        runner_health = app.extensions["jobs"].health
        dependencies.checks["broker"] = lambda: _raise_unless_ok(runner_health()["broker"])
    else:
        runner = LocalJobRunner(
            job_kinds,
            workers=settings.job_workers,
            max_batch_images=settings.batch_max_images,
            max_batch_wait=settings.batch_max_wait_ms / 1000,
            fairness_seconds=settings.schedule_fairness_seconds,
            # A worker holds at most its concurrency; admission happened at the API.
            max_queued=settings.queue_max if role != "worker" else 10_000,
            max_queued_per_owner=settings.queue_max_per_owner if role != "worker" else 10_000,
            is_resident=loader.is_resident,
            keep_finished_seconds=settings.job_keep_seconds,
            observer=metrics,
            # Every job of this process is a row of the history (a worker's are the API's).
            store=storage.jobs if role != "worker" else None,
            inputs=FolderInputs(settings.upload_dir),
        )
        runner.init_app(app)
        if role == "embedded" and settings.job_recover_on_start:
            runner.recover()
        if role == "worker":
            _init_worker(app, settings, job_kinds, runner, loader, storage)
    if role in ("embedded", "api"):
        _init_http(app, settings, metrics)
    else:
        metrics.watch(loader=loader, runner=app.extensions["jobs"])
        if settings.metrics_port:  # a worker has no HTTP front of its own
            app.extensions["metrics_server"] = start_metrics_server(
                metrics, settings.metrics_port, settings.host
            )
    if role == "api":
        return app  # no model ever loads here
    if settings.model_idle_seconds > 0 and role != "cli":
        app.extensions["model_idle_reaper"] = loader.start_idle_reaper()
    if settings.preload_models and role != "cli":
        loader.preload(_preload_names(loader, settings.preload_models))
    return app


def _init_http(app: Flask, settings: Settings, metrics: Metrics) -> None:
    """The HTTP API: limits, identity, blueprints, error handlers, CORS, /metrics."""
    loader: ModelLoader = app.extensions["model_loader"]
    jobs.StreamSlots(settings.event_streams, settings.event_streams_per_key).init_app(app)
    realtime.RealtimeSlots(settings.realtime_sessions, settings.realtime_sessions_per_key).init_app(
        app
    )
    request_stats = RequestStats()
    app.extensions["request_stats"] = request_stats
    metrics.watch(
        loader=loader,
        runner=app.extensions["jobs"],
        in_flight=lambda: request_stats.in_flight,
        dependencies=app.extensions["dependencies"].status,
    )

    storage_uri = settings.ratelimit_storage_uri
    if settings.distributed and storage_uri == "memory://":
        storage_uri = settings.broker_url  # counted across every API process
    limiter = Limiter(
        identity.rate_limit_key,
        default_limits=[settings.ratelimit_default],
        storage_uri=storage_uri,
        # A dead Redis must not fail requests: count in memory meanwhile (logged), and go
        # back to Redis once it answers again (Flask-Limiter checks it with back-off).
        storage_options=_ratelimit_storage_options(storage_uri),
        in_memory_fallback_enabled=True,
        # Concurrent requests that hit the dead storage before the fallback took over must not
        # fail either (a 500 each): their limits are skipped once, with a log line.
        swallow_errors=True,
        headers_enabled=True,
        enabled=settings.ratelimit_enabled,
        key_prefix=settings.queue_prefix,  # "s2i" unless deployments share one Redis
    )
    # The work limits count only requests that passed validation: a developer iterating on
    # a form must not be locked out by their own 400s.
    counted = {"deduct_when": counts_against_work_limits}
    limiter.limit(settings.ratelimit_transcribe, **counted)(speech.bp)
    limiter.limit(settings.ratelimit_generate, methods=["POST"], **counted)(images.bp)
    limiter.limit(settings.ratelimit_generate, **counted)(speech.pipeline_bp)
    limiter.limit(settings.ratelimit_transcribe, **counted)(openai.audio_bp)
    limiter.limit(settings.ratelimit_generate, **counted)(openai.images_bp)
    limiter.limit(settings.ratelimit_generate, methods=["POST"], **counted)(edit_api.bp)
    limiter.limit(settings.ratelimit_generate, methods=["POST"], **counted)(conversations_api.bp)
    limiter.limit(settings.ratelimit_generate, **counted)(drafts.bp)
    limiter.exempt(system.health)
    limiter.exempt(web.bp)  # loading the page spends none of the API's budget
    limiter.exempt(metrics_api.metrics)
    # A CORS preflight carries no credentials and does no work: never refuse or count it.
    # Liveness never waits on the limiter's storage (not even its recovery check).
    limiter.request_filter(
        lambda: request.method == "OPTIONS" or request.endpoint == "system.health"
    )
    # Order of before-request hooks: request id and timing, then the stop gate, then
    # identity (and its failed-authentication limit), then limits.
    _register_request_logging(app)
    ServerState(settings.shutdown_grace_seconds).init_app(app)
    identity.register_identity(app)
    limiter.init_app(app)
    app.extensions["s2i_limiter"] = limiter

    app.register_blueprint(system.bp)
    app.register_blueprint(speech.bp)
    app.register_blueprint(speech.pipeline_bp)
    app.register_blueprint(images.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(metrics_api.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(realtime.bp, url_prefix=openai.PREFIX)
    app.register_blueprint(drafts.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(edit_api.bp)
    app.register_blueprint(conversations_api.bp)
    app.register_blueprint(accounts_api.bp)
    openapi.register_openapi(app)
    app.url_map.merge_slashes = False  # "//etc/passwd" must be a 404, not a redirect
    errors.register_error_handlers(app)
    if settings.cors_origins:
        any_origin = "*" in settings.cors_origins
        if not any_origin:  # registered first, so it runs after flask-cors's hook
            app.after_request(_vary_on_origin)
        CORS(
            app,
            origins="*" if any_origin else settings.cors_origins,
            # Browsers refuse credentials with a wildcard origin: only for listed origins.
            supports_credentials=not any_origin,
            send_wildcard=any_origin,  # "*" itself: the same answer whatever the Origin
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    if settings.metrics_port:
        app.extensions["metrics_server"] = start_metrics_server(
            metrics, settings.metrics_port, settings.host
        )


def _raise_unless_ok(check: dict[str, Any]) -> None:
    if not check["ok"]:
        raise ConnectionError(check.get("problem", "not answering"))


def _quota_redis(settings: Settings) -> Any:
    """The Redis client that counts quota reservations of every API process."""
    from .jobs.celery import redis_client

    return redis_client(settings.broker_url, settings.redis_timeout_seconds)


def _broker(settings: Settings) -> Any:
    from .jobs.celery import BrokerState, redis_client

    client = redis_client(settings.broker_url, settings.redis_timeout_seconds)
    return BrokerState(client, settings.queue_prefix)


def _reconciler(app: Flask, broker: Any, send: Any, inputs: Any) -> None:
    """Every distributed process reconciles rows and broker; one at a time does it."""
    from .errors import error_body
    from .jobs.celery import REDIS_ERRORS, Reconciler
    from .jobs.records import job_event, job_from_row

    settings: Settings = app.config["S2I_SETTINGS"]
    store = app.extensions["storage"].jobs

    def fail(record: Any, error: Exception) -> None:
        store.finish(record.id, "failed", error=error_body(error), lease_expires_at=None)
        with contextlib.suppress(*REDIS_ERRORS):
            broker.release(record.id, record.owner)
            broker.publish(job_event(job_from_row(store.get(record.id) or record)))
        if record.input:
            with contextlib.suppress(Exception):
                inputs.discard(record.id, record.input)

    def input_exists(location: str) -> bool:
        return bool(inputs.store.exists(location))

    reconciler = Reconciler(
        store,
        broker,
        send=send,
        fail=fail,
        input_exists=input_exists,
        lease_seconds=settings.job_lease_seconds,
        interval=settings.reconcile_interval_seconds,
        max_attempts=settings.job_max_attempts,
    )
    app.extensions["reconciler"] = reconciler
    reconciler.start()


def _all_queues(loader: ModelLoader) -> list[str]:
    """Every queue a job of this deployment may wait in (for queue depth and reconciling)."""
    from .jobs.kinds import pipeline_queue_name, queue_name

    models = loader.names()
    queues = [queue_name(m) for m in models]
    queues += [pipeline_queue_name(m) for m in models if m.startswith("sd:")]
    return [*queues, pipeline_queue_name(None)]


def _init_api_jobs(
    app: Flask,
    settings: Settings,
    job_kinds: JobKinds,
    speech_service: SpeechService,
    storage: Storage,
    loader: ModelLoader,
) -> None:
    """Jobs of an API process go to Celery workers; rows are the truth."""
    from .jobs.celery import CeleryJobRunner, celery_init_app
    from .jobs.inputs import StoreInputs
    from .jobs.records import JobRecorder

    broker = _broker(settings)
    inputs = StoreInputs(storage.images, settings.upload_dir)
    runner = CeleryJobRunner(
        settings,
        celery_init_app(app),
        broker,
        job_kinds,
        recorder=JobRecorder(storage.jobs, "api", settings.job_keep_seconds),
        inputs=inputs,
        default_model=speech_service.model_name,
        queues=_all_queues(loader),
        check_upload=speech_service.check_upload,
        check_store=app.extensions["dependencies"].require_image_store,
    )
    runner.init_app(app)
    _reconciler(app, broker, runner.send_row, inputs)


def _init_worker(
    app: Flask,
    settings: Settings,
    job_kinds: JobKinds,
    runner: LocalJobRunner,
    loader: ModelLoader,
    storage: Storage,
) -> None:
    """A Celery worker's app: delivered tasks run through the local runner."""
    from .image_service import model_key
    from .jobs.celery import JobWorker, celery_init_app
    from .jobs.inputs import StoreInputs
    from .jobs.kinds import pipeline_queues

    models = worker_models(loader, settings.worker_models)
    celery = celery_init_app(app)
    broker = _broker(settings)
    inputs = StoreInputs(storage.images, settings.upload_dir)
    JobWorker(
        settings,
        broker,
        runner,
        job_kinds,
        models=models,
        pipelines=pipeline_queues(
            models,
            f"whisper:{settings.whisper_model}",
            [model_key(m) for m in settings.style_models.values()],
        ),
        loader=loader,
        rows=storage.jobs,
        inputs=inputs,
    ).init_app(app)

    def send(record: Any) -> None:
        from .jobs.celery import send_job

        send_job(
            celery,
            record.id,
            record.kind,
            record.owner,
            record.work,
            record.request_id,
            record.queue,
        )

    _reconciler(app, broker, send, inputs)


def worker_models(loader: ModelLoader, wanted: list[str]) -> list[str]:
    """The loader names of the models a worker serves (S2I_WORKER_MODELS; empty: all)."""
    if not wanted:
        return loader.names()
    names = []
    for item in wanted:
        matches = [
            n for n in loader.names() if item in (n, n.split(":", 1)[0], n.split(":", 1)[-1])
        ]
        if not matches:
            raise ValueError(f"S2I_WORKER_MODELS names {item!r}, which is not configured")
        names.extend(m for m in matches if m not in names)
    return names


def _vary_on_origin(response: Response) -> Response:
    """Listed origins: the CORS headers depend on the request's Origin, so caches must too."""
    response.vary.add("Origin")  # one Vary: Origin, also when flask-cors set it already
    return response


def counts_against_work_limits(response: Response) -> bool:
    """Whether a response counts against the generation and transcription limits."""
    return response.status_code not in INVALID_REQUEST_STATUSES


def _ratelimit_storage_options(storage_uri: str) -> dict[str, Any]:
    if storage_uri.startswith("memory://"):
        return {}
    # Without timeouts a Redis that stops answering would hang every request.
    return {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}


def _preload_names(loader: ModelLoader, wanted: list[str]) -> list[str]:
    """Map preload entries ('whisper', 'whisper:base', ...) onto registered model names."""
    names = []
    for item in wanted:
        matches = [n for n in loader.names() if n == item or n.split(":", 1)[0] == item]
        if not matches:
            raise ValueError(f"S2I_PRELOAD_MODELS names {item!r}, which is not configured")
        names.extend(matches)
    return names


def _register_request_logging(app: Flask) -> None:
    stats: RequestStats = app.extensions["request_stats"]
    metrics: Metrics = app.extensions["metrics"]

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        stats.started()

    @app.after_request
    def _finish(response):  # type: ignore[no-untyped-def]
        # Registered before the rate limiter, so this runs after it: Flask-Limiter puts a
        # Retry-After on every response, which only means something on 429 and 503.
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)
        elif g.get("retry_after"):  # the error's own back-off, not the limiter's window
            response.headers["Retry-After"] = g.retry_after
        response.headers["X-Request-ID"] = g.get("request_id", "-")
        # Browsers must not guess a type: an image or a JSON error is never run as a script.
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.teardown_request
    def _log(exc: BaseException | None) -> None:
        # A streamed response (SSE) tears its context down twice: count and log once.
        if "started" not in g or g.get("logged"):
            return
        g.logged = True
        status = getattr(g, "response_status", None)
        duration_ms = (time.perf_counter() - g.started) * 1000
        endpoint = request.endpoint or "unknown"
        stats.finished(endpoint, status or 500)
        metrics.request_done(endpoint, request.method, status or 500, duration_ms / 1000)
        # Percent-encoded: a path is client input and must not forge log lines.
        path = quote(request.path, safe="/:@!$&'()*+,;=-._~")
        log.info(
            "%s %s %s %.1fms client=%s",
            request.method,
            path,
            status or 500,
            duration_ms,
            request.remote_addr,
            extra={
                "method": request.method,
                "path": path,
                "endpoint": endpoint,
                "status": status or 500,
                "duration_ms": round(duration_ms, 1),
                "client": request.remote_addr,
            },
        )

    @app.after_request
    def _remember_status(response):  # type: ignore[no-untyped-def]
        g.response_status = response.status_code
        return response
