"""cancel_job: the API already marked the job canceled; ask the provider to stop, best effort."""

from __future__ import annotations

from core.jobs.ledger import JobStatus
from workers.context import Ctx, bind_job, cancel_quietly, deployment_of, release


async def cancel_job(ctx: Ctx, job_id: str) -> None:
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status != JobStatus.canceled:
        return
    bind_job(job)
    dep = deployment_of(rt, job)
    if dep is not None and job.provider_handle is not None:
        await cancel_quietly(rt.adapters.get(dep), job.provider_handle)
    await release(rt, job)
