"""The poller: polls every job running at a provider when it is due, from the Redis poll
schedule (core/jobs/polls.py), thousands in flight per worker process.

    claim due entries (one Lua call, up to `batch`) ─► poll each (concurrently, bounded)
        Pending, nothing new ─► reschedule                      ┐
        Pending, new progress ─► progress sub-event (Redis)       ├─ one pipeline per flush
                                 + row at most every progress_write_seconds (one UPDATE per flush)
        lease older than a third of its life ─► renew            ┘
        Done ─► claim the finish in the row ─► store_outputs (workers/store.py)
        Failed, deadline passed, errors spent ─► the ledger (a real transition)

A poll whose answer changes nothing a user can see writes nothing to SQL. A worker killed
mid-poll loses nothing: its claimed entries are due again after `poll_claim_seconds`.
Our own infrastructure failing (Redis, the database) never ends a job: the entry stays
claimed and comes back when its claim ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.base import Adapter
from core import disclosure, logs, metrics
from core.callbacks import load_result
from core.errors import ErrorCode, ProviderError
from core.jobs.ledger import JobStatus
from core.jobs.polls import PollEntry
from core.limits.deployments import RENEW
from core.models import utcnow
from core.outages import infra_down
from core.runtime import Runtime
from core.types import Done, Failed, Pending
from workers.context import cancel_quietly, fail
from workers.store import hand_to_store

log = logging.getLogger("genroute.poller")



@dataclass
class _Batch:
    """What the polls since the last flush want written: Redis commands, then SQL."""

    reschedules: list[tuple[PollEntry, float, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[PollEntry, dict[str, Any]]] = field(default_factory=list)
    renewals: list[PollEntry] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reschedules)


@dataclass
class PollStats:
    polls: int = 0
    late_ms_max: int = 0
    late_over_5s: int = 0
    flushes: int = 0
    rows_written: int = 0


class Poller:
    def __init__(self, rt: Runtime, queues: list[str]) -> None:
        self.rt = rt
        self.queues = queues  # "media", "video"
        s = rt.settings
        self.concurrency = s.poll_concurrency
        self.claim_seconds = s.poll_claim_seconds
        self.batch = _Batch()
        self.in_flight: set[asyncio.Task[None]] = set()
        self.sem = asyncio.Semaphore(self.concurrency)
        self.stats = PollStats()
        self._flush_now = asyncio.Event()
        self._renew = rt.redis.register_script(RENEW)
        self._stopping = False

    async def run(self) -> None:
        flusher = asyncio.create_task(self._flush_loop(), name="poll-flush")
        try:
            await self._claim_loop()
        finally:
            self._stopping = True
            if self.in_flight:
                await asyncio.wait(self.in_flight, timeout=self.rt.settings.task_timeout_seconds)
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await self._flush()

    async def _claim_loop(self) -> None:
        idle = 0.02
        down = False
        while True:
            room = self.concurrency - len(self.in_flight)
            if room <= 0:
                await asyncio.sleep(0.01)
                continue
            claimed = 0
            try:
                for q in self.queues:
                    now_ms, entries = await self.rt.polls.claim(q, min(room, 500), self.claim_seconds)
                    for e in entries:
                        self._start(e, now_ms)
                    claimed += len(entries)
                if down:
                    log.warning("poller: Redis answers again")
                    down = False
            except Exception as exc:
                if not infra_down(exc):
                    raise
                if not down:
                    log.warning("poller: Redis unreachable (%s); retrying", type(exc).__name__)
                    down = True
                await asyncio.sleep(1.0)
                continue
            if claimed == 0:
                await asyncio.sleep(idle)
                idle = min(0.1, idle * 1.5)
            else:
                idle = 0.02

    def _start(self, entry: PollEntry, now_ms: int) -> None:
        late = now_ms - entry.due_ms
        metrics.observe_poll_lateness(late / 1000)
        self.stats.polls += 1
        self.stats.late_ms_max = max(self.stats.late_ms_max, late)
        if late > 5000:
            self.stats.late_over_5s += 1
        task = asyncio.create_task(self._poll(entry, now_ms))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _poll(self, e: PollEntry, now_ms: int) -> None:
        logs.bind_here(job_id=e.job_id, deployment=e.deployment)  # this poll's own task: its lines only
        try:
            await self._poll_one(e, now_ms)
        except Exception as exc:
            if infra_down(exc):  # ours, not the provider's: the entry stays claimed and is due again soon
                log.debug("poll of job %s: infrastructure error (%s); it comes back after its claim", e.job_id,
                            type(exc).__name__)
                return
            log.exception("poll of job %s crashed", e.job_id)

    async def _poll_one(self, e: PollEntry, now_ms: int) -> None:
        rt = self.rt
        if e.deadline_ms and now_ms >= e.deadline_ms:
            await self._deadline(e)
            return
        dep = rt.catalog.deployment(e.deployment)
        if dep is None:
            await self._end(e, ErrorCode.internal, f"deployment {e.deployment!r} left the catalog mid-job")
            return
        adapter = rt.adapters.get(dep)
        try:
            result = load_result(e.callback) if e.callback else await adapter.poll(e.handle)
        except ProviderError as exc:
            if exc.retryable and e.errors + 1 < rt.settings.poll_error_limit:
                cap = rt.settings.router_max_retry_after_seconds
                delay = max(min(exc.retry_after or 0.0, cap), min(60.0, 2.0 ** (e.errors + 1)))
                self._reschedule(e, now_ms, delay, {"e": e.errors + 1})
                return
            told = disclosure.of_provider_error(exc)
            await self._end(e, exc.code, told.message, told.detail)
            return
        except Exception as exc:
            if infra_down(exc):
                raise
            # an adapter bug: the job cannot go on
            log.exception("poll of job %s at %s crashed", e.job_id, e.deployment)
            await self._end(e, ErrorCode.internal, f"adapter {dep.adapter} crashed while polling: {type(exc).__name__}")
            return
        if isinstance(result, Pending):
            await self._pending(e, now_ms, result, adapter)
        elif isinstance(result, Failed):
            told = disclosure.of_failure(result.message, result.detail)
            await self._end(e, result.code, told.message, told.detail)
        else:
            await self._done(e, result)

    async def _pending(self, e: PollEntry, now_ms: int, result: Pending, adapter: Adapter) -> None:
        fields: dict[str, Any] = {}
        if e.errors:
            fields["e"] = 0
        if e.callback:
            fields["cb"] = ""
        if not e.first_ms:
            fields["s0"] = now_ms
        if result.handle != e.handle:
            fields["h"] = json.dumps(result.handle, separators=(",", ":"))
        fraction = result.progress
        if fraction is None:  # the provider says nothing of progress: keep what was last shown
            last = json.loads(e.published).get("progress") if e.published else None
            fraction = last if isinstance(last, int | float) else 0.0
        progress = {"progress": fraction, "message": result.message, "queue_position": result.queue_position}
        published = json.dumps(progress, separators=(",", ":"), sort_keys=True)
        if published != e.published:
            fields["pv"] = published
            if e.webhooks:  # subscribers want job.progress webhooks: a delivery row, so the row too
                moved = await self.rt.ledger.transition(
                    e.job_id, JobStatus.running, progress=fraction, progress_message=result.message,
                    queue_position=result.queue_position,
                )
                if moved is None:
                    await self.rt.polls.remove(e.job_id, e.modality)
                    return
            else:
                data = {"status": "running", **progress}
                self.batch.events.append((e, data))
                if now_ms - e.written_ms >= self.rt.settings.progress_write_seconds * 1000:
                    fields["pw"] = now_ms
                    self.batch.rows.append({"id": e.job_id, "progress": fraction,
                                            "progress_message": result.message, "queue_position": result.queue_position})
        lease_ms = self.rt.settings.router_lease_seconds * 1000
        if now_ms - e.renewed_ms >= lease_ms / 3:
            fields["lr"] = now_ms
            self.batch.renewals.append(e)
        age = (now_ms - e.first_ms) / 1000 if e.first_ms else 0.0
        self._reschedule(e, now_ms, adapter.paced(result.poll_after, age), fields)

    def _reschedule(self, e: PollEntry, now_ms: int, delay: float, fields: dict[str, Any]) -> None:
        """Queue the next poll: never later than the longest interval (so the slot lease is
        renewed in time) nor past the job's deadline."""
        s = self.rt.settings
        delay = min(max(0.0, delay), s.poll_max_interval_seconds, s.router_lease_seconds / 3)
        if e.deadline_ms:
            delay = min(delay, max(0.0, (e.deadline_ms - now_ms) / 1000))
        self.batch.reschedules.append((e, delay, fields))
        if len(self.batch) >= 200:
            self._flush_now.set()

    async def _flush_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._flush_now.wait(), 0.02)
            except TimeoutError:
                pass
            self._flush_now.clear()
            try:
                await self._flush()
            except Exception as exc:
                if infra_down(exc):
                    log.warning("poller: could not write poll results (%s); they come back after their claim",
                                type(exc).__name__)
                else:
                    log.exception("poller: flush failed")

    async def _flush(self) -> None:
        batch, self.batch = self.batch, _Batch()
        if not batch.reschedules and not batch.events and not batch.rows:
            return
        rt = self.rt
        bus = rt.ledger.events
        at = datetime.now(UTC)
        async with rt.redis.pipeline(transaction=False) as pipe:
            if bus is not None:
                for e, data in batch.events:
                    await bus.publish_progress(pipe, e.tenant, e.job_id, 0, at, data)
            lease_ms = int(rt.settings.router_lease_seconds * 1000)
            for e in batch.renewals:
                if e.deployment:
                    await self._renew(keys=[rt.limiter.key("slots", e.deployment)], args=[e.job_id, lease_ms], client=pipe)
                if e.key_id and rt.ledger.quotas is not None:
                    await self._renew(keys=[rt.ledger.quotas.slots_key(e.key_id)], args=[e.job_id, lease_ms], client=pipe)
            for e, delay, fields in batch.reschedules:
                await rt.polls.reschedule(pipe, e, delay, fields)
            await pipe.execute()
        self.stats.flushes += 1
        if batch.rows:
            self.stats.rows_written += await rt.ledger.write_progress(batch.rows)

    async def _done(self, e: PollEntry, done: Done) -> None:
        rt = self.rt
        # claim the finish, so a second poll of the same seq does not store twice; the row
        # takes the progress last published (it may hold an older checkpoint)
        last = json.loads(e.published).get("progress") if e.published else None
        extra: dict[str, Any] = {"progress": last} if isinstance(last, int | float) else {}
        claimed = await rt.ledger.transition(
            e.job_id, JobStatus.running, expect_poll_seq=e.seq, poll_seq=e.seq + 1, progress_message="storing outputs", queue_position=None, **extra,
            next_poll_at=utcnow() + timedelta(seconds=rt.settings.reconcile_grace_seconds),
        )
        if claimed is None:
            await rt.polls.remove(e.job_id, e.modality)
            return
        await hand_to_store(rt, claimed, done)

    async def _end(self, e: PollEntry, code: ErrorCode, message: str, detail: Any = None) -> None:
        job = await self.rt.ledger.get(e.job_id)
        if job is None or job.status != JobStatus.running:
            await self.rt.polls.remove(e.job_id, e.modality)
            return
        await fail(self.rt, job, code, message, detail)
        await self.rt.polls.remove(e.job_id, e.modality)

    async def _deadline(self, e: PollEntry) -> None:
        dep = self.rt.catalog.deployment(e.deployment)
        if dep is not None:
            await cancel_quietly(self.rt.adapters.get(dep), e.handle)
        deadline = datetime.fromtimestamp(e.deadline_ms / 1000, UTC).isoformat()
        await self._end(e, ErrorCode.timeout, f"the provider did not finish before the job's deadline ({deadline})")


async def serve_poller(rt: Runtime, queues: list[str]) -> None:
    await Poller(rt, queues).run()

