"""The job state machine: the only code that writes a job's status.

    queued ──► running ──► succeeded
       │  ▲       │  ▲
       │  └───────┤  └─ (progress, provider handle, poll bookkeeping)
       │          │     running ─► queued: a submit the provider refused with 429/5xx
       │          │     (provably not started) waits to be retried
       ├──────────┴──► failed
       └──────────┴──► canceled

`Ledger.transition` is a compare-and-set: `UPDATE jobs SET ... WHERE id = :id AND status IN
(:allowed) [AND version = :v]`. It bumps `version`, sets the timestamps that go with the
new status and attaches outputs (assets) in the same transaction. Each transition is
also the job's events (core/events.py): the UPDATE allocates their `seq` (`event_seq`),
they are published to Redis while the row is still locked (so two transitions of one job
publish in commit order), and the webhook deliveries they cause are inserted in the same
transaction, then enqueued after the commit:

    queued→running: job.started    running→running: job.progress, when progress, message
    running→queued: job.progress   or queue position changed
    →succeeded: job.output per asset, job.succeeded    →failed / →canceled: job.failed / job.canceled

`Ledger.create` inserts a new job, with its billing hold, and announces job.queued. A
terminal transition closes the hold in its own transaction (core/billing/ledger.py: settle on
success, release on failure), writes the job's usage row and frees the key's slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy import Text, bindparam, case, cast, func, or_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core import metrics
from core.billing import ledger as billing
from core.billing.pricing import Cost
from core.db import Sessions
from core.errors import ErrorCode
from core.events import Event, EventBus, EventType
from core.jobs.queue import enqueue_woken
from core.limits.keys import KeyQuotas
from core.limits.waits import Gate
from core.models import Asset, Job, UsageRecord, WebhookDelivery, table_of, utcnow
from core.settings import Settings
from core.webhooks import WebhookPlanner, enqueue_delivery

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})

# to-status -> the statuses it may be reached from. running -> running is an update
# (progress, handle, poll bookkeeping) that keeps the status.
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    # running -> queued: retry of a submit that never started; queued -> queued: a waiting
    # job says why (no free slot, cooling down)
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.queued}),
    JobStatus.running: frozenset({JobStatus.queued, JobStatus.running}),
    JobStatus.succeeded: frozenset({JobStatus.running}),
    JobStatus.failed: frozenset({JobStatus.queued, JobStatus.running}),
    JobStatus.canceled: frozenset({JobStatus.queued, JobStatus.running}),
}

# Columns a transition may set besides status; anything else is a programming error.
WRITABLE = frozenset(
    {
        "progress",
        "progress_message",
        "queue_position",
        "deployment",
        "attempt",
        "attempts",
        "provider_handle",
        "poll_seq",
        "poll_errors",
        "next_poll_at",
        "error_detail",
    }
)


def can_transition(src: JobStatus, dst: JobStatus) -> bool:
    return src in ALLOWED_FROM[dst]


class Ledger:
    """Reads and writes jobs. Built once per process with the sessionmaker and Redis."""

    def __init__(self, sessions: Sessions, redis: Redis | None, channel_prefix: str) -> None:
        self.sessions = sessions
        self.redis = redis
        self.channel_prefix = channel_prefix
        self.events: EventBus | None = EventBus(redis, channel_prefix) if redis is not None else None
        self.webhooks = WebhookPlanner()
        self.quotas: KeyQuotas | None = KeyQuotas(redis, channel_prefix) if redis is not None else None
        self.waits: Any = None  # core.limits.waits.WaitQueues, set by the Runtime
        self.settings: Settings | None = None

    def configure(self, settings: Settings) -> None:
        """Apply the event and webhook settings (the API's lifespan and the worker's startup call it)."""
        self.settings = settings
        if self.redis is not None:
            self.events = EventBus(
                self.redis,
                self.channel_prefix,
                maxlen=settings.event_stream_maxlen,
                retention_seconds=settings.event_retention_seconds,
            )
        self.webhooks = WebhookPlanner(settings.webhook_endpoint_cache_seconds)
        if self.redis is not None:
            self.quotas = KeyQuotas(self.redis, self.channel_prefix, lease_seconds=settings.router_lease_seconds)

    def channel(self, job_id: str) -> str:
        return f"{self.channel_prefix}:job:{job_id}"

    async def get(self, job_id: str) -> Job | None:
        async with self.sessions() as s:
            return await s.get(Job, job_id)

    async def overlay(self, jobs: Sequence[Job]) -> None:
        """Put on these rows (in memory only) the progress that polls published as events
        without writing the row (DESIGN.md §13), so a read shows the latest progress."""
        running = [j for j in jobs if j.status == JobStatus.running]
        if not running or self.events is None:
            return
        try:
            latest = await self.events.latest([j.id for j in running])
        except Exception:  # the row is the truth, a little older
            log.debug("no live progress for %d jobs", len(running), exc_info=True)
            return
        for j in running:
            ev = latest.get(j.id)
            if ev is None or not ev.sub or ev.type != EventType.progress or ev.seq < j.event_seq:
                continue
            d = ev.data
            j.progress = d.get("progress", j.progress)
            j.progress_message = d.get("message", j.progress_message)
            j.queue_position = d.get("queue_position")

    async def write_progress(self, rows: Sequence[dict[str, Any]]) -> int:
        """Write several running jobs' progress in one statement (a checkpoint: the events
        went out already, so this bumps neither `version` nor `event_seq`). Rows:
        {"id", "progress", "progress_message", "queue_position"}."""
        if not rows:
            return 0
        t = table_of(Job)
        stmt = (
            update(t)
            .where(t.c.id == bindparam("b_id"), t.c.status == JobStatus.running.value)
            .values(progress=bindparam("b_progress"), progress_message=bindparam("b_message"),
                    queue_position=bindparam("b_position"))
        )
        params = [{"b_id": r["id"], "b_progress": r["progress"], "b_message": r["progress_message"],
                   "b_position": r["queue_position"]} for r in rows]
        async with self.sessions() as s:
            conn = await s.connection()
            await conn.execute(stmt, params)  # executemany: one round trip on asyncpg
            await s.commit()
        return len(rows)

    async def assets(self, job_ids: Sequence[str]) -> dict[str, list[Asset]]:
        out: dict[str, list[Asset]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        async with self.sessions() as s:
            rows = await s.exec(select(Asset).where(col(Asset.job_id).in_(list(job_ids))).order_by(col(Asset.index)))
            for a in rows:
                out[a.job_id].append(a)
        return out

    async def create(self, job: Job, *, hold: int | None = None, budgeted: bool = True) -> Job:
        """Insert a new queued job (with its billing hold of `hold` micro-USD and any
        job.queued webhook deliveries) and announce job.queued. Raises IntegrityError when
        the tenant's idempotency key is taken, BudgetExceeded when the hold does not fit.
        `budgeted`: whether the tenant is thought to have a budget (a hint, core/billing/ledger.py)."""
        job.event_seq = 1
        event = Event.make(job.id, 1, EventType.queued, job.created_at, _event_data(job))
        async with self.sessions() as s:
            deliveries = await self.webhooks.plan(s, job, [event])
            s.add(job)
            s.add_all(deliveries)
            if hold is not None:  # last: the tenant's row stays locked only until the commit
                job.cost_held = hold
                await billing.hold(s, tenant=job.tenant, key_id=job.key_id, subject_id=job.id, amount=hold,
                                   model=job.model, budgeted=budgeted)
            await s.commit()
        # after the commit: nobody may hear of a job the DB does not have (an idempotent
        # retry that loses the insert above must not announce its discarded id)
        await self._publish(job.tenant, [event])
        await self._enqueue(deliveries)
        metrics.job_submitted(job)
        return job

    async def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        expect_version: int | None = None,
        expect_poll_seq: int | None = None,
        error: tuple[ErrorCode, str] | None = None,
        assets: list[Asset] | None = None,
        cost: Cost | None = None,
        usage: dict[str, Any] | None = None,
        **changes: Any,
    ) -> Job | None:
        """Move a job to `to` if it is in a status allowed to get there (and, when given,
        at `expect_version` / `expect_poll_seq`). Returns the new row, or None when the
        compare-and-set lost (the job moved on: canceled, finished, or another worker).
        To succeeded, `cost` is what to settle (None: nothing) and `usage` the provider's."""
        unknown = set(changes) - WRITABLE
        if unknown:
            raise ValueError(f"transition cannot write {sorted(unknown)}")
        now = utcnow()
        values: dict[str, Any] = dict(changes, status=to.value, version=Job.version + 1, updated_at=now)
        if to is JobStatus.running:
            values["started_at"] = func.coalesce(Job.started_at, now)  # set once, on leaving queued
        if to in TERMINAL:
            values["finished_at"] = now
            values["next_poll_at"] = None
            values["queue_position"] = None
            if to is JobStatus.succeeded:
                values["progress"] = 1.0
            # the hold's end: charged on success (and on a cancel after the provider took
            # the task, which it bills), released on everything else
            if to is JobStatus.succeeded:
                settle: Any = cost.amount if cost is not None else 0
            elif to is JobStatus.canceled:
                # no handle saved: SQL NULL, or JSON null (what the ORM's INSERT of None writes)
                untaken = or_(col(Job.provider_handle).is_(None), cast(col(Job.provider_handle), Text) == "null")
                settle = case((untaken, 0), else_=Job.cost_held)
            else:
                settle = 0
            values["cost_settled"] = case((col(Job.cost_held).is_(None), None), else_=settle)
        if error is not None:
            values["error_code"] = error[0].value
            values["error_message"] = error[1][:2000]

        # Which events this write is, and so how far it moves event_seq. To running, the
        # row is tried as running first (a progress update, the common case) and then as
        # queued (a start), so the event type is known without reading the row first.
        if to is JobStatus.running:
            changed = [getattr(Job, f).is_distinct_from(changes[f]) for f in PROGRESS_FIELDS if f in changes]
            attempts: list[tuple[JobStatus | None, EventType, Any]] = [
                (JobStatus.running, EventType.progress, case((or_(*changed), 1), else_=0) if changed else 0),
                (JobStatus.queued, EventType.started, 1),
            ]
        elif to is JobStatus.queued:
            attempts = [(JobStatus.running, EventType.progress, 1), (JobStatus.queued, EventType.progress, 1)]
        else:
            kind = {JobStatus.succeeded: EventType.succeeded, JobStatus.failed: EventType.failed}.get(to, EventType.canceled)
            attempts = [(None, kind, 1 + (len(assets or []) if to is JobStatus.succeeded else 0))]

        async with self.sessions() as s:
            job: Job | None = None
            for src, tried_kind, bump in attempts:
                allowed = [src.value] if src is not None else [x.value for x in ALLOWED_FROM[to]]
                stmt = update(Job).where(col(Job.id) == job_id, col(Job.status).in_(allowed))
                if expect_version is not None:
                    stmt = stmt.where(col(Job.version) == expect_version)
                if expect_poll_seq is not None:
                    stmt = stmt.where(col(Job.poll_seq) == expect_poll_seq)
                stmt = stmt.values(**values, event_seq=col(Job.event_seq) + bump)
                stmt = stmt.returning(Job).execution_options(synchronize_session=False)
                job = (await s.exec(stmt)).scalar_one_or_none()
                if job is not None:
                    kind = tried_kind  # the write that matched says which event it is
                    break
            if job is None:
                await s.rollback()
                return None
            if assets:
                # assets are written only together with success, so a running job has none yet
                s.add_all(assets)
                await s.flush()  # a failing insert must fail before anything is published
            if to in TERMINAL:  # before publishing: the window from event to commit stays short
                await _account(s, job, to, cost, usage, now)
                await self._free_key_slot(job)  # before the event: a client resubmitting on it finds the slot free
            events = _events_of(job, kind, now, assets or [])
            # published while the row is locked: events of one job reach Redis in commit order
            sent = await self._publish(job.tenant, events)
            deliveries = await self.webhooks.plan(s, job, sent)
            s.add_all(deliveries)
            await s.commit()
        await self._enqueue(deliveries)
        if to in TERMINAL:
            metrics.job_finished(job)
            # one line per job's end, wherever it ends (worker, API cancel, reconciler); the
            # bound context (core/logs.py) names the job, its tenant and the request that sent it
            log.info("job %s %s%s", job.id, job.status, f" ({job.error_code})" if job.error_code else "",
                     extra={"model": job.model, **({"deployment": job.deployment} if job.deployment else {})})
            await self._after_terminal(job)
        return job

    async def _after_terminal(self, job: Job) -> None:
        """Off the poll schedule, out of any wait queue, and the key's freed slot handed to
        the next job waiting for it (core/limits/waits.py). Best effort: the reconciler and
        the leases' expiry cover a lost step."""
        if self.redis is None or self.waits is None or self.settings is None:
            return
        try:
            queue = "video" if job.modality == "video" else "media"
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(f"{self.channel_prefix}:polls:{queue}", job.id)
                pipe.delete(f"{self.channel_prefix}:poll:{job.id}")
                await pipe.execute()
            await self.waits.leave(job.id)
            if job.key_id:
                await self.wake_key(job.key_id)
        except Exception:
            log.warning("after the end of job %s: cleanup in Redis failed (it expires or is reconciled)", job.id, exc_info=True)

    async def wake_key(self, key_id: str) -> None:
        """A slot of the key was freed (a job ended, a chat call ended): hand it to the
        next job waiting in the key's queue and run that job."""
        if self.waits is None or self.quotas is None or self.settings is None or not isinstance(self.redis, ArqRedis):
            return
        gate = Gate(f"k:{key_id}", self.quotas.slots_key(key_id), -1)
        woken = await self.waits.wake(gate)
        if woken is not None:
            await enqueue_woken(self.redis, self.settings, self.waits, woken, gate.name)

    async def _free_key_slot(self, job: Job) -> None:
        if job.key_id and self.quotas is not None:
            try:
                await self.quotas.free(job.key_id, job.id)
            except Exception:  # the lease expires by itself (router_lease_seconds)
                log.warning("could not free key slot of job %s", job.id, exc_info=True)

    async def _publish(self, tenant: str, events: list[Event]) -> list[Event]:
        """Publish; returns the events that are news (and so get webhooks). A progress
        write that changed nothing reuses the last seq and the bus drops it as a duplicate."""
        if not events:
            return []
        seqs: set[int] = set()
        if self.events is not None:
            try:
                seqs = set(await self.events.publish(tenant, events))
            except Exception:  # the row is the truth; subscribers re-read it, waiters poll it
                log.warning("could not publish events of job %s", events[0].job_id, exc_info=True)
        return [e for e in events if e.type != EventType.progress or e.seq in seqs]

    async def _enqueue(self, deliveries: list[WebhookDelivery]) -> None:
        for d in deliveries:
            try:
                await enqueue_delivery(self.redis, self.channel_prefix, d.id)
            except Exception:  # the reconciler re-enqueues due deliveries from the DB
                log.warning("could not enqueue webhook delivery %s", d.id, exc_info=True)


PROGRESS_FIELDS = ("progress", "progress_message", "queue_position")


async def _account(s: AsyncSession, job: Job, to: JobStatus, cost: Cost | None, usage: dict[str, Any] | None, now: datetime) -> None:
    """In the terminal transition's transaction: write the usage row and close the hold."""
    tokens = usage or {}
    prompt = _int(tokens.get("prompt_tokens", tokens.get("input_tokens")))
    completion = _int(tokens.get("completion_tokens", tokens.get("output_tokens")))
    s.add(
        UsageRecord(
            id=job.id, tenant=job.tenant, key_id=job.key_id or "", kind=job.modality, model=job.model,
            deployment=job.deployment, status=to.value, prompt_tokens=prompt, completion_tokens=completion,
            total_tokens=prompt + completion, cost=job.cost_settled, attempts=_answered(job, tokens),
            error_code=job.error_code, duration_ms=int((now - job.created_at).total_seconds() * 1000), created_at=now,
        )
    )
    if job.cost_held is not None:
        settled = charged(job)
        basis = (cost.basis if cost is not None else "unpriced") if to is JobStatus.succeeded else "canceled after the provider started"
        dep = job.deployment
        await billing.close(s, [billing.Close(job.tenant, job.key_id, job.id, job.cost_held, job.cost_settled if settled else None,
                                              basis if settled else None, job.model, dep)])


def _answered(job: Job, usage: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's attempts for its usage row, the one that answered carrying `answered_model`
    when the provider named it (usage.model: an aggregator's in-provider fallback may answer)."""
    attempts = [dict(a) for a in job.attempts or []]
    model = usage.get("model")
    if isinstance(model, str) and model and attempts and job.deployment:
        for entry in reversed(attempts):
            if entry.get("deployment") == job.deployment and not entry.get("error"):
                entry["answered_model"] = model
                break
    return attempts


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _event_data(job: Job, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "status": job.status,
        "progress": job.progress,
        "message": job.progress_message,
        "queue_position": job.queue_position,
    }
    if job.status == JobStatus.queued and job.event_seq == 1:
        data.update(model=job.model, modality=job.modality, metadata=job.meta)
    data.update(extra)
    return data


def _events_of(job: Job, kind: EventType, at: datetime, assets: list[Asset]) -> list[Event]:
    """The events one write stands for; their seqs end at the row's new event_seq."""
    items: list[tuple[EventType, dict[str, Any]]]
    if kind is EventType.started:
        items = [(kind, _event_data(job, deployment=job.deployment, attempt=job.attempt))]
    elif kind is EventType.succeeded:
        items = [
            (
                EventType.output,
                {
                    "index": a.index,
                    "content_type": a.content_type,
                    "bytes": a.bytes,
                    "sha256": a.sha256,
                    "width": a.width,
                    "height": a.height,
                    "duration_seconds": a.duration_seconds,
                },
            )
            for a in assets
        ]
        items.append((kind, _event_data(job, outputs=len(assets), cost=_cost_data(job))))
    elif kind in (EventType.failed, EventType.canceled):
        error = {"code": job.error_code, "message": job.error_message}
        items = [(kind, _event_data(job, error=error, cost=_cost_data(job)))]
    else:
        items = [(kind, _event_data(job))]
    first = job.event_seq - len(items) + 1
    return [Event.make(job.id, first + i, t, at, data) for i, (t, data) in enumerate(items)]


def charged(job: Job) -> bool:
    """Whether a finished job's hold is settled (charged) rather than released: it succeeded,
    or it was canceled after the provider took the task (which the provider bills)."""
    return job.status == JobStatus.succeeded or (job.status == JobStatus.canceled and job.provider_handle is not None)


def _cost_data(job: Job) -> dict[str, Any] | None:
    """What a terminal event says of money: the hold, and what was settled (0: released)."""
    return None if job.cost_held is None else {"unit": "micro_usd", "held": job.cost_held, "settled": job.cost_settled}


def deadline_for(created: datetime, seconds: int) -> datetime:
    return created.astimezone(UTC) + timedelta(seconds=seconds)
