"""A real distributed cluster for tests: the roles `speech2image cluster` starts, as it starts them.

`Cluster` is `LocalCluster` (speech2image/devtools/cluster.py) on the machine's Redis (a
dedicated DB number and a random key prefix) and PostgreSQL (a throwaway schema); the fixture
skips when either does not answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from speech2image.devtools import scratch
from speech2image.devtools.cluster import LocalCluster, Process
from speech2image.devtools.scratch import ScratchSchema, drop_keys, free_port, http

__all__ = [
    "POSTGRES_URL",
    "REDIS_URL",
    "Cluster",
    "RedisServer",
    "TcpProxy",
    "free_port",
    "http",
    "multipart",
    "postgres_problem",
    "redis_problem",
]

REDIS_URL = os.environ.get("S2I_TEST_BROKER_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get(
    "S2I_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def redis_problem() -> str | None:
    """Why the tests' Redis cannot be used, or None."""
    problem = scratch.redis_problem(REDIS_URL)
    return None if problem is None else f"no Redis answers at {REDIS_URL} ({problem})"


def postgres_problem() -> str | None:
    """Why the tests' PostgreSQL cannot be used, or None."""
    problem = scratch.database_problem(POSTGRES_URL)
    return None if problem is None else f"no PostgreSQL at {POSTGRES_URL} ({problem})"


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


class Cluster(LocalCluster):
    """API processes and workers sharing one Redis key prefix and one PostgreSQL schema.

    Each process gets folders of its own: what crosses processes goes through Redis, PostgreSQL
    and the object store, never a shared disk.
    """

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.prefix = f"s2itest{uuid.uuid4().hex[:8]}"
        self.schema = ScratchSchema(POSTGRES_URL, "s2i_dist_")
        self.database_url = self.schema.url
        env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
        env.update(
            S2I_BROKER_URL=REDIS_URL,  # unless ``settings`` name another (a private Redis)
            S2I_QUEUE_PREFIX=self.prefix,
            S2I_DATABASE_URL=self.database_url,
            S2I_LOG_DIR=str(root / "logs"),
        )
        env.update({k: str(v) for k, v in settings.items()})
        super().__init__(root, env, log=lambda line: None)

    def env(self, **extra: Any) -> dict[str, str]:
        """A process's environment: the cluster's settings, folders of its own, ``extra``."""
        own = self.root / f"process-{uuid.uuid4().hex[:8]}"
        folders = {
            "S2I_IMAGE_DIR": own / "images",
            "S2I_DATA_DIR": own / "data",
            "S2I_UPLOAD_DIR": own / "uploads",
        }
        return super().env(**{**folders, **extra})

    def create_schema(self) -> None:
        """The throwaway PostgreSQL schema."""
        self.schema.create()

    def start_api(self, port: int = 0, host: str = "127.0.0.1", **extra: Any) -> Process:
        """Start a `speech2image serve` process with 16 threads."""
        return super().start_api(port, host, **{"S2I_THREADS": 16, **extra})

    def worker_names(self, url: str) -> dict[int, str]:
        """Live workers by pid, as the API at ``url`` lists them."""
        _, _, body = http("GET", f"{url}/status")
        return {w["pid"]: w["name"] for w in body["jobs"]["workers"]}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to worker ``name``."""
        self.worker(name).popen.send_signal(sig)

    def stop(self, timeout: float = 20, service_timeout: float = 5) -> None:
        """Stop every process; drop the Redis keys and the schema."""
        try:
            super().stop(timeout, service_timeout)
        finally:
            drop_keys(REDIS_URL, self.prefix)
            self.schema.drop()


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
    """A private redis-server on a fixed port that a test can stop, start, pause and resume.

    With ``persistent`` it writes an append-only file (fsync on every write) into ``root``
    and reads it back when started again; without, it starts empty every time.
    """

    def __init__(self, root: Path, *, persistent: bool = False) -> None:
        self.root = root
        self.persistent = persistent
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
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
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
        """Kill it (SIGKILL: no chance to save anything)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server dies too
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let it run again (SIGCONT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
