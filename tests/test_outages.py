"""Dependencies that go away: a database that hangs or refuses, a Redis that dies."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url


class FaultyProxy:
    """A TCP proxy in front of a server that can start to hang (accept, never answer), stall
    (stop relaying, every connection kept open) or refuse."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(client)  # kept open, answered or not
            if self.mode == "forward":
                upstream = socket.create_connection(self.target)
                self._open.append(upstream)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            # "hang": the connection is accepted and then nothing is ever sent back

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.mode == "stall":
                    return  # swallowed: both sides stay connected and hear nothing more
                sink.sendall(data)

    def stall(self) -> None:
        """Stop relaying mid-connection: sockets stay open (the kernel still acknowledges
        every packet), nothing more gets through; new connections are never answered."""
        self.mode = "stall"

    def hang(self) -> None:
        """Cut every open connection; new ones are accepted and never answered."""
        self.mode = "hang"
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._open.clear()

    def refuse(self) -> None:
        """Close the port: connections are refused."""
        self.hang()
        self._listener.close()


@pytest.fixture
def postgres_behind_proxy(postgres_url: str) -> Iterator[tuple[str, FaultyProxy]]:
    """A throwaway schema's URL that goes through a proxy the test can make hang or refuse."""
    target = make_url(postgres_url)
    proxy = FaultyProxy((target.host or "127.0.0.1", target.port or 5432))
    try:
        yield target.set(host="127.0.0.1", port=proxy.port).render_as_string(False), proxy
    finally:
        proxy.refuse()


@pytest.mark.postgres
@pytest.mark.parametrize("fault", ["hang", "refuse"])
def test_database_that_does_not_answer_gives_503_within_the_timeout(
    make_app, postgres_behind_proxy, fault
) -> None:
    url, proxy = postgres_behind_proxy
    app = make_app(database_url=url, database_connect_timeout_seconds=2)
    client = app.test_client()
    assert client.get("/images").status_code == 200
    assert client.get("/ready").status_code == 200
    getattr(proxy, fault)()

    began = time.monotonic()
    response = client.get("/images")
    elapsed = time.monotonic() - began
    assert response.status_code == 503
    assert response.json["error"]["code"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert elapsed < 10, f"took {elapsed:.1f}s"  # the 2 s connect timeout, not a hang
    submitted = client.post("/generate-image", json={"prompt": "a lighthouse", "steps": 1})
    assert submitted.status_code == 503, submitted.json
    assert client.get("/health").status_code == 200
    not_ready = client.get("/ready")
    assert not_ready.status_code == 503
    assert not_ready.json["down"] == ["database"]
    assert not_ready.json["checks"]["database"]["problem"]


@pytest.mark.postgres
def test_a_database_that_stops_answering_mid_connection_gives_503_within_the_bound(
    make_app, postgres_behind_proxy
) -> None:
    # Issue 18.2: a pooled connection whose server or path went silent held its request with
    # no bound (115 s seen): the statement timeout is the server's, and TCP keepalives and the
    # TCP user timeout cannot see a peer whose kernel still acknowledges every packet.
    url, proxy = postgres_behind_proxy
    app = make_app(
        database_url=url,
        database_connect_timeout_seconds=1,
        database_statement_timeout_seconds=2,  # + 1: no answer for 3 s drops the connection
    )
    client = app.test_client()
    assert client.get("/images").status_code == 200  # a pooled connection, idle now
    proxy.stall()
    answers: list = []

    def request() -> None:
        began = time.monotonic()
        answers.append((client.get("/images"), time.monotonic() - began))

    worker = threading.Thread(target=request, daemon=True)
    worker.start()
    worker.join(60)  # the request's thread is freed, with an answer
    assert not worker.is_alive(), "the request still hangs after 60 s"
    response, elapsed = answers[0]
    assert response.status_code == 503, response.json
    assert response.json["error"]["code"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    print(f"answered 503 after {elapsed:.1f} s (bound: 3 s, then a 1 s reconnect)")
    assert elapsed < 20, f"took {elapsed:.1f}s"
    assert client.get("/health").status_code == 200
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json["down"] == ["database"]


def test_a_locked_sqlite_history_gives_503_within_its_busy_timeout(make_app) -> None:
    # SQLite's busy timeout bounds a write that another connection blocks: 503, never a hang,
    # and nothing is lost; the same request works once the lock is gone.
    import sqlite3

    from .test_images import generate

    app = make_app(database_statement_timeout_seconds=1)
    client = app.test_client()
    image = generate(client, prompt="a lighthouse", steps=1).json["images"][0]
    path = app.extensions["storage"].engine.url.database
    blocker = sqlite3.connect(path, timeout=0)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # a writer that never finishes
        began = time.monotonic()
        refused = client.delete(f"/images/{image['id']}")
        assert time.monotonic() - began < 20
        assert refused.status_code == 503, refused.json
        assert refused.json["error"]["code"] == "database_unavailable"
        assert client.get("/images").json["total"] == 1  # reads go on meanwhile
    finally:
        blocker.rollback()
        blocker.close()
    assert client.delete(f"/images/{image['id']}").status_code == 204
    assert client.get("/images").json["total"] == 0


def test_ready_names_an_image_folder_that_cannot_be_written(make_app, tmp_path) -> None:
    app = make_app()
    client = app.test_client()
    body = client.get("/ready").json
    assert body["ready"] and body["down"] == [] and body["checks"]["image_dir"]["ok"]
    image_dir = app.extensions["storage"].image_dir
    try:
        image_dir.chmod(0o500)
        if os.access(image_dir, os.W_OK):  # root writes anywhere: fill the disk check instead
            refused = make_app(ready_min_free_bytes=shutil.disk_usage(tmp_path).total)
            response = refused.test_client().get("/ready")
        else:
            response = client.get("/ready")
    finally:
        image_dir.chmod(0o700)
    assert response.status_code == 503
    assert response.json["down"] == ["image_dir"]
    assert response.json["checks"]["image_dir"]["problem"]


# --- the rate-limit storage -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that the test can kill and restart."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: run `bash scripts/install-system-deps.sh`"
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        options += ["--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen([binary, *options], stdout=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def keys(self) -> list[bytes]:
        import redis

        return redis.Redis(port=self.port, socket_timeout=1).keys("*")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_rate_limits_survive_a_dead_redis_and_go_back_to_it(make_app, private_redis) -> None:
    app = make_app(
        ratelimit_storage_uri=f"redis://127.0.0.1:{private_redis.port}/0",
        ratelimit_default="1000/minute",
    )
    client = app.test_client()
    assert client.get("/images").status_code == 200
    assert private_redis.keys(), "counting happens in Redis"
    assert client.get("/ready").json["degraded"] == []

    private_redis.kill()
    for path in ("/images", "/status", "/images", "/jobs"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.json)
        assert "X-RateLimit-Remaining" in response.headers  # still counted, in memory
    app_log = app.config["S2I_SETTINGS"].log_dir / "app.log"
    assert "falling back to in-memory storage" in app_log.read_text()
    ready = client.get("/ready")
    assert ready.status_code == 200  # served meanwhile: degraded, not down
    assert ready.json["degraded"] == ["ratelimit_storage"]

    private_redis.start()  # empty: no counters yet
    deadline = time.monotonic() + 40  # Flask-Limiter re-checks the storage with back-off
    while not private_redis.keys():
        assert time.monotonic() < deadline, "never went back to Redis"
        assert client.get("/images").status_code == 200
        time.sleep(0.5)
    assert client.get("/ready").json["degraded"] == []
    assert "Rate limit storage recovered" in app_log.read_text()
