"""Storing a provider output over a flaky CDN (a real HTTP server on loopback): a download
is cut by stalls (`idle_timeout`), not by its length, and a broken attempt is resumed with
`Range: bytes=N-` (or restarted when the server ignores Range) a bounded number of times."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from core.errors import ErrorCode
from core.types import OutputRef
from storage import LocalBlobStore, StorageError, store_output

BODY = b"\x00\x00\x00\x18ftypmp42" + os.urandom(600 * 1024)  # an octet stream is stored as is
SHA = hashlib.sha256(BODY).hexdigest()


@dataclass
class Cdn:
    """`mode`: drop (close mid-body on the first `drops` answers), slow (steady trickle),
    stall (headers, a little, then nothing), norange (drops once, then 200s ignoring Range)."""

    url: str = ""
    mode: str = "drop"
    drops: int = 2
    ranges: list[str] = field(default_factory=list)
    answers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _serve(cdn: Cdn) -> tuple[ThreadingHTTPServer, threading.Thread]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            with cdn.lock:
                n = cdn.answers
                cdn.answers += 1
                rng = self.headers.get("Range")
                if rng:
                    cdn.ranges.append(rng)
            start = 0
            if rng and cdn.mode != "norange":
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(BODY) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            rest = BODY[start:]
            try:
                if cdn.mode == "slow":  # ~2.5 s in all, never idle for long
                    for i in range(0, len(rest), 32 * 1024):
                        self.wfile.write(rest[i:i + 32 * 1024])
                        self.wfile.flush()
                        time.sleep(0.13)
                elif cdn.mode == "stall":
                    self.wfile.write(rest[:1000])
                    self.wfile.flush()
                    time.sleep(30)
                elif n < cdn.drops:  # a third of what is left, then the connection drops
                    self.wfile.write(rest[: len(rest) // 3])
                    self.wfile.flush()
                else:
                    self.wfile.write(rest)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    cdn.url = f"http://127.0.0.1:{server.server_address[1]}/out.mp4"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def cdn() -> Iterator[Cdn]:
    c = Cdn()
    server, thread = _serve(c)
    yield c
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalBlobStore]:
    s = LocalBlobStore(tmp_path / "blobs", "http://files.test/", "s3cret")
    await s.start()
    yield s
    await s.close()


async def _store(store: LocalBlobStore, cdn: Cdn, tmp_path: Path, **kw: float) -> tuple[str, Path]:
    async with httpx.AsyncClient(timeout=10) as http:
        got = await store_output(store, http, OutputRef(url=cdn.url), key_base="t/j", index=0,
                                 max_bytes=10 * 1024 * 1024, max_image_pixels=64_000_000, tmp_dir=tmp_path, **kw)
    return got.sha256, store.root / got.key


async def test_dropped_twice_then_resumed_with_range(store: LocalBlobStore, cdn: Cdn, tmp_path: Path) -> None:
    sha, path = await _store(store, cdn, tmp_path, idle_timeout=5)
    assert sha == SHA and hashlib.sha256(path.read_bytes()).hexdigest() == SHA
    assert cdn.answers == 3 and len(cdn.ranges) == 2, cdn.ranges
    assert all(r.startswith("bytes=") and r != "bytes=0-" for r in cdn.ranges)


async def test_slow_but_steady_outlasts_the_idle_timeout(store: LocalBlobStore, cdn: Cdn, tmp_path: Path) -> None:
    cdn.mode = "slow"
    t0 = time.monotonic()
    sha, _ = await _store(store, cdn, tmp_path, idle_timeout=1.0)
    assert time.monotonic() - t0 > 1.0  # longer than the idle timeout in all, never cut
    assert sha == SHA and cdn.answers == 1


async def test_a_stall_fails_storage_error_after_the_retries(store: LocalBlobStore, cdn: Cdn, tmp_path: Path) -> None:
    cdn.mode = "stall"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        await _store(store, cdn, tmp_path, idle_timeout=0.5, tries=3)
    took = time.monotonic() - t0
    assert info.value.code == ErrorCode.storage_error
    assert "3 attempt" in str(info.value) and "stalled" in str(info.value), str(info.value)
    assert cdn.answers == 3 and took < 15, took
    assert list(tmp_path.glob("genroute-*")) == []


async def test_range_ignored_restarts_from_zero(store: LocalBlobStore, cdn: Cdn, tmp_path: Path) -> None:
    cdn.mode, cdn.drops = "norange", 1
    sha, path = await _store(store, cdn, tmp_path, idle_timeout=5)
    assert sha == SHA and path.read_bytes() == BODY
    assert cdn.ranges  # it asked to resume, got a 200, and kept only the fresh bytes


class _AwayTwice(LocalBlobStore):
    """Our own blob store, away for its first two puts (as S3 refusing connections is)."""

    puts = 0

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        self.puts += 1
        if self.puts <= 2:
            raise StorageError("S3 upload failed: could not connect", unavailable=True)
        await super().put_file(key, path, content_type)


async def test_our_store_away_is_waited_on_not_failed(cdn: Cdn, tmp_path: Path) -> None:
    cdn.drops = 0
    store = _AwayTwice(tmp_path / "blobs", "http://files.test/", "s3cret")
    await store.start()
    sha, path = await _store(store, cdn, tmp_path, idle_timeout=5)
    assert sha == SHA and path.read_bytes() == BODY and store.puts == 3


async def test_an_unreachable_s3_endpoint_counts_as_away(tmp_path: Path) -> None:
    from cli.embedded import free_port
    from storage.s3 import S3BlobStore

    s3 = S3BlobStore("b", endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="k", secret_access_key="s",
                     connect_timeout=0.5, max_attempts=1)
    blob = tmp_path / "x.bin"
    blob.write_bytes(b"x")
    with pytest.raises(StorageError) as info:
        await s3.put_file("t/j/0.bin", blob, "application/octet-stream")
    assert info.value.unavailable
    await s3.close()


async def test_our_temp_disk_failing_is_waited_on_then_fetched_once(store: LocalBlobStore, cdn: Cdn, tmp_path: Path) -> None:
    """The temporary directory fails (a plain file where it should be: every temp file
    raises NotADirectoryError, as a full disk raises ENOSPC) and is fixed 1.5 s later: the
    output is stored, fetched once (nothing is downloaded while no temp file can be made)."""
    cdn.drops = 0
    tmp = tmp_path / "tmp"
    tmp.write_text("not a directory")

    def fixed() -> None:
        tmp.unlink()
        tmp.mkdir()

    timer = threading.Timer(1.5, fixed)
    timer.start()
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        got = await store_output(store, http, OutputRef(url=cdn.url), key_base="t/j", index=0, max_bytes=10 * 1024 * 1024,
                                 max_image_pixels=64_000_000, tmp_dir=tmp, idle_timeout=5)
    timer.join()
    assert got.sha256 == SHA and (store.root / got.key).read_bytes() == BODY
    assert cdn.answers == 1 and time.monotonic() - t0 >= 1.5


async def test_an_adapters_file_is_not_retried_when_our_temp_disk_fails(store: LocalBlobStore, tmp_path: Path) -> None:
    """An adapter's own output file is read (and removed) once: with no temp file to copy it
    into, the output fails storage_error at once rather than waiting for a file it lost."""
    src = tmp_path / "adapter-output.bin"
    src.write_bytes(BODY)
    tmp = tmp_path / "tmp"
    tmp.write_text("not a directory")
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        with pytest.raises(StorageError) as info:
            await store_output(store, http, OutputRef(path=str(src)), key_base="t/j", index=0, max_bytes=10 * 1024 * 1024,
                               max_image_pixels=64_000_000, tmp_dir=tmp)
    assert info.value.code == ErrorCode.storage_error and "temporary file" in str(info.value), str(info.value)
    assert time.monotonic() - t0 < 5
