"""Image stores: the local folder (embedded default) or an S3-compatible object store."""

from __future__ import annotations

from typing import Any

from .base import ImageStore, StoredObject
from .local import LocalImageStore

__all__ = ["ImageStore", "LocalImageStore", "StoredObject", "make_image_store"]


def make_image_store(settings: Any) -> ImageStore:
    """The store that S2I_IMAGE_STORE names, configured from the settings."""
    if settings.image_store == "s3":
        from .s3 import S3ImageStore  # boto3 is imported only when it is used

        return S3ImageStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region or None,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
            create_bucket=settings.s3_create_bucket,
        )
    return LocalImageStore(settings.image_dir)
