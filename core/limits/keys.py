"""Per-key limits in Redis, so they hold across every API replica and worker:

    P:key:{id}:rate   ZSET  uid -> start (ms)    sliding one-minute window of generation requests
    P:key:{id}:slots  ZSET  lease id -> expiry   the key's jobs and chat calls in flight

Each check-and-change is one Lua script timed by the Redis server's clock. Rate: a key
limited to N requests a minute gets exactly N, however many processes share them.
Concurrency: a job takes a slot when a worker starts it (lease id = job id, so a task
run twice holds one slot) and frees it on its terminal transition (core/jobs/ledger.py); a key
that asked for no queueing takes it at submit instead, and is answered 429 when full.

When Redis does not answer, the per-key gate fails open, as Stripe's limiters do: the
outage is ours, not the client's, and refusing every request (503) for it would turn a
queue outage into an API outage. It is not waived, though: each API process counts the
key's rate in its own sliding window until Redis is back (so N replicas admit at most N
times the rpm), and spend stays bounded by the tenant's budget, held in PostgreSQL. A
key's concurrency slot at submit is skipped (the worker takes it when the job runs, and
nothing runs until Redis is back). Each state change is logged once.
"""

from __future__ import annotations

import collections
import logging
import math
import time
import uuid

from redis.asyncio import Redis

from core import metrics
from core.errors import Forbidden, RateLimited
from core.keys import Principal
from core.outages import REDIS_DOWN

log = logging.getLogger("genroute.quotas")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: rate   ARGV: limit window_ms uid  -> {1, 0} | {0, retry_ms}
HIT = _NOW + """
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return {1, 0}
"""

# KEYS: slots   ARGV: lease_id lease_ms max  -> {1, 0} | {0, retry_ms}
TAKE = _NOW + """
local lease, lease_ms, maxc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], lease) and redis.call('ZCARD', KEYS[1]) >= maxc then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + lease_ms, lease)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], tonumber(last[2]) - now + 1000)
return {1, 0}
"""


class KeyQuotas:
    def __init__(self, redis: Redis, prefix: str, *, window_seconds: float = 60.0, lease_seconds: float = 300.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window_ms = int(window_seconds * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        self._hit = redis.register_script(HIT)
        self._take = redis.register_script(TAKE)

        self._local: dict[str, collections.deque[float]] = {}  # key id -> starts, while Redis is away
        self._down = False

    def _key(self, key_id: str, kind: str) -> str:
        return f"{self.prefix}:key:{key_id}:{kind}"

    def slots_key(self, key_id: str) -> str:
        """The key's slot leases (a wait queue hands a freed one on: core/limits/waits.py)."""
        return self._key(key_id, "slots")

    def _state(self, down: bool, exc: BaseException | None = None) -> None:
        if down and not self._down:
            log.warning("Redis unavailable (%s): per-key rate limits fall back to this process's own count",
                        type(exc).__name__ if exc else "?")
        elif not down and self._down:
            log.warning("Redis is back: per-key rate limits are shared again")
            self._local.clear()
        self._down = down

    async def hit(self, key_id: str, rpm: int) -> float | None:
        """Count one request against the key's per-minute limit. None: admitted; else the
        seconds until the window has room (the request was not counted). With Redis away,
        counted in this process (module docstring)."""
        try:
            ok, retry = await self._hit(keys=[self._key(key_id, "rate")], args=[rpm, self.window_ms, uuid.uuid4().hex])
        except REDIS_DOWN as exc:
            self._state(True, exc)
            return self._local_hit(key_id, rpm)
        self._state(False)
        return None if int(ok) else max(0.0, int(retry) / 1000)

    def _local_hit(self, key_id: str, rpm: int) -> float | None:
        now, window = time.monotonic(), self.window_ms / 1000
        starts = self._local.setdefault(key_id, collections.deque())
        while starts and starts[0] <= now - window:
            starts.popleft()
        if len(starts) >= rpm:
            return max(0.0, starts[0] + window - now)
        starts.append(now)
        return None

    async def take(self, key_id: str, lease_id: str, max_concurrency: int) -> float | None:
        """Take (or renew) a slot for `lease_id`. None: held; else the seconds until the
        soonest lease would expire (a hint only: slots usually free much sooner)."""
        ok, retry = await self._take(keys=[self._key(key_id, "slots")], args=[lease_id, self.lease_ms, max_concurrency])
        return None if int(ok) else max(0.0, int(retry) / 1000)

    async def free(self, key_id: str, lease_id: str) -> None:
        await self.redis.zrem(self._key(key_id, "slots"), lease_id)

    async def in_flight(self, key_id: str) -> int:
        return int(await self.redis.zcard(self._key(key_id, "slots")))


async def admit(quotas: KeyQuotas | None, principal: Principal, model_id: str, modality: str) -> None:
    """The per-key gate of every generation request: scopes, then the rate (a refused
    request is not counted). Raises Forbidden or RateLimited."""
    if not principal.allows(model_id, modality):
        allowed = sorted(principal.models or ()) + sorted(f"any {m} model" for m in principal.modalities or ())
        raise Forbidden(
            f"this key may not use {model_id!r}; its scopes allow: {', '.join(allowed) or 'nothing'}",
            code="model_not_allowed",
        )
    if principal.rpm and quotas is not None:
        retry = await quotas.hit(principal.key_id, principal.rpm)
        if retry is not None:
            metrics.refused("key_rpm")
            raise RateLimited(
                f"this key is limited to {principal.rpm} generation requests a minute; retry in {math.ceil(retry)} s",
                retry_after=retry,
            )


async def take_or_refuse(quotas: KeyQuotas | None, principal: Principal, lease_id: str) -> None:
    """Take a concurrency slot now, or answer 429: for chat calls (which cannot wait) and
    for keys that asked for no queueing."""
    if not principal.max_concurrency or quotas is None:
        return
    try:
        retry = await quotas.take(principal.key_id, lease_id, principal.max_concurrency)
    except REDIS_DOWN as exc:  # fail open: the worker takes the slot when the job runs
        quotas._state(True, exc)
        return
    if retry is not None:
        metrics.refused("key_concurrency")
        raise RateLimited(
            f"this key already has {principal.max_concurrency} jobs or calls in flight, its limit; "
            "retry when one finishes" + ("" if principal.queue_when_busy else " (it is set to refuse rather than queue)"),
            retry_after=min(retry, 5.0),
            code="concurrency_limited",
        )
