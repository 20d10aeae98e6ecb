"""reconcile: the DB is the truth. A cron pages (by id, with a cursor, at any backlog size)
through queued and running jobs and puts back what Redis lost:

    queued, nothing waiting for it (no ARQ run, no wait queue, no timer) ─► run_job again
    queued past its deadline ─► failed (timeout)
    running with a handle, off the poll schedule and not being stored ─► scheduled again
    running without a handle, no create call in flight (its marker is gone) ─► run_job
        (which resends the create only where the adapter proves it safe)
    canceled within the last hour with a handle, its provider cancel neither queued, nor
        live, nor done (its marker is gone: the worker holding it died) ─► cancel_job

It also re-enqueues due webhook deliveries and releases stale chat holds.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, and_, cast
from sqlalchemy import select as sa_select
from sqlmodel import col

from core.billing.ledger import release_stale_holds
from core.errors import ErrorCode
from core.jobs.ledger import JobStatus
from core.jobs.queue import CANCEL_WATCH_SECONDS, canceling_key, enqueue_cancel, enqueue_run
from core.models import Job, utcnow
from core.runtime import Runtime
from workers.context import Ctx, fail
from workers.run import schedule_poll, submitting_key, waiting_key
from workers.store import done_key, enqueue_store, storing_key
from workers.webhooks import due_deliveries

log = logging.getLogger("genroute.reconciler")

PAGE = 2000
_COLS = tuple(col(c) for c in (Job.id, Job.modality, Job.next_poll_at, Job.updated_at, Job.deadline_at, Job.progress_message, Job.priority))


async def reconcile(ctx: Ctx) -> dict[str, int]:
    return await reconcile_once(ctx["rt"])


async def reconcile_once(rt: Runtime, *, limit: int = 1000) -> dict[str, int]:
    s = rt.settings
    now = utcnow()
    stale = now - timedelta(seconds=s.reconcile_grace_seconds)
    counts = {"requeued": 0, "repolled": 0, "resubmitted": 0, "timed_out": 0, "cancels": 0}
    tag = f":r{time.time_ns()}"
    async for rows in _pages(rt, JobStatus.queued, stale):
        await _queued(rt, rows, now, stale, tag, counts)
    async for rows in _pages(rt, JobStatus.running, stale):
        await _running(rt, rows, stale, tag, counts)
    async for rows in _pages(rt, JobStatus.canceled, stale, since=now - timedelta(seconds=CANCEL_WATCH_SECONDS)):
        await _canceled(rt, rows, tag, counts)
    # webhook deliveries that are due but whose deferred task was lost (Redis flushed, worker killed)
    counts["webhooks"] = await due_deliveries(rt, older_than=s.reconcile_grace_seconds, limit=limit)
    # holds of chat calls whose API process died mid-call (jobs' holds close with the job)
    async with rt.sessions() as session:
        older = timedelta(seconds=s.deadline_text_seconds + s.reconcile_grace_seconds)
        counts["stale_holds"] = await release_stale_holds(session, prefix="chat_", older_than=older, limit=limit)
        await session.commit()
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts


async def _pages(rt: Runtime, status: JobStatus, stale: datetime, *, since: datetime | None = None) -> Any:
    """Jobs in `status` last written before `stale` (and, for a finished status, after
    `since`: with a provider handle, the ones whose task may still need stopping)."""
    cursor = ""
    while True:
        q = (
            sa_select(*_COLS)
            .where(col(Job.status) == status.value, col(Job.updated_at) < stale, col(Job.id) > cursor)
            .order_by(col(Job.id))
            .limit(PAGE)
        )
        if since is not None:
            taken = and_(col(Job.provider_handle).is_not(None), cast(col(Job.provider_handle), Text) != "null")
            q = q.where(col(Job.updated_at) >= since, taken)
        async with rt.sessions() as session:
            rows = (await session.execute(q)).all()
        if not rows:
            return
        yield rows
        if len(rows) < PAGE:
            return
        cursor = rows[-1].id


async def _flags(rt: Runtime, ids: list[str], keys: list[str]) -> list[list[bool]]:
    """For each job, whether each of these marker keys (formatted with the id) exists."""
    async with rt.redis.pipeline(transaction=False) as pipe:
        for j in ids:
            for k in keys:
                pipe.exists(k.format(j))
        found = await pipe.execute()
    n = len(keys)
    return [[bool(x) for x in found[i * n:(i + 1) * n]] for i in range(len(ids))]


async def _queued(rt: Runtime, rows: list[Any], now: datetime, stale: datetime, tag: str, counts: dict[str, int]) -> None:
    ids = [r.id for r in rows]
    flags = await _flags(rt, ids, [rt.waits.job_key("{}"), waiting_key(rt, "{}"), "arq:job:run:{}", "arq:in-progress:run:{}",
                                   submitting_key(rt, "{}")])
    for r, (in_wait_queue, timer, run_queued, run_in_progress, live_run) in zip(rows, flags, strict=True):
        if r.deadline_at is not None and now >= r.deadline_at:
            job = await rt.ledger.get(r.id)
            if job is not None and job.status == JobStatus.queued:
                await rt.waits.leave(r.id)
                await fail(rt, job, ErrorCode.timeout, "the job passed its deadline while queued")
                counts["timed_out"] += 1
            continue
        if r.next_poll_at is not None and r.next_poll_at > stale:
            continue  # a submit retry is scheduled for then
        if in_wait_queue or timer:
            continue  # a release (or its timer) wakes it
        if run_queued and not run_in_progress:
            continue  # its run is on the queue, behind others
        if live_run:
            continue  # a run is routing or submitting it right now (its marker is beating)
        # no run at all, or one held by a dead worker (its in-progress key outlives it)
        if await enqueue_run(rt.redis, rt.settings, r.id, r.modality, suffix=tag if run_in_progress else "", priority=r.priority):
            counts["requeued"] += 1


async def _running(rt: Runtime, rows: list[Any], stale: datetime, tag: str, counts: dict[str, int]) -> None:
    ids = [r.id for r in rows]
    scheduled = await rt.polls.scheduled(ids, {r.id: r.modality for r in rows})
    rest = [r for r in rows if r.id not in scheduled]
    if not rest:
        return
    flags = await _flags(rt, [r.id for r in rest], [storing_key(rt, "{}"), submitting_key(rt, "{}")])
    for r, (storing, submitting) in zip(rest, flags, strict=True):
        if storing or submitting:
            continue
        if r.next_poll_at is not None and r.next_poll_at > stale and r.progress_message == "storing outputs":
            continue  # a finish was claimed a moment ago
        job = await rt.ledger.get(r.id)
        if job is None or job.status != JobStatus.running:
            continue
        if job.provider_handle is not None and job.progress_message == "storing outputs" and await rt.redis.exists(done_key(rt, job.id)):
            await enqueue_store(rt, job, suffix=tag)
            counts["repolled"] += 1
        elif job.provider_handle is not None and job.provider_handle.get("done_at_submit"):
            await fail(rt, job, ErrorCode.storage_error, "the outputs were lost before they could be stored; submit the job again")
        elif job.provider_handle is not None:
            await schedule_poll(rt, job, delay=0)
            counts["repolled"] += 1
        else:
            # a submit that never reported back: run_job decides whether it may be resent
            await enqueue_run(rt.redis, rt.settings, job.id, job.modality, suffix=tag, priority=job.priority)
            counts["resubmitted"] += 1


async def _canceled(rt: Runtime, rows: list[Any], tag: str, counts: dict[str, int]) -> None:
    """Canceled jobs whose provider cancel is neither queued, live nor done: the worker
    holding it was killed (ARQ would retry it only after its in-progress key, an hour)."""
    prefix = rt.settings.redis_prefix
    flags = await _flags(rt, [r.id for r in rows], [canceling_key(prefix, "{}")])
    for r, (marked,) in zip(rows, flags, strict=True):
        if not marked and await enqueue_cancel(rt.redis, rt.settings, r.id, r.modality, suffix=tag):
            counts["cancels"] += 1
