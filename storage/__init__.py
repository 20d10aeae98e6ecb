"""Blob storage for outputs: S3-compatible or local disk, chosen by settings (DESIGN.md §7).

    build_store(settings) -> BlobStore   (S3BlobStore | LocalBlobStore)
    store_output(store, http, ref, ...) -> StoredAsset
"""

from __future__ import annotations

from core.settings import Settings
from storage.base import BlobStore, StorageError, StoredAsset, validate_key
from storage.ingest import store_output
from storage.local import LocalBlobStore
from storage.probe import (
    Probe,
    ProbeError,
    content_type_for_extension,
    extension_for,
    probe_file,
    sniff_content_type,
)
from storage.s3 import S3BlobStore

__all__ = [
    "BlobStore",
    "LocalBlobStore",
    "Probe",
    "ProbeError",
    "S3BlobStore",
    "StorageError",
    "StoredAsset",
    "build_store",
    "content_type_for_extension",
    "extension_for",
    "probe_file",
    "sniff_content_type",
    "store_output",
    "validate_key",
]


def build_store(settings: Settings) -> BlobStore:
    """The store `settings.storage` names. Nothing connects until `start()`."""
    if settings.storage == "s3":
        return S3BlobStore(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            create_bucket=settings.s3_create_bucket,
            multipart_threshold_bytes=settings.s3_multipart_threshold_bytes,
            read_timeout=settings.http_timeout_seconds,
        )
    return LocalBlobStore(
        settings.resolved_storage_dir(), settings.public_url, settings.secret_key
    )
