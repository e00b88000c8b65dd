"""A real S3 server for the tests: the object store of `speech2image cluster` (SeaweedFS).

`start_seaweedfs(folder)` starts it through `LocalCluster.start_object_store`, the code the
cluster command runs (every port chosen, ready once a bucket takes and gives back an object),
and `S3Server.stop()` ends it. tests/conftest.py wraps it in the session-scoped `s3_server`
fixture; any test module may reuse it (buckets per test).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from speech2image.devtools.cluster import S3_KEY, S3_SECRET, ClusterError, LocalCluster
from speech2image.devtools.scratch import weed_binary

__all__ = ["S3Server", "start_seaweedfs", "weed_binary"]

REGION = "us-east-1"


@dataclasses.dataclass
class S3Server:
    """A running SeaweedFS with its S3 endpoint and keys (any key pair is accepted)."""

    endpoint_url: str
    stack: LocalCluster
    access_key: str = S3_KEY
    secret_key: str = S3_SECRET
    region: str = REGION

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
        """Stop the server."""
        self.stack.stop()


def start_seaweedfs(folder: Path, timeout: float = 90.0) -> S3Server:
    """Start SeaweedFS with S3 storing under ``folder``; raise RuntimeError if it fails."""
    stack = LocalCluster(folder, log=lambda line: None)
    try:
        stack.start_object_store(wait=False)
        stack.wait_object_store(timeout)
    except ClusterError as exc:
        stack.stop()
        raise RuntimeError(str(exc)) from None
    return S3Server(stack.settings["S2I_S3_ENDPOINT_URL"], stack)
