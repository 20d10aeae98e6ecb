"""Storage against real S3 (SeaweedFS), the local disk, and a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import os
import socket
import struct
import threading
import time
import uuid
import wave
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio
from PIL import Image

from core.errors import ErrorCode, NotFound
from core.settings import Settings
from core.types import OutputRef
from storage import (
    LocalBlobStore,
    ProbeError,
    S3BlobStore,
    StorageError,
    build_store,
    extension_for,
    probe_file,
    sniff_content_type,
    store_output,
    validate_key,
)
from storage.probe import mp4_duration
from tests.seaweed import SeaweedFS, start_seaweedfs

MiB = 1024 * 1024
MAX_PIXELS = 64_000_000


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A fresh bucket name; the store's start() creates it, teardown empties and drops it."""
    name = f"t-{uuid.uuid4().hex}"
    yield name
    client = seaweedfs.client()
    try:
        objects = client.list_objects_v2(Bucket=name).get("Contents", [])
    except client.exceptions.NoSuchBucket:
        return
    for obj in objects:
        client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


def make_s3_store(seaweedfs: SeaweedFS, bucket: str, **kwargs: Any) -> S3BlobStore:
    options: dict[str, Any] = {
        "endpoint_url": seaweedfs.endpoint_url,
        "access_key_id": seaweedfs.access_key,
        "secret_access_key": seaweedfs.secret_key,
        "create_bucket": True,
        "multipart_threshold_bytes": 5 * MiB,
    }
    return S3BlobStore(bucket, **(options | kwargs))


@pytest_asyncio.fixture
async def s3_store(seaweedfs: SeaweedFS, bucket: str) -> AsyncIterator[S3BlobStore]:
    store = make_s3_store(seaweedfs, bucket)
    await store.start()
    yield store
    await store.close()


@pytest_asyncio.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[LocalBlobStore]:
    store = LocalBlobStore(tmp_path / "blobs", "http://files.test/", "s3cret")
    await store.start()
    yield store
    await store.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """Where store_output keeps its temp files; tests check it is left empty."""
    path = tmp_path / "ingest-tmp"
    path.mkdir()
    return path


# -- a provider's file server on loopback -----------------------------------------------


@dataclass
class FileServer:
    """Serves `routes` (path -> (status, headers, body)) and records request headers."""

    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    seen: dict[str, dict[str, str]] = field(default_factory=dict)
    url: str = ""


def start_file_server() -> tuple[FileServer, ThreadingHTTPServer]:
    state = FileServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.seen[self.path] = {k.lower(): v for k, v in self.headers.items()}
            status, headers, body = state.routes.get(self.path, (404, {}, b"no such file"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers and not headers.get("X-No-Length"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # Written in pieces, so a client limit is hit while streaming.
            for start in range(0, len(body), 64 * 1024):
                try:
                    self.wfile.write(body[start : start + 64 * 1024])
                except (BrokenPipeError, ConnectionResetError):
                    return

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return state, server


@pytest.fixture
def provider() -> Iterator[FileServer]:
    state, server = start_file_server()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def cdn() -> Iterator[FileServer]:
    """A second origin (another port), like the CDN a provider redirects to."""
    state, server = start_file_server()
    yield state
    server.shutdown()
    server.server_close()


# -- data factories -------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (640, 480), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 0).save(out, "PNG")
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all zeros: tiny on disk, huge decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def mvhd(version: int, timescale: int, duration: int) -> bytes:
    if version == 1:
        times = struct.pack(">QQIQ", 0, 0, timescale, duration)
    else:
        times = struct.pack(">IIII", 0, 0, timescale, duration)
    return box(b"mvhd", bytes([version, 0, 0, 0]) + times + b"\x00" * 80)


def mp4_bytes(version: int, timescale: int, duration: int, mdat: bytes = b"") -> bytes:
    ftyp = box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2mp41")
    # mdat before moov, with a 64-bit size: the walk must skip it by its header.
    big_mdat = struct.pack(">I4sQ", 1, b"mdat", 16 + len(mdat)) + mdat
    moov = box(b"moov", box(b"udta", b"\x00" * 12) + mvhd(version, timescale, duration))
    return ftyp + big_mdat + moov


def animated(fmt: str, durations: list[int]) -> bytes:
    frames = [Image.new("RGB", (320, 200), color) for color in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(
        out, fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0
    )
    return out.getvalue()


def closed_url() -> str:
    """A loopback URL nothing listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- S3 ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_s3_put_url_round_trip(
    s3_store: S3BlobStore, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await s3_store.check()
    data = os.urandom(100_000)
    path = tmp_path / "blob"
    path.write_bytes(data)

    await s3_store.put_file("tenant/job/0.bin", path, "application/x-test")
    url = await s3_store.url("tenant/job/0.bin", expires_in=60)

    assert "X-Amz-Signature=" in url
    response = await http.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "application/x-test"
    # The signature covers the key: the same query string does not open another object.
    other = await http.get(url.replace("/0.bin?", "/1.bin?"))
    assert other.status_code == 403


@pytest.mark.asyncio
async def test_s3_multipart_upload_round_trips(
    seaweedfs: SeaweedFS, s3_store: S3BlobStore, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = os.urandom(12 * MiB)
    path = tmp_path / "big"
    path.write_bytes(data)

    await s3_store.put_file("tenant/job/0.mp4", path, "video/mp4")

    head = seaweedfs.client().head_object(Bucket=s3_store.bucket, Key="tenant/job/0.mp4")
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"], "a multipart upload's ETag is md5-of-parts-<n>"
    response = await http.get(await s3_store.url("tenant/job/0.mp4", expires_in=60))
    assert sha256(response.content) == sha256(data)


@pytest.mark.asyncio
async def test_s3_presigns_for_the_public_endpoint(
    seaweedfs: SeaweedFS, bucket: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    public = seaweedfs.endpoint_url.replace("127.0.0.1", "localhost")
    store = make_s3_store(seaweedfs, bucket, public_endpoint_url=public)
    await store.start()
    try:
        path = tmp_path / "blob"
        path.write_bytes(b"hello")
        await store.put_file("a/b.txt", path, "text/plain")

        url = await store.url("a/b.txt", expires_in=60)

        assert url.startswith(f"{public}/{bucket}/a/b.txt?")
        assert (await http.get(url)).content == b"hello"
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_s3_delete_and_check(
    seaweedfs: SeaweedFS, bucket: str, s3_store: S3BlobStore, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x")
    await s3_store.put_file("a/0.bin", path, "application/octet-stream")

    await s3_store.delete("a/0.bin")
    await s3_store.delete("a/0.bin")  # deleting what is gone is fine

    listed = seaweedfs.client().list_objects_v2(Bucket=bucket)
    assert listed.get("Contents", []) == []
    missing = make_s3_store(seaweedfs, f"missing-{uuid.uuid4().hex}", create_bucket=False)
    await missing.start()  # without create_bucket, start does not touch the bucket
    with pytest.raises(StorageError) as info:
        await missing.check()
    assert info.value.code == ErrorCode.storage_error
    assert isinstance(info.value.__cause__, Exception)
    await missing.close()


# -- store_output ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_store_output_from_png_bytes(
    seaweedfs: SeaweedFS, s3_store: S3BlobStore, http: httpx.AsyncClient, tmp_dir: Path
) -> None:
    data = png_bytes((640, 480))

    asset = await store_output(
        s3_store,
        http,
        OutputRef(data=data, content_type="application/octet-stream"),
        key_base="tenant-a/job-1",
        index=0,
        max_bytes=10 * MiB,
        max_image_pixels=MAX_PIXELS,
        tmp_dir=tmp_dir,
    )

    assert asset.key == "tenant-a/job-1/0.png"
    assert asset.content_type == "image/png"
    assert (asset.width, asset.height) == (640, 480)
    assert (asset.bytes, asset.sha256) == (len(data), sha256(data))
    assert asset.thumbnail_key == "tenant-a/job-1/0.thumb.webp"
    stored = (await http.get(await s3_store.url(asset.key, expires_in=60))).content
    assert stored == data
    thumb = (await http.get(await s3_store.url(asset.thumbnail_key, expires_in=60))).content
    with Image.open(io.BytesIO(thumb)) as im:
        assert (im.format, im.size) == ("WEBP", (256, 192))
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.asyncio
async def test_store_output_to_local_store(
    local_store: LocalBlobStore, http: httpx.AsyncClient, tmp_dir: Path
) -> None:
    data = b"just some text\n"

    asset = await store_output(
        local_store,
        http,
        OutputRef(data=data, content_type="text/html"),
        key_base="t/j",
        index=2,
        max_bytes=MiB,
        max_image_pixels=MAX_PIXELS,
        tmp_dir=tmp_dir,
    )

    # The bytes decide, never the provider's hint (text/html would be active content).
    assert (asset.key, asset.content_type) == ("t/j/2.txt", "text/plain")
    assert asset.thumbnail_key is None
    assert (local_store.root / asset.key).read_bytes() == data
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.asyncio
async def test_store_output_follows_redirects_without_leaking_headers(
    s3_store: S3BlobStore,
    http: httpx.AsyncClient,
    provider: FileServer,
    cdn: FileServer,
    tmp_dir: Path,
) -> None:
    data = png_bytes((300, 100))
    provider.routes["/out/1"] = (302, {"Location": "/files/1.png"}, b"")
    provider.routes["/files/1.png"] = (302, {"Location": f"{cdn.url}/signed/1.png"}, b"")
    cdn.routes["/signed/1.png"] = (200, {"Content-Type": "image/png"}, data)

    asset = await store_output(
        s3_store,
        http,
        OutputRef(url=f"{provider.url}/out/1", headers={"X-Api-Key": "provider-key"}),
        key_base="t/j",
        index=0,
        max_bytes=10 * MiB,
        max_image_pixels=MAX_PIXELS,
        tmp_dir=tmp_dir,
    )

    assert (asset.sha256, asset.width, asset.height) == (sha256(data), 300, 100)
    assert provider.seen["/out/1"]["x-api-key"] == "provider-key"
    assert provider.seen["/files/1.png"]["x-api-key"] == "provider-key"  # same origin
    assert "x-api-key" not in cdn.seen["/signed/1.png"]  # another origin
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [404, 410, 403])
async def test_store_output_expired_provider_url(
    s3_store: S3BlobStore,
    http: httpx.AsyncClient,
    provider: FileServer,
    tmp_dir: Path,
    status: int,
) -> None:
    provider.routes["/gone"] = (status, {}, b"expired")

    with pytest.raises(StorageError) as info:
        await store_output(
            s3_store,
            http,
            OutputRef(url=f"{provider.url}/gone"),
            key_base="t/j",
            index=0,
            max_bytes=MiB,
            max_image_pixels=MAX_PIXELS,
            tmp_dir=tmp_dir,
        )

    assert "expired or was refused" in info.value.message
    assert info.value.code == ErrorCode.provider_error
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.asyncio
async def test_store_output_server_error_and_transport_error(
    s3_store: S3BlobStore, http: httpx.AsyncClient, provider: FileServer, tmp_dir: Path
) -> None:
    provider.routes["/boom"] = (500, {}, b"oops")
    kwargs: dict[str, Any] = {
        "key_base": "t/j",
        "index": 0,
        "max_bytes": MiB,
        "max_image_pixels": MAX_PIXELS,
        "tmp_dir": tmp_dir,
    }

    with pytest.raises(StorageError) as info:
        await store_output(s3_store, http, OutputRef(url=f"{provider.url}/boom"), **kwargs)
    assert info.value.code == ErrorCode.storage_error
    assert "HTTP 500" in str(info.value)

    with pytest.raises(StorageError) as info:
        await store_output(s3_store, http, OutputRef(url=f"{closed_url()}/x"), **kwargs)
    assert info.value.code == ErrorCode.storage_error
    assert isinstance(info.value.__cause__.__cause__, httpx.TransportError)
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
async def test_store_output_refuses_oversize_download(
    seaweedfs: SeaweedFS,
    s3_store: S3BlobStore,
    http: httpx.AsyncClient,
    provider: FileServer,
    tmp_dir: Path,
    declared: bool,
) -> None:
    headers = {} if declared else {"X-No-Length": "1"}
    provider.routes["/big"] = (200, headers, os.urandom(3 * MiB))

    with pytest.raises(StorageError) as info:
        await store_output(
            s3_store,
            http,
            OutputRef(url=f"{provider.url}/big"),
            key_base="t/j",
            index=0,
            max_bytes=MiB,
            max_image_pixels=MAX_PIXELS,
            tmp_dir=tmp_dir,
        )

    assert "over the limit" in info.value.message
    assert list(tmp_dir.iterdir()) == []
    listed = seaweedfs.client().list_objects_v2(Bucket=s3_store.bucket)
    assert listed.get("Contents", []) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("size", "limit"),
    [((20000, 20000), MAX_PIXELS), ((3000, 3000), 1_000_000)],
    ids=["pillow-bomb", "over-our-limit"],
)
async def test_store_output_refuses_decompression_bomb(
    seaweedfs: SeaweedFS,
    s3_store: S3BlobStore,
    http: httpx.AsyncClient,
    tmp_dir: Path,
    size: tuple[int, int],
    limit: int,
) -> None:
    data = bomb_png(*size)
    assert len(data) < 200_000

    with pytest.raises(StorageError) as info:
        await store_output(
            s3_store,
            http,
            OutputRef(data=data),
            key_base="t/j",
            index=0,
            max_bytes=10 * MiB,
            max_image_pixels=limit,
            tmp_dir=tmp_dir,
        )

    assert isinstance(info.value.__cause__, ProbeError)
    assert list(tmp_dir.iterdir()) == []
    listed = seaweedfs.client().list_objects_v2(Bucket=s3_store.bucket)
    assert listed.get("Contents", []) == []


@pytest.mark.asyncio
async def test_store_output_rejects_a_bad_key_base(
    s3_store: S3BlobStore, http: httpx.AsyncClient
) -> None:
    with pytest.raises(ValueError):
        await store_output(
            s3_store,
            http,
            OutputRef(data=b"x"),
            key_base="../etc",
            index=0,
            max_bytes=MiB,
            max_image_pixels=MAX_PIXELS,
        )


# -- local store ------------------------------------------------------------------------


def signed(secret: str, key: str, exp: int) -> str:
    """The documented signature: hex HMAC-SHA256(secret, f"{key}\\n{exp}")."""
    return hmac.new(secret.encode(), f"{key}\n{exp}".encode(), hashlib.sha256).hexdigest()


@pytest.mark.asyncio
async def test_local_url_and_verify(local_store: LocalBlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    await local_store.put_file("t/j/0.png", src, "image/png")
    await local_store.check()

    url = await local_store.url("t/j/0.png", expires_in=60)

    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "http://files.test/v1/files/t/j/0.png"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["sig"] == signed("s3cret", "t/j/0.png", int(query["exp"]))
    path = local_store.verify("t/j/0.png", query["exp"], query["sig"])
    assert path.read_bytes() == b"payload"
    # Only the file itself is in the directory: no temp file left behind.
    assert [p.name for p in path.parent.iterdir()] == ["0.png"]


@pytest.mark.asyncio
async def test_local_verify_refuses(local_store: LocalBlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    await local_store.put_file("t/j/0.png", src, "image/png")
    (local_store.root.parent / "secret.txt").write_text("outside")
    future, past = int(time.time()) + 60, int(time.time()) - 1
    good = signed("s3cret", "t/j/0.png", future)

    cases: list[tuple[str, int | str, str]] = [
        ("t/j/0.png", future, good[:-1] + ("0" if good[-1] != "0" else "1")),  # tampered
        ("t/j/0.png", future, signed("other", "t/j/0.png", future)),  # wrong secret
        ("t/j/1.png", future, good),  # signature of another key
        ("t/j/0.png", future + 1, good),  # exp changed
        ("t/j/0.png", past, signed("s3cret", "t/j/0.png", past)),  # expired
        ("../secret.txt", future, signed("s3cret", "../secret.txt", future)),  # traversal
        ("/etc/passwd", future, signed("s3cret", "/etc/passwd", future)),
        ("t/j/9.png", future, signed("s3cret", "t/j/9.png", future)),  # no such file
        ("t/j/0.png", "soon", good),
        ("t/j/0.png", future, "ünïcode"),
    ]
    for key, exp, sig in cases:
        with pytest.raises(NotFound) as info:
            local_store.verify(key, exp, sig)
        assert info.value.message == "file not found or link expired", (key, exp)
    assert local_store.verify("t/j/0.png", future, good).is_file()


@pytest.mark.asyncio
async def test_local_put_replaces_and_delete(local_store: LocalBlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for content in (b"first", b"second"):
        src.write_bytes(content)
        await local_store.put_file("t/j/0.bin", src, "application/octet-stream")
    assert (local_store.root / "t/j/0.bin").read_bytes() == b"second"

    await local_store.delete("t/j/0.bin")
    await local_store.delete("t/j/0.bin")
    assert not (local_store.root / "t/j/0.bin").exists()
    with pytest.raises(ValueError):
        await local_store.put_file("../x", src, "text/plain")


def test_local_store_needs_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalBlobStore(tmp_path, "http://x", "")


def test_build_store_by_settings(tmp_path: Path) -> None:
    local = build_store(Settings(data_dir=tmp_path, secret_key="k"))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "blobs"
    s3 = build_store(Settings(storage="s3", s3_bucket="b", s3_endpoint_url="http://s3.test"))
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.endpoint_url) == ("b", "http://s3.test")


# -- keys, sniffing, probing ------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["t/j/0.png", "tenant_1/job-01HX/12.thumb.webp", "a", "A.b-c_d/e"]
)
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "../x", "a/../b", "a/..", "./a", "/abs/path", "a//b", "a/", "a\\b", "a b", "a/ü", "a?b"]
    + ["a%2fb", "a\x00b", "x" * 600],
)
def test_validate_key_rejects(key: str) -> None:
    with pytest.raises(ValueError):
        validate_key(key)


RIFF = b"RIFF\x24\x00\x00\x00"


@pytest.mark.parametrize(
    ("head", "content_type", "ext"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg", "jpg"),
        (b"GIF89a\x01\x00", "image/gif", "gif"),
        (b"GIF87a\x01\x00", "image/gif", "gif"),
        (RIFF + b"WEBPVP8 ", "image/webp", "webp"),
        (RIFF + b"WAVEfmt ", "audio/wav", "wav"),
        (b"ID3\x04\x00\x00", "audio/mpeg", "mp3"),
        (b"\xff\xfb\x90\x64", "audio/mpeg", "mp3"),
        (b"\xff\xf3\x90\x64", "audio/mpeg", "mp3"),
        (b"\xff\xf2\x90\x64", "audio/mpeg", "mp3"),
        (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "video/mp4", "mp4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00", "video/mp4", "mp4"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00", "audio/mp4", "m4a"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "image/avif", "avif"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "video/webm", "webm"),
        (b"OggS\x00\x02", "audio/ogg", "ogg"),
        (b"fLaC\x00\x00\x00\x22", "audio/flac", "flac"),
        (b"%PDF-1.7\n", "application/pdf", "pdf"),
        (b'{"text": "hi"}', "application/json", "json"),
        (b"  [1, 2" + b" " * 600, "application/json", "json"),  # the head of a long file
        (b"hello world\n", "text/plain", "txt"),
        (b"{not json}", "text/plain", "txt"),
        (b"\x00\x01\x02\x03binary", "application/octet-stream", "bin"),
        (b"", "application/octet-stream", "bin"),
        (RIFF + b"AVI LIST", "application/octet-stream", "bin"),
    ],
)
def test_sniff_content_type(head: bytes, content_type: str, ext: str) -> None:
    assert sniff_content_type(head) == content_type
    assert extension_for(content_type) == ext


def test_sniffs_real_files() -> None:
    assert sniff_content_type(png_bytes()[:64]) == "image/png"
    assert sniff_content_type(animated("WEBP", [100, 100, 100])[:64]) == "image/webp"
    assert sniff_content_type(mp4_bytes(0, 1000, 5000)[:64]) == "video/mp4"


@pytest.mark.parametrize("version", [0, 1])
def test_mp4_duration_from_mvhd(version: int, tmp_path: Path) -> None:
    duration = 2**33 + 600 if version == 1 else 123_456  # v1 needs 64 bits
    path = tmp_path / "a.mp4"
    path.write_bytes(mp4_bytes(version, 600, duration, mdat=b"\x00" * 1000))

    with open(path, "rb") as f:
        assert mp4_duration(f) == pytest.approx(duration / 600)
    assert probe_file(path, "video/mp4", max_image_pixels=MAX_PIXELS).duration_seconds == (
        pytest.approx(duration / 600)
    )


def test_mp4_duration_missing_or_broken() -> None:
    ftyp = box(b"ftyp", b"isom\x00\x00\x02\x00")
    assert mp4_duration(io.BytesIO(ftyp + box(b"mdat", b"\x00" * 100))) is None  # no moov
    assert mp4_duration(io.BytesIO(ftyp + box(b"moov", box(b"trak", b"")))) is None  # no mvhd
    truncated = ftyp + struct.pack(">I4s", 10_000, b"moov") + mvhd(0, 600, 6000)
    assert mp4_duration(io.BytesIO(truncated)) is None  # box runs past the end
    assert mp4_duration(io.BytesIO(ftyp + box(b"moov", mvhd(0, 600, 0)))) is None  # fragmented


def test_probe_wav_duration(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * 8000)

    assert probe_file(path, "audio/wav", max_image_pixels=MAX_PIXELS).duration_seconds == 0.5


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_probe_animated_image(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "anim"
    path.write_bytes(animated(fmt, [100, 200, 300]))

    probe = probe_file(path, f"image/{fmt.lower()}", max_image_pixels=MAX_PIXELS)

    assert (probe.width, probe.height, probe.duration_seconds) == (320, 200, 0.6)
    assert probe.thumbnail is not None
    with Image.open(io.BytesIO(probe.thumbnail)) as thumb:
        assert (thumb.format, thumb.size) == ("WEBP", (256, 160))


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P", "1"])
def test_probe_still_image_modes(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes((100, 400), mode))

    probe = probe_file(path, "image/png", max_image_pixels=MAX_PIXELS)

    assert (probe.width, probe.height, probe.duration_seconds) == (100, 400, None)
    assert probe.thumbnail is not None
    with Image.open(io.BytesIO(probe.thumbnail)) as thumb:
        assert thumb.size == (64, 256)


def test_probe_refuses_corrupt_and_pillow_warning_images(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png_bytes()[:100])
    with pytest.raises(ProbeError):
        probe_file(corrupt, "image/png", max_image_pixels=MAX_PIXELS)

    # Between Pillow's own limit and twice it, Pillow only warns; that counts as a bomb.
    pillow_limit = Image.MAX_IMAGE_PIXELS or 0
    side = int((pillow_limit * 1.2) ** 0.5)
    warned = tmp_path / "warned.png"
    warned.write_bytes(bomb_png(side, side))
    with pytest.raises(ProbeError, match="decompression bomb"):
        probe_file(warned, "image/png", max_image_pixels=pillow_limit * 2)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data,served_as,hint,stored_as",
    [
        (b"<html><script>alert(document.cookie)</script></html>", "image/png", "image/png", "text/plain"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml", None, "text/plain"),
        (png_bytes((32, 32)), "text/html; charset=utf-8", "text/html", "image/png"),
    ],
    ids=["html-served-as-png", "svg", "png-served-as-html"],
)
async def test_stored_object_carries_the_sniffed_type_never_the_providers(
    s3_store: S3BlobStore, http: httpx.AsyncClient, provider: FileServer, tmp_dir: Path,
    data: bytes, served_as: str, hint: str | None, stored_as: str,
) -> None:
    """The S3 object's Content-Type (what a browser is told when it opens the download) is
    the one the bytes show, whatever the provider's answer and OutputRef hint said."""
    provider.routes["/out/typed"] = (200, {"Content-Type": served_as}, data)
    asset = await store_output(
        s3_store, http, OutputRef(url=f"{provider.url}/out/typed", content_type=hint),
        key_base="t/typed", index=0, max_bytes=MiB, max_image_pixels=MAX_PIXELS, tmp_dir=tmp_dir,
    )
    head = await asyncio.to_thread(s3_store._clients()[0].head_object, Bucket=s3_store.bucket, Key=asset.key)
    assert (asset.content_type, head["ContentType"]) == (stored_as, stored_as)
    served = await http.get(await s3_store.url(asset.key, expires_in=60))
    assert served.headers["content-type"] == stored_as and served.content == data
