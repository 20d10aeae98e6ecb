"""Wait queues: jobs that wait for a free concurrency slot, woken by its release.

A job that finds every deployment it could use full (or its API key at its concurrency
limit) joins a FIFO queue per slot set instead of re-running on a timer (DESIGN.md §13).
Releasing a slot hands it straight to the head of that queue, so a newcomer cannot take
it first and the order is kept; the woken job's run finds the slot already its own.

    P:wq:{gate}     ZSET  job id -> order: priority rank * 1e13 + ticket (lower goes first:
                          high before normal before low; FIFO by submission within one)
    P:wj:{job}      HASH  gate -> slots key (the gates it waits at), _m lane (run queue), _t ticket
                          (the job's submit time in ms, kept from its first wait)
    P:dur:{gate}    STR   recent task duration (s), a moving average, for ETAs

A gate is `d:{deployment}` or `k:{key id}`; its slots are the ZSET of leases (lease id ->
expiry ms) that core.limits.deployments / core.limits.keys keep. Entering and waking are
single Lua scripts that check the slots in the same step, so a release can never slip
between "the slot is full" and "I am waiting" (no lost wake-up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from core import priorities

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Hand a free slot of one gate to its queue's head. Needs wq, slots, max, handoff_ms, wj prefix.
_HAND = """
local function hand(wq, slots, maxc, handoff_ms, wj_prefix)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  while maxc <= 0 or redis.call('ZCARD', slots) < maxc do
    local head = redis.call('ZPOPMIN', wq)
    if #head == 0 then return false end
    local id = head[1]
    if redis.call('EXISTS', wj_prefix .. id) == 1 then
      if not redis.call('ZSCORE', slots, id) then
        redis.call('ZADD', slots, now + handoff_ms, id)
        local ttl = redis.call('PTTL', slots)
        if ttl < handoff_ms + 1000 then redis.call('PEXPIRE', slots, handoff_ms + 1000) end
      end
      return id
    end
  end
  return false
end
"""

# KEYS: wj, then per gate: wq, slots   ARGV: job, modality, handoff_ms, submit time (ms), wj prefix,
# priority rank (0 high .. 2 low), then per gate: gate name, max_concurrency
# -> {ticket, woken job per gate ('' none)}
ENTER = _NOW + _HAND + """
local job, handoff_ms, wj_prefix = ARGV[1], tonumber(ARGV[3]), ARGV[5]
local ticket = tonumber(redis.call('HGET', KEYS[1], '_t') or '0')
if ticket == 0 then ticket = tonumber(ARGV[4]) end
redis.call('HSET', KEYS[1], '_t', ticket, '_m', ARGV[2])
local order = tonumber(ARGV[6]) * 1e13 + ticket
local out = {ticket}
local n = (#KEYS - 1) / 2
for i = 0, n - 1 do
  local wq, slots = KEYS[2 + i * 2], KEYS[3 + i * 2]
  local gate, maxc = ARGV[7 + i * 2], tonumber(ARGV[8 + i * 2])
  redis.call('HSET', KEYS[1], gate, slots)
  redis.call('SET', wq .. ':max', maxc, 'EX', 86400)
  redis.call('ZADD', wq, 'NX', order, job)
  out[#out + 1] = hand(wq, slots, maxc, handoff_ms, wj_prefix) or ''
end
return out
"""

# KEYS: wq, slots   ARGV: max_concurrency (-1: as the last waiter said), handoff_ms, wj prefix
# -> woken job or false
WAKE = _NOW + _HAND + """
if redis.call('ZCARD', KEYS[1]) == 0 then return false end
local maxc = tonumber(ARGV[1])
if maxc < 0 then maxc = tonumber(redis.call('GET', KEYS[1] .. ':max') or '1') end
return hand(KEYS[1], KEYS[2], maxc, tonumber(ARGV[2]), ARGV[3])
"""

# KEYS: wj, dur   ARGV: job, gate kept ('' none), wq prefix, seconds (-1: no duration)
# -> gates whose handed slot was given back (their queues need a wake)
LEAVE = """
local fields = redis.call('HGETALL', KEYS[1])
local freed = {}
for i = 1, #fields, 2 do
  local gate, slots = fields[i], fields[i + 1]
  if string.sub(gate, 1, 1) ~= '_' then
    redis.call('ZREM', ARGV[3] .. gate, ARGV[1])
    if gate ~= ARGV[2] and redis.call('ZREM', slots, ARGV[1]) == 1 then freed[#freed + 1] = gate end
  end
end
redis.call('DEL', KEYS[1])
return freed
"""

# KEYS: dur   ARGV: seconds   (a moving average of task durations, for ETAs)
DURATION = """
local old = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if old >= 0 then new = old * 0.8 + new * 0.2 end
redis.call('SET', KEYS[1], tostring(new), 'EX', 86400)
return tostring(new)
"""


@dataclass(frozen=True, slots=True)
class Gate:
    """One set of slots a job can wait for: a deployment's or an API key's."""

    name: str  # "d:{deployment}" or "k:{key id}"
    slots_key: str
    max_concurrency: int


@dataclass(frozen=True, slots=True)
class Position:
    ahead: int  # jobs ahead of this one (0: next)
    eta_seconds: float | None


class WaitQueues:
    def __init__(self, redis: Redis, prefix: str, *, handoff_seconds: float = 30.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.handoff_ms = int(handoff_seconds * 1000)
        self._enter = redis.register_script(ENTER)
        self._wake = redis.register_script(WAKE)
        self._leave = redis.register_script(LEAVE)
        self._duration = redis.register_script(DURATION)

    def queue_key(self, gate: str) -> str:
        return f"{self.prefix}:wq:{gate}"

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:wj:{job_id}"

    async def enter(self, job_id: str, lane: str, gates: list[Gate], priority: str | None = None,
                    submitted: datetime | None = None) -> list[tuple[str, str]]:
        """Wait at these gates, behind every job of a higher priority and every one of the
        same submitted before it (runs start concurrently, so the order they reach a gate
        is not the order they were submitted in). A job woken but beaten to the slot keeps
        its place. Returns (gate name, job) for each free slot handed out on the way, this
        job perhaps among them: the caller runs each of them now."""
        keys = [self.job_key(job_id)]
        since = submitted.timestamp() if submitted is not None else time.time()
        args: list[Any] = [job_id, lane, self.handoff_ms, int(since * 1000), f"{self.prefix}:wj:",
                           priorities.rank(priority)]
        for g in gates:
            keys += [self.queue_key(g.name), g.slots_key]
            args += [g.name, g.max_concurrency]
        out = await self._enter(keys=keys, args=args)
        return [(g.name, _s(x)) for g, x in zip(gates, out[1:], strict=True) if x]

    async def wake(self, gate: Gate) -> str | None:
        """After a slot of `gate` was released: hand it to the head of its queue, if any.
        A gate's max_concurrency of -1 means "as the waiters last said" (the ledger frees
        a key's slot without knowing the key's limit)."""
        woken = await self._wake(keys=[self.queue_key(gate.name), gate.slots_key],
                                 args=[gate.max_concurrency, self.handoff_ms, f"{self.prefix}:wj:"])
        return _s(woken) if woken else None

    async def leave(self, job_id: str, kept: str | None = None) -> list[str]:
        """The job stops waiting (it started, or ended): out of every queue; a slot handed
        to it at a gate other than `kept` is given back. Returns those gates' names."""
        out = await self._leave(keys=[self.job_key(job_id)], args=[job_id, kept or "", f"{self.prefix}:wq:"])
        return [_s(x) for x in out]

    async def waiting(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.job_key(job_id)))

    async def waiting_many(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for j in job_ids:
                pipe.exists(self.job_key(j))
            found = await pipe.execute()
        return {j for j, n in zip(job_ids, found, strict=True) if n}

    async def position(self, job_id: str, gates: dict[str, int]) -> Position | None:
        """Where the job stands: the fewest jobs ahead at any gate it waits at, and an ETA
        from that gate's recent task durations and slot count. `gates`: name -> max slots."""
        fields = await self.redis.hgetall(self.job_key(job_id))  # type: ignore[misc]  # redis-py types one method for its sync and async clients
        names = [_s(k) for k in fields if not _s(k).startswith("_")]
        if not names:
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.zrank(self.queue_key(n), job_id)
                pipe.get(f"{self.prefix}:dur:{n}")
            res = await pipe.execute()
        best: Position | None = None
        for i, n in enumerate(names):
            rank, dur = res[2 * i], res[2 * i + 1]
            if rank is None:
                continue
            slots = max(1, gates.get(n, 1))
            eta = (int(rank) // slots + 1) * float(_s(dur)) if dur is not None else None
            if best is None or int(rank) < best.ahead:
                best = Position(int(rank), eta)
        return best

    async def ahead_of(self, priority: str | None, submitted: datetime, gates: dict[str, int]) -> Position | None:
        """Where a job not yet in a wait queue (its run has not reached one) will stand
        when it does: the jobs already waiting that go before it, at the least crowded of
        its gates. None when nothing waits there."""
        order = priorities.rank(priority) * 1e13 + int(submitted.timestamp() * 1000)
        names = list(gates)
        if not names:
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.zcount(self.queue_key(n), "-inf", f"({order}")
                pipe.get(f"{self.prefix}:dur:{n}")
            res = await pipe.execute()
        best: Position | None = None
        for i, n in enumerate(names):
            ahead, dur = int(res[2 * i]), res[2 * i + 1]
            if ahead == 0:
                continue
            eta = (ahead // max(1, gates[n]) + 1) * float(_s(dur)) if dur is not None else None
            if best is None or ahead < best.ahead:
                best = Position(ahead, eta)
        return best

    async def record_duration(self, gate: str, seconds: float) -> None:
        await self._duration(keys=[f"{self.prefix}:dur:{gate}"], args=[max(0.0, seconds)])

    async def depth(self, gate: str) -> int:
        return int(await self.redis.zcard(self.queue_key(gate)))


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
