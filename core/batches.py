"""Inserting a batch of jobs in one transaction (POST /v1/batches, api/batches.py).

    one transaction:  INSERT batch ─ per item: hold (a savepoint when the tenant has a budget)
                      ─ INSERT the jobs whose hold fit, their job.queued webhook rows ─ COMMIT
    after the commit: publish each job.queued, enqueue the webhook rows (the caller enqueues runs)

Budget holds are taken **per item**, not atomically: each item holds its own price, in
request order, inside the batch's one transaction; an item whose hold does not fit the
budget left is refused (`budget_exceeded` in its slot) and the items before it keep theirs.
Why: items are independent jobs (own idempotency key, own outcome, own settle or release),
and a batch that would fail whole because its last item overdraws would make a client
resubmit 999 good jobs; per-item holds give the same guarantee (the budget is never
overdrawn) with a precise answer. The savepoint per item (only for a budgeted tenant)
lets one refusal roll back just that item's hold.

This mirrors Ledger.create (core/jobs/ledger.py) for many jobs at once; it belongs beside it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from core.billing import ledger as billing
from core.errors import BudgetExceeded
from core.events import Event, EventType, job_event_data
from core.jobs.ledger import Ledger
from core.models import Batch, Job, WebhookDelivery
from core.webhooks import enqueue_delivery

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Item:
    job: Job
    hold: int
    refused: BudgetExceeded | None = None


async def create_batch(ledger: Ledger, batch: Batch, items: list[Item], *, budgeted: bool) -> list[Item]:
    """Insert `batch` and the jobs of `items` whose holds fit; returns the items, each
    refused one with its BudgetExceeded. Raises IntegrityError when an idempotency key was
    taken meanwhile (the caller re-reads and retries)."""
    deliveries: list[WebhookDelivery] = []
    events: dict[str, Event] = {}
    async with ledger.sessions() as s:
        s.add(batch)
        for it in items:
            it.refused = None
            job = it.job
            job.event_seq = 1
            job.cost_held = it.hold
            if budgeted:
                try:
                    async with s.begin_nested():
                        await billing.hold(s, tenant=job.tenant, key_id=job.key_id, subject_id=job.id, amount=it.hold,
                                           model=job.model, budgeted=True)
                except BudgetExceeded as exc:
                    it.refused = exc
                    continue
            else:
                await billing.hold(s, tenant=job.tenant, key_id=job.key_id, subject_id=job.id, amount=it.hold,
                                   model=job.model, budgeted=False)
            events[job.id] = Event.make(job.id, 1, EventType.queued, job.created_at, job_event_data(job))
            s.add(job)
            deliveries += await ledger.webhooks.plan(s, job, [events[job.id]])
        s.add_all(deliveries)
        await s.commit()
    await _announce(ledger, [it.job for it in items if it.refused is None], events, deliveries)
    return items


async def _announce(ledger: Ledger, jobs: list[Job], events: dict[str, Event], deliveries: list[WebhookDelivery]) -> None:
    """After the commit: job.queued on each job's stream, and the webhook rows enqueued; the
    row is the truth, so a failure here only delays subscribers (they re-read) and webhooks
    (the reconciler re-enqueues due rows)."""
    bus = ledger.events
    sem = asyncio.Semaphore(50)

    async def one(job: Job) -> None:
        async with sem:
            if bus is not None:
                await bus.publish(job.tenant, [events[job.id]])

    async def hook(d: WebhookDelivery) -> None:
        async with sem:
            await enqueue_delivery(ledger.redis, ledger.channel_prefix, d.id)

    results = await asyncio.gather(*(one(j) for j in jobs), *(hook(d) for d in deliveries), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        log.warning("batch: %d announcements failed (first: %r)", len(failed), failed[0])
