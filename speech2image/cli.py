"""The `speech2image` command: serve, transcribe, models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .config import Settings, SettingsError, load_settings

__all__ = ["gunicorn_options", "main"]


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """Production gunicorn settings: one worker process, many threads (see gunicorn.conf.py)."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": 1,  # more processes would each load every model
        "worker_class": "gthread",
        "threads": settings.threads,
        "timeout": 600,  # long transcriptions and generations are normal
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": None,  # the app logs one line per request, with its request id
        "errorlog": "-",
    }


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


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
        create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
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
        result = service.transcribe_file(audio, options)
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
    """List the configured models and whether each is available offline."""
    from .model_loader import ModelLoader
    from .speech_service import SpeechService

    settings = _settings()
    loader = ModelLoader(budgets={}, max_models=settings.max_models_in_memory)
    SpeechService(settings, loader)
    rows = [loader.factory(name).describe() | {"name": name} for name in loader.names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "available" if row["available"] else "NOT AVAILABLE"
        offline = " (offline)" if row.get("offline") else ""
        click.echo(f"{row['name']:<28} {state}{offline}  {row.get('source') or row.get('problem')}")
    if not all(row["available"] for row in rows):
        sys.exit(1)
