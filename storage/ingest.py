"""Move one provider output into the blob store.

    OutputRef (bytes | URL) -> temp file (sha256, size limit) -> sniff -> probe -> put_file

The output goes through a temporary file so memory stays flat however large it is; at
most one write buffer (WRITE_BUFFER_BYTES) is held at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
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

log = logging.getLogger("genroute.storage")

WRITE_BUFFER_BYTES = 1024 * 1024
PUT_BACKOFF_MAX = 5.0
MAX_REDIRECTS = 5
# A provider answering these for its own output URL has expired or revoked the link.
_REFUSED_STATUSES = frozenset({401, 403, 404, 410})
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
DOWNLOAD_TRIES = 4  # attempts per output URL before storage_error
BACKOFF_SECONDS = 0.5  # before the second attempt; doubled each time, at most BACKOFF_MAX
BACKOFF_MAX = 8.0


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
    timeout: float = 3600.0,
    idle_timeout: float = 60.0,
    tries: int = DOWNLOAD_TRIES,
    by_hash: bool = False,
) -> StoredAsset:
    """Download or write `ref`, check and probe it, and store it as `{key_base}/{index}.ext`,
    or with `by_hash` as `{key_base}/{sha256[:2]}/{sha256}.ext` (content-addressed: the same
    bytes under one key_base are stored once, however many jobs made them).

    Images also get a WebP thumbnail beside it (`….thumb.webp`). The stored content
    type is the sniffed one only. URLs go through core.fetcher (address guard, byte cap),
    `idle_timeout` the longest stall, `timeout` the ceiling for the whole download, broken
    attempts resumed (see _download). Every failure is a StorageError; a provider URL that
    answers 401/403/404/410, or that the guard refuses, has code provider_error.

    Our own disks failing are waited on, not blamed on the output: the blob store's (see
    _put_waiting) and the temporary file's (OSError: full, read-only, gone), after which the
    output is fetched again, with backoff to PUT_BACKOFF_MAX, until max(timeout, 60 s) have
    passed; an adapter's own file (`ref.path`) can be read once only, so it is not retried.
    """
    with metrics.storing():  # the job's storing time, told apart from its time at the provider
        validate_key(f"{key_base}/{index}.bin")  # fail before downloading anything
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        until = loop.time() + max(timeout, 60.0)
        pause = 0.5
        while True:
            try:
                return await _store_once(store, http, ref, key_base=key_base, index=index, max_bytes=max_bytes,
                                         max_image_pixels=max_image_pixels, tmp_dir=tmp_dir,
                                         timeout=max(1.0, deadline - loop.time()), idle_timeout=idle_timeout,
                                         tries=tries, by_hash=by_hash)
            except _TempDiskFailed as exc:
                cause = exc.__cause__
                if ref.path is not None or loop.time() + pause >= until:
                    raise StorageError(f"output {index}: cannot write a temporary file: {cause}") from cause
                log.warning("temporary file for output %d failed (%s); trying again in %.1f s", index, cause, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, PUT_BACKOFF_MAX)


class _TempDiskFailed(Exception):
    """Our temporary file could not be written or read (its cause: the OSError)."""


async def _store_once(
    store: BlobStore, http: httpx.AsyncClient, ref: OutputRef, *, key_base: str, index: int, max_bytes: int,
    max_image_pixels: int, tmp_dir: Path | None, timeout: float, idle_timeout: float, tries: int, by_hash: bool,
) -> StoredAsset:
    """One try of store_output."""
    sink: _TempSink | None = None
    try:
        sink = await asyncio.to_thread(_TempSink, max_bytes, tmp_dir)
        if ref.data is not None:
            await sink.write(ref.data)
        elif ref.path is not None:
            await _copy_from_file(Path(ref.path), sink)
        else:
            await _download(http, ref, sink, timeout, idle_timeout, tries)
        await sink.finish()

        # the bytes decide, never the provider's hint: a hint of text/html or SVG would make
        # a stored file active content on the download origin
        content_type = sniff_content_type(sink.head[:SNIFF_BYTES])
        stem = f"{key_base}/{sink.sha256[:2]}/{sink.sha256}" if by_hash else f"{key_base}/{index}"
        key = f"{stem}.{extension_for(content_type)}"
        try:
            probe = await asyncio.to_thread(
                probe_file, sink.path, content_type, max_image_pixels=max_image_pixels
            )
        except ProbeError as exc:
            raise StorageError(f"output {index} refused: {exc}") from exc

        put_by = asyncio.get_running_loop().time() + max(timeout, 60.0)
        await _put_waiting(store, key, sink.path, content_type, put_by)
        thumbnail_key = None
        if probe.thumbnail is not None:
            thumbnail_key = f"{stem}.thumb.webp"
            await _put_bytes(store, thumbnail_key, probe.thumbnail, "image/webp", tmp_dir, put_by)
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
        raise _TempDiskFailed(str(exc)) from exc
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




class _Transient(Exception):
    """This attempt broke in a way another attempt may not: retried with backoff."""


async def _download(
    http: httpx.AsyncClient, ref: OutputRef, sink: _TempSink, timeout: float, idle: float, tries: int
) -> None:
    """Through the guarded fetcher, every attempt: every hop's address checked, the
    provider's headers kept to the first origin (providers put keys in custom ones,
    `x-api-key`, and their output URLs often redirect to a CDN or a presigned S3 URL on
    another host), the byte cap enforced while streaming.

    `idle` is how long the stream may stall (no byte) before the attempt fails; a stream
    that keeps flowing is cut only by `timeout`, the ceiling for the whole download. A
    broken attempt (connection reset, stall, 408/429/5xx, a body shorter than its
    Content-Length) is retried up to `tries` attempts in all, with backoff, resuming with
    `Range: bytes=N-` (a 206 whose Content-Range starts at N is appended; a 200 restarts
    from zero, the partial bytes discarded)."""
    assert ref.url is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    total: int | None = None  # the whole body's length, once an answer told it
    last = ""
    cause: BaseException | None = None
    for attempt in range(tries):
        if attempt:
            pause = min(BACKOFF_SECONDS * 2 ** (attempt - 1), BACKOFF_MAX)
            if loop.time() + pause >= deadline:
                break
            await asyncio.sleep(pause)
        remaining = deadline - loop.time()
        if remaining <= 0:
            last = last or "the download took longer than allowed"
            break
        every_hop = {"accept-encoding": "identity"}  # byte offsets of the stored bytes, not of a gzip stream
        if sink.size:
            every_hop["range"] = f"bytes={sink.size}-"
        try:
            async with fetcher.fetch(
                http, ref.url, headers=ref.headers, max_bytes=sink.max_bytes, timeout=remaining, idle=idle,
                max_redirects=MAX_REDIRECTS, every_hop=every_hop,
            ) as got:
                total = await _take(got, sink, total)
                async for chunk in got.chunks():
                    await sink.write(chunk)
                if total is not None and sink.size > total:
                    await sink.reset()  # longer than it said: start again from zero
                    raise _Transient(f"the body was {sink.size} bytes where {total} were announced")
                if total is not None and sink.size < total:
                    raise _Transient(f"the body ended after {sink.size} of {total} bytes")
                return
        except _Transient as exc:
            last, cause = str(exc), exc
        except fetcher.FetchError as exc:
            if exc.kind == fetcher.FetchFailure.too_large:
                raise StorageError(f"output is over the limit of {sink.max_bytes} bytes") from exc
            if exc.kind not in (fetcher.FetchFailure.transport, fetcher.FetchFailure.timeout, fetcher.FetchFailure.stalled):
                # the guard refused the provider's URL (or a redirect of it): the provider's fault
                raise StorageError(f"the provider's output URL was not fetched: {exc.reason}",
                                   code=ErrorCode.provider_error) from exc
            last, cause = exc.reason, exc
            if exc.kind == fetcher.FetchFailure.timeout:
                break
    raise StorageError(f"downloading the output failed after {attempt + 1} attempt(s), "
                       f"{sink.size} bytes received: {last}") from cause


async def _take(got: fetcher.Fetched, sink: _TempSink, total: int | None) -> int | None:
    """Decide what one answer means for the bytes already in `sink`; returns the body's
    whole length when known. Refusals raise StorageError, transient answers _Transient."""
    status = got.response.status_code
    if status in _REFUSED_STATUSES:
        raise StorageError(f"the provider's output URL expired or was refused (HTTP {status})", code=ErrorCode.provider_error)
    if status in _TRANSIENT_STATUSES:
        raise _Transient(f"the provider's URL answered HTTP {status}")
    length = got.response.headers.get("content-length", "")
    if status == 206 and sink.size:
        start, whole = _content_range(got.response.headers.get("content-range", ""))
        if start == sink.size and (total is None or whole is None or whole == total):
            return whole if whole is not None else (sink.size + int(length) if length.isdigit() else total)
        await sink.reset()  # a range we did not ask for: start again from zero
        raise _Transient("the provider's URL answered another range than the one asked for")
    if not 200 <= status < 300 or status == 206:
        raise StorageError(f"downloading the output failed: the provider's URL answered HTTP {status}")
    if sink.size:
        await sink.reset()  # Range ignored: the whole body again, the partial bytes discarded
    return int(length) if length.isdigit() else None


def _content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes 100-199/*` -> (100, None)."""
    unit, _, rest = value.strip().partition(" ")
    span, _, whole = rest.partition("/")
    first = span.partition("-")[0]
    if unit.lower() != "bytes" or not first.isdigit():
        return None, None
    return int(first), int(whole) if whole.isdigit() else None


async def _put_waiting(store: BlobStore, key: str, path: Path, content_type: str, until: float) -> None:
    """Put one blob; while our own store is away (StorageError.unavailable) wait and try
    again (backoff to PUT_BACKOFF_MAX) until `until` (loop time): the provider's output is
    not at fault, and the job is paid for."""
    loop = asyncio.get_running_loop()
    pause = 0.5
    while True:
        try:
            await store.put_file(key, path, content_type)
            return
        except StorageError as exc:
            if not exc.unavailable:
                raise
            if loop.time() + pause >= until:
                raise StorageError(f"our blob store did not answer in time; the output was not stored: {exc}") from exc
            log.warning("blob store away (%s); trying %s again in %.1f s", str(exc)[:200], key, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, PUT_BACKOFF_MAX)


async def _put_bytes(
    store: BlobStore, key: str, data: bytes, content_type: str, tmp_dir: Path | None, until: float
) -> None:
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="genroute-", suffix=".part")
    try:
        await asyncio.to_thread(_write_fd, fd, data)
        await _put_waiting(store, key, Path(name), content_type, until)
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

    async def reset(self) -> None:
        """Forget everything written: the next byte is the first again."""
        def reset() -> None:
            self._file.seek(0)
            self._file.truncate()

        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self.head = b""
        self.size = 0
        await asyncio.to_thread(reset)

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
            with contextlib.suppress(OSError):  # a temp file left behind fails no output
                self._file.close()
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

        await asyncio.to_thread(discard)
