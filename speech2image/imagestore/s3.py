"""The S3 image store: AWS S3, MinIO, SeaweedFS, R2 ... through boto3.

Objects are ``<prefix><name>`` in one bucket. A PUT is atomic in S3 (readers see the old
object, the new one, or none), so the same job's images written twice are simply replaced.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import StorageUnavailable
from .base import StoredObject

log = logging.getLogger(__name__)

__all__ = ["S3ImageStore"]

_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


@contextlib.contextmanager
def _answering(what: str) -> Iterator[None]:
    """Turn "the object store does not answer" into a 503 ``storage_unavailable``."""
    try:
        yield
    except ClientError as exc:
        if _missing(exc) or not _server_side(exc):
            raise
        log.warning("object store: %s failed: %s", what, exc)
        raise StorageUnavailable(
            "the image store is not answering; retry shortly", retry_after=5
        ) from None
    except BotoCoreError as exc:  # no connection, a timeout, a broken answer
        log.warning("object store: %s failed: %s", what, exc)
        raise StorageUnavailable(
            "the image store is not answering; retry shortly", retry_after=5
        ) from None


def _server_side(exc: ClientError) -> bool:
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status >= 500 or status == 0


class S3ImageStore:
    """Images as objects of one S3 bucket, under a key prefix."""

    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                # Path-style URLs work with every S3-compatible server, not only AWS.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                # A store that does not answer fails a call within seconds (503), never
                # holds a request thread; jobs retry storage themselves (S2I_STORAGE_RETRY...).
                connect_timeout=3,
                read_timeout=15,
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )
        if create_bucket:
            self._ensure_bucket()

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if not _missing(exc):
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, name: str, data: bytes) -> None:
        """Upload ``data`` as one object (atomic in S3)."""
        with _answering("put"):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data, ContentType="image/png"
            )

    def delete(self, name: str) -> bool:
        """Delete the object (S3 does not say whether it existed: check first)."""
        existed = self.exists(name)
        with _answering("delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        return existed

    def exists(self, name: str) -> bool:
        """HEAD the object."""
        try:
            with _answering("head"):
                self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def source(self, name: str) -> io.BytesIO | None:
        """The object's bytes (images are small: read them whole), or None."""
        try:
            with _answering("get"):
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
                with response["Body"] as body:
                    return io.BytesIO(body.read())
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def presigned_url(self, name: str, expires_seconds: int) -> str:
        """A presigned GET URL valid for ``expires_seconds``."""
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(name)},
            ExpiresIn=expires_seconds,
        )

    def objects(self) -> Iterator[StoredObject]:
        """Every object under the prefix."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                modified = item["LastModified"]
                if modified.tzinfo is None:
                    modified = modified.replace(tzinfo=dt.UTC)
                name = item["Key"][len(self.prefix) :]
                if name and "/" not in name:
                    yield StoredObject(name, int(item["Size"]), modified.astimezone(dt.UTC))

    def location(self, name: str) -> str:
        """The object's s3:// URL."""
        return f"s3://{self.bucket}/{self._key(name)}"

    def check(self) -> None:
        """The bucket must answer."""
        self.client.head_bucket(Bucket=self.bucket)
