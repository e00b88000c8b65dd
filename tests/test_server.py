"""The production server command (`speech2image serve`: gunicorn, one worker, threads).

Liveness under load through the probe listener (S2I_HEALTH_PORT), and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`speech2image serve` in a subprocess, on free ports."""

    def __init__(self, root: Path, tiny: Path, **extra: str) -> None:
        self.port, self.health_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
        env.update(
            PORT=str(self.port),
            S2I_HEALTH_PORT=str(self.health_port),
            S2I_LOG_DIR=str(root / "logs"),
            S2I_UPLOAD_DIR=str(root / "uploads"),
            S2I_IMAGE_DIR=str(root / "images"),
            S2I_DATA_DIR=str(root / "data"),
            S2I_IMAGE_MODELS=json.dumps({"tiny": {"source": str(tiny)}}),
            S2I_STYLE_MODELS=json.dumps({"artistic": "tiny", "photographic": "tiny"}),
            S2I_DEFAULT_WIDTH="64",
            S2I_DEFAULT_HEIGHT="64",
            S2I_RATELIMIT_DEFAULT="100000/minute",
            S2I_RATELIMIT_GENERATE="100000/minute",
            S2I_QUEUE_MAX_PER_OWNER="64",
            S2I_MODEL_IDLE_SECONDS="0",
            S2I_CLEANUP_INTERVAL_SECONDS="0",
            S2I_PRELOAD_MODELS="sd:tiny",
        )
        env.update(extra)
        self.log = (root / "server.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "speech2image", "serve"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if self.get("/health", port=self.health_port, timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not start:\n" + self.output())

    def get(self, path: str, *, port: int | None = None, timeout: float = 10) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def generate(self, timeout: float = 120, **fields: Any) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            body = json.dumps({"prompt": "a lighthouse", **fields})
            connection.request(
                "POST", "/generate-image", body, {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # gunicorn: stop now, worker included
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(20)
        self.log.close()


@pytest.fixture
def server(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Any]:
    started: list[Server] = []

    def start(**extra: str) -> Server:
        running = Server(tmp_path, tiny_models["tiny-art"], **extra)
        started.append(running)
        running.wait_ready()
        return running

    yield start
    for running in started:
        running.stop()


def _probe_latencies(server: Server, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        status, body = server.get("/health", port=server.health_port, timeout=5)
        latencies.append(time.perf_counter() - began)
        assert status == 200 and body["status"] == "ok"
        time.sleep(0.02)
    return sorted(latencies)


def _p99(latencies: list[float]) -> float:
    return latencies[max(0, round(len(latencies) * 0.99) - 1)]


def _hold_every_thread(port: int, stop: Any, served: Any, failed: Any) -> None:
    """16 synchronous clients and 8 slow ones (headers a byte a second), in a process of its own
    so that the measuring thread does not share a GIL with them."""

    def synchronous_client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = json.dumps({"prompt": "a lighthouse", "steps": 12})
        while not stop.is_set():
            try:
                connection.request(
                    "POST", "/generate-image", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                response.read()
                counter = served if response.status == 200 else failed
            except OSError:
                counter = failed
                connection.close()
            with counter.get_lock():
                counter.value += 1

    def slow_client() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(1.0):
                sock.sendall(b"X")  # one header byte per second, never the end

    threads = [threading.Thread(target=synchronous_client) for _ in range(16)]
    threads += [threading.Thread(target=slow_client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.slow
def test_health_answers_fast_while_every_request_thread_is_held(server) -> None:
    # Every request thread is held whatever the jobs cost; one job thread with one torch
    # thread keeps the tiny CPU model from taking both cores of a small test machine.
    # (S2I_EVENT_STREAMS threads are request threads too while no stream holds them: keep one.)
    running = server(
        S2I_THREADS="8", S2I_EVENT_STREAMS="1", S2I_JOB_WORKERS="1", OMP_NUM_THREADS="1"
    )
    assert running.generate(steps=2)[0] == 200  # the model is resident
    context = multiprocessing.get_context("spawn")
    stop, served, failed = context.Event(), context.Value("i", 0), context.Value("i", 0)
    load = context.Process(target=_hold_every_thread, args=(running.port, stop, served, failed))
    load.start()
    try:
        time.sleep(3.0)  # every request thread is held by now
        held = _probe_latencies(running, 250)
        # The main port is saturated meanwhile: its /health waits for a request thread.
        with pytest.raises(OSError):
            running.get("/health", timeout=0.5)
    finally:
        stop.set()
        load.join(120)
    print(
        f"/health on the probe port: p50 {held[len(held) // 2] * 1000:.1f} ms, p99 "
        f"{_p99(held) * 1000:.1f} ms, max {held[-1] * 1000:.1f} ms ({len(held)} probes)"
    )
    assert _p99(held) < 0.050, f"p99 {_p99(held) * 1000:.1f} ms; slowest {held[-5:]}"
    assert served.value > 0 and failed.value == 0


def test_sigterm_lets_running_jobs_finish_and_refuses_new_work(server, tmp_path) -> None:
    running = server(S2I_THREADS="4", S2I_SHUTDOWN_GRACE_SECONDS="300", S2I_JOB_WORKERS="1")
    results: dict[str, Any] = {}

    def long_job() -> None:
        try:
            results["sync"] = running.generate(timeout=300, steps=8, seed=1)
        except Exception as exc:  # reported by the assertion below
            results["sync"] = exc

    client = threading.Thread(target=long_job)
    client.start()
    _wait_until(lambda: running.get("/status")[1]["jobs"]["running"] >= 1)
    # A second job, accepted (202) before SIGTERM, queued behind the first.
    status, queued = _post_async(running)
    assert status == 202
    # A client with a kept-alive connection opened before SIGTERM.
    kept = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    kept.request("GET", "/health")
    assert kept.getresponse().read()
    running.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # New work is refused: on the kept-alive connection with 503, on new ones by the listener.
    try:
        body = json.dumps({"prompt": "late"})
        kept.request("POST", "/generate-image", body, {"Content-Type": "application/json"})
        late = kept.getresponse()
        assert late.status == 503, late.status
        assert json.loads(late.read())["error"]["code"] == "shutting_down"
        assert late.getheader("Retry-After")
    except (ConnectionError, http.client.RemoteDisconnected):
        pass  # the connection was closed instead: also no new work
    finally:
        kept.close()
    with pytest.raises(OSError):
        running.generate(timeout=5)
    client.join(300)
    assert isinstance(results["sync"], tuple), results["sync"]
    assert results["sync"][0] == 200, results["sync"]
    assert running.process.wait(300) == 0
    # The queued job ran too before the process stopped: its image is in the history.
    log = running.output()
    assert "all jobs finished" in log, log
    assert len(list((tmp_path / "images").glob("*.png"))) == 2, log
    assert queued["id"]


def _http_get(port: int, path: str, method: str = "GET", timeout: float = 30) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def test_the_probe_port_answers_ready_as_the_main_port_does(make_app, tmp_path) -> None:
    # Issue 18.8: the README said the probe port answers /ready; it answered 404.
    from speech2image.server import ProbeServer

    app = make_app(api_keys=["k-user"])  # the probe port is private: no key there
    probes = [ProbeServer(app, "127.0.0.1", 0).start()]
    try:
        status, body = _http_get(probes[0].port, "/ready")
        main = app.test_client().get("/ready", headers={"Authorization": "Bearer k-user"})
        assert (status, body) == (200, main.json)
        assert _http_get(probes[0].port, "/ready", "HEAD") == (200, None)
        assert _http_get(probes[0].port, "/health")[0] == 200
        assert _http_get(probes[0].port, "/status")[0] == 404
        # Not ready: the same 503 naming what is down.
        full = make_app(ready_min_free_bytes=10 * 1024**5)  # more free space than any disk has
        probes.append(ProbeServer(full, "127.0.0.1", 0).start())
        status, body = _http_get(probes[1].port, "/ready")
        assert status == 503 and body["down"] == ["image_dir"]
        again = full.test_client().get("/ready").json
        # The same answer, but for the free bytes it quotes (other tests write meanwhile).
        for answer in (body, again):
            answer["checks"]["image_dir"]["problem"] = re.sub(
                r"^\d+ bytes", "N bytes", answer["checks"]["image_dir"]["problem"]
            )
        assert body == again
    finally:
        for probe in probes:
            probe.close()


def _open_stream(port: int, path: str) -> tuple[socket.socket, bytes]:
    """Start reading an event stream: the socket (kept open) and the answer's head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_event_streams_do_not_take_the_request_threads(server) -> None:
    # Issue 18.6: each stream held one of S2I_THREADS, so streams were capped at half of them
    # (4 by default). They now wait in S2I_EVENT_STREAMS threads of their own.
    running = server(
        S2I_THREADS="2",
        S2I_EVENT_STREAMS="6",
        S2I_EVENT_STREAMS_PER_KEY="10",
        S2I_JOB_WORKERS="1",
        S2I_MAX_STEPS="500",
    )
    status, job = _post_async(running, steps=500)  # runs while the streams watch it
    assert status == 202, job
    streams = [_open_stream(running.port, job["events"]) for _ in range(6)]
    try:
        assert all(head.startswith(b"HTTP/1.1 200") for _, head in streams), streams[0][1]
        assert b"text/event-stream" in streams[0][1]
        # Both request threads are still free: requests are answered at once.
        assert running.get("/images", timeout=10)[0] == 200
        assert running.get("/health", timeout=10)[0] == 200
        status, refused = _http_get(running.port, job["events"], timeout=10)  # a seventh
        assert status == 503 and refused["error"]["code"] == "service_busy", refused
    finally:
        cancel = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        cancel.request("DELETE", job["url"])
        assert cancel.getresponse().status in (200, 202)
        cancel.close()
        for sock, _ in streams:
            sock.close()


def _nginx_front(root: Path, upstream: int) -> tuple[subprocess.Popen, int]:
    """nginx with deploy/nginx.conf (the README's recommended front), on a free port."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else ""
    )
    if not binary:
        pytest.skip("nginx is missing: run `bash scripts/install-system-deps.sh`")
    port = _free_port()
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in (
        ("server 127.0.0.1:5000;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
    ):
        assert old in site, old
        site = site.replace(old, new)
    prefix = root / "nginx"
    prefix.mkdir()
    (prefix / "site.conf").write_text(site)
    temporary = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # its workers write to this test's folder
        + f"worker_processes 1;\ndaemon off;\npid {prefix / 'nginx.pid'};\n"
        + f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 256; }}\n"
        + f"http {{\n    access_log off;\n{temporary}    include {prefix / 'site.conf'};\n}}\n"
    )
    process = subprocess.Popen(
        [
            binary,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "error.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, (prefix / "error.log").read_text()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return process, port
        assert time.monotonic() < deadline, "nginx did not start"
        time.sleep(0.05)


def _slow_uploads(port: int, count: int, stop: threading.Event) -> list[threading.Thread]:
    """``count`` clients that send an upload's headers, then its body a byte every 0.3 s."""

    def upload() -> None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /transcribe-audio HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n--b"
            )
            while not stop.wait(0.3):
                sock.sendall(b"-")

    threads = [threading.Thread(target=upload, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.slow
def test_slow_uploads_hold_no_request_thread_behind_the_recommended_front(server, tmp_path):
    # Issue 18.7: eight slow uploads held every request thread of the main port. gunicorn's
    # threaded worker reads a body at the client's pace in a request thread, and has no option
    # to buffer it first; a buffering proxy does (README, Running in production).
    running = server(S2I_THREADS="4", S2I_EVENT_STREAMS="4", S2I_TRUSTED_PROXIES="1")
    assert running.generate(steps=1)[0] == 200  # the model is resident
    # Straight at gunicorn: eight slow uploads hold all 4 + 4 threads, requests wait.
    stop = threading.Event()
    uploads = _slow_uploads(running.port, 8, stop)
    time.sleep(1.5)
    with pytest.raises(OSError):
        running.get("/images", timeout=3)
    assert running.get("/health", port=running.health_port, timeout=3)[0] == 200
    stop.set()
    for thread in uploads:
        thread.join(10)
    _wait_until(lambda: _answers(running.port, "/health"), 30)

    nginx, port = _nginx_front(tmp_path, running.port)
    stop = threading.Event()
    try:
        uploads = _slow_uploads(port, 8, stop)  # the same eight, through nginx
        time.sleep(1.5)
        assert _http_get(port, "/images", timeout=10)[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request(
            "POST",
            "/generate-image",
            json.dumps({"prompt": "a lighthouse", "steps": 1}),
            {"Content-Type": "application/json"},
        )
        generated = connection.getresponse()
        assert generated.status == 200, generated.read()
        connection.close()
        assert _http_get(port, "/health", timeout=10)[0] == 200
    finally:
        stop.set()
        nginx.terminate()
        nginx.wait(20)


def _answers(port: int, path: str) -> bool:
    try:
        return _http_get(port, path, timeout=2)[0] == 200
    except OSError:
        return False


def _wait_until(condition: Any, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _post_async(server: Server, steps: int = 1) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        body = json.dumps({"prompt": "a harbour", "steps": steps, "async": True})
        connection.request("POST", "/generate-image", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_an_api_process_of_the_distributed_mode_stops_without_draining_the_cluster() -> None:
    """The Celery runner's stats count the cluster's jobs: an API process must not wait on them."""
    from speech2image.config import load_settings
    from speech2image.jobs import JobKinds, RunnerStats
    from speech2image.jobs.celery import CeleryJobRunner
    from speech2image.server import ServerState

    class ClusterBusy(CeleryJobRunner):
        def stats(self) -> RunnerStats:
            return RunnerStats(mode="distributed", queued=5, running=3)

    runner = ClusterBusy(
        load_settings(),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        JobKinds(),
        recorder=None,  # type: ignore[arg-type]
        inputs=None,  # type: ignore[arg-type]
        default_model="m",
        queues=[],
        check_upload=lambda _path: None,
    )
    state = ServerState(grace_seconds=30)
    state.begin_stop()
    started = time.monotonic()
    assert state.drain(runner) is True
    assert time.monotonic() - started < 1
    runner.shutdown()  # was an AttributeError on SIGTERM
