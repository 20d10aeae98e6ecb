"""POST /v1/chat/completions: OpenAI's chat API, routed inline by the same catalog and router
as jobs (DESIGN.md §1: text runs in the API process and streams back).

    key gate (scopes, rate, concurrency) ─► hold (budgeted tenants: 402 when it does not fit)
    snapshot ─► plan ─► for each candidate: acquire slot (lease = request id)
                                             ├─ adapter.chat (stream: and its first chunk)
                                             │    ProviderError + can_fall_back ─► release, next
                                             └─ answer ─► ... last byte ─► release, record usage,
                                                          settle the tokens used (or release)

Falling back happens only before the first byte: a stream is committed to its deployment
once its first chunk is in hand (errors raised before the first chunk fall back too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from api.deps import PrincipalDep, RuntimeDep
from api.openai_compat import OpenAIError, from_provider, invalid, model_for, openai_router
from api.params import check_provider_params
from api.streams import Revoked, StreamGuard, until_ended
from core import metrics
from core.billing.ledger import Close, hold, hold_for
from core.billing.pricing import chat_cost, reported_cost
from core.billing.usage import count_tokens, prompt_text, record_usage, tokens_of
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.ids import new_id
from core.keys import Principal
from core.limits.keys import admit, take_or_refuse
from core.models import UsageRecord
from core.routing.catalog import Deployment, Model
from core.routing.dispatch import Placed, Refused, Unplaced, dispatch, release
from core.routing.router import Candidate
from core.runtime import Runtime

router = openai_router(tags=["openai"])

CHAT_BASE = frozenset({"model", "messages", "stream"})  # every chat deployment takes these
# What a provider bills and where it routed (OpenRouter's usage.cost, its `provider`): kept
# for usage and settling, never shown to a tenant
PRIVATE_USAGE = frozenset({"cost", "cost_credits", "cost_details", "is_byok"})
PRIVATE_ANSWER = frozenset({"provider"})
_background: set[asyncio.Task[None]] = set()  # detached end-of-call work, kept from the GC


class CannotChat(ProviderError):
    """The catalog routes text to a deployment that cannot chat: skip it (nothing was sent)."""


def _config_error(message: str) -> CannotChat:
    return CannotChat(ProviderErrorKind.retryable, message, code=ErrorCode.provider_unavailable, resend_safe=True, fault=Fault.operator)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()  # api/strict.py: NaN, NUL and deep nesting refused too
    except ValueError as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("Invalid 'messages': expected a non-empty array of messages.", "messages", code="invalid_type" if messages else "empty_array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"Invalid 'messages[{i}]': expected an object with a 'role'.", f"messages[{i}]", code="invalid_type")
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise invalid(f"Invalid '{key}': expected a positive integer.", key)
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2):
        raise invalid("Invalid 'temperature': expected a number from 0 to 2.", "temperature")
    return body


class _Call:
    """One chat call's bookkeeping, written to usage_records when it is over."""

    def __init__(self, rt: Runtime, principal: Principal, model: Model, body: dict[str, Any], stream: bool) -> None:
        self.rt = rt
        self.id = new_id("chat")  # "chat_" ids: the reconciler releases their holds if the call never ends
        self.held = 0  # micro-USD held against the tenant's budget
        self.slot = False  # holds one of the key's concurrency slots
        self.principal = principal
        self.model = model
        self.body = body
        self.stream = stream
        self.t0 = time.monotonic()
        self.attempts: list[dict[str, Any]] = []
        self.deployment: Deployment | None = None
        self.usage: dict[str, Any] | None = None
        self.answered_model: str | None = None  # the answer's `model`: an aggregator's fallback may answer
        self.text: list[str] = []  # streamed content, to count tokens when no usage came
        self.status = "failed"
        self.error_code: str | None = None

    async def open(self) -> None:
        """The key's concurrency slot (429 when full) and, for a budgeted tenant, the hold."""
        quotas = self.rt.ledger.quotas
        await take_or_refuse(quotas, self.principal, self.id)
        self.slot = self.principal.max_concurrency is not None
        if not self.principal.budgeted:
            return  # nothing to check against: the call is settled when it ends
        amount = hold_for(self.model, self.rt.catalog, self.body)
        try:
            async with self.rt.sessions() as s:
                await hold(s, tenant=self.principal.tenant, key_id=self.principal.key_id, subject_id=self.id,
                           amount=amount, model=self.model.id)
                await s.commit()
        except BaseException:
            await self._free_slot()
            raise
        self.held = amount

    async def _free_slot(self) -> None:
        if self.slot and self.rt.ledger.quotas is not None:
            self.slot = False
            await self.rt.ledger.quotas.free(self.principal.key_id, self.id)
            await self.rt.ledger.wake_key(self.principal.key_id)  # a job may wait for this slot

    async def finish(self) -> None:
        """Free the slots, record the call and settle it: after the response, never before
        its first byte. A call no deployment answered is released (nothing charged)."""
        dep = self.deployment
        try:
            if dep is not None:
                await release(self.rt, dep, self.id, success=self.status == "succeeded")
            await self._free_slot()
        finally:
            counted = tokens_of(self.usage)
            if counted is None:
                counted = (count_tokens(prompt_text(self.body.get("messages"))), count_tokens("".join(self.text)))
            prompt, completion = counted if dep is not None else (0, 0)
            cost = chat_cost(dep.price, prompt, completion, self.usage) if dep is not None else None
            basis = None
            if dep is not None:
                basis = "unpriced" if dep.price is None else (
                    "provider_cost" if reported_cost(dep.price, self.usage or {}) is not None else "tokens")
            record = UsageRecord(
                id=self.id, tenant=self.principal.tenant, key_id=self.principal.key_id, kind="chat",
                model=self.model.id, deployment=dep.name if dep else None, status=self.status, stream=self.stream,
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                cost=cost, attempts=_answered(self.attempts, dep, self.answered_model), error_code=self.error_code,
                duration_ms=int((time.monotonic() - self.t0) * 1000),
            )
            metrics.chat_finished(self.model.id, record.deployment or "", self.status, prompt, completion, record.cost,
                                  time.monotonic() - self.t0)
            p = self.principal
            close = Close(p.tenant, p.key_id, self.id, self.held, (record.cost or 0) if dep is not None else None,
                          basis, self.model.id, record.deployment)
            if self.rt.usage is not None:
                self.rt.usage.add(record, close)  # batched off the request path
            else:
                await record_usage(self.rt.sessions, record, close)

    def finish_detached(self) -> None:
        """`finish` in its own task: it must run even when a dropped client cancels the stream."""
        task = asyncio.create_task(self.finish())
        _background.add(task)
        task.add_done_callback(_background.discard)


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, rt: RuntimeDep, principal: PrincipalDep) -> JSONResponse | StreamingResponse:
    body = await _body(request)
    if not body.get("model"):
        raise invalid("you must provide a model parameter", "model", code="missing_required_parameter")
    model = model_for(rt, body["model"], "text")
    await admit(rt.ledger.quotas, principal, model.id, model.modality)
    # the body reaches the provider as it is (the model id replaced): only settable fields
    check_provider_params(rt.catalog, model, {k: v for k, v in body.items() if k not in CHAT_BASE}, loc=())
    stream = bool(body.get("stream"))
    client_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else True
    upstream = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    if stream:
        upstream["stream_options"] = {"include_usage": True}  # so usage is recorded; stripped below if not asked
    call = _Call(rt, principal, model, body, stream)
    await call.open()

    async def call_chat(cand: Candidate, adapter: Any, attempts: list[dict[str, Any]]) -> tuple[Any, Any]:
        call.attempts = attempts
        chat = getattr(adapter, "chat", None)
        if chat is None:
            raise _config_error(f"deployment {cand.deployment.name!r}: adapter {cand.deployment.adapter!r} has no chat endpoint")
        t0 = time.monotonic()
        try:
            result = await chat(upstream, stream=stream)
            first = await anext(result, None) if stream else None
        except ProviderError as exc:
            metrics.provider_call(cand.deployment.name, "chat", exc.kind.value, time.monotonic() - t0)
            raise
        metrics.provider_call(cand.deployment.name, "chat", "ok", time.monotonic() - t0)  # to the first chunk when streaming
        return result, first

    try:
        out = await dispatch(rt, model, body, call.id, call_chat, counts=lambda exc: not isinstance(exc, CannotChat))
    except BaseException:  # a bug, or the client gone: the slot is free; release the hold, let it propagate
        call.finish_detached()
        raise
    call.attempts = out.attempts
    if isinstance(out, Placed):
        result, first = out.value
        dep = out.deployment
        call.deployment = dep
        headers = {"x-genroute-request-id": call.id, "x-genroute-deployment": dep.name}
        if not stream:
            assert isinstance(result, dict)
            call.status, call.usage = "succeeded", result.get("usage")
            call.answered_model = result.get("model") if isinstance(result.get("model"), str) else None
            answer = {**_public(result), "model": model.id}
            return JSONResponse(answer, headers=headers, background=BackgroundTask(call.finish))
        if first is not None and isinstance(first.get("model"), str):
            call.answered_model = first["model"]
        return StreamingResponse(
            _sse(call, first, result, client_usage, request.app.state.streams),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    last = out.error if isinstance(out, Refused) else None
    call.error_code = last.code.value if last is not None else ErrorCode.provider_unavailable.value
    call.finish_detached()
    if last is not None:
        raise from_provider(last)
    if isinstance(out, Unplaced) and out.plan.status in ("wait", "cooldown"):
        raise OpenAIError(429, out.plan.message(), type="rate_limit_error", code="rate_limit_exceeded",
                          headers={"retry-after": str(max(1, round(out.retry_in(1.0, 3600.0))))})
    message = out.plan.message() if isinstance(out, Unplaced) else "no usable deployment"
    raise OpenAIError(503, message, type="server_error", code="provider_unavailable")


def _public(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer or chunk without the provider's billing and routing fields."""
    out = {k: v for k, v in answer.items() if k not in PRIVATE_ANSWER}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k not in PRIVATE_USAGE}
    return out


def _answered(attempts: list[dict[str, Any]], dep: Deployment | None, model: str | None) -> list[dict[str, Any]]:
    """The attempts, the one that answered carrying `answered_model` (the provider's model
    id that answered: the deployment's, or one of its in-provider fallbacks)."""
    if dep is None or not model:
        return attempts
    out = [dict(a) for a in attempts]
    for entry in reversed(out):
        if entry.get("deployment") == dep.name and not entry.get("error"):
            entry["answered_model"] = model
            break
    return out


def _ms(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


async def _sse(call: _Call, first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], client_usage: bool,
               guard: StreamGuard) -> AsyncIterator[bytes]:
    """The chunks as `data: {...}` lines, then `data: [DONE]`. A failure mid-stream can no
    longer fall back: it ends the stream with an error event, as OpenAI does. A key revoked
    or expired mid-stream ends it the same way (api/streams.py), and the upstream call with it."""
    call.status = "incomplete"
    try:
        with guard.watch(call.principal) as watch:
            items = until_ended(rest, watch)  # owns `rest` and closes it
            async with contextlib.aclosing(items):
                chunk = first
                while chunk is not None:
                    if chunk.get("usage"):
                        call.usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if isinstance(content, str):
                            call.text.append(content)
                    is_usage_chunk = not chunk.get("choices") and "usage" in chunk
                    if not (is_usage_chunk and not client_usage):
                        out = {**_public(chunk), "model": call.model.id}
                        if not client_usage:
                            out.pop("usage", None)
                        yield b"data: " + json.dumps(out, separators=(",", ":")).encode() + b"\n\n"
                    chunk = await anext(items, None)
        call.status = "succeeded"
        yield b"data: [DONE]\n\n"
    except ProviderError as exc:
        call.error_code = exc.code.value
        err = from_provider(exc)
        payload = {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
        yield b"data: " + json.dumps(payload).encode() + b"\n\n"
    except Revoked as exc:
        call.error_code = "unauthorized"
        payload = {"error": {"message": exc.reason, "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}}
        yield b"data: " + json.dumps(payload).encode() + b"\n\n"
    finally:
        closer = getattr(rest, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):  # normally closed already; the upstream is done with either way
                await closer()
        call.finish_detached()
