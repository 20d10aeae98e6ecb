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
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from adapters.base import Adapter
from adapters.registry import UnknownAdapter, build_adapter
from api.deps import PrincipalDep, RuntimeDep
from api.openai_compat import OpenAIError, from_provider, invalid, model_for, openai_router
from core.billing import Close, hold, hold_for
from core.catalog import Deployment, Model
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.ids import new_id
from core.keys import Principal
from core.limits import Denied
from core.models import UsageRecord, utcnow
from core.quotas import admit, take_or_refuse
from core.router import Candidate, can_fall_back, plan, reachable
from core.runtime import Runtime
from core.usage import chat_cost, count_tokens, prompt_text, record_usage, tokens_of

router = openai_router(tags=["openai"])

_background: set[asyncio.Task[None]] = set()  # detached end-of-call work, kept from the GC


def _chat_of(request: Request, dep: Deployment, rt: Runtime) -> Any:
    """The deployment's adapter's `chat` (one adapter per deployment per process, rebuilt
    when a catalog reload replaces the deployment). A deployment that cannot chat is a
    catalog mistake: a ProviderError that falls back and does not count against health."""
    cache: dict[str, tuple[Deployment, Adapter]] = request.app.state.__dict__.setdefault("chat_adapters", {})
    hit = cache.get(dep.name)
    if hit is None or hit[0] is not dep:
        try:
            hit = (dep, build_adapter(dep, rt.http))
        except UnknownAdapter as exc:
            raise _config_error(str(exc)) from exc
        cache[dep.name] = hit
    chat = getattr(hit[1], "chat", None)
    if chat is None:
        raise _config_error(f"deployment {dep.name!r}: adapter {dep.adapter!r} has no chat endpoint")
    return chat


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
        self.text: list[str] = []  # streamed content, to count tokens when no usage came
        self.status = "failed"
        self.error_code: str | None = None

    def attempt(self, cand: Candidate) -> dict[str, Any]:
        entry = {"deployment": cand.deployment.name, "model": cand.model.id, "started_at": utcnow().isoformat()}
        self.attempts.append(entry)
        return entry

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

    async def finish(self) -> None:
        """Free the slots, record the call and settle it: after the response, never before
        its first byte. A call no deployment answered is released (nothing charged)."""
        dep = self.deployment
        try:
            if dep is not None:
                await self.rt.limiter.release(dep.name, self.id, success=self.status == "succeeded")
            await self._free_slot()
        finally:
            counted = tokens_of(self.usage)
            if counted is None:
                counted = (count_tokens(prompt_text(self.body.get("messages"))), count_tokens("".join(self.text)))
            prompt, completion = counted if dep is not None else (0, 0)
            record = UsageRecord(
                id=self.id, tenant=self.principal.tenant, key_id=self.principal.key_id, kind="chat",
                model=self.model.id, deployment=dep.name if dep else None, status=self.status, stream=self.stream,
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                cost=chat_cost(dep.price, prompt, completion) if dep is not None else None,
                attempts=self.attempts, error_code=self.error_code, duration_ms=int((time.monotonic() - self.t0) * 1000),
            )
            p = self.principal
            close = Close(p.tenant, p.key_id, self.id, self.held, (record.cost or 0) if dep is not None else None,
                          ("tokens" if dep.price is not None else "unpriced") if dep is not None else None,
                          self.model.id, record.deployment)
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
    stream = bool(body.get("stream"))
    client_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else True
    upstream = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    if stream:
        upstream["stream_options"] = {"include_usage": True}  # so usage is recorded; stripped below if not asked
    call = _Call(rt, principal, model, body, stream)
    await call.open()

    cat = rt.catalog
    snap = await rt.limiter.snapshot(reachable(model, cat), catalog_version=cat.version)
    p = plan(model, body, snap.states, now=snap.now, catalog=cat)
    last: ProviderError | None = None
    for cand in p.candidates:
        dep = cand.deployment
        if isinstance(await rt.limiter.acquire(dep, lease_id=call.id, tokens=cand.estimated_tokens), Denied):
            continue  # taken since the snapshot
        entry = call.attempt(cand)
        t0 = time.monotonic()
        try:
            chat = _chat_of(request, dep, rt)
            result = await chat(upstream, stream=stream)
            first = await anext(result, None) if stream else None
        except ProviderError as exc:
            await rt.limiter.release(dep.name, call.id)
            if not isinstance(exc, CannotChat):  # our catalog's fault is not the provider's health
                await rt.limiter.record_error(dep, exc, catalog_version=cat.version)
            entry.update(duration_ms=_ms(t0), error={"code": exc.code.value, "message": exc.message[:500]})
            last = exc
            if can_fall_back(exc):
                continue
            break
        except BaseException:  # a bug, or the client gone: free the slots, release the hold, let it propagate
            await rt.limiter.release(dep.name, call.id)
            call.finish_detached()
            raise
        entry["duration_ms"] = _ms(t0)
        call.deployment = dep
        headers = {"x-genroute-request-id": call.id, "x-genroute-deployment": dep.name}
        if not stream:
            assert isinstance(result, dict)
            call.status, call.usage = "succeeded", result.get("usage")
            answer = {**result, "model": model.id}
            return JSONResponse(answer, headers=headers, background=BackgroundTask(call.finish))
        return StreamingResponse(
            _sse(call, first, result, client_usage),  # type: ignore[arg-type]
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    call.error_code = last.code.value if last is not None else ErrorCode.provider_unavailable.value
    call.finish_detached()
    if last is not None:
        raise from_provider(last)
    if p.status in ("wait", "cooldown"):
        retry = (p.retry_at - snap.now) if p.retry_at else 1.0
        raise OpenAIError(429, p.message(), type="rate_limit_error", code="rate_limit_exceeded",
                          headers={"retry-after": str(max(1, round(retry)))})
    raise OpenAIError(503, p.message(), type="server_error", code="provider_unavailable")


def _ms(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


async def _sse(call: _Call, first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], client_usage: bool) -> AsyncIterator[bytes]:
    """The chunks as `data: {...}` lines, then `data: [DONE]`. A failure mid-stream can no
    longer fall back: it ends the stream with an error event, as OpenAI does."""
    call.status = "incomplete"
    try:
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
                out = {**chunk, "model": call.model.id}
                if not client_usage:
                    out.pop("usage", None)
                yield b"data: " + json.dumps(out, separators=(",", ":")).encode() + b"\n\n"
            chunk = await anext(rest, None)
        call.status = "succeeded"
        yield b"data: [DONE]\n\n"
    except ProviderError as exc:
        call.error_code = exc.code.value
        err = from_provider(exc)
        payload = {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
        yield b"data: " + json.dumps(payload).encode() + b"\n\n"
    finally:
        closer = getattr(rest, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except Exception:  # noqa: BLE001 - the upstream is done with either way
                pass
        call.finish_detached()
