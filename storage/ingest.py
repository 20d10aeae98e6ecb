"""Move one provider output into the blob store.

    OutputRef (bytes | URL) -> temp file (sha256, size limit) -> sniff -> probe -> put_file

The output goes through a temporary file so memory stays flat however large it is; at
most one write buffer (WRITE_BUFFER_BYTES) is held at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

import httpx

from core import fetcher, metrics
from core.errors import ErrorCode
from core.types import OutputRef
from storage.base import BlobStore, StorageError, StoredAsset, validate_key
from storage.probe import (
    SNIFF_BYTES,
    ProbeError,
    extension_for,
    probe_file,
    sniff_content_type,
)

WRITE_BUFFER_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
# A provider answering these for its own output URL has expired or revoked the link.
_REFUSED_STATUSES = frozenset({401, 403, 404, 410})


async def store_output(
    store: BlobStore,
    http: httpx.AsyncClient,
    ref: OutputRef,
    *,
    key_base: str,
    index: int,
    max_bytes: int,
    max_image_pixels: int,
    tmp_dir: Path | None = None,
    timeout: float = 900.0,
) -> StoredAsset:
    """Download or write `ref`, check and probe it, and store it as `{key_base}/{index}.ext`.

    Images also get a WebP thumbnail at `{key_base}/{index}.thumb.webp`. The stored content
    type is the sniffed one only. URLs go through core.fetcher (address guard, byte cap,
    `timeout` for the whole download). Every failure is a StorageError; a provider URL that
    answers 401/403/404/410, or that the guard refuses, has code provider_error.
    """
    with metrics.storing():  # the job's storing time, told apart from its time at the provider
        validate_key(f"{key_base}/{index}.bin")  # fail before downloading anything
        sink: _TempSink | None = None
        try:
            sink = await asyncio.to_thread(_TempSink, max_bytes, tmp_dir)
            if ref.data is not None:
                await sink.write(ref.data)
            elif ref.path is not None:
                await _copy_from_file(Path(ref.path), sink)
            else:
                await _download(http, ref, sink, timeout)
            await sink.finish()

            # the bytes decide, never the provider's hint: a hint of text/html or SVG would make
            # a stored file active content on the download origin
            content_type = sniff_content_type(sink.head[:SNIFF_BYTES])
            key = f"{key_base}/{index}.{extension_for(content_type)}"
            try:
                probe = await asyncio.to_thread(
                    probe_file, sink.path, content_type, max_image_pixels=max_image_pixels
                )
            except ProbeError as exc:
                raise StorageError(f"output {index} refused: {exc}") from exc

            await store.put_file(key, sink.path, content_type)
            thumbnail_key = None
            if probe.thumbnail is not None:
                thumbnail_key = f"{key_base}/{index}.thumb.webp"
                await _put_bytes(store, thumbnail_key, probe.thumbnail, "image/webp", tmp_dir)
            return StoredAsset(
                key=key,
                content_type=content_type,
                bytes=sink.size,
                sha256=sink.sha256,
                width=probe.width,
                height=probe.height,
                duration_seconds=probe.duration_seconds,
                thumbnail_key=thumbnail_key,
            )
        except OSError as exc:  # the temp file: disk full, permissions
            raise StorageError(f"output {index}: cannot write a temporary file: {exc}") from exc
        finally:
            if sink is not None:
                await sink.discard()


async def _copy_from_file(path: Path, sink: _TempSink) -> None:
    """An adapter's temp file: copied in chunks (bounded memory), then removed."""
    try:
        with path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, WRITE_BUFFER_BYTES):
                await sink.write(chunk)
    except OSError as exc:
        raise StorageError(f"cannot read the adapter's output file: {exc}") from exc
    finally:
        await asyncio.to_thread(path.unlink, missing_ok=True)


async def _download(http: httpx.AsyncClient, ref: OutputRef, sink: _TempSink, timeout: float) -> None:
    """Through the guarded fetcher: every hop's address checked, the provider's headers
    kept to the first origin (providers put keys in custom ones, `x-api-key`, and their
    output URLs often redirect to a CDN or a presigned S3 URL on another host), the byte
    cap enforced while streaming, one deadline for the whole download."""
    assert ref.url is not None
    try:
        async with fetcher.fetch(
            http, ref.url, headers=ref.headers, max_bytes=sink.max_bytes, timeout=timeout, max_redirects=MAX_REDIRECTS
        ) as got:
            status = got.response.status_code
            if status in _REFUSED_STATUSES:
                raise StorageError(
                    f"the provider's output URL expired or was refused (HTTP {status})",
                    code=ErrorCode.provider_error,
                )
            if not 200 <= status < 300:
                raise StorageError(f"downloading the output failed: the provider's URL answered HTTP {status}")
            async for chunk in got.chunks():
                await sink.write(chunk)
    except fetcher.FetchError as exc:
        if exc.kind == fetcher.FetchFailure.too_large:
            raise StorageError(f"output is over the limit of {sink.max_bytes} bytes") from exc
        if exc.kind in (fetcher.FetchFailure.transport, fetcher.FetchFailure.timeout):
            raise StorageError(f"downloading the output failed: {exc.reason}") from exc
        # the guard refused the provider's URL (or a redirect of it): the provider's fault
        raise StorageError(f"the provider's output URL was not fetched: {exc.reason}", code=ErrorCode.provider_error) from exc


async def _put_bytes(
    store: BlobStore, key: str, data: bytes, content_type: str, tmp_dir: Path | None
) -> None:
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="genroute-", suffix=".part")
    try:
        await asyncio.to_thread(_write_fd, fd, data)
        await store.put_file(key, Path(name), content_type)
    finally:
        await asyncio.to_thread(Path(name).unlink, missing_ok=True)


def _write_fd(fd: int, data: bytes) -> None:
    with open(fd, "wb") as f:
        f.write(data)


class _TempSink:
    """A temp file that counts, hashes and keeps the head of what is written to it.

    Chunks are gathered into a buffer and written (and hashed) in a thread, so the event
    loop neither blocks on the disk nor holds more than one buffer.
    """

    def __init__(self, max_bytes: int, tmp_dir: Path | None) -> None:
        self.max_bytes = max_bytes
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="genroute-", suffix=".part")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self.head = b""
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise StorageError(f"output is over the limit of {self.max_bytes} bytes")
        if len(self.head) < SNIFF_BYTES:
            self.head += data[: SNIFF_BYTES - len(self.head)]
        if len(self._buffer) + len(data) < WRITE_BUFFER_BYTES:
            self._buffer += data
            return
        if self._buffer:
            self._buffer += data
            data, self._buffer = bytes(self._buffer), bytearray()
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)

    async def finish(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        await asyncio.to_thread(self._finish, data)

    def _finish(self, data: bytes) -> None:
        self._write(data)
        self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    async def discard(self) -> None:
        def discard() -> None:
            self._file.close()
            self.path.unlink(missing_ok=True)

        await asyncio.to_thread(discard)
