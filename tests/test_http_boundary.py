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
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.routing.router import NO_EFFECT, can_fall_back, health_effect
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


def _resp(status: int, body: object = None, headers: dict[str, str] | None = None, method: str = "POST") -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers, request=httpx.Request(method, "http://p/x"))


U, P, OP = Fault.user, Fault.provider, Fault.operator


@pytest.mark.parametrize(
    "status,body,headers,method,code,retry,safe,fault",
    [
        (401, {"error": {"message": "bad key"}}, None, "POST", ErrorCode.provider_auth, False, False, OP),
        (403, None, None, "GET", ErrorCode.provider_auth, False, False, OP),
        (402, {"detail": "out of credits"}, None, "POST", ErrorCode.provider_error, False, False, OP),
        (422, {"detail": [{"loc": ["body", "width"], "msg": "too big"}]}, None, "POST", ErrorCode.invalid_input, False, False, U),
        (400, {"error": {"message": "bad size"}}, None, "POST", ErrorCode.invalid_input, False, False, U),
        # a misconfigured deployment: the operator's, never reported as the user's input
        (404, {"detail": "Model not found: acme/nope"}, None, "POST", ErrorCode.provider_unavailable, False, True, OP),
        (404, {"detail": "prediction not found"}, None, "GET", ErrorCode.provider_error, False, False, P),
        (429, {"detail": "slow down"}, {"retry-after": "7"}, "POST", ErrorCode.rate_limited, True, True, P),
        # a 5xx on a create may follow an accepted task (a gateway's 502/504): not resent
        (503, None, None, "POST", ErrorCode.provider_unavailable, True, False, P),
        (502, None, None, "POST", ErrorCode.provider_unavailable, True, False, P),
        (503, None, None, "GET", ErrorCode.provider_unavailable, True, True, P),
        (500, None, {"x-should-retry": "false"}, "POST", ErrorCode.provider_error, False, False, P),
    ],
)
def test_status_mapping(status: int, body: object, headers: dict | None, method: str, code: ErrorCode, retry: bool,
                        safe: bool, fault: Fault) -> None:
    err = error_from_response(_resp(status, body, headers, method), "p")
    assert (err.code, err.retryable, err.resend_safe, err.fault) == (code, retry, safe, fault)
    if status == 422:
        assert "body.width: too big" in err.message


async def test_send_records_whether_it_was_a_create(url: str) -> None:
    """Cancel and Veo's poll are POSTs too: whether a 404 is the operator's depends on what
    `send` was told, not on the method."""
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await send(http, "POST", f"{url}/missing", provider="p", create=False)
        assert resp.status_code == 404
        assert error_from_response(resp, "p").fault is Fault.provider
        resp = await send(http, "POST", f"{url}/missing", provider="p", create=True)
        assert error_from_response(resp, "p").fault is Fault.operator


async def test_an_input_url_that_does_not_answer_is_the_users_fault() -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        with pytest.raises(ProviderError) as exc:
            await send(http, "GET", f"http://127.0.0.1:{free_port()}/in.png", provider="input image", fault=Fault.user)
    e = exc.value
    assert (e.kind, e.code, e.fault, e.retryable) == (ProviderErrorKind.invalid, ErrorCode.invalid_input, Fault.user, False)
    assert health_effect(e) == NO_EFFECT and not can_fall_back(e)


def test_retry_after_sources() -> None:
    assert retry_after(_resp(429, None, {"retry-after-ms": "1500"})) == 1.5
    assert retry_after(_resp(429, None, {"retry-after": "3"})) == 3
    assert retry_after(_resp(429, {"retry_after": 5})) == 5
    google = {"error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}
    assert retry_after(_resp(429, google)) == 30
    assert retry_after(_resp(429, {})) is None
