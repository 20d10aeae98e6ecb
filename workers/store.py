"""store_outputs: stream a finished provider task's outputs into the blob store, then succeed.

A poll (or a submit) that sees Done has already claimed the finish in the row (poll_seq
compare-and-set, message "storing outputs"); it hands the result over in Redis and
enqueues this task, so storing a large video never holds a poll's place. While it runs,
a marker in Redis tells the reconciler it is alive; if the worker dies, the marker ends,
the reconciler puts the job back on the poll schedule, and the next poll finds the
provider's result again.
"""

from __future__ import annotations

import time

from core.billing.pricing import actual_cost
from core.callbacks import dump_result, load_result
from core.errors import ErrorCode
from core.jobs.ledger import JobStatus
from core.models import Asset, Job, utcnow
from core.runtime import Runtime
from core.types import Done, OutputRef
from storage import StorageError, store_output
from workers.context import Ctx, alive, bind_job, deployment_of, fail, release

QUEUED, LIVE = "queued", "1"  # the storing marker: a store task is queued / running


def done_key(rt: Runtime, job_id: str) -> str:
    return f"{rt.settings.redis_prefix}:done:{job_id}"


def storing_key(rt: Runtime, job_id: str) -> str:
    return f"{rt.settings.redis_prefix}:storing:{job_id}"


async def hand_to_store(rt: Runtime, job: Job, done: Done) -> None:
    """After the finish was claimed (the row says "storing outputs" at `job.poll_seq`)."""
    await rt.polls.remove(job.id, job.modality)
    await rt.redis.set(done_key(rt, job.id), dump_result(done), ex=3600)
    await enqueue_store(rt, job)


async def enqueue_store(rt: Runtime, job: Job, suffix: str = "") -> None:
    """Queue a store task, marked "queued" first so the reconciler leaves it alone until it
    starts (then `alive` beats the marker) or the mark lapses unstarted."""
    await rt.redis.set(storing_key(rt, job.id), QUEUED, px=int(rt.settings.reconcile_grace_seconds * 2000))
    await rt.redis.enqueue_job(
        "store_outputs", job.id, job.poll_seq, _job_id=f"store:{job.id}:{job.poll_seq}{suffix}",
        _queue_name=rt.settings.queue_for(job.modality),
    )


async def store_outputs(ctx: Ctx, job_id: str, seq: int) -> None:
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status != JobStatus.running or job.poll_seq != seq:
        return
    bind_job(job)
    raw = await rt.redis.get(done_key(rt, job_id))
    if raw is None:  # the hand-over was lost (Redis flushed): poll the provider again
        from workers.run import schedule_poll

        await schedule_poll(rt, job, delay=0)
        return
    result = load_result(raw)
    if not isinstance(result, Done):
        return
    # one store at a time: a store task re-run by the queue, or queued twice, while another
    # is live (its marker beats) leaves it be; if that one dies, its marker lapses and the
    # reconciler queues another
    before = await rt.redis.set(storing_key(rt, job_id), LIVE, px=int(rt.settings.submit_marker_seconds * 1000), get=True)
    if before in (LIVE, LIVE.encode()):
        return
    async with alive(rt, storing_key(rt, job_id)):
        await finish(rt, job, result)
    await rt.redis.delete(done_key(rt, job_id))


async def finish(rt: Runtime, job: Job, done: Done) -> None:
    """Stream every output into the blob store, then succeed with the assets attached."""
    # content-addressed per tenant: a tenant's identical outputs (a cache hit, a seeded rerun)
    # share one object; nothing deletes output objects, so each lives as long as its jobs
    key_base = f"{job.tenant}/sha256"
    assets: list[Asset] = []
    outputs: list[OutputRef] = [o for o in done.outputs if o.role == "output"] + [
        o for o in done.outputs if o.role != "output"
    ]
    if not outputs:
        await fail(rt, job, ErrorCode.provider_error, "the provider reported success but returned no output")
        return
    dep = deployment_of(rt, job)
    idle = rt.adapters.get(dep).timeout("download") if dep is not None else None
    # the ceiling for storing every output, however steadily they stream: the store
    # budget, or longer when the job's deadline leaves more (workers/main.py: the task outlasts it)
    ceiling = float(rt.settings.store_max_seconds)
    if job.deadline_at is not None:
        ceiling = max(ceiling, (job.deadline_at - utcnow()).total_seconds())
    ends = time.monotonic() + ceiling
    try:
        for index, ref in enumerate(outputs):
            stored = await store_output(
                rt.store, rt.http, ref, key_base=key_base, index=index, by_hash=True,
                max_bytes=rt.settings.max_output_bytes, max_image_pixels=rt.settings.max_image_pixels,
                timeout=max(1.0, ends - time.monotonic()), tries=rt.settings.store_download_tries,
                **({"idle_timeout": idle} if idle is not None else {}),
            )
            assets.append(
                Asset(
                    job_id=job.id, index=index, key=stored.key, content_type=stored.content_type, bytes=stored.bytes,
                    sha256=stored.sha256, width=stored.width, height=stored.height,
                    duration_seconds=stored.duration_seconds, thumbnail_key=stored.thumbnail_key,
                )
            )
    except StorageError as exc:
        await fail(rt, job, ErrorCode(exc.code), str(exc))
        return
    delivered = [a for a, ref in zip(assets, outputs, strict=True) if ref.role == "output"]
    seconds = [a.duration_seconds for a in delivered if a.duration_seconds is not None]
    cost = (
        actual_cost(dep.price, job.modality, job.input, done.usage, outputs=len(delivered),
                    output_seconds=sum(seconds) if seconds else None)
        if dep is not None and dep.price is not None
        else None
    )
    finished = await rt.ledger.transition(
        job.id, JobStatus.succeeded, assets=assets, progress_message="done", cost=cost, usage=done.usage
    )
    if finished is not None:
        await release(rt, finished, success=True)

