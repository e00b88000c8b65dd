"""A real distributed cluster for tests: `speech2image serve` API processes and workers.

Redis (a dedicated DB number and a random key prefix) and PostgreSQL (a throwaway schema) are
the machine's own services; the fixture skips when either does not answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REDIS_URL = os.environ.get("S2I_TEST_BROKER_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get(
    "S2I_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BIN = Path(sys.executable).parent / "speech2image"


def redis_problem() -> str | None:
    """Why Redis cannot be used, or None."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except redis.RedisError as exc:
        return f"no Redis answers at {REDIS_URL} ({exc})"
    return None


def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used, or None."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:
        return f"no PostgreSQL at {POSTGRES_URL} ({type(exc).__name__})"
    return None


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 120,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request: (status, headers, JSON body or raw bytes)."""
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


def multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        )
    chunks = [p.encode() for p in parts]
    for name, path in files.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        chunks.append(path.read_bytes() + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class Cluster:
    """API processes and workers sharing one Redis prefix and one PostgreSQL schema."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = root
        self.prefix = f"s2itest{uuid.uuid4().hex[:8]}"
        self.schema = f"s2i_dist_{uuid.uuid4().hex[:8]}"
        self.database_url = f"{POSTGRES_URL}?options=-csearch_path%3D{self.schema}"
        self.settings = {
            "S2I_BROKER_URL": REDIS_URL,
            "S2I_QUEUE_PREFIX": self.prefix,
            "S2I_DATABASE_URL": self.database_url,
            "S2I_IMAGE_DIR": str(root / "images"),
            "S2I_LOG_DIR": str(root / "logs"),
            **{k: str(v) for k, v in settings.items()},
        }
        self.apis: list[tuple[subprocess.Popen, str]] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_env: dict[str, dict[str, str]] = {}
        self._logs: list[Any] = []

    def _log(self, name: str) -> Any:
        log = open(self.root / name, "ab")  # noqa: SIM115 (closed by stop)
        self._logs.append(log)
        return log

    def env(self, **extra: Any) -> dict[str, str]:
        """The processes' environment: this cluster's settings, nobody's S2I_* variables."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("S2I_") and k not in ("HOST", "PORT", "DEBUG")
        }
        env.update(self.settings)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def create_schema(self) -> None:
        """The throwaway PostgreSQL schema."""
        from sqlalchemy import create_engine, text

        engine = create_engine(POSTGRES_URL)
        with engine.begin() as connection:
            connection.execute(text(f"create schema {self.schema}"))
        engine.dispose()

    def start_api(self) -> str:
        """Start a `speech2image serve` process; returns its base URL."""
        port = free_port()
        log = self._log(f"api-{port}.log")
        proc = subprocess.Popen(
            [str(BIN), "serve"],
            env=self.env(HOST="127.0.0.1", PORT=port, S2I_THREADS=16),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        self.apis.append((proc, url))
        return url

    def start_worker(self, name: str, **extra: Any) -> subprocess.Popen:
        """Start a `speech2image worker` (one torch thread) named ``name`` in the logs."""
        env = self.env(**extra)
        log = self._log(f"worker-{name}.log")
        proc = subprocess.Popen(
            [str(BIN), "worker", "--torch-threads", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers[name] = proc
        self.worker_env[name] = {k: str(v) for k, v in extra.items()}
        return proc

    def restart_worker(self, name: str) -> subprocess.Popen:
        """Start a worker again with the settings it had."""
        return self.start_worker(name, **self.worker_env[name])

    def wait_ready(self, url: str, workers: int, timeout: float = 120) -> dict[str, Any]:
        """Wait until ``url`` answers and sees ``workers`` live workers; returns /status."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                code, _, body = http("GET", f"{url}/status", timeout=5)
                if code == 200 and len(body["jobs"].get("workers", [])) >= workers:
                    return body
                status = body if isinstance(body, dict) else {}
            time.sleep(0.5)
        raise AssertionError(f"cluster not ready: {status.get('jobs')}; see {self.root}")

    def worker_names(self, url: str) -> dict[int, str]:
        """Live workers by pid."""
        _, _, body = http("GET", f"{url}/status")
        return {w["pid"]: w["name"] for w in body["jobs"]["workers"]}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a worker."""
        self.workers[name].send_signal(sig)

    def stop(self) -> None:
        """Stop every process; drop the Redis keys and the schema."""
        for proc in [p for p, _ in self.apis] + list(self.workers.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in [p for p, _ in self.apis] + list(self.workers.values()):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        import redis
        from sqlalchemy import create_engine, text

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        engine = create_engine(POSTGRES_URL)
        with engine.begin() as connection:
            connection.execute(text(f"drop schema if exists {self.schema} cascade"))
        engine.dispose()
