"""S3-compatible blob store (AWS S3, SeaweedFS, MinIO, R2...).

boto3 is synchronous, so every call runs in a worker thread. Clients are built on first
use (normally by `start()`), never at import. Presigned URLs are signed by a second client
on `public_endpoint_url` when that is set: a SigV4 signature covers the host, so a URL
signed for an internal endpoint (`http://seaweedfs:8333`) cannot be rewritten afterwards
to the host clients reach.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from storage.base import StorageError, validate_key

T = TypeVar("T")

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest allowed multipart part (but the last)
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week


def _away(exc: BaseException) -> bool:
    """The S3 endpoint did not answer or answered 5xx / SlowDown: it is away, not refusing."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return int(status) >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    return isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
                            S3UploadFailedError, OSError))


class S3BlobStore:
    """Blobs in one S3 bucket; downloads through presigned GET URLs."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        multipart_threshold_bytes: int = 8 * 1024 * 1024,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        upload_concurrency: int = 4,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url
        self.region = region
        self.create_bucket = create_bucket
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._config = Config(
            region_name=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            max_pool_connections=max(10, upload_concurrency * 2),
        )
        # Memory held by an upload is about max_concurrency * multipart_chunksize,
        # whatever the file's size.
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=max(MIN_PART_BYTES, multipart_threshold_bytes),
            max_concurrency=upload_concurrency,
        )
        self._lock = threading.Lock()
        self._client: Any = None
        self._presigner: Any = None

    # -- clients ---------------------------------------------------------------------

    def _clients(self) -> tuple[Any, Any]:
        """Build the clients once; called from worker threads, hence the lock."""
        with self._lock:
            if self._client is None:
                # A session per store: boto3's default session is not thread-safe.
                session = boto3.session.Session(
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    region_name=self.region,
                )
                client = session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
                presigner = client
                if self.public_endpoint_url and self.public_endpoint_url != self.endpoint_url:
                    presigner = session.client(
                        "s3", endpoint_url=self.public_endpoint_url, config=self._config
                    )
                self._client, self._presigner = client, presigner
            return self._client, self._presigner

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run a boto3 call in a thread; the one place boto errors become StorageError."""
        try:
            return await asyncio.to_thread(fn)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise StorageError(f"S3 {what} failed (bucket {self.bucket!r}): {exc}", unavailable=_away(exc)) from exc

    # -- BlobStore -------------------------------------------------------------------

    async def start(self) -> None:
        def start() -> None:
            client, _ = self._clients()
            if self.create_bucket:
                self._ensure_bucket(client)

        await self._run("start", start)

    def _ensure_bucket(self, client: Any) -> None:
        params: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # AWS rejects a LocationConstraint of us-east-1
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            client.create_bucket(**params)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":
                # Some servers say this for our own bucket; it is fine if we can use it.
                client.head_bucket(Bucket=self.bucket)
                return
            raise

    async def check(self) -> None:
        await self._run("head_bucket", lambda: self._clients()[0].head_bucket(Bucket=self.bucket))

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        validate_key(key)

        def upload() -> None:
            self._clients()[0].upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": content_type},
                Config=self._transfer,
            )

        await self._run("upload", upload)

    async def url(self, key: str, *, expires_in: int) -> str:
        validate_key(key)
        if not 0 < expires_in <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_in must be within 1..{MAX_PRESIGN_SECONDS} seconds")

        def presign() -> str:
            url: str = self._clients()[1].generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=expires_in,
            )
            return url

        return await self._run("presign", presign)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._run(
            "delete", lambda: self._clients()[0].delete_object(Bucket=self.bucket, Key=key)
        )

    async def close(self) -> None:
        with self._lock:
            clients = {id(c): c for c in (self._client, self._presigner) if c is not None}
            self._client = self._presigner = None
        for client in clients.values():
            client.close()
