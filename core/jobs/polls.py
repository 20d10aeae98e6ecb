"""The poll schedule: when each job running at a provider is polled next, kept in Redis.

A job waiting at a provider costs one sorted-set member and one small hash, nothing in
SQL and no worker slot (DESIGN.md §13). Keys, under the prefix `P`:

    P:polls:{queue}   ZSET  job id -> due time (ms, Redis clock)
    P:poll:{job}      HASH  what a poll needs, and nothing more (never the job's input):
                            q queue, d deployment, t tenant, k key id, m modality,
                            h provider handle (JSON), seq poll_seq of the row,
                            dl deadline (ms), e consecutive poll errors, s0 first poll (ms),
                            lr last lease renewal (ms), pw last progress written to SQL (ms),
                            pv progress last published (JSON), wh 1: progress has webhook
                            subscribers (so it goes through the ledger), cb a result a
                            provider callback handed over (core/callbacks.py dump_result)

    claim ──► due members re-scored to now + claim lease ──► poll ──► reschedule (due + delay)
                       (a worker killed mid-poll: the member is due again when the claim lease ends)

The DB stays the truth: the reconciler puts back any running job with a handle whose
member is missing (Redis flushed), from its row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.settings import Settings

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: zset   ARGV: claim_ms, count, hash key prefix -> {now, id1, due1, fields1, id2, ...}
CLAIM = _NOW + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {now}
for i = 1, #due, 2 do
  local id = due[i]
  local fields = redis.call('HGETALL', ARGV[3] .. id)
  if #fields == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    out[#out + 1] = id
    out[#out + 1] = due[i + 1]
    out[#out + 1] = fields
  end
end
return out
"""

# KEYS: zset, hash   ARGV: job id, delay_ms, then field/value pairs -> 1, or 0 when the entry is gone
RESCHEDULE = _NOW + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if #ARGV > 2 then redis.call('HSET', KEYS[2], unpack(ARGV, 3)) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: zset, hash   ARGV: job id, delay_ms, then field/value pairs: a new entry (or a fresh one)
SCHEDULE = _NOW + """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return now
"""

# KEYS: zset, hash   ARGV: job id, callback result -> 1 when the job was waiting for it
KICK = _NOW + """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'cb', ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""


@dataclass(slots=True)
class PollEntry:
    """One claimed job: what its poll needs, read from its hash in the claim's round trip."""

    job_id: str
    due_ms: int  # when it was due (lateness = claim time - due)
    queue: str
    deployment: str
    tenant: str
    key_id: str
    modality: str
    handle: dict[str, Any]
    seq: int
    deadline_ms: int
    errors: int
    first_ms: int
    renewed_ms: int
    written_ms: int
    published: str
    webhooks: bool
    callback: str | None

    @classmethod
    def from_fields(cls, job_id: str, due: Any, raw: list[Any]) -> PollEntry:
        f = {_s(raw[i]): _s(raw[i + 1]) for i in range(0, len(raw), 2)}
        return cls(
            job_id=job_id,
            due_ms=int(float(_s(due))),
            queue=f.get("q", ""),
            deployment=f.get("d", ""),
            tenant=f.get("t", ""),
            key_id=f.get("k", ""),
            modality=f.get("m", ""),
            handle=json.loads(f.get("h") or "{}"),
            seq=int(f.get("seq") or 0),
            deadline_ms=int(f.get("dl") or 0),
            errors=int(f.get("e") or 0),
            first_ms=int(f.get("s0") or 0),
            renewed_ms=int(f.get("lr") or 0),
            written_ms=int(f.get("pw") or 0),
            published=f.get("pv", ""),
            webhooks=f.get("wh") == "1",
            callback=f.get("cb") or None,
        )


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class PollSchedule:
    """The due-time set and per-job hashes. Cheap to build; holds no connection of its own."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.prefix = settings.redis_prefix
        self.settings = settings
        self._claim = redis.register_script(CLAIM)
        self._reschedule = redis.register_script(RESCHEDULE)
        self._schedule = redis.register_script(SCHEDULE)
        self._kick = redis.register_script(KICK)

    def zset(self, queue: str) -> str:
        return f"{self.prefix}:polls:{queue}"

    def hash(self, job_id: str) -> str:
        return f"{self.prefix}:poll:{job_id}"

    def queue_of(self, modality: str) -> str:
        return "video" if modality == "video" else "media"

    async def schedule(
        self,
        *,
        job_id: str,
        modality: str,
        deployment: str,
        tenant: str,
        key_id: str | None,
        handle: dict[str, Any],
        seq: int,
        deadline_ms: int,
        delay: float,
        webhooks: bool,
        published: str = "",
        started_ms: int = 0,
    ) -> int:
        """Put a job on the schedule (after its handle is saved in the row). Returns the
        Redis clock (ms) it was scheduled at. `started_ms`: when its provider task began
        (epoch ms; 0: at its first pending poll), the age its cadence backs off by."""
        q = self.queue_of(modality)
        fields: dict[str, Any] = {
            "q": q, "d": deployment, "t": tenant, "k": key_id or "", "m": modality,
            "h": json.dumps(handle, separators=(",", ":")), "seq": seq, "dl": deadline_ms, "e": 0,
            "s0": started_ms, "lr": 0, "pw": 0, "pv": published, "wh": 1 if webhooks else 0,
        }
        args: list[Any] = [job_id, int(max(0.0, delay) * 1000)]
        for k, v in fields.items():
            args += [k, v]
        return int(await self._schedule(keys=[self.zset(q), self.hash(job_id)], args=args))

    async def claim(self, queue: str, count: int, claim_seconds: float) -> tuple[int, list[PollEntry]]:
        """Take up to `count` due entries; each stays claimed for `claim_seconds`, then is
        due again (its poller died). Returns the Redis clock (ms) and the entries."""
        raw = await self._claim(keys=[self.zset(queue)], args=[int(claim_seconds * 1000), count, f"{self.prefix}:poll:"])
        now = int(raw[0])
        entries = [PollEntry.from_fields(_s(raw[i]), raw[i + 1], raw[i + 2]) for i in range(1, len(raw), 3)]
        return now, entries

    async def reschedule(self, pipe: Any, entry: PollEntry, delay: float, fields: dict[str, Any]) -> None:
        """Queue, on `pipe`, the entry's next poll and the fields that changed."""
        args: list[Any] = [entry.job_id, int(max(0.0, delay) * 1000)]
        for k, v in fields.items():
            args += [k, v]
        await self._reschedule(keys=[self.zset(entry.queue), self.hash(entry.job_id)], args=args, client=pipe)

    async def remove(self, job_id: str, modality: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.zset(self.queue_of(modality)), job_id)
            pipe.delete(self.hash(job_id))
            await pipe.execute()

    async def kick(self, job_id: str, modality: str, result: str) -> bool:
        """Hand a provider callback's final result to the job's next poll, due now."""
        q = self.queue_of(modality)
        return bool(await self._kick(keys=[self.zset(q), self.hash(job_id)], args=[job_id, result]))

    async def due_now(self, job_id: str, modality: str) -> bool:
        """Make a scheduled job due now (a callback's progress, a cancel to notice)."""
        return bool(await self.redis.zadd(self.zset(self.queue_of(modality)), {job_id: 0}, xx=True))

    async def scheduled(self, job_ids: list[str], modality_of: dict[str, str]) -> set[str]:
        """Which of these jobs are on the schedule (the reconciler's check)."""
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for j in job_ids:
                pipe.zscore(self.zset(self.queue_of(modality_of[j])), j)
            scores = await pipe.execute()
        return {j for j, sc in zip(job_ids, scores, strict=True) if sc is not None}

    async def depth(self, queue: str) -> int:
        return int(await self.redis.zcard(self.zset(queue)))
