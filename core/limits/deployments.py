"""Per-deployment limits and health in Redis, shared by every worker and API process.

The router (core/routing/router.py) decides; this module keeps the state it decides over, with
Lua scripts so each check-and-change is atomic across processes and timed by the Redis
server's clock (no skew between machines). Keys, under the caller's prefix `P`:

    P:slots:{dep}      ZSET  lease id -> expiry (ms)     concurrency slots; an expired lease
                                                         (a crashed worker's) frees itself
    P:rate:{dep}       ZSET  "uid:tokens" -> start (ms)  sliding window for rpm and tpm
    P:tok:{dep}        STR   tokens held by P:rate:{dep} (kept in step by the scripts)
    P:fails:{dep}      STR   consecutive counted failures (reset by a success)
    P:cool:{dep}       STR   cooldown-until (ms); expires with the cooldown
    P:unhealthy:{dep}  HASH  mark (catalog version + key fingerprint), reason, at

In-flight work is counted for every deployment (least_busy needs it), limited or not.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from core import metrics
from core.routing.catalog import Deployment
from core.routing.router import DeploymentState, HealthEffect, health_effect

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Drop requests that left the window from P:rate and their tokens from P:tok.
_TRIM = """
local function trim(rate, tok, cutoff)
  local gone = redis.call('ZRANGEBYSCORE', rate, '-inf', cutoff)
  if #gone == 0 then return end
  local sum = 0
  for _, m in ipairs(gone) do sum = sum + tonumber(string.match(m, ':(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', rate, '-inf', cutoff)
  if sum > 0 and redis.call('DECRBY', tok, sum) <= 0 then redis.call('DEL', tok) end
end
"""

# KEYS: slots rate tok   ARGV: lease_id lease_ms max_concurrency rpm tpm tokens window_ms uid
# -> {1, expiry_ms, now} | {0, reason, retry_ms (-1 unknown), now}
ACQUIRE = _NOW + _TRIM + """
local lease, lease_ms = ARGV[1], tonumber(ARGV[2])
local maxc, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens, window = tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], lease)
if not held and maxc > 0 and redis.call('ZCARD', KEYS[1]) >= maxc then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 'concurrency', tonumber(first[2]) - now, now}
end
if rpm > 0 or tpm > 0 then
  trim(KEYS[2], KEYS[3], now - window)
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local frees = -1
  if #oldest > 0 then frees = tonumber(oldest[2]) + window - now end
  if rpm > 0 and redis.call('ZCARD', KEYS[2]) >= rpm then return {0, 'rpm', frees, now} end
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tpm > 0 and used > 0 and used + tokens > tpm then return {0, 'tpm', frees, now} end
  redis.call('ZADD', KEYS[2], now, ARGV[8] .. ':' .. tokens)
  if tokens > 0 then redis.call('INCRBY', KEYS[3], tokens) end
  redis.call('PEXPIRE', KEYS[2], window + 1000)
  if tokens > 0 then redis.call('PEXPIRE', KEYS[3], window + 1000) end
end
redis.call('ZADD', KEYS[1], now + lease_ms, lease)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], tonumber(last[2]) - now + 1000)
return {1, now + lease_ms, now}
"""

# KEYS: slots   ARGV: lease_id lease_ms  -> new expiry ms, or 0 when the lease is gone
RENEW = _NOW + """
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not exp or tonumber(exp) <= now then return 0 end
local new = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], new, ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < new - now + 1000 then redis.call('PEXPIRE', KEYS[1], new - now + 1000) end
return new
"""

# KEYS: fails cool   ARGV: counts(0/1) threshold cooldown_ms fails_ttl_ms cool_for_ms
# -> {failures, cooldown_until_ms (0: none), now}
# While the breaker is open, further failures do not extend it; the count outlives the
# cooldown, so the first failure after it closes (half-open) opens it again at once.
FAIL = _NOW + """
local counts, threshold = tonumber(ARGV[1]), tonumber(ARGV[2])
local cooldown_ms, fails_ttl, cool_for = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local open = current > now
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local target = 0
if counts == 1 then
  n = redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], fails_ttl + cooldown_ms)
  if n >= threshold and not open then target = now + cooldown_ms end
end
if cool_for > 0 and now + cool_for > target then target = now + cool_for end
if target > current then
  redis.call('SET', KEYS[2], target, 'PX', target - now)
  current = target
end
if current <= now then current = 0 end
return {n, current, now}
"""

# KEYS: 6 per deployment (slots rate tok cool fails unhealthy)   ARGV: window_ms, mark per deployment
# -> {now, then 8 numbers per deployment}
SNAPSHOT = _NOW + """
local window = tonumber(ARGV[1])
local cutoff = now - window
local out = {now}
for i = 0, #KEYS / 6 - 1 do
  local slots, rate, tok, cool, fails, bad = KEYS[i*6+1], KEYS[i*6+2], KEYS[i*6+3], KEYS[i*6+4], KEYS[i*6+5], KEYS[i*6+6]
  local in_flight = redis.call('ZCOUNT', slots, '(' .. now, '+inf')
  local first = redis.call('ZRANGEBYSCORE', slots, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local slot_frees = -1
  if #first > 0 then slot_frees = tonumber(first[2]) end
  local requests = redis.call('ZCOUNT', rate, '(' .. cutoff, '+inf')
  local oldest = redis.call('ZRANGEBYSCORE', rate, '(' .. cutoff, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local window_frees = -1
  if #oldest > 0 then window_frees = tonumber(oldest[2]) + window end
  local tokens = tonumber(redis.call('GET', tok) or '0')
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', rate, '-inf', cutoff)) do
    tokens = tokens - tonumber(string.match(m, ':(%d+)$'))
  end
  if tokens < 0 then tokens = 0 end
  local cool_until = tonumber(redis.call('GET', cool) or '0')
  local n = tonumber(redis.call('GET', fails) or '0')
  local mark = redis.call('HGET', bad, 'mark')
  local unhealthy = 0
  if mark and mark == ARGV[i + 2] then unhealthy = 1 end
  for _, v in ipairs({in_flight, slot_frees, requests, window_frees, tokens, cool_until, n, unhealthy}) do
    table.insert(out, v)
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held concurrency slot (and one request in the rate window). `lease_id` is
    what release/renew need: the job id is a good one, since it survives process death."""

    deployment: str
    lease_id: str
    expires_at: float  # epoch seconds, Redis clock


@dataclass(frozen=True, slots=True)
class Denied:
    deployment: str
    reason: Literal["concurrency", "rpm", "tpm"]
    retry_after: float | None  # seconds until a slot or window place frees (None: unknown)


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float  # epoch seconds, Redis clock: pass it to router.plan
    states: dict[str, DeploymentState]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def health_mark(dep: Deployment, catalog_version: str) -> str:
    """What an unhealthy mark is bound to: the catalog version and the key itself, so a new
    catalog or a new key in the environment lifts it (the key is hashed, never stored)."""
    key = dep.api_key() or ""
    return hashlib.sha256(f"{catalog_version}\0{dep.name}\0{key}".encode()).hexdigest()[:24]


class Limiter:
    """The Redis side of routing. Build one per process (it holds no connection of its own;
    it borrows `redis`) with the prefix for this stack, e.g. f"{settings.redis_prefix}:rt"."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        *,
        window_seconds: float = 60.0,
        lease_seconds: float = 300.0,
        cooldown_failures: int = 3,
        cooldown_seconds: float = 30.0,
        failure_window_seconds: float = 60.0,
        max_cool_for_seconds: float = 300.0,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.window_ms = int(window_seconds * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        self.cooldown_failures = cooldown_failures
        self.cooldown_ms = int(cooldown_seconds * 1000)
        self.failure_window_ms = int(failure_window_seconds * 1000)
        self.max_cool_for_ms = int(max_cool_for_seconds * 1000)
        # register_script only hashes the source; scripts load on first use (EVALSHA, then EVAL)
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._fail = redis.register_script(FAIL)
        self._snapshot = redis.register_script(SNAPSHOT)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Any) -> Limiter:
        return cls(
            redis,
            f"{settings.redis_prefix}:rt",
            lease_seconds=settings.router_lease_seconds,
            cooldown_failures=settings.router_cooldown_failures,
            cooldown_seconds=settings.router_cooldown_seconds,
            failure_window_seconds=settings.router_failure_window_seconds,
            max_cool_for_seconds=settings.router_max_retry_after_seconds,
        )

    def key(self, kind: str, deployment: str) -> str:
        return f"{self.prefix}:{kind}:{deployment}"

    # --- concurrency and rate -------------------------------------------------------------

    async def acquire(
        self, dep: Deployment, *, lease_id: str | None = None, tokens: int = 0, lease_seconds: float | None = None
    ) -> Lease | Denied:
        """Take a concurrency slot and a place in the rate window, atomically, or neither.
        Acquiring again with a lease id that holds a slot renews it (tasks run twice) and
        counts one more request against rpm/tpm (it is one more provider call)."""
        lease_id = lease_id or uuid.uuid4().hex
        lim = dep.limits
        lease_ms = int(lease_seconds * 1000) if lease_seconds is not None else self.lease_ms
        r = await self._acquire(
            keys=[self.key("slots", dep.name), self.key("rate", dep.name), self.key("tok", dep.name)],
            args=[lease_id, lease_ms, lim.max_concurrency or 0, lim.rpm or 0, lim.tpm or 0, max(0, int(tokens)),
                  self.window_ms, uuid.uuid4().hex],
        )
        if int(r[0]) == 1:
            return Lease(dep.name, lease_id, int(r[1]) / 1000)
        retry = int(r[2])
        reason: Any = _s(r[1])
        metrics.limiter_denied(dep.name, reason)
        return Denied(dep.name, reason, retry / 1000 if retry >= 0 else None)

    async def renew(self, lease: Lease, *, lease_seconds: float | None = None) -> Lease | None:
        """Extend a held slot (a long provider task's poll does this). None: it expired."""
        lease_ms = int(lease_seconds * 1000) if lease_seconds is not None else self.lease_ms
        new = int(await self._renew(keys=[self.key("slots", lease.deployment)], args=[lease.lease_id, lease_ms]))
        return Lease(lease.deployment, lease.lease_id, new / 1000) if new else None

    async def release(self, deployment: str, lease_id: str, *, success: bool = False) -> bool:
        """Free the slot (idempotent). `success=True` also resets the failure count, in the
        same round trip. Returns whether the slot was still held."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.key("slots", deployment), lease_id)
            if success:
                pipe.delete(self.key("fails", deployment))
            res = await pipe.execute()
        return bool(res[0])

    # --- health ---------------------------------------------------------------------------

    async def record_success(self, deployment: str) -> None:
        await self.redis.delete(self.key("fails", deployment))

    async def record_failure(self, deployment: str, *, counts: bool = True, cool_for: float | None = None) -> tuple[int, float | None]:
        """Count a failure (and/or cool down at least `cool_for` s now). Returns the
        consecutive failures and the cooldown end (epoch s), if cooling down."""
        cool_ms = min(int((cool_for or 0) * 1000), self.max_cool_for_ms)
        n, until, _ = await self._fail(
            keys=[self.key("fails", deployment), self.key("cool", deployment)],
            args=[1 if counts else 0, self.cooldown_failures, self.cooldown_ms, self.failure_window_ms, cool_ms],
        )
        return int(n), (int(until) / 1000 if int(until) else None)

    async def record_error(self, dep: Deployment, err: BaseException, *, catalog_version: str) -> HealthEffect:
        """Apply router.health_effect(err) to `dep`, which reads the error's `fault`: only the
        provider's faults count, the operator's mark this deployment out, the user's and
        ours cost no round trip at all."""
        effect = health_effect(err)
        if effect.unhealthy:
            await self.mark_unhealthy(dep, catalog_version, reason=str(err))
        elif effect.counts or effect.cool_for:
            await self.record_failure(dep.name, counts=effect.counts, cool_for=effect.cool_for)
        return effect

    async def mark_unhealthy(self, dep: Deployment, catalog_version: str, *, reason: str = "") -> None:
        await self.redis.hset(  # type: ignore[misc]  # redis-py types hset for sync and async clients
            self.key("unhealthy", dep.name),
            mapping={"mark": health_mark(dep, catalog_version), "reason": reason[:500]},
        )

    async def clear_unhealthy(self, deployments: Iterable[str]) -> None:
        """A catalog reload lifts every mark, even when the file did not change."""
        names = list(deployments)
        if names:
            await self.redis.delete(*(self.key("unhealthy", n) for n in names))

    # --- the router's view ------------------------------------------------------------------

    async def snapshot(self, deployments: Sequence[Deployment], *, catalog_version: str = "") -> Snapshot:
        """Everything the router needs about `deployments`, in one round trip."""
        keys: list[str] = []
        for d in deployments:
            keys += [self.key(k, d.name) for k in ("slots", "rate", "tok", "cool", "fails", "unhealthy")]
        marks = [health_mark(d, catalog_version) for d in deployments]
        r = await self._snapshot(keys=keys, args=[self.window_ms, *marks])
        now_ms = int(r[0])
        states: dict[str, DeploymentState] = {}
        for i, d in enumerate(deployments):
            (in_flight, slot_frees, requests, window_frees, tokens, cool, fails, bad) = (int(v) for v in r[1 + 8 * i : 9 + 8 * i])
            states[d.name] = DeploymentState(
                in_flight=in_flight,
                requests_in_window=requests,
                tokens_in_window=tokens,
                window_frees_at=window_frees / 1000 if window_frees >= 0 else None,
                slot_frees_at=slot_frees / 1000 if slot_frees >= 0 else None,
                cooldown_until=cool / 1000 if cool > now_ms else None,
                unhealthy=bool(bad),
                failures=fails,
            )
        return Snapshot(now_ms / 1000, states)
