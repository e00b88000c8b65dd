"""Operators' endpoints: liveness, readiness and resource status."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import sqlalchemy.exc
from flask import Blueprint, Flask, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from .. import __version__
from ..errors import redact_paths
from ..image_service import get_image_service, required_models
from ..jobs import get_job_runner
from ..maintenance import get_maintenance
from ..model_loader import get_model_loader
from ..server import health_body
from ..speech_service import get_speech_service
from ..storage import get_storage
from .identity import operators_only
from .openapi import Content, endpoint
from .responses import Cleanup, Health, Ready, ServerConfig, ServerStatus

__all__ = ["bp", "readiness"]

bp = Blueprint("system", __name__)
log = logging.getLogger(__name__)


@bp.get("/health")
@endpoint(responses={200: Health}, tags=("system",), public=True, rate_limited=False)
def health() -> ResponseReturnValue:
    """Liveness: the process answers. Touches no model and takes no lock a model holds."""
    return jsonify(health_body(current_app))


@bp.get("/ready")
@endpoint(
    responses={200: Ready, 503: Content({"application/json": Ready}, "Not ready")},
    tags=("system",),
)
def ready() -> ResponseReturnValue:
    """Readiness: the database answers, images can be written, the needed models can be had.

    In the distributed mode: the broker, the database and the image store answer, and a live
    worker serves every model the default flow needs.
    """
    body, status = readiness(current_app._get_current_object())  # type: ignore[attr-defined]
    return jsonify(body), status


def readiness(app: Flask) -> tuple[dict[str, Any], int]:
    """The body and status of /ready (also answered on the probe port, outside any request)."""
    with app.app_context():
        if app.config.get("S2I_ROLE") == "api":
            return _ready_distributed()
        return _ready_embedded()


def _ready_embedded() -> tuple[dict[str, Any], int]:
    settings = current_app.config["S2I_SETTINGS"]
    storage = get_storage(current_app)
    models = _model_readiness(settings)
    required_ok = all(m["loaded"] or m["available"] for m in models if m["required"])
    checks: dict[str, dict[str, Any]] = {
        "database": _check_database(storage),
        "image_dir": _check_image_dir(storage, int(settings.ready_min_free_bytes)),
        "models": {"ok": required_ok}
        | ({} if required_ok else {"problem": "a model the default flow needs cannot be had"}),
        "server": _check_server(),
        "ratelimit_storage": _check_ratelimit_storage(settings),
    }
    down = [name for name, check in checks.items() if not check["ok"] and name in CRITICAL]
    degraded = [name for name, check in checks.items() if not check["ok"] and name not in CRITICAL]
    body = {"ready": not down, "down": down, "degraded": degraded, "checks": checks}
    return body | {"models": models}, 503 if down else 200


# A failing check in this set makes the instance not ready; the others only degrade it.
CRITICAL = frozenset({"database", "image_dir", "models", "server"})


def _model_readiness(settings: Any) -> list[dict[str, Any]]:
    loader = get_model_loader(current_app)
    required = set(required_models(settings))
    models = []
    for row in loader.status():
        info = loader.factory(row["name"]).describe()
        models.append(
            {
                "name": row["name"],
                "required": row["name"] in required,
                "loaded": row["loaded"],
                "available": info["available"],
                # Why, without the server's paths (the model cache, a checkpoint's folder).
                "problem": redact_paths(info["problem"]) if info.get("problem") else None,
            }
        )
    return models


def _check_database(storage: Any) -> dict[str, Any]:
    try:
        with storage.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        log.warning("readiness: database: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return {"ok": False, "problem": "the history database is not answering"}
    return {"ok": True}


def _check_image_dir(storage: Any, min_free: int) -> dict[str, Any]:
    store = getattr(storage, "images", None)
    folder = getattr(store, "folder", None)
    if store is not None and folder is None:  # an object store: it answers, or it does not
        try:
            store.check()
        except Exception as exc:  # whatever the client library raises
            log.warning("readiness: image store: %s", exc)
            return {"ok": False, "problem": "the image store is not answering"}
        return {"ok": True}
    folder = folder or storage.image_dir
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-", suffix=".tmp") as probe:
            probe.write(b"ok")
            probe.flush()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        log.warning("readiness: image folder: %s", exc)
        return {"ok": False, "problem": f"the image folder is not writable ({exc.strerror})"}
    if free < min_free:
        return {
            "ok": False,
            "problem": f"{free} bytes free for images, less than S2I_READY_MIN_FREE_BYTES",
        }
    return {"ok": True}


def _check_server() -> dict[str, Any]:
    state = current_app.extensions.get("server_state")
    if state is not None and state.stopping:
        return {"ok": False, "problem": "the server is stopping"}
    return {"ok": True}


def _check_ratelimit_storage(settings: Any) -> dict[str, Any]:
    limiter = current_app.extensions.get("s2i_limiter")
    if limiter is None or not limiter.enabled or settings.ratelimit_storage_uri == "memory://":
        return {"ok": True}
    try:
        reachable = bool(limiter.storage.check())
    except Exception:  # any storage error means it does not answer
        reachable = False
    # Flask-Limiter keeps counting in memory until its back-off check sees the storage again;
    # it has no public flag for that state.
    falling_back = bool(getattr(limiter, "_storage_dead", False))
    if reachable and not falling_back:
        return {"ok": True}
    return {
        "ok": False,
        "problem": "the rate-limit storage is not answering: counting in memory meanwhile",
    }


def _ready_distributed() -> tuple[dict[str, Any], int]:
    runner = get_job_runner(current_app)
    checks: dict[str, Any] = dict(runner.health())
    stats = runner.stats() if checks.get("broker", {}).get("ok") else None
    workers = (stats.workers if stats is not None else None) or []
    try:
        get_storage(current_app).ping()
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "problem": type(exc).__name__}
    settings = current_app.config["S2I_SETTINGS"]
    # The object store (or the folder) the workers write to and this process serves from.
    checks["image_store"] = _check_image_dir(
        get_storage(current_app), int(settings.ready_min_free_bytes)
    )
    served = {m for w in workers for m in w["models"]}
    required = required_models(settings)
    models = [{"name": name, "required": True, "served": name in served} for name in required]
    checks["workers"] = {"ok": all(m["served"] for m in models), "live": len(workers)}
    down = [name for name, check in checks.items() if not check["ok"]]
    body = {"ready": not down, "down": down, "degraded": [], "checks": checks, "models": models}
    return body, 503 if down else 200


@bp.get("/config")
@endpoint(responses={200: ServerConfig}, tags=("system",), public=True)
def config() -> ResponseReturnValue:
    """Models, schedulers and the limits a form needs, from this server's settings."""
    settings = current_app.config["S2I_SETTINGS"]
    images = get_image_service(current_app)
    fields = images.request_model.model_json_schema()["properties"]

    def limit(name: str, *keys: str) -> dict[str, Any]:
        schema = fields[name]
        names = {"min": "minimum", "max": "maximum", "multiple_of": "multipleOf"}
        names["default"] = "default"
        return {key: schema[names[key]] for key in keys if names[key] in schema}

    profiles = images.model_profiles()
    return jsonify(
        models={
            "image": [
                _model_entry(name, spec.source) | profiles[name].as_dict()
                for name, spec in sorted(images.models.items())
            ],
            "whisper": [_whisper_entry(settings.whisper_model)],
            "default_image": "auto",
        },
        loras=[lora.as_dict() for lora in images.loras.files().values()],
        schedulers=list(fields["scheduler"]["enum"]),
        limits={
            "width": limit("width", "min", "max", "multiple_of", "default"),
            "height": limit("height", "min", "max", "multiple_of", "default"),
            "steps": limit("steps", "min", "max", "default"),
            "num_images": limit("num_images", "min", "max", "default"),
            "prompt_chars": {"max": settings.max_prompt_chars},
            "upload_bytes": {"max": int(settings.max_upload_bytes)},
            "audio_seconds": {"max": settings.max_audio_seconds},
        },
        auth={
            "required": bool(settings.api_keys or settings.admin_api_keys) or settings.auth_required
        },
    )


def _model_entry(name: str, source: str) -> dict[str, Any]:
    # A hub id says what the model is; a server path says nothing to a client and leaks.
    local = source.startswith(("/", ".", "~")) or os.path.exists(source)
    return {"name": name} if local else {"name": name, "source": source}


def _whisper_entry(model: str) -> dict[str, Any]:
    local = model.startswith(("/", ".", "~")) or os.path.exists(model)
    return {"name": os.path.basename(model.rstrip("/")) if local else model}


@bp.get("/status")
@endpoint(responses={200: ServerStatus}, tags=("system",), operators=True)
@operators_only
def status() -> ResponseReturnValue:
    """Resources, resident models and request counts."""
    loader = get_model_loader(current_app)
    settings = current_app.config["S2I_SETTINGS"]
    return jsonify(
        version=__version__,
        uptime_seconds=round(time.time() - current_app.config["S2I_STARTED_AT"], 1),
        system=_system_resources(settings.upload_dir),
        gpu=_gpu_memory(),
        models=loader.status(),
        memory_budgets=loader.budgets,
        transcription={"active": get_speech_service(current_app).active},
        generation=get_image_service(current_app).state(),
        jobs=get_job_runner(current_app).stats().as_dict(),
        images=get_storage(current_app).stats(),
        cleanup={"last_run": get_maintenance(current_app).last_run},
        requests=current_app.extensions["request_stats"].snapshot(),
    )


@bp.post("/cleanup")
@endpoint(responses={200: Cleanup}, tags=("system",), operators=True)
@operators_only
def cleanup() -> ResponseReturnValue:
    """Remove images past retention (rows and files together) and unload idle models."""
    return jsonify(get_maintenance(current_app).run())


def _system_resources(upload_dir: os.PathLike[str]) -> dict[str, Any]:
    import psutil

    memory = psutil.virtual_memory()
    disk_path = os.fspath(upload_dir) if os.path.isdir(upload_dir) else os.getcwd()
    disk = psutil.disk_usage(disk_path)
    process = psutil.Process()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "memory": {"total": memory.total, "available": memory.available, "percent": memory.percent},
        "process_rss": process.memory_info().rss,
        "disk": {
            "path": disk_path,
            "total": disk.total,
            "free": disk.free,
            "percent": disk.percent,
        },
    }


def _gpu_memory() -> list[dict[str, Any]] | None:
    """GPU memory per device, when torch is already loaded and sees CUDA (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "total": total,
                "free": free,
                "allocated_by_torch": torch.cuda.memory_allocated(index),
            }
        )
    return devices
