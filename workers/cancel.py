"""cancel_job: the API already marked the job canceled; ask the provider to stop, best effort.

While it runs, its marker (core/jobs/queue.py canceling_key) beats; once the provider was
asked, the marker says "done". A worker killed mid-cancel leaves neither: the reconciler
queues the cancel again (workers/reconcile.py), instead of ARQ after its in-progress key
lapses, an hour later.
"""

from __future__ import annotations

from core.jobs.ledger import JobStatus
from core.jobs.queue import CANCEL_DONE, CANCEL_WATCH_SECONDS, canceling_key
from workers.context import Ctx, alive, bind_job, cancel_quietly, deployment_of, release


async def cancel_job(ctx: Ctx, job_id: str) -> None:
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status != JobStatus.canceled:
        return
    bind_job(job)
    key = canceling_key(rt.settings.redis_prefix, job_id)
    mark = await rt.redis.get(key)
    if mark in (b"1", "1", CANCEL_DONE.encode(), CANCEL_DONE):
        return  # another run of it is live (its marker beats), or the provider was asked already
    async with alive(rt, key):
        dep = deployment_of(rt, job)
        if dep is not None and job.provider_handle is not None:
            await cancel_quietly(rt.adapters.get(dep), job.provider_handle)
        await release(rt, job)
    await rt.redis.set(key, CANCEL_DONE, ex=CANCEL_WATCH_SECONDS + 600)
