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

from core import metrics
from core.errors import ErrorCode
from core.types import OutputRef
from storage.base import BlobStore, StorageError, StoredAsset, validate_key
from storage.probe import (
    OCTET_STREAM,
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
# Sniffed types that say little: a provider's content type hint is better than these.
_WEAK_TYPES = frozenset({OCTET_STREAM, "text/plain", "application/json"})


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
) -> StoredAsset:
    """Download or write `ref`, check and probe it, and store it as `{key_base}/{index}.ext`.

    Images also get a WebP thumbnail at `{key_base}/{index}.thumb.webp`. Every failure is
    a StorageError; a provider URL that answers 401/403/404/410 has code provider_error.
    """
    with metrics.storing():  # the job's storing time, told apart from its time at the provider
        return await _store_output(store, http, ref, key_base=key_base, index=index, max_bytes=max_bytes,
                                   max_image_pixels=max_image_pixels, tmp_dir=tmp_dir)


async def _store_output(
    store: BlobStore,
    http: httpx.AsyncClient,
    ref: OutputRef,
    *,
    key_base: str,
    index: int,
    max_bytes: int,
    max_image_pixels: int,
    tmp_dir: Path | None,
) -> StoredAsset:
    validate_key(f"{key_base}/{index}.bin")  # fail before downloading anything
    sink: _TempSink | None = None
    try:
        sink = await asyncio.to_thread(_TempSink, max_bytes, tmp_dir)
        if ref.data is not None:
            await sink.write(ref.data)
        elif ref.path is not None:
            await _copy_from_file(Path(ref.path), sink)
        else:
            await _download(http, ref, sink)
        await sink.finish()

        content_type = _content_type(sink.head, ref.content_type)
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


def _content_type(head: bytes, hint: str | None) -> str:
    sniffed = sniff_content_type(head[:SNIFF_BYTES])
    if sniffed in _WEAK_TYPES and hint:
        bare = hint.split(";", 1)[0].strip().lower()
        if bare and bare != OCTET_STREAM:
            return bare
    return sniffed


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


async def _download(http: httpx.AsyncClient, ref: OutputRef, sink: _TempSink) -> None:
    try:
        response = await _send_following_redirects(http, ref)
        try:
            if response.status_code in _REFUSED_STATUSES:
                raise StorageError(
                    f"the provider's output URL expired or was refused "
                    f"(HTTP {response.status_code})",
                    code=ErrorCode.provider_error,
                )
            try:
                response.raise_for_status()
            except httpx.HTTPStatusError as exc:
                raise StorageError(f"downloading the output failed: {exc}") from exc
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > sink.max_bytes:
                raise StorageError(
                    f"output is {length} bytes, over the limit of {sink.max_bytes} bytes"
                )
            async for chunk in response.aiter_bytes():
                await sink.write(chunk)
        finally:
            await response.aclose()
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StorageError(f"downloading the output failed: {exc!r}") from exc


async def _send_following_redirects(http: httpx.AsyncClient, ref: OutputRef) -> httpx.Response:
    """GET with redirects followed by hand, so `ref.headers` never leave the origin.

    httpx drops Authorization on a cross-origin redirect but not other headers, and
    providers put keys in custom ones (`x-api-key`); their output URLs often redirect
    to a CDN or a presigned S3 URL on another host.
    """
    assert ref.url is not None
    request = http.build_request("GET", ref.url, headers=ref.headers)
    for _ in range(MAX_REDIRECTS + 1):
        response = await http.send(request, stream=True, follow_redirects=False)
        next_request = response.next_request
        if next_request is None:
            return response
        await response.aclose()
        if _origin(next_request.url) != _origin(request.url):
            for name in ref.headers:
                next_request.headers.pop(name, None)
        request = next_request
    raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=request)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


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
