"""Live job events: `/v1/jobs/{id}/events` as a websocket or SSE, and `/v1/ws` multiplexed.

A per-job stream sends the job's current state first (`{"type": "job.state", "seq", "job"}`),
then its events (`{id, seq, job_id, type, at, data}`), and ends after the terminal event.
With `last_event_id` (query, or the `Last-Event-ID` header for SSE) it replays the events
after that one from the job's Redis stream, then continues live: subscribe first, then
read and replay, then take live messages above the last seq sent, so there is no gap and
no duplicate. Any API replica serves any job (core.events.EventHub per process).

`/v1/ws` takes `{"op": "subscribe", "job_ids": [...], "last_event_ids": {id: evt}?}`,
`{"op": "subscribe", "all": true}` (every job of the tenant, live only; an admin key may
add `"tenant": ID` to follow another tenant's jobs, and may follow any tenant's job by id),
`{"op": "unsubscribe", "job_ids": [...] | "all": true}` and `{"op": "ping"}`; it sends
`{"type": "ping"}` every ws_ping_seconds.

Auth: `Authorization: Bearer KEY`, or `?token=KEY`, or (browsers) a first message
`{"op": "auth", "token": KEY}` within 10 s.

Websocket close codes:

    1000  the job ended (per-job stream), or the client closed
    4400  bad request: malformed message, bad last_event_id, too many subscriptions
    4401  unauthorized: no key, or an unknown or revoked key; also sent to an open
          websocket when its key is revoked or expires (api/streams.py)
    4404  no such job for this tenant. Another tenant's job is refused with the same
          code on purpose: like the REST API's 404, it does not tell that the job exists
    4408  slow consumer: more than ws_queue_size messages waited for this client, or one
          send blocked ws_send_timeout_seconds; reconnect with last_event_id to resume
    4409  the key already holds ws_max_per_key websockets (on all replicas together);
          close one first
    4429  too many failed authentications from this address (auth_failure_limit); the
          reason says when to retry
    1011  internal error
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from api.deps import PrincipalDep, RuntimeDep, client_address, resolve_principal
from api.streams import Revoked, StreamGuard, Watch, until_ended
from api.strict import StrictRoute, loads
from api.views import job_public
from core.errors import InvalidRequest, NotFound, RateLimited
from core.events import OVERFLOW, Event, EventBus, EventHub, Pos, Subscription, parse_last_event_id
from core.jobs.ledger import TERMINAL, JobStatus
from core.keys import Principal
from core.models import Job
from core.runtime import Runtime

log = logging.getLogger("genroute.api.events")
router = APIRouter(route_class=StrictRoute, tags=["events"])

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_SLOW = 4408
CLOSE_TOO_MANY = 4409
CLOSE_RATE_LIMITED = 4429
MAX_JOBS_PER_SOCKET = 1000
PING = {"type": "ping"}


class SlowConsumer(Exception):
    pass


# shared pieces ---------------------------------------------------------------------------
def _bus(rt: Runtime) -> EventBus:
    bus = rt.ledger.events
    if bus is None:
        raise RuntimeError("events need Redis")
    return bus


async def _state(rt: Runtime, job: Job) -> dict[str, Any]:
    assets = (await rt.ledger.assets([job.id]))[job.id] if job.status == JobStatus.succeeded else []
    await rt.ledger.overlay([job])
    public = await job_public(rt.store, job, assets, rt.settings.url_ttl_seconds)
    return {"type": "job.state", "seq": job.event_seq, "job": public.model_dump(mode="json")}


def _seen_by(principal: Principal) -> str | None:
    """Whose jobs a key may follow: its tenant's; an admin key (the operator) every tenant's (None)."""
    return None if principal.admin else principal.tenant


async def _visible_job(rt: Runtime, tenant: str | None, job_id: str) -> Job:
    job = await rt.ledger.get(job_id) if len(job_id) <= 40 else None
    if job is None or (tenant is not None and job.tenant != tenant):  # another tenant's job does not exist
        raise NotFound(f"no job {job_id[:100]!r}")
    return job


async def follow_job(rt: Runtime, hub: EventHub, tenant: str | None, job_id: str, last_seq: Pos | None) -> AsyncIterator[Any]:
    """Yield the job's state, then its events (missed ones first), until the terminal
    event. Yields PING when idle. Raises NotFound, or SlowConsumer on overflow."""
    s = rt.settings
    bus = _bus(rt)
    sub = Subscription(s.ws_queue_size)
    channel = bus.job_channel(job_id)
    await hub.add(channel, sub)  # subscribed before anything is read: nothing slips between
    try:
        job = await _visible_job(rt, tenant, job_id)
        yield await _state(rt, job)
        after: Pos = last_seq if last_seq is not None else (job.event_seq, 0)
        for ev in await bus.replay(job_id, after):  # missed events, and any newer than the row
            yield ev
            after = ev.pos
            if ev.terminal:
                return
        if job.status in TERMINAL:
            return
        idle = 0
        while True:
            try:
                item = await asyncio.wait_for(sub.get(), s.ws_recheck_seconds)
            except TimeoutError:
                # a quiet job, or a lost pub/sub message: the stream has what was published
                idle += 1
                missed = await bus.replay(job_id, after)
                for ev in missed:
                    yield ev
                    after = ev.pos
                    if ev.terminal:
                        return
                if not missed and idle % 6 == 0:
                    fresh = await rt.ledger.get(job_id)
                    if fresh is None or (fresh.status in TERMINAL and fresh.event_seq <= after[0]):
                        return  # over, and its terminal event is gone from Redis
                yield PING
                continue
            if item is OVERFLOW:
                raise SlowConsumer
            ev = Event.from_json(item)
            if ev.pos <= after:
                continue  # already sent (replayed)
            if ev.seq > after[0] + 1:  # a gap in durable events: a message was lost; the stream has it
                for missed_ev in await bus.replay(job_id, after, ev.seq - 1):
                    yield missed_ev
                    after = missed_ev.pos
            yield ev
            after = ev.pos
            if ev.terminal:
                return
    finally:
        await hub.remove(channel, sub)


async def _principal_from_token(ws: WebSocket, rt: Runtime, token: str) -> Principal | None:
    return await resolve_principal(ws.app.state.key_cache, rt, token, address=client_address(ws),
                                   failures=getattr(ws.app.state, "auth_failures", None))


async def _close(ws: WebSocket, code: int, reason: str, timeout: float = 5.0) -> None:
    """Close with a code; a client that reads nothing cannot take the close frame, so give up
    after `timeout` (the server then drops the connection)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, reason[:120]), timeout)


async def ws_principal(ws: WebSocket, rt: Runtime) -> Principal | None:
    """Authenticate an accepted websocket; closes it with 4401 and returns None on failure."""
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    token = token or ws.query_params.get("token", "")
    if not token:
        try:
            first = await asyncio.wait_for(_message(ws), 10)
            if isinstance(first, dict) and first.get("op") == "auth" and isinstance(first.get("token"), str):
                token = first["token"]
        except (TimeoutError, _Close, WebSocketDisconnect):
            pass
    try:
        principal = await _principal_from_token(ws, rt, token) if token else None
    except RateLimited as exc:
        await _close(ws, CLOSE_RATE_LIMITED, exc.message)
        return None
    if principal is None:
        await _close(ws, CLOSE_UNAUTHORIZED, "unauthorized: send Authorization: Bearer KEY, ?token=KEY or an auth message")
    return principal


async def _message(ws: WebSocket) -> Any:
    """The next client message, parsed by api/strict.py's `loads`. A binary frame, or text
    that is not JSON we accept (NaN, NUL, nested past the limit), is a bad request (4400)."""
    msg = await ws.receive()
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000), msg.get("reason"))
    text = msg.get("text")
    if text is None:
        raise _Close(CLOSE_BAD_REQUEST, "messages must be JSON text frames, not binary")
    try:
        return loads(text)
    except ValueError as exc:
        raise _Close(CLOSE_BAD_REQUEST, f"messages must be JSON objects: {exc}") from None


def _dump(item: Any) -> str:
    return item.to_json() if isinstance(item, Event) else json.dumps(item, separators=(",", ":"))


# per-job websocket and SSE ----------------------------------------------------------------
@contextlib.asynccontextmanager
async def _held_socket(ws: WebSocket, principal: Principal) -> AsyncIterator[Watch | None]:
    """A place among the key's websockets (None, after closing with 4409, when it has
    ws_max_per_key open), watched for the key's revocation (api/streams.py)."""
    guard: StreamGuard = ws.app.state.streams
    conn = await guard.take_socket(principal.key_id)
    if conn is None:
        await _close(ws, CLOSE_TOO_MANY, f"too many websockets for this key: at most {guard.max_per_key} open at once "
                                         "(ws_max_per_key); close one first")
        yield None
        return
    try:
        with guard.watch(principal) as watch:
            yield watch
    finally:
        await guard.free_socket(conn)


@router.websocket("/v1/jobs/{job_id}/events")
async def job_events_ws(ws: WebSocket, job_id: str) -> None:
    await ws.accept()
    rt: Runtime = ws.app.state.runtime
    principal = await ws_principal(ws, rt)
    if principal is None:
        return
    raw = ws.query_params.get("last_event_id")
    try:
        last_seq = parse_last_event_id(job_id, raw) if raw else None
    except ValueError as exc:
        await _close(ws, CLOSE_BAD_REQUEST, str(exc))
        return
    timeout = rt.settings.ws_send_timeout_seconds
    async with _held_socket(ws, principal) as watch:
        if watch is None:
            return
        try:
            items = until_ended(follow_job(rt, ws.app.state.event_hub, _seen_by(principal), job_id, last_seq), watch)
            async with contextlib.aclosing(items):
                async for item in items:
                    await asyncio.wait_for(ws.send_text(_dump(item)), timeout)
        except NotFound as exc:
            await _close(ws, CLOSE_NOT_FOUND, exc.message)
        except Revoked as exc:
            await _close(ws, CLOSE_UNAUTHORIZED, f"unauthorized: {exc.reason}")
        except (SlowConsumer, TimeoutError):
            await _close(ws, CLOSE_SLOW, "slow consumer: reconnect with last_event_id")
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client went away
        else:
            await _close(ws, 1000, "job ended")


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
)
async def job_events_sse(
    job_id: str,
    request: Request,
    rt: RuntimeDep,
    principal: PrincipalDep,
    last_event_id: Annotated[str | None, Query(max_length=100)] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-sent events: `event: job.state` first, then one `id:/event:/data:` block per event."""
    raw = last_event_id or last_event_id_header
    try:
        last_seq = parse_last_event_id(job_id, raw) if raw else None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    await _visible_job(rt, _seen_by(principal), job_id)  # refuse with a JSON 404 before streaming
    hub: EventHub = request.app.state.event_hub
    guard: StreamGuard = request.app.state.streams

    async def body() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        try:
            with guard.watch(principal) as watch:  # a revoked key ends the stream (api/streams.py)
                items = until_ended(follow_job(rt, hub, _seen_by(principal), job_id, last_seq), watch)
                async with contextlib.aclosing(items):
                    async for item in items:
                        if isinstance(item, Event):
                            yield f"id: {item.id}\nevent: {item.type}\ndata: {item.to_json()}\n\n"
                        elif item is PING:
                            yield ": ping\n\n"
                        else:
                            yield f"event: {item['type']}\ndata: {_dump(item)}\n\n"
        except SlowConsumer:
            yield 'event: error\ndata: {"code":"slow_consumer","message":"reconnect with Last-Event-ID"}\n\n'
        except NotFound:
            yield 'event: error\ndata: {"code":"not_found","message":"job not found"}\n\n'
        except Revoked as exc:
            yield f"event: error\ndata: {json.dumps({'code': 'unauthorized', 'message': exc.reason})}\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# multiplexed websocket ---------------------------------------------------------------------
@dataclass
class _Marker:
    """Queued behind live messages: from here on, events of `job_id` above `after` go out."""

    job_id: str
    after: Pos
    state: dict[str, Any]


class _Mux:
    def __init__(self, ws: WebSocket, rt: Runtime, hub: EventHub, principal: Principal, watch: Watch) -> None:
        self.ws = ws
        self.watch = watch
        self.rt = rt
        self.hub = hub
        self.tenant = principal.tenant  # whose channel `all` follows (an admin may pick another)
        self.admin = principal.admin
        self.bus = _bus(rt)
        self.sub = Subscription(rt.settings.ws_queue_size)
        self.jobs: set[str] = set()  # subscribed one by one
        self.all = False
        self.last: dict[str, Pos] = {}  # job -> position of the last event sent

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._send()), asyncio.create_task(self._ping()),
                 asyncio.create_task(self._ended())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if isinstance(exc, _Close):
                    await _close(self.ws, exc.code, exc.reason)
                elif exc is not None and not isinstance(exc, (WebSocketDisconnect, RuntimeError, OSError)):
                    log.warning("websocket failed", exc_info=exc)
                    await _close(self.ws, 1011, "internal error")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for job_id in list(self.jobs):
                await self.hub.remove(self.bus.job_channel(job_id), self.sub)
            if self.all:
                await self.hub.remove(self.bus.tenant_channel(self.tenant), self.sub)

    async def _ended(self) -> None:
        await self.watch.ended.wait()  # the key was revoked or expired (api/streams.py)
        raise _Close(CLOSE_UNAUTHORIZED, f"unauthorized: {self.watch.reason}")

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.rt.settings.ws_ping_seconds)
            self.sub.offer(PING)

    async def _receive(self) -> None:
        while True:
            msg = await _message(self.ws)
            if not isinstance(msg, dict):
                raise _Close(CLOSE_BAD_REQUEST, "messages must be JSON objects")
            op = msg.get("op")
            if op == "ping":
                self.sub.offer({"type": "pong"})
            elif op == "auth":
                continue  # already authenticated
            elif op in ("subscribe", "unsubscribe"):
                job_ids = msg.get("job_ids", [])
                if not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids):
                    raise _Close(CLOSE_BAD_REQUEST, "job_ids must be a list of job ids")
                if op == "subscribe":
                    await self._subscribe(job_ids, bool(msg.get("all")), msg.get("last_event_ids") or {}, msg.get("tenant"))
                else:
                    await self._unsubscribe(job_ids, bool(msg.get("all")))
            else:
                raise _Close(CLOSE_BAD_REQUEST, "op must be subscribe, unsubscribe, auth or ping")

    async def _subscribe(self, job_ids: list[str], all_jobs: bool, last_ids: Any, tenant: Any = None) -> None:
        if not isinstance(last_ids, dict):
            raise _Close(CLOSE_BAD_REQUEST, "last_event_ids must map job ids to event ids")
        if tenant is not None and tenant != self.tenant:
            if not isinstance(tenant, str) or not 1 <= len(tenant) <= 100:
                raise _Close(CLOSE_BAD_REQUEST, "tenant must be a tenant id")
            if not self.admin:  # another tenant does not exist for this key
                raise _Close(CLOSE_NOT_FOUND, f"no tenant {tenant[:60]!r}")
            if self.all:  # an admin moves `all` to another tenant's jobs
                await self.hub.remove(self.bus.tenant_channel(self.tenant), self.sub)
                self.all = False
            self.tenant = tenant
        if len(self.jobs) + len(job_ids) > MAX_JOBS_PER_SOCKET:
            raise _Close(CLOSE_BAD_REQUEST, f"at most {MAX_JOBS_PER_SOCKET} jobs per connection")
        if all_jobs and not self.all:
            await self.hub.add(self.bus.tenant_channel(self.tenant), self.sub)
            self.all = True
            self.sub.offer({"type": "subscribed", "all": True})
        for job_id in job_ids:
            if job_id in self.jobs:
                continue
            last_seq: Pos | None = None
            if job_id in last_ids:
                try:
                    last_seq = parse_last_event_id(job_id, str(last_ids[job_id]))
                except ValueError as exc:
                    raise _Close(CLOSE_BAD_REQUEST, str(exc)) from exc
            channel = self.bus.job_channel(job_id)
            await self.hub.add(channel, self.sub)
            self.jobs.add(job_id)
            try:
                job = await _visible_job(self.rt, None if self.admin else self.tenant, job_id)
            except NotFound as exc:
                raise _Close(CLOSE_NOT_FOUND, f"no job {job_id[:60]!r}") from exc
            after = last_seq if last_seq is not None else (job.event_seq, 0)
            self.sub.offer(_Marker(job_id, after, await _state(self.rt, job)))
            for ev in await self.bus.replay(job_id, after):
                self.sub.offer(ev)

    async def _unsubscribe(self, job_ids: list[str], all_jobs: bool) -> None:
        for job_id in job_ids:
            if job_id in self.jobs:
                self.jobs.discard(job_id)
                self.last.pop(job_id, None)
                await self.hub.remove(self.bus.job_channel(job_id), self.sub)
        if all_jobs and self.all:
            self.all = False
            await self.hub.remove(self.bus.tenant_channel(self.tenant), self.sub)
        self.sub.offer({"type": "unsubscribed", "job_ids": job_ids, "all": all_jobs})

    async def _send(self) -> None:
        timeout = self.rt.settings.ws_send_timeout_seconds
        while True:
            item = await self.sub.get()
            if item is OVERFLOW:
                raise _Close(CLOSE_SLOW, "slow consumer: resubscribe with last_event_ids")
            out: Any = item
            if isinstance(item, _Marker):
                self.last[item.job_id] = max(self.last.get(item.job_id, (0, 0)), item.after)
                out = item.state
            elif isinstance(item, (bytes, str, Event)):
                ev = item if isinstance(item, Event) else Event.from_json(item)
                if ev.job_id not in self.last and (not self.all or ev.job_id in self.jobs):
                    continue  # its marker is still queued; the replay behind it covers this
                if ev.pos <= self.last.get(ev.job_id, (0, 0)):
                    continue
                self.last[ev.job_id] = ev.pos
                out = ev
                if ev.terminal:  # nothing follows a terminal event: stop listening for it
                    if ev.job_id in self.jobs:
                        self.jobs.discard(ev.job_id)
                        await self.hub.remove(self.bus.job_channel(ev.job_id), self.sub)
                    else:
                        self.last.pop(ev.job_id, None)
            try:
                await asyncio.wait_for(self.ws.send_text(_dump(out)), timeout)
            except TimeoutError as exc:
                raise _Close(CLOSE_SLOW, "slow consumer: resubscribe with last_event_ids") from exc


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@router.websocket("/v1/ws")
async def multiplexed_ws(ws: WebSocket) -> None:
    await ws.accept()
    rt: Runtime = ws.app.state.runtime
    principal = await ws_principal(ws, rt)
    if principal is None:
        return
    async with _held_socket(ws, principal) as watch:
        if watch is not None:
            await _Mux(ws, rt, ws.app.state.event_hub, principal, watch).run()
