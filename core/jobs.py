"""The job state machine: the only code that writes a job's status.

    queued ──► running ──► succeeded
       │          │  ▲
       │          └──┘ (progress, provider handle, poll bookkeeping)
       ├──────────┴──► failed
       └──────────┴──► canceled

`Ledger.transition` is a compare-and-set: `UPDATE jobs SET ... WHERE id = :id AND status IN
(:allowed) [AND version = :v]`. It bumps `version`, sets the timestamps that go with the
new status, attaches outputs (assets) in the same transaction, and after the commit
announces the change on the job's Redis channel, where `Prefer: wait` listens. Later
features (events, webhooks) hang on this one function.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func, update
from sqlmodel import select

from core.db import Sessions
from core.errors import ErrorCode
from core.models import Asset, Job, utcnow

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
    JobStatus.queued: frozenset(),
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

    def channel(self, job_id: str) -> str:
        return f"{self.channel_prefix}:job:{job_id}"

    async def get(self, job_id: str) -> Job | None:
        async with self.sessions() as s:
            return await s.get(Job, job_id)

    async def assets(self, job_ids: Sequence[str]) -> dict[str, list[Asset]]:
        out: dict[str, list[Asset]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        async with self.sessions() as s:
            rows = await s.exec(select(Asset).where(Asset.job_id.in_(list(job_ids))).order_by(Asset.index))  # type: ignore[attr-defined]
            for a in rows:
                out[a.job_id].append(a)
        return out

    async def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        expect_version: int | None = None,
        expect_poll_seq: int | None = None,
        error: tuple[ErrorCode, str] | None = None,
        assets: list[Asset] | None = None,
        **changes: Any,
    ) -> Job | None:
        """Move a job to `to` if it is in a status allowed to get there (and, when given,
        at `expect_version` / `expect_poll_seq`). Returns the new row, or None when the
        compare-and-set lost (the job moved on: canceled, finished, or another worker)."""
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
        if error is not None:
            values["error_code"] = error[0].value
            values["error_message"] = error[1][:2000]
        stmt = update(Job).where(Job.id == job_id, Job.status.in_([s.value for s in ALLOWED_FROM[to]]))  # type: ignore[attr-defined]
        if expect_version is not None:
            stmt = stmt.where(Job.version == expect_version)
        if expect_poll_seq is not None:
            stmt = stmt.where(Job.poll_seq == expect_poll_seq)
        stmt = stmt.values(**values).returning(Job).execution_options(synchronize_session=False)
        async with self.sessions() as s:
            job = (await s.exec(stmt)).scalar_one_or_none()  # type: ignore[call-overload]
            if job is None:
                await s.rollback()
                return None
            if assets:
                # assets are written only together with success, so a running job has none yet
                s.add_all(assets)
            await s.commit()
        await self._announce(job)
        return job

    async def _announce(self, job: Job) -> None:
        if self.redis is None:
            return
        try:
            await self.redis.publish(
                self.channel(job.id),
                json.dumps({"status": job.status, "version": job.version, "progress": job.progress}),
            )
        except Exception:  # the row is the truth; a lost notification only delays a waiter
            log.warning("could not publish change of job %s", job.id, exc_info=True)


def deadline_for(created: datetime, seconds: int) -> datetime:
    return created.astimezone(UTC) + timedelta(seconds=seconds)
