"""Deadlines a client set on a job, enforced by a scan every second (a cron on the worker).

    Cancel-After (header; POST /v1/jobs and /replicate)   job.cancel_after_at
        not finished by then -> canceled, error {code: canceled, details: {reason: deadline}};
        a running job's provider task is canceled (cancel_job); it settles as any cancel:
        released if the provider never took the task, charged (the hold) if it had (the
        provider bills a started task)
    start_within_seconds (body)                           job.start_by_at
        still queued by then -> canceled, details {reason: start_deadline}; never billed
        (a queued job has no provider task, so its hold is released)

These are separate from `deadline_at` (the operator's per-modality limit), which the
reconciler enforces as `timeout`. Every end goes through Ledger.transition (compare-and-set
on the version read here), so a job that finished meanwhile is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlmodel import col, select

from core.errors import ErrorCode
from core.jobs.ledger import JobStatus
from core.jobs.queue import enqueue_cancel
from core.models import Job, utcnow
from core.runtime import Runtime

log = logging.getLogger("genroute.deadlines")

LIVE = [JobStatus.queued.value, JobStatus.running.value]


async def enforce_deadlines(ctx: dict[str, Any]) -> dict[str, int]:
    """ARQ cron entry (workers/main.py)."""
    return await enforce_once(ctx["rt"])


async def enforce_once(rt: Runtime) -> dict[str, int]:
    now = utcnow()
    limit = rt.settings.deadline_scan_limit
    async with rt.sessions() as s:
        overdue = (await s.exec(
            select(Job).where(col(Job.cancel_after_at) <= now, col(Job.status).in_(LIVE)).limit(limit)
        )).all()
        unstarted = (await s.exec(
            select(Job).where(col(Job.start_by_at) <= now, Job.status == JobStatus.queued.value).limit(limit)
        )).all()
    counts = {"canceled_after": 0, "not_started": 0}
    for job in overdue:
        seconds = (job.cancel_after_at - job.created_at).total_seconds() if job.cancel_after_at else 0
        if await _cancel(rt, job, f"canceled: not finished within its Cancel-After deadline ({seconds:g} s)",
                         {"reason": "deadline", "cancel_after_seconds": round(seconds, 3)}):
            counts["canceled_after"] += 1
    for job in unstarted:
        if job.cancel_after_at is not None and job.cancel_after_at <= now:
            continue  # ended above
        seconds = (job.start_by_at - job.created_at).total_seconds() if job.start_by_at else 0
        if await _cancel(rt, job, f"canceled: not started within start_within_seconds ({seconds:g} s); not billed",
                         {"reason": "start_deadline", "start_within_seconds": round(seconds, 3)}):
            counts["not_started"] += 1
    if any(counts.values()):
        log.info("deadlines: %s", counts)
    return counts


async def _cancel(rt: Runtime, job: Job, message: str, detail: dict[str, Any]) -> bool:
    moved = await rt.ledger.transition(
        job.id, JobStatus.canceled, expect_version=job.version, error=(ErrorCode.canceled, message), error_detail=detail
    )
    if moved is None:
        return False  # it moved on (finished, canceled, progressed): the next scan reads it again
    if moved.provider_handle is not None:  # the provider has the task: stop it (best effort, cancel_job)
        await enqueue_cancel(rt.redis, rt.settings, job.id, job.modality)
    return True
