"""Job events: the model, the Redis bus that publishes them, and a per-process hub that
fans them out to websocket/SSE subscribers.

    Ledger.transition ──(seq from the job row)──► EventBus.publish  (one Lua call)
                                                    ├─ XADD {p}:events:{job}  id "{seq}-0", capped, EXPIRE
                                                    ├─ PUBLISH {p}:job:{job}
                                                    └─ PUBLISH {p}:tenant:{tenant}
    EventHub (one pub/sub connection per API process) ──► Subscription queues (bounded)

An event is `{id, seq, job_id, type, at, data}`. `seq` counts a job's events from 1 and is
allocated by the job row's UPDATE (`jobs.event_seq`), so it is durable, dense, and the
same number the webhook delivery rows carry. The stream entry id *is* the seq, so "replay
after event N" is `XRANGE (N-0 +`, and the Lua script refuses a seq not above the top of
the stream: a duplicate publish is a no-op, and stream order is seq order.

A subscriber subscribes first, then reads the row and replays the stream after the seq it
knows, then takes live messages, dropping any seq it already has: no gap, no duplicate.

Progress seen by a poll that changes no row (DESIGN.md §13) is published without SQL as a
*sub-event*: `(seq, sub)` with `seq` the stream's newest durable seq and `sub` 1, 2, ...
(stream id "{seq}-{sub}", event id `evt_{job}_{seq}.{sub}`). Events order by `(seq, sub)`;
durable events have sub 0 and stay dense, so a gap in them is still noticed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

log = logging.getLogger(__name__)


class EventType(StrEnum):
    queued = "job.queued"
    started = "job.started"
    progress = "job.progress"
    output = "job.output"
    succeeded = "job.succeeded"
    failed = "job.failed"
    canceled = "job.canceled"


TERMINAL_EVENTS: frozenset[str] = frozenset({EventType.succeeded, EventType.failed, EventType.canceled})
EVENT_ID = re.compile(r"^evt_([0-9a-z]{1,40})_(\d{1,9})(?:\.(\d{1,9}))?$")
Pos = tuple[int, int]  # (seq, sub): where an event stands in its job's stream


def event_id(job_id: str, seq: int, sub: int = 0) -> str:
    """`evt_{job ulid}_{seq}` (`.{sub}` for a sub-event): unique, stable across replays
    and webhook retries."""
    base = f"evt_{job_id.removeprefix('job_')}_{seq}"
    return f"{base}.{sub}" if sub else base


def parse_last_event_id(job_id: str, value: str) -> Pos:
    """Where a client stands, from an event id of this job or a bare seq number."""
    value = value.strip()
    if value.isdigit() and len(value) <= 9:
        return int(value), 0
    m = EVENT_ID.match(value)
    if m is None or f"job_{m[1]}" != job_id:
        raise ValueError(f"last_event_id {value[:100]!r} is not an event id of job {job_id}")
    return int(m[2]), int(m[3] or 0)


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    seq: int
    job_id: str
    type: str
    at: str  # ISO 8601 UTC
    data: dict[str, Any] = field(default_factory=dict)
    sub: int = 0  # > 0: a progress sub-event published without SQL (see above)

    @classmethod
    def make(cls, job_id: str, seq: int, type: EventType, at: datetime, data: dict[str, Any]) -> Event:
        return cls(event_id(job_id, seq), seq, job_id, type.value, at.isoformat().replace("+00:00", "Z"), data)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def pos(self) -> Pos:
        return self.seq, self.sub

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.sub:
            del d["sub"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        d = json.loads(raw)
        return cls(d["id"], int(d["seq"]), d["job_id"], d["type"], d["at"], d.get("data") or {}, int(d.get("sub") or 0))


# KEYS: stream, job channel, tenant channel. ARGV: maxlen, ttl, then seq/payload pairs.
# Returns the seqs it published (a seq at or below the stream's top is a duplicate).
_PUBLISH = """
local top = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then top = tonumber(string.match(last[1][1], '^(%d+)')) end
-- a sub-event of seq N does not make N a duplicate: compare durable seqs only
local out = {}
for i = 3, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > top then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], seq .. '-0', 'e', ARGV[i + 1])
    redis.call('PUBLISH', KEYS[2], ARGV[i + 1])
    redis.call('PUBLISH', KEYS[3], ARGV[i + 1])
    top = seq
    out[#out + 1] = seq
  end
end
if #out > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return out
"""


# KEYS: stream, job channel, tenant channel. ARGV: maxlen, ttl, seq hint, then the event's
# JSON in three parts around its sub number: head .. sub .. middle .. sub .. tail.
# The sub-event hangs under the stream's newest seq (or the hint, on an empty stream).
# Returns {seq, sub}.
_PUBLISH_SUB = """
local seq, sub = tonumber(ARGV[3]), 1
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local a, b = string.match(last[1][1], '^(%d+)-(%d+)')
  a, b = tonumber(a), tonumber(b)
  if a >= seq then seq, sub = a, b + 1 end
end
local payload = ARGV[4] .. seq .. ARGV[5] .. sub .. ARGV[6] .. seq .. ARGV[7] .. sub .. ARGV[8]
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], seq .. '-' .. sub, 'e', payload)
redis.call('PUBLISH', KEYS[2], payload)
redis.call('PUBLISH', KEYS[3], payload)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {seq, sub}
"""


class EventBus:
    """Publishes and replays job events on Redis. Cheap to build; holds no connection of its own."""

    def __init__(self, redis: Redis, prefix: str, *, maxlen: int = 1000, retention_seconds: int = 86400) -> None:
        self.redis = redis
        self.prefix = prefix
        self.maxlen = maxlen
        self.retention_seconds = retention_seconds
        self._script = redis.register_script(_PUBLISH)
        self._sub_script = redis.register_script(_PUBLISH_SUB)

    def stream_key(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def job_channel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def tenant_channel(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}"

    async def publish(self, tenant: str, events: list[Event]) -> list[int]:
        """Append to the job's stream and publish, in one round trip. Events of one job only."""
        if not events:
            return []
        job_id = events[0].job_id
        args: list[Any] = [self.maxlen, self.retention_seconds]
        for e in events:
            args += [e.seq, e.to_json()]
        keys = [self.stream_key(job_id), self.job_channel(job_id), self.tenant_channel(tenant)]
        out = await self._script(keys=keys, args=args)
        return [int(x) for x in out]

    async def publish_progress(self, pipe: Any, tenant: str, job_id: str, seq_hint: int, at: datetime, data: dict[str, Any]) -> None:
        """Queue on `pipe` (a pipeline, or the Redis client itself) a progress sub-event:
        no SQL, no webhook; it orders after every event already in the job's stream."""
        when = at.isoformat().replace("+00:00", "Z")
        ulid = job_id.removeprefix("job_")
        body = json.dumps({"job_id": job_id, "type": EventType.progress.value, "at": when, "data": data},
                          separators=(",", ":"), default=str)
        # {"id":"evt_X_{seq}.{sub}","seq":{seq},"sub":{sub},<body>}
        parts = ['{"id":"evt_' + ulid + "_", ".", '","seq":', ',"sub":', "," + body[1:]]
        keys = [self.stream_key(job_id), self.job_channel(job_id), self.tenant_channel(tenant)]
        await self._sub_script(keys=keys, args=[self.maxlen, self.retention_seconds, seq_hint, *parts], client=pipe)

    async def latest(self, job_ids: list[str]) -> dict[str, Event]:
        """The newest event in each job's stream (one round trip)."""
        if not job_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for j in job_ids:
                pipe.xrevrange(self.stream_key(j), "+", "-", count=1)
            rows = await pipe.execute()
        out: dict[str, Event] = {}
        for j, r in zip(job_ids, rows, strict=True):
            if r:
                fields = r[0][1]
                out[j] = Event.from_json(fields[b"e"] if b"e" in fields else fields["e"])
        return out

    async def replay(self, job_id: str, after: Pos | int, upto: int | None = None, count: int | None = None) -> list[Event]:
        """Events of the job after position `after` (and with seq <= upto), oldest first."""
        a, b = after if isinstance(after, tuple) else (after, 0)
        hi = f"{upto}-0" if upto is not None else "+"
        rows = await self.redis.xrange(self.stream_key(job_id), f"({a}-{b}", hi, count=count)
        return [Event.from_json(fields[b"e"] if b"e" in fields else fields["e"]) for _, fields in rows]


OVERFLOW = object()  # put in a subscription's queue when it overflowed; the consumer must hang up


class Subscription:
    """One consumer's bounded inbox. The hub never waits on it: when it is full the
    consumer is marked overflowed (it is too slow) and gets no more messages."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize + 1)  # +1: room for OVERFLOW
        self.maxsize = maxsize
        self.overflowed = False

    def offer(self, item: Any) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= self.maxsize:
            # drop the backlog: the consumer hears at once that it is cut off
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(OVERFLOW)
            return
        self.queue.put_nowait(item)

    async def get(self) -> Any:
        return await self.queue.get()


class EventHub:
    """Shares one Redis pub/sub connection among every subscriber in this process.

    `add(channel, sub)` returns once Redis has confirmed the subscription, so a caller
    that then reads the stream cannot miss an event published in between. Dispatch never
    awaits a subscriber, so one slow client cannot slow the others."""

    def __init__(self, redis: Redis, control_channel: str) -> None:
        self.redis = redis
        self.control = control_channel
        self._pubsub: Any = None
        self._subs: dict[str, set[Subscription]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self.control)  # the connection exists from now on
        self._task = asyncio.create_task(self._read(), name="event-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def add(self, channel: str, sub: Subscription, timeout: float = 5.0) -> None:
        async with self._lock:
            subs = self._subs.setdefault(channel, set())
            subs.add(sub)
            ready = self._ready.get(channel)
            if ready is None:
                ready = self._ready[channel] = asyncio.Event()
                await self._pubsub.subscribe(channel)
        await asyncio.wait_for(ready.wait(), timeout)

    async def remove(self, channel: str, sub: Subscription) -> None:
        async with self._lock:
            subs = self._subs.get(channel)
            if subs is None:
                return
            subs.discard(sub)
            if not subs:
                del self._subs[channel]
                self._ready.pop(channel, None)
                try:
                    await self._pubsub.unsubscribe(channel)
                except Exception:  # the connection is gone; it re-subscribes only what is left
                    log.debug("unsubscribe %s failed", channel, exc_info=True)

    def _dispatch(self, channel: str, data: Any) -> None:
        for sub in list(self._subs.get(channel, ())):
            sub.offer(data)

    async def _read(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                # redis-py reconnects and re-subscribes on the next read; subscribers
                # re-read their streams periodically, so what was missed comes back
                log.warning("event hub lost its Redis connection; retrying", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            if msg["type"] == "subscribe":
                ready = self._ready.get(channel)
                if ready is not None:
                    ready.set()
            elif msg["type"] == "message":
                self._dispatch(channel, msg["data"])


def job_event_data(job: Any, **extra: Any) -> dict[str, Any]:
    """The fields every event carries about the job (a core.models.Job)."""
    data: dict[str, Any] = {"status": job.status, "progress": job.progress, "message": job.progress_message}
    data.update(extra)
    return data


def events_from(items: Iterable[tuple[int, EventType, dict[str, Any]]], job_id: str, at: datetime) -> list[Event]:
    return [Event.make(job_id, seq, t, at, data) for seq, t, data in items]
