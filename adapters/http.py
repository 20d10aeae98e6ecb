"""HTTP at the provider boundary: one place that turns transport failures and error
responses into ProviderError (httpx's `map_httpcore_exceptions` is the model).

    send(...)            -> httpx.Response, or ProviderError for transport failures
    raise_for_status(r)  -> None, or ProviderError by status (adapters refine first)
    retry_after(r)       -> seconds from Retry-After / retry-after-ms / body / Google RetryInfo
    follow_up(...)       -> httpx.Response for a URL a provider's answer named (a polling or
                            result URL): on the deployment's own origin as `send`, elsewhere
                            through the guarded fetcher (core/fetcher.py)

Whose fault (core.errors.Fault) is decided here, once:

    connect failure, 5xx, timeout, 429   provider  (counts against the deployment's health)
    400/409/413/415/422                  user      (the request; no health effect)
    401/403, 402, 404/405 on a create    operator  (a bad key, no credits, a wrong model or
                                                    base URL: this deployment is marked out)
    404 on a read (poll, result)         provider  (it lost the task)
    an input URL that does not answer    user      (`send(..., fault=Fault.user)`)

A create that may have reached the provider (the request was sent, then the read timed
out, the connection broke, or a 5xx came back, which a gateway can send after the
provider accepted the task) is `resend_safe=False`: no provider documents an idempotency
key, so resending could start and bill a second task. An adapter that can prove no task
exists (it looked the task up by a client reference) may say otherwise.
"""

from __future__ import annotations

import contextvars
import email.utils
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from core import fetcher, logs
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind

# The read timeout of the provider call in progress (adapters/registry.py sets it around
# each submit, poll and cancel from the deployment's `timeouts`); a request that names its
# own timeout keeps it.
CALL_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar("genroute_call_timeout", default=None)
CONNECT_SECONDS = 10.0

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
_CREATE = "genroute.create"  # response extension: the request was a create (error_from_response reads it)


@contextmanager
def transport_errors(provider: str, *, create: bool, fault: Fault = Fault.provider) -> Iterator[None]:
    """Transport failures become ProviderError(retryable). Reads (GET, polls) are always
    safe to resend; a create only when it provably never left. With `fault=Fault.user`
    (a URL the user gave us), a failure is the user's: invalid input, no health effect."""
    if fault is Fault.user:
        try:
            yield
        except httpx.HTTPError as exc:
            raise ProviderError(
                ProviderErrorKind.invalid,
                f"{provider}: cannot be fetched ({type(exc).__name__})",
                code=ErrorCode.invalid_input,
                fault=Fault.user,
            ) from exc
        return
    try:
        yield
    except _NOT_SENT as exc:
        raise ProviderError(
            ProviderErrorKind.retryable,
            f"{provider}: cannot connect ({type(exc).__name__})",
            resend_safe=True,
        ) from exc
    except httpx.TimeoutException as exc:
        raise ProviderError(
            ProviderErrorKind.retryable,
            f"{provider}: timed out waiting for an answer ({type(exc).__name__})",
            resend_safe=not create,
        ) from exc
    except httpx.TransportError as exc:
        raise ProviderError(
            ProviderErrorKind.retryable,
            f"{provider}: connection failed mid-request ({type(exc).__name__})",
            resend_safe=not create,
        ) from exc


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    create: bool = False,
    fault: Fault = Fault.provider,
    **kwargs: Any,
) -> httpx.Response:
    """One request, its body read; transport failures mapped by `transport_errors`.
    The request id of the work it serves goes along (X-Request-Id), for the provider's logs.
    `fault`: whose fault a failure to reach `url` is (Fault.user for a user's input URL)."""
    rid = logs.request_id()
    if rid is not None:
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "X-Request-Id": rid}
    limit = CALL_TIMEOUT.get()
    if limit is not None and "timeout" not in kwargs:
        kwargs["timeout"] = httpx.Timeout(limit, connect=min(CONNECT_SECONDS, limit))
    with transport_errors(provider, create=create, fault=fault):
        resp = await http.request(method, url, **kwargs)
    resp.extensions[_CREATE] = create
    return resp


async def send_stream(http: httpx.AsyncClient, request: httpx.Request, *, provider: str, create: bool = True) -> httpx.Response:
    """Like `send`, but the body is left to stream (the caller closes the response)."""
    rid = logs.request_id()
    if rid is not None and "x-request-id" not in request.headers:
        request.headers["X-Request-Id"] = rid
    with transport_errors(provider, create=create):
        resp = await http.send(request, stream=True)
    resp.extensions[_CREATE] = create
    return resp


FOLLOW_UP_MAX_BYTES = 8 * 2**20  # a polling or result answer is JSON: far less than this
FOLLOW_UP_SECONDS = 60.0


def same_origin(url: str, base: str) -> bool:
    """Whether `url` is on the deployment's base URL's origin (scheme, host, port): the
    operator's choice, trusted like the base URL itself."""
    try:
        a, b = httpx.URL(url), httpx.URL(base)
    except httpx.InvalidURL:
        return False
    return (a.scheme, a.host, a.port or _PORTS.get(a.scheme)) == (b.scheme, b.host, b.port or _PORTS.get(b.scheme))


_PORTS = {"http": 80, "https": 443}


async def follow_up(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    base: str,
    provider: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    """A request to a URL the provider's answer named. On the base URL's origin it is sent
    like any call to the provider; anywhere else it goes through the guarded fetcher (the
    address checked and connected to as checked, no redirect followed, the answer capped),
    so a provider, or whoever answers in its name, cannot point us into our own network.
    A refused URL is the provider's fault and ends the job; transport trouble is retried."""
    if same_origin(url, base):
        return await send(http, method, url, provider=provider, headers=headers, params=params)
    if params:
        url = str(httpx.URL(url).copy_merge_params(params))
    try:
        async with fetcher.fetch(http, url, method=method, headers=headers, max_bytes=FOLLOW_UP_MAX_BYTES,
                                 timeout=FOLLOW_UP_SECONDS, max_redirects=0) as got:
            content = await got.read()
            answer = got.response
    except fetcher.FetchError as exc:
        if exc.kind in (fetcher.FetchFailure.transport, fetcher.FetchFailure.timeout):
            raise ProviderError(ProviderErrorKind.retryable, f"{provider}: {exc.reason}", resend_safe=True) from None
        raise ProviderError(
            ProviderErrorKind.failed, f"{provider}: the URL its answer named was not fetched: {exc.reason}",
            detail={"fetch": exc.kind.value},
        ) from None
    # the body is decoded already: the headers must not say otherwise
    kept = [(k, v) for k, v in answer.headers.multi_items() if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(answer.status_code, headers=kept, content=content, request=answer.request)


def body_json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def error_message(resp: httpx.Response) -> str:
    """The provider's own words, from the error shapes providers use."""
    body = body_json(resp)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and body.get("message"):
            return f"{err}: {body['message']}"
        detail = body.get("detail")
        if isinstance(detail, str):
            return f"{body['title']}: {detail}" if body.get("title") else detail
        if isinstance(detail, list) and detail:
            parts = []
            for d in detail[:5]:
                if isinstance(d, dict):
                    loc = ".".join(str(x) for x in d.get("loc", []))
                    parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", d)))
                else:
                    parts.append(str(d))
            return "; ".join(parts)
        for key in ("message", "msg", "error"):
            if isinstance(body.get(key), str):
                return str(body[key])
    text = resp.text.strip()
    return text[:300] if text else resp.reason_phrase


_GOOGLE_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")


def retry_after(resp: httpx.Response) -> float | None:
    ms = resp.headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = resp.headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(ra) if ra else None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - time.time())
    body = body_json(resp)
    if isinstance(body, dict):
        if isinstance(body.get("retry_after"), int | float):
            return float(body["retry_after"])
        err = body.get("error")
        details = err.get("details") if isinstance(err, dict) else None
        for d in details or []:
            if isinstance(d, dict) and str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
                m = _GOOGLE_DELAY.match(str(d.get("retryDelay", "")))
                if m:
                    return float(m[1])
    return None


def was_create(resp: httpx.Response) -> bool:
    """Whether `resp` answers a create sent through `send`/`send_stream` (else: a read)."""
    return bool(resp.extensions.get(_CREATE, resp.request.method == "POST"))


def error_from_response(resp: httpx.Response, provider: str, *, create: bool | None = None) -> ProviderError:
    """The generic status mapping, with whose fault it is; adapters check
    provider-specific bodies first. `create` defaults to what `send` recorded."""
    status = resp.status_code
    is_create = was_create(resp) if create is None else create
    message = f"{provider} answered {status}: {error_message(resp)}"
    detail = {"status": status, "body": body_json(resp) if body_json(resp) is not None else resp.text[:500]}
    if status == 429:
        return ProviderError(ProviderErrorKind.rate_limited, message, retry_after=retry_after(resp), detail=detail, resend_safe=True)
    if status >= 500:
        should = resp.headers.get("x-should-retry")
        if should == "false":
            return ProviderError(ProviderErrorKind.failed, message, detail=detail)
        # a 502/504 from a gateway can follow a create the provider accepted: not resent
        return ProviderError(ProviderErrorKind.retryable, message, retry_after=retry_after(resp), detail=detail,
                             resend_safe=not is_create)
    if status in (401, 403):
        return ProviderError(ProviderErrorKind.auth, message, detail=detail)
    if status == 402:
        return ProviderError(ProviderErrorKind.quota, message, detail=detail)
    if status in (404, 405):
        if is_create:  # the deployment names a model or URL the provider does not have
            return ProviderError(
                ProviderErrorKind.invalid,
                f"{message} (the deployment is misconfigured: check its model and base_url)",
                detail=detail, fault=Fault.operator, resend_safe=True,
            )
        return ProviderError(ProviderErrorKind.failed, message, detail=detail)  # it lost the task
    if status in (400, 409, 413, 415, 422):
        return ProviderError(ProviderErrorKind.invalid, message, detail=detail)
    return ProviderError(ProviderErrorKind.failed, message, detail=detail)


def raise_for_status(resp: httpx.Response, provider: str) -> None:
    if resp.is_success:
        return
    raise error_from_response(resp, provider)


def unsupported(param: str, value: Any, allowed: Any, model: str) -> ProviderError:
    """A parameter the chosen model cannot honour: refused before anything is sent."""
    return ProviderError(
        ProviderErrorKind.invalid,
        f"{model} cannot honour {param}={value!r}; allowed: {allowed}",
        code=ErrorCode.invalid_input,
        detail={"loc": ["input", param], "allowed": allowed},
    )


def moderated(message: str, stage: str, reasons: list[str] | None = None) -> ProviderError:
    return ProviderError(
        ProviderErrorKind.moderated, message, detail={"stage": stage, "reasons": reasons or []}
    )
