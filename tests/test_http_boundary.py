"""adapters/http.py: transport failures and error statuses become the right ProviderError,
and a create that may have reached the provider is never marked safe to resend."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.http import error_from_response, retry_after, send
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from tests.fakes.server import free_port, serve


async def slow(request: Request) -> Response:
    await asyncio.sleep(2)
    return JSONResponse({"ok": True})


@pytest.fixture(scope="module")
def url():
    with serve(Starlette(routes=[Route("/slow", slow, methods=["GET", "POST"])])) as u:
        yield u


async def test_read_timeout_after_sending_a_create_is_not_resend_safe(url: str) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(0.3)) as http:
        with pytest.raises(ProviderError) as exc:
            await send(http, "POST", f"{url}/slow", provider="p", create=True, json={})
        assert exc.value.retryable and not exc.value.resend_safe
        with pytest.raises(ProviderError) as exc:  # a read (a poll) is always safe to repeat
            await send(http, "GET", f"{url}/slow", provider="p")
        assert exc.value.resend_safe


async def test_connect_error_is_resend_safe() -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        with pytest.raises(ProviderError) as exc:
            await send(http, "POST", f"http://127.0.0.1:{free_port()}/x", provider="p", create=True)
    assert exc.value.kind is ProviderErrorKind.retryable and exc.value.resend_safe


def _resp(status: int, body: object = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers, request=httpx.Request("POST", "http://p/x"))


@pytest.mark.parametrize(
    "status,body,headers,code,retry,safe",
    [
        (401, {"error": {"message": "bad key"}}, None, ErrorCode.provider_auth, False, False),
        (403, None, None, ErrorCode.provider_auth, False, False),
        (402, {"detail": "out of credits"}, None, ErrorCode.provider_error, False, False),
        (422, {"detail": [{"loc": ["body", "width"], "msg": "too big"}]}, None, ErrorCode.invalid_input, False, False),
        (429, {"detail": "slow down"}, {"retry-after": "7"}, ErrorCode.rate_limited, True, True),
        (503, None, None, ErrorCode.provider_unavailable, True, True),
        (500, None, {"x-should-retry": "false"}, ErrorCode.provider_error, False, False),
    ],
)
def test_status_mapping(status: int, body: object, headers: dict | None, code: ErrorCode, retry: bool, safe: bool) -> None:
    err = error_from_response(_resp(status, body, headers), "p")
    assert (err.code, err.retryable, err.resend_safe) == (code, retry, safe)
    if status == 422:
        assert "body.width: too big" in err.message


def test_retry_after_sources() -> None:
    assert retry_after(_resp(429, None, {"retry-after-ms": "1500"})) == 1.5
    assert retry_after(_resp(429, None, {"retry-after": "3"})) == 3
    assert retry_after(_resp(429, {"retry_after": 5})) == 5
    google = {"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}
    assert retry_after(_resp(429, google)) == 30
    assert retry_after(_resp(429, {})) is None
