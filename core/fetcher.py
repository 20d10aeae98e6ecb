"""The one guarded outbound fetcher (DESIGN.md §12) for every URL a tenant or a provider
hands us: input images and masks, provider output URLs, provider polling follow-ups,
webhook targets.

    async with fetcher.fetch(http, url, max_bytes=..., timeout=...) as got:
        got.response.status_code            # any status: the caller decides
        async for chunk in got.chunks(): ...  # at most max_bytes, within the time left

Each hop (the first URL and every redirect) is checked by `core.netguard` and connected
to by the address that was checked, with the original host kept for Host and TLS SNI
(so certificates are verified against the name, not the IP). Redirects are followed by
hand up to `max_redirects` (0: the 3xx answer is returned as is); the caller's headers
never leave the first origin. Bytes are capped while streaming (a Content-Length over
the cap is refused before reading) and one deadline covers resolving, connecting and
reading. Every refusal or failure is one FetchError whose `reason` is fit to show a
tenant: it names the guard that stopped the fetch, never a refused target's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urljoin, urlsplit

import httpx

from core import netguard

REDIRECTS = frozenset({301, 302, 303, 307, 308})


class FetchFailure(StrEnum):
    refused = "refused"  # the guard: scheme, address, credentials in the URL
    redirects = "redirects"  # too many redirects, or a redirect the guard refused
    too_large = "too_large"  # over the byte cap
    timeout = "timeout"  # over the overall deadline
    stalled = "stalled"  # no byte for `idle` seconds (when the caller set one)
    transport = "transport"  # connection refused or broken, TLS failure


class FetchError(Exception):
    """Why a fetch did not happen or did not finish (`kind`), in words for the caller's
    user (`reason`)."""

    def __init__(self, kind: FetchFailure, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class Fetched:
    """An answer whose body is still to be read through `chunks()` or `read()`."""

    response: httpx.Response
    url: str  # the URL that answered (after redirects)
    max_bytes: int
    deadline: float  # loop time
    idle: float | None = None  # seconds without a byte that end the read (None: only the deadline)

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        # as the bytes arrive (httpx reads at most 64 KiB at a time), never gathered into
        # fixed-size chunks: a chunker holds back what a broken connection delivered before it
        # broke, and a resumed download (storage.ingest: `Range: bytes=N-`) would ask for it again
        it = self.response.aiter_bytes().__aiter__()
        total = 0
        while True:
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                raise FetchError(FetchFailure.timeout, "the download took longer than allowed")
            wait = remaining if self.idle is None else min(remaining, self.idle)
            try:
                chunk = await asyncio.wait_for(it.__anext__(), wait)
            except StopAsyncIteration:
                return
            except (TimeoutError, httpx.ReadTimeout):
                if wait < remaining:
                    raise FetchError(FetchFailure.stalled, f"the download stalled (no data for {self.idle:g} s)") from None
                raise FetchError(FetchFailure.timeout, "the download took longer than allowed") from None
            except httpx.HTTPError as exc:
                raise FetchError(FetchFailure.transport, f"the download broke ({type(exc).__name__})") from exc
            total += len(chunk)
            if total > self.max_bytes:
                raise FetchError(FetchFailure.too_large, f"the body is over the limit of {self.max_bytes} bytes")
            yield chunk

    async def read(self) -> bytes:
        """The whole body, for small capped things (an input image)."""
        buf = bytearray()
        async for chunk in self.chunks():
            buf += chunk
        return bytes(buf)


@asynccontextmanager
async def fetch(
    http: httpx.AsyncClient,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    max_bytes: int,
    timeout: float,
    max_redirects: int = 5,
    connect_timeout: float = 10.0,
    idle: float | None = None,
    every_hop: dict[str, str] | None = None,
) -> AsyncIterator[Fetched]:
    """Open `url` through the guard; the response is closed when the block ends.

    `idle`: besides the overall `timeout`, the longest wait for the answer or for the next
    chunk of the body (a stalled stream fails as `stalled`, one that keeps flowing runs up
    to `timeout`). `every_hop`: headers that carry no secret and go to every hop, redirects
    to other origins too (`Range`, `Accept-Encoding`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    response = await _open(http, method, url, headers or {}, content, max_bytes, deadline, max_redirects, connect_timeout,
                           idle, every_hop or {})
    try:
        yield Fetched(response, str(response.request.extensions.get("genroute_url", url)), max_bytes, deadline, idle)
    finally:
        await response.aclose()


async def _open(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    headers: dict[str, str],
    content: bytes | None,
    max_bytes: int,
    deadline: float,
    max_redirects: int,
    connect_timeout: float,
    idle: float | None = None,
    every_hop: dict[str, str] | None = None,
) -> httpx.Response:
    loop = asyncio.get_running_loop()
    first_origin = _origin(url)
    for hop in range(max_redirects + 1):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise FetchError(FetchFailure.timeout, "the fetch took longer than allowed")
        try:
            target = await asyncio.wait_for(netguard.resolve(url), remaining)
        except netguard.UnsafeURL as exc:
            kind = FetchFailure.refused if hop == 0 else FetchFailure.redirects
            where = "" if hop == 0 else f"a redirect (hop {hop}) was refused: "
            raise FetchError(kind, f"{where}{exc}") from None
        except TimeoutError:
            raise FetchError(FetchFailure.timeout, "resolving the host took longer than allowed") from None
        parts = urlsplit(url)
        hop_headers = dict(headers) if _origin(url) == first_origin else {}
        hop_headers.update(every_hop or {})
        hop_headers["host"] = parts.netloc
        extensions: dict[str, object] = {"genroute_url": url}
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
        remaining = max(0.001, deadline - loop.time())
        read = remaining if idle is None else min(idle, remaining)
        request = http.build_request(
            method,
            target.pinned_url(parts),
            headers=hop_headers,
            content=content,
            timeout=httpx.Timeout(read, connect=min(connect_timeout, remaining)),
            extensions=extensions,
        )
        try:
            response = await http.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ReadTimeout) and idle is not None and read < remaining:
                raise FetchError(FetchFailure.stalled, f"the target did not answer within {idle:g} s") from exc
            raise FetchError(FetchFailure.timeout, "the target did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise FetchError(FetchFailure.transport, f"cannot reach the target ({type(exc).__name__})") from exc
        location = response.headers.get("location")
        if response.status_code not in REDIRECTS or not location or max_redirects == 0:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                await response.aclose()
                raise FetchError(FetchFailure.too_large, f"the body is {length} bytes, over the limit of {max_bytes} bytes")
            return response
        await response.aclose()
        url = urljoin(url, location)
        if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
            method, content = "GET", None
    raise FetchError(FetchFailure.redirects, f"more than {max_redirects} redirects")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port
