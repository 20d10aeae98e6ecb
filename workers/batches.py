"""Batch completion: once every job of a batch has ended, mark it completed and send its
webhook (`batch.completed`, signed like every webhook) — a scan every second (a cron on the
worker, workers/main.py), one query for up to 200 open batches.

The claim is a compare-and-set on `completed_at IS NULL`, and the delivery row is written in
the same transaction, so two workers scanning at once send it once.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import update
from sqlmodel import col, func, select

from core.ids import new_id
from core.jobs.ledger import JobStatus
from core.models import Batch, Job, WebhookDelivery, utcnow
from core.runtime import Runtime
from core.webhooks import enqueue_delivery

log = logging.getLogger("genroute.batches")
EVENT = "batch.completed"


async def complete_batches(ctx: dict[str, Any]) -> int:
    """ARQ cron entry (workers/main.py)."""
    return await complete_once(ctx["rt"])


async def complete_once(rt: Runtime, limit: int = 200) -> int:
    async with rt.sessions() as s:
        open_ids = list((await s.exec(
            select(Batch.id).where(col(Batch.completed_at).is_(None)).order_by(col(Batch.created_at)).limit(limit)
        )).all())
        if not open_ids:
            return 0
        busy = set((await s.exec(
            select(Job.batch_id).where(col(Job.batch_id).in_(open_ids),
                                       col(Job.status).in_([JobStatus.queued.value, JobStatus.running.value]))
            .distinct()
        )).all())
    done = 0
    for batch_id in open_ids:
        if batch_id not in busy and await _complete(rt, batch_id):
            done += 1
    return done


async def _complete(rt: Runtime, batch_id: str) -> bool:
    now = utcnow()
    async with rt.sessions() as s:
        claimed = (await s.exec(
            update(Batch).where(col(Batch.id) == batch_id, col(Batch.completed_at).is_(None)).values(completed_at=now)
            .returning(Batch).execution_options(synchronize_session=False)
        )).scalar_one_or_none()
        if claimed is None:
            await s.rollback()
            return False
        counts = {st.value: 0 for st in JobStatus}
        for status, n in (await s.exec(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status))).all():
            counts[status] = int(n)
        delivery = None
        if claimed.webhook_url:
            payload = {"type": EVENT, "batch_id": batch_id, "at": now.isoformat().replace("+00:00", "Z"),
                       "data": {"total": claimed.total, "rejected": claimed.rejected, "counts": counts,
                                "metadata": claimed.meta}}
            delivery = WebhookDelivery(id=new_id("whd"), tenant=claimed.tenant, job_id=batch_id, url=claimed.webhook_url,
                                       event_id=f"evt_{batch_id}_completed", event_type=EVENT, seq=1, payload=payload,
                                       status="pending", next_attempt_at=now, created_at=now, updated_at=now)
            s.add(delivery)
        await s.commit()
    if delivery is not None:
        await enqueue_delivery(rt.redis, rt.settings.redis_prefix, delivery.id)
    log.info("batch %s completed: %s", batch_id, counts)
    return True
