"""The `speech2image` command: serve, worker, transcribe, generate, models, cleanup, db, ..."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import click

from .config import Settings, SettingsError, exposure_warning, load_settings
from .server import gunicorn_hooks

__all__ = ["gunicorn_options", "main", "warn_if_exposed"]


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """Production gunicorn settings: one worker process, many threads (see gunicorn.conf.py)."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": 1,  # more processes would each load every model
        "worker_class": "gthread",
        # Event streams wait in threads of their own (api/jobs.py StreamSlots caps them), so
        # they never take the S2I_THREADS that requests need.
        "threads": settings.threads + settings.event_streams,
        "timeout": 600,  # long transcriptions and generations are normal
        # On SIGTERM running jobs get this long before the worker is killed (speech2image.server).
        "graceful_timeout": math.ceil(settings.shutdown_grace_seconds),
        "keepalive": 5,
        "accesslog": None,  # the app logs one line per request, with its request id
        "errorlog": "-",
        # gunicorn's control socket sits at one path per user: a second server would take it.
        "control_socket_disable": True,
        "when_ready": partial(_warn_if_exposed, settings),
        **gunicorn_hooks(),  # the probe listener (S2I_HEALTH_PORT) and the graceful stop
    }


def _warn_if_exposed(settings: Settings, server: Any) -> None:
    """gunicorn hook: warn for every bound address reachable from other machines without auth."""
    for address in server.cfg.bind:
        if address.startswith(("unix:", "fd://")):
            continue
        host = address.rsplit(":", 1)[0] if ":" in address.strip("[]") else address
        warning = exposure_warning(settings, host)
        if warning:
            server.log.warning("speech2image: %s", warning)


def warn_if_exposed(settings: Settings) -> None:
    """Log a warning when the configured address is public and auth is off."""
    warning = exposure_warning(settings)
    if warning:
        logging.getLogger("speech2image").warning(warning)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _progress_bar(label: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr fed with (done, total); quiet when stderr is not a terminal."""
    from tqdm import tqdm

    bar = tqdm(desc=label, unit=unit, total=0, disable=None, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


@click.group()
def main() -> None:
    """speech2image: speech in, images out."""


@main.command()
@click.option("--dev", is_flag=True, help="Use Flask's development server instead of gunicorn.")
def serve(dev: bool) -> None:
    """Start the HTTP server with the settings from the environment."""
    settings = _settings()
    from .app import create_app

    if dev:
        app = create_app(settings)
        warn_if_exposed(settings)
        app.run(host=settings.host, port=settings.port, threaded=True)
        return
    from gunicorn.app.base import BaseApplication

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(settings)

    _Server().run()


@main.command()
@click.option(
    "--torch-threads",
    type=int,
    default=0,
    help="Limit torch to this many CPU threads (several workers on one machine).",
)
def worker(torch_threads: int) -> None:
    """Run a Celery worker that serves S2I_WORKER_MODELS (distributed mode)."""
    settings = _settings()
    if not settings.distributed:
        raise click.ClickException("a worker needs S2I_BROKER_URL (the Redis of the cluster)")
    from .app import create_app

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        app = create_app(settings, role="worker")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    job_worker, celery = app.extensions["job_worker"], app.extensions["celery"]
    job_worker.start_heartbeat()
    click.echo(f"worker {job_worker.name} serves {', '.join(job_worker.models)}", err=True)
    celery.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={','.join(job_worker.queues())}",
            f"--hostname={job_worker.name}@%h",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


@main.command()
@click.option(
    "--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Worker processes."
)
@click.option(
    "--torch-threads",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Torch CPU threads per worker (0: torch's default).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Port of the API (default: a free one).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API binds.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of logs, images and the object store's data (default: a new temporary one).",
)
@click.option("--tiny", is_flag=True, help="Serve the tiny random-weight model (it draws noise).")
@click.option(
    "--no-object-store",
    is_flag=True,
    help="Do not start SeaweedFS (images go where S2I_IMAGE_STORE says).",
)
def cluster(
    workers: int,
    torch_threads: int,
    port: int,
    host: str,
    root: Path | None,
    tiny: bool,
    no_object_store: bool,
) -> None:
    """Start the distributed stack on this machine: object store, workers, API; Ctrl-C stops it.

    Redis (S2I_BROKER_URL) and PostgreSQL (S2I_DATABASE_URL) are used where they answer, or
    started from their binaries when those exist.
    """
    import signal
    import tempfile

    from .devtools.cluster import ClusterError, LocalCluster

    folder = root or Path(tempfile.mkdtemp(prefix="speech2image-cluster-"))
    stack = LocalCluster(folder, log=lambda line: click.echo(line, err=True))

    def stop_on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        stack.ensure_redis()
        stack.ensure_postgres()
        if not no_object_store:
            stack.start_object_store(wait=False)  # it starts while the rest does
        if tiny:
            stack.use_tiny_model()
        stack.migrate()
        for _ in range(workers):
            stack.start_worker(torch_threads)
        api = stack.start_api(port, host)
        click.echo(
            f"starting {workers} workers and the API (logs in {folder / 'logs'}) ...", err=True
        )
        stack.wait_object_store()
        status = stack.wait_ready()
        names = ", ".join(w["name"] for w in status.get("jobs", {}).get("workers", []))
        click.echo(f"ready: {api.url}")
        click.echo(f"  web page  {api.url}/")
        click.echo(f"  API docs  {api.url}/docs")
        click.echo(f"  status    {api.url}/status   (workers: {names})")
        if not no_object_store:
            click.echo(f"  S3        {stack.settings['S2I_S3_ENDPOINT_URL']}")
        click.echo("Ctrl-C stops everything.", err=True)
        while True:  # until Ctrl-C; a role that dies ends the cluster
            time.sleep(1)
            stack.check_alive()
    except KeyboardInterrupt:
        click.echo("stopping (running jobs may finish) ...", err=True)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        # A second Ctrl-C must not leave the roles running: stopping is bounded anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    click.echo("stopped", err=True)


@main.command()
@click.argument("audio", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--language", default=None, help="Spoken language (ISO 639-1); detected if absent.")
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default="transcribe")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def transcribe(audio: Path, language: str | None, task: str, as_json: bool) -> None:
    """Transcribe an audio file with the configured Whisper model."""
    import dataclasses

    from .errors import ServiceError
    from .model_loader import ModelLoader
    from .speech_service import SpeechService

    settings = _settings()
    loader = ModelLoader(budgets={}, max_models=settings.max_models_in_memory)
    service = SpeechService(settings, loader)
    try:
        options = service.validate_options(language, task, None)
        with _progress_bar("transcribing", "s") as bar:
            result = service.transcribe_file(audio, options, on_progress=bar)
    except ServiceError as exc:
        raise click.ClickException(f"{exc.error}: {exc.description}") from None
    if as_json:
        body = dataclasses.asdict(result.transcript) | {"timings": result.timings}
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        click.echo(result.transcript.text)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the configured models and whether each is available offline.

    Exits 1 when a model the default flow needs (Whisper, the automatic-choice models) is not.
    """
    from .image_service import register_image_models, required_models
    from .model_loader import ModelLoader
    from .speech_service import SpeechService

    settings = _settings()
    loader = ModelLoader(budgets={}, max_models=settings.max_models_in_memory)
    SpeechService(settings, loader)
    register_image_models(loader, settings)
    required = set(required_models(settings))
    rows = [
        loader.factory(name).describe() | {"name": name, "required": name in required}
        for name in loader.names()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = "available" if row["available"] else "NOT AVAILABLE"
            offline = " (offline)" if row.get("offline") else ""
            need = "*" if row["required"] else " "
            detail = row.get("problem") or row.get("source")
            family = f" [{row['family']}]" if row.get("family") else ""
            click.echo(f"{need} {row['name']:<26} {state}{offline}{family}  {detail}")
        click.echo("* needed by the default flow")
    if not all(row["available"] for row in rows if row["required"]):
        sys.exit(1)


@main.command("build-tiny-model")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--family",
    type=click.Choice(["sd", "sdxl", "flux"]),
    default="sd",
    show_default=True,
    help="sd: Stable Diffusion 1.x; sdxl: two text encoders; flux: FLUX.1 (CLIP + T5).",
)
@click.option(
    "--full-size",
    is_flag=True,
    help="The full SD 1.5 architecture (2 GB in float16), for load and GPU measurements.",
)
@click.option(
    "--lora",
    "lora_name",
    default=None,
    metavar="NAME",
    help="Also write a random LoRA for it as FOLDER-loras/NAME.safetensors.",
)
def build_tiny_model(
    folder: Path, seed: int, family: str, full_size: bool, lora_name: str | None
) -> None:
    """Build a random-weight image pipeline (it draws noise) into FOLDER."""
    from .devtools.tiny_models import build_random_pipeline, build_tiny_lora, build_tiny_model

    if full_size and family != "sd":
        raise click.UsageError("--full-size builds SD 1.5 only (--family sd)")
    if full_size:
        path = build_random_pipeline(folder, seed=seed, architecture="sd15", half=True)
    else:
        path = build_tiny_model(folder, family, seed=seed)
    click.echo(f"built {path}")
    spec = json.dumps({"tiny": {"source": str(path.resolve())}})
    click.echo(f"use it: S2I_IMAGE_MODELS='{spec}'")
    if lora_name:
        loras = path.parent / f"{path.name}-loras"
        lora = build_tiny_lora(loras / f"{lora_name}.safetensors", family, seed=seed + 1)
        click.echo(f"built {lora}")
        click.echo(f"use it: S2I_LORA_DIR='{loras.resolve()}'")


@main.command()
@click.argument("prompt")
@click.option("--model", default="auto", show_default=True)
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--num-images", type=int, default=1, show_default=True)
def generate(
    prompt: str,
    model: str,
    width: int | None,
    height: int | None,
    steps: int | None,
    seed: int | None,
    num_images: int,
) -> None:
    """Generate images from PROMPT into the history; prints the files."""
    from .api.identity import LOCAL_OWNER
    from .app import create_app
    from .errors import ServiceError

    app = create_app(_settings(), role="cli")
    service, runner = app.extensions["images"], app.extensions["jobs"]
    payload = {"prompt": prompt, "model": model, "num_images": num_images}
    for key, value in (("width", width), ("height", height), ("steps", steps), ("seed", seed)):
        if value is not None:
            payload[key] = value
    try:
        item = service.prepare(service.validate(payload))
        job = runner.submit(app.extensions["job_kinds"].new("generate", LOCAL_OWNER, item))
        with _progress_bar("generating", "step") as bar:
            for snapshot in runner.watch(job, timeout=1.0):
                if snapshot and snapshot["progress"]["total"]:
                    bar(snapshot["progress"]["step"], snapshot["progress"]["total"])
    except ServiceError as exc:
        raise click.ClickException(f"{exc.error}: {exc.description}") from None
    if job.exception is not None:
        error = job.exception
        raise click.ClickException(f"{getattr(error, 'error', 'error')}: {error}") from None
    result = job.result or {}
    click.echo(f"model: {result['model']} ({result['model_choice']['reason']})")
    for image in result["images"]:
        click.echo(
            f"{app.extensions['storage'].images.location(image['filename'])}  seed={image['seed']}"
        )


@main.command()
def cleanup() -> None:
    """Remove images past retention now (rows and files together)."""
    from .app import create_app

    report = create_app(_settings(), role="cli").extensions["maintenance"].run()
    click.echo(json.dumps(report, indent=2))


def _history_engine() -> Any:
    from .storage import make_engine
    from .storage.layout import history_location

    settings = _settings()
    if not settings.database_url:  # the default SQLite file lives in the data folder
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    # An older release's history in the image folder is moved first, as `serve` would.
    return make_engine(history_location(settings.resolved_database_url(), settings.image_dir))


@main.group()
def db() -> None:
    """The history database's schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Migrate to this revision.")
def db_upgrade(revision: str) -> None:
    """Apply the migrations the database lacks (create_app does this at start-up too)."""
    from .storage import migrate

    engine = _history_engine()
    try:
        before, after = migrate.upgrade(engine, revision)
    finally:
        engine.dispose()
    click.echo(f"history database: {before or 'empty'} -> {after}")


@db.command("current")
def db_current() -> None:
    """Print the database's revision and the newest one this version knows."""
    from .storage import migrate

    engine = _history_engine()
    try:
        with engine.connect() as connection:
            current = migrate.current_revision(connection)
    finally:
        engine.dispose()
    click.echo(f"current: {current or 'none'}\nhead: {migrate.head_revision()}")


@main.group()
def keys() -> None:
    """API keys kept in the database: create, list, rename, revoke."""


def _key_store() -> Any:
    from .storage import migrate
    from .storage.accounts import KeyStore

    engine = _history_engine()
    migrate.upgrade(engine)
    return KeyStore(engine)


@keys.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["transcribe", "generate", "edit", "admin"]),
    help="Repeat for several; default: transcribe, generate, edit.",
)
@click.option("--model", "models", multiple=True, help="Allowed model (repeat); default: all.")
def keys_create(name: str, scopes: tuple[str, ...], models: tuple[str, ...]) -> None:
    """Make a key and print its secret (shown this once)."""
    from .storage.accounts import DuplicateKeyName

    try:
        record, secret = _key_store().create(
            name, list(scopes or ("transcribe", "generate", "edit")), models=list(models) or None
        )
    except DuplicateKeyName:
        raise click.ClickException(f"a key named {name!r} exists") from None
    click.echo(f"id: {record.id}\nname: {record.name}\nscopes: {','.join(record.scopes)}")
    click.echo(f"secret: {secret}")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(as_json: bool) -> None:
    """Every key: prefix, name, scopes, last use, revoked."""
    records = [r.as_dict() for r in _key_store().list()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for r in records:
        state = "revoked" if r["revoked_at"] else "active"
        click.echo(
            f"{r['prefix']}  {r['name']}  {','.join(r['scopes'])}  {state}  "
            f"last used: {r['last_used_at'] or 'never'}"
        )


def _one_key(store: Any, ref: str) -> Any:
    record = store.get(ref)
    if record is None:
        raise click.ClickException(f"no key {ref!r} (give its id, name or prefix)")
    return record


@keys.command("rename")
@click.argument("key")
@click.argument("new_name")
def keys_rename(key: str, new_name: str) -> None:
    """Rename a key (by id, name or prefix)."""
    from .storage.accounts import DuplicateKeyName

    store = _key_store()
    try:
        store.change(_one_key(store, key).id, name=new_name)
    except DuplicateKeyName:
        raise click.ClickException(f"a key named {new_name!r} exists") from None
    click.echo(f"renamed to {new_name}")


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke a key (by id, name or prefix): refused from its next request on."""
    store = _key_store()
    record = store.revoke(_one_key(store, key).id)
    click.echo(f"revoked {record.prefix} ({record.name})")
