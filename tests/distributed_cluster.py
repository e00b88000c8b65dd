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
        # Each process its own folders: what crosses processes goes through Redis and S3.
        own = self.root / f"process-{uuid.uuid4().hex[:8]}"
        env.update(
            S2I_IMAGE_DIR=str(own / "images"),
            S2I_DATA_DIR=str(own / "data"),
            S2I_UPLOAD_DIR=str(own / "uploads"),
        )
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
        """Start a worker again with the settings it had (after the old process ended)."""
        self.workers[name].wait(timeout=60)
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


class TcpProxy:
    """A TCP forwarder on a fixed loopback port that can be cut and restored (a network fault)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        """Accept and forward connections."""
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the blocked accept() (Linux)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for sock in self._conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._conns.clear()


class RedisServer:
    """A private redis-server on a fixed port that a test can stop and start again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Its URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers."""
        import redis

        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        """Kill it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
