"""Task functions. Each takes a job id, re-reads the row and returns early when there is
nothing to do, so running one twice is harmless (ARQ is at-least-once).

    run_job(id)        route -> adapter.submit -> persist handle -> store outputs | schedule poll
    poll_job(id, seq)  adapter.poll -> progress + re-schedule | store outputs | fail
    cancel_job(id)     best-effort provider cancel after the API marked the job canceled
    reconcile()        cron: re-enqueue work the DB says exists but Redis lost

Waiting on a provider is a deferred `poll_job`, never a sleep in a worker slot; the
`poll_seq` compare-and-set makes a duplicate poll (after a crash, or the reconciler's
re-enqueue) stop instead of forking the poll chain.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from typing import Any, TypedDict

from sqlmodel import select

from adapters.base import Adapter
from adapters.registry import UnknownAdapter, build_adapter
from core.billing import release_stale_holds
from core.callbacks import callback_key, callback_secret, callback_url, load_result
from core.catalog import Deployment, Model
from core.errors import ErrorCode, ProviderError
from core.jobs import TERMINAL, JobStatus
from core.limits import Denied, Lease
from core.models import ApiKey, Asset, Job, utcnow
from core.pricing import actual_cost
from core.queue import enqueue_poll, enqueue_run
from core.router import can_fall_back, plan, reachable
from core.runtime import Runtime
from core.types import Done, Failed, OutputRef, Pending, ProviderRequest
from storage import StorageError, store_output

log = logging.getLogger("genroute.worker")


class Ctx(TypedDict, total=False):
    rt: Runtime
    adapters: dict[str, Adapter]
    redis: Any


def _adapter(ctx: Ctx, dep: Deployment) -> Adapter:
    cache = ctx.setdefault("adapters", {})
    key = f"{ctx['rt'].catalog.version}:{dep.name}"  # a reloaded catalog builds fresh adapters
    if key not in cache:
        cache[key] = build_adapter(dep, ctx["rt"].http)
    return cache[key]


def _deployment(rt: Runtime, job: Job) -> Deployment | None:
    return rt.catalog.deployment(job.deployment)  # it may serve a fallback model


async def _fail(rt: Runtime, job: Job, code: ErrorCode, message: str, detail: Any = None, **changes: Any) -> None:
    if detail is not None:
        changes["error_detail"] = detail
    failed = await rt.ledger.transition(job.id, JobStatus.failed, error=(code, message), **changes)
    if failed is not None:
        await _release(rt, failed)


async def _release(rt: Runtime, job: Job, *, success: bool = False) -> None:
    """Free the job's concurrency slot at its deployment (idempotent: lease id = job id)."""
    if job.deployment:
        await rt.limiter.release(job.deployment, job.id, success=success)


async def run_job(ctx: Ctx, job_id: str) -> None:
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status in TERMINAL:
        return
    if job.deadline_at is not None and utcnow() >= job.deadline_at:
        await _fail(rt, job, ErrorCode.timeout, "the job passed its deadline before it could start")
        return
    if job.status == JobStatus.running:
        await _resume(ctx, job)
        return

    model = rt.catalog.get(job.model)
    if model is None:
        await _fail(rt, job, ErrorCode.invalid_input, f"model {job.model!r} is no longer in the catalog")
        return
    if not await _key_slot(ctx, job):
        return
    await _route_and_submit(ctx, job, model)


async def _key_slot(ctx: Ctx, job: Job) -> bool:
    """Take the submitting key's concurrency slot (core/quotas.py), or leave the job queued,
    saying why, and look again shortly. The slot is freed by the job's terminal transition."""
    rt = ctx["rt"]
    if not job.key_id or rt.ledger.quotas is None:
        return True
    limit = await _key_limit(ctx, job.key_id)
    if limit is None or await rt.ledger.quotas.take(job.key_id, job.id, limit) is None:
        return True
    await _wait_queued(rt, job, f"waiting: its API key has {limit} jobs in flight, its concurrency limit", 0.5, "k")
    return False


async def _wait_queued(rt: Runtime, job: Job, message: str, delay: float, tag: str) -> None:
    """Leave the job queued, saying why, and run it again after `delay`. A marker in Redis
    (living a little longer than the delay) tells the reconciler this wait loop is alive,
    so it does not start a second one beside it however long the job waits."""
    if job.status == JobStatus.queued and job.progress_message != message:
        await rt.ledger.transition(job.id, JobStatus.queued, expect_version=job.version, progress_message=message)
    await rt.redis.set(_waiting_key(rt, job.id), tag, px=int((delay + rt.settings.reconcile_grace_seconds) * 1000))
    await enqueue_run(rt.redis, rt.settings, job.id, job.modality, suffix=f":{tag}{time.time_ns()}", delay=delay)


def _waiting_key(rt: Runtime, job_id: str) -> str:
    return f"{rt.settings.redis_prefix}:waiting:{job_id}"


async def _key_limit(ctx: Ctx, key_id: str) -> int | None:
    """The key's max_concurrency, read at most every few seconds per worker."""
    cache: dict[str, tuple[int | None, float]] = ctx.setdefault("key_limits", {})  # type: ignore[typeddict-item]
    hit = cache.get(key_id)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    async with ctx["rt"].sessions() as s:
        limit = (await s.exec(select(ApiKey.max_concurrency).where(ApiKey.id == key_id))).first()
    if len(cache) > 10_000:
        cache.clear()
    cache[key_id] = (limit, time.monotonic() + ctx["rt"].settings.key_cache_seconds)
    return limit


async def _route_and_submit(ctx: Ctx, job: Job, model: Model) -> None:
    """Plan deployments (strategy, health, limits, capabilities: core.router), take a slot
    (core.limits, shared by every process) and submit; on an error that allows it, fall
    back to the next candidate at once. Every submit is recorded in `job.attempts`."""
    rt = ctx["rt"]
    cat = rt.catalog
    snap = await rt.limiter.snapshot(reachable(model, cat), catalog_version=cat.version)
    p = plan(model, job.input, snap.states, now=snap.now, catalog=cat)
    if p.status == "unavailable":
        await _fail(rt, job, ErrorCode.provider_unavailable, p.message())
        return
    attempts = list(job.attempts or [])
    last: tuple[Adapter, ProviderError] | None = None
    for i, cand in enumerate(p.candidates):
        dep = cand.deployment
        if isinstance(await rt.limiter.acquire(dep, lease_id=job.id, tokens=cand.estimated_tokens), Denied):
            continue  # taken since the snapshot
        try:
            adapter = _adapter(ctx, dep)
        except UnknownAdapter as exc:
            await rt.limiter.release(dep.name, job.id)
            attempts.append(_attempt(dep, cand.model.id, error=(ErrorCode.provider_unavailable, str(exc))))
            continue
        attempts.append(_attempt(dep, cand.model.id))
        started = await rt.ledger.transition(
            job.id,
            JobStatus.running,
            expect_version=job.version,
            deployment=dep.name,
            attempt=job.attempt + 1,
            attempts=attempts,
            progress_message=f"submitting to {dep.name}" + (f" (fallback for {model.id})" if cand.fallback else ""),
            queue_position=None,
        )
        if started is None:  # canceled meanwhile, or another run started it
            now = await rt.ledger.get(job.id)
            if now is None or now.status != JobStatus.running:
                await rt.limiter.release(dep.name, job.id)
            return
        job = started
        t0 = time.monotonic()
        try:
            result = await adapter.submit(_request(rt, job, dep))
        except ProviderError as exc:
            await rt.limiter.release(dep.name, job.id)
            await rt.limiter.record_error(dep, exc, catalog_version=cat.version)
            attempts[-1].update(duration_ms=_ms(t0), error={"code": exc.code.value, "message": exc.message[:500]})
            if can_fall_back(exc) and i + 1 < len(p.candidates):
                last = (adapter, exc)
                continue
            await _submit_failed(rt, job, adapter, exc, attempts=attempts)
            return
        except Exception as exc:  # an adapter bug must not strand the job
            log.exception("submit of job %s to %s crashed", job.id, dep.name)
            attempts[-1].update(duration_ms=_ms(t0), error={"code": "internal", "message": type(exc).__name__})
            await _fail(rt, job, ErrorCode.internal, f"adapter {dep.adapter} crashed: {type(exc).__name__}", attempts=attempts)
            return
        attempts[-1]["duration_ms"] = _ms(t0)
        await _submitted(rt, job, adapter, result, attempts)
        return
    if last is not None:  # every candidate tried failed in a way that allowed falling back
        await _submit_failed(rt, job, last[0], last[1], attempts=attempts)
        return
    # nothing could take it now (slots, rate windows, cooldowns): it waits, queued, visibly
    await _wait_queued(rt, job, p.message(), min(2.0, max(0.2, (p.retry_at - snap.now) if p.retry_at else 1.0)), "w")


def _attempt(dep: Deployment, model_id: str, error: tuple[ErrorCode, str] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"deployment": dep.name, "model": model_id, "started_at": utcnow().isoformat()}
    if error is not None:
        entry.update(duration_ms=0, error={"code": error[0].value, "message": error[1][:500]})
    return entry


def _ms(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)


async def _resume(ctx: Ctx, job: Job) -> None:
    """A run found the job already running: a worker died after (or during) its submit."""
    rt = ctx["rt"]
    if job.provider_handle is not None:
        await enqueue_poll(rt.redis, rt.settings, job.id, job.modality, job.poll_seq, delay=0, suffix=":resume")
        return
    if utcnow() - job.updated_at < timedelta(seconds=rt.settings.task_timeout_seconds):
        return  # another run may still be inside its submit; the reconciler comes back later
    dep = _deployment(rt, job)
    if dep is None:
        await _fail(rt, job, ErrorCode.internal, f"deployment {job.deployment!r} left the catalog mid-job")
        return
    adapter = _adapter(ctx, dep)
    if not adapter.idempotent_submit:
        await _fail(
            rt,
            job,
            ErrorCode.provider_error,
            f"the submit to {dep.name} was interrupted and its outcome is unknown; "
            "it was not resent, so the provider cannot run (and bill) it twice",
        )
        return
    again = await rt.ledger.transition(job.id, JobStatus.running, expect_version=job.version, attempt=job.attempt + 1)
    if again is not None:
        await _submit(ctx, again, dep, adapter)


def _request(rt: Runtime, job: Job, dep: Deployment) -> ProviderRequest:
    s = rt.settings
    wants_callbacks = bool(dep.options.get("callbacks")) and bool(s.secret_key)
    return ProviderRequest(
        job_id=job.id,
        tenant=job.tenant,
        modality=job.modality,
        provider_model=dep.model,
        input=job.input,
        options=dep.options,
        callback_url=callback_url(s.public_url, s.secret_key, dep.adapter, job.id) if wants_callbacks else None,
        callback_secret=callback_secret(s.secret_key, job.id) if wants_callbacks else None,
    )


async def _submit(ctx: Ctx, job: Job, dep: Deployment, adapter: Adapter) -> None:
    """Resend an interrupted submit (only for adapters that cannot create a duplicate)."""
    rt = ctx["rt"]
    try:
        result = await adapter.submit(_request(rt, job, dep))
    except ProviderError as exc:
        await _submit_failed(rt, job, adapter, exc)
        return
    except Exception as exc:  # an adapter bug must not strand the job
        log.exception("submit of job %s to %s crashed", job.id, dep.name)
        await _fail(rt, job, ErrorCode.internal, f"adapter {dep.adapter} crashed: {type(exc).__name__}")
        return
    await _submitted(rt, job, adapter, result, list(job.attempts or []))


async def _submitted(rt: Runtime, job: Job, adapter: Adapter, result: Pending | Done, attempts: list[dict[str, Any]]) -> None:
    # The handle is saved before anything else, so a crash from here on resumes, never resubmits.
    if isinstance(result, Pending):
        saved = await rt.ledger.transition(
            job.id,
            JobStatus.running,
            expect_version=job.version,
            provider_handle=result.handle,
            poll_seq=1,
            progress=result.progress or 0.0,
            progress_message=result.message,
            queue_position=result.queue_position,
            next_poll_at=utcnow() + timedelta(seconds=result.poll_after),
            attempts=attempts,
        )
        if saved is None:  # canceled while we were submitting: tell the provider
            await _cancel_quietly(adapter, result.handle)
            await _release(rt, job)
            return
        if job.deployment:
            await rt.limiter.record_success(job.deployment)  # the slot stays held until the end
        await enqueue_poll(rt.redis, rt.settings, job.id, job.modality, 1, delay=result.poll_after)
        return

    saved = await rt.ledger.transition(
        job.id,
        JobStatus.running,
        expect_version=job.version,
        provider_handle=result.handle or {"done_at_submit": True},
        attempts=attempts,
        progress_message="storing outputs",
        next_poll_at=utcnow() + timedelta(seconds=rt.settings.reconcile_grace_seconds),
    )
    if saved is not None:
        await _finish(rt, saved, result)


async def _submit_failed(
    rt: Runtime, job: Job, adapter: Adapter, exc: ProviderError, *, attempts: list[dict[str, Any]] | None = None
) -> None:
    """A create failed. Retry it only when it provably started nothing upstream."""
    s = rt.settings
    extra: dict[str, Any] = {"attempts": attempts} if attempts is not None else {}
    if exc.retryable and not (exc.resend_safe or adapter.idempotent_submit):
        await _fail(
            rt, job, ErrorCode.provider_unavailable,
            f"{exc.message}; the request may have reached the provider, so it was not resent "
            "(a second create could run and bill the job twice)", exc.detail, **extra,
        )
        return
    if exc.retryable and job.attempt < s.submit_attempts:
        backoff = s.submit_backoff_seconds * 2 ** (job.attempt - 1) * random.uniform(0.8, 1.2)
        delay = min(60.0, max(exc.retry_after or 0.0, backoff))
        waiting = await rt.ledger.transition(
            job.id,
            JobStatus.queued,
            expect_version=job.version,
            progress_message=f"attempt {job.attempt} refused ({exc.code.value}: {exc.message[:200]}); retrying in {delay:.1f}s",
            next_poll_at=utcnow() + timedelta(seconds=delay),  # the reconciler waits for it too
            **extra,
        )
        if waiting is not None:
            await enqueue_run(rt.redis, s, job.id, job.modality, suffix=f":retry{job.attempt}", delay=delay)
        return
    await _fail(rt, job, exc.code, exc.message, exc.detail, **extra)


async def poll_job(ctx: Ctx, job_id: str, seq: int) -> None:
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status != JobStatus.running or job.poll_seq != seq or job.provider_handle is None:
        return
    dep = _deployment(rt, job)
    if dep is None:
        await _fail(rt, job, ErrorCode.internal, f"deployment {job.deployment!r} left the catalog mid-job")
        return
    adapter = _adapter(ctx, dep)
    if job.deadline_at is not None and utcnow() >= job.deadline_at:
        await _cancel_quietly(adapter, job.provider_handle)
        await _fail(rt, job, ErrorCode.timeout, f"the provider did not finish before the job's deadline ({job.deadline_at.isoformat()})")
        return
    if job.deployment:  # a long provider task keeps its slots: renew the leases
        await rt.limiter.renew(Lease(job.deployment, job.id, 0.0))
    if job.key_id and rt.ledger.quotas is not None:
        await rt.ledger.quotas.renew(job.key_id, job.id)
    try:
        handed = await rt.redis.getdel(callback_key(rt.settings.redis_prefix, job.id))
        result = load_result(handed) if handed else await adapter.poll(job.provider_handle)
    except ProviderError as exc:
        if exc.retryable and job.poll_errors + 1 < rt.settings.poll_error_limit:
            delay = max(exc.retry_after or 0.0, min(60.0, 2.0 ** (job.poll_errors + 1)))
            await _reschedule(rt, job, seq, delay, poll_errors=job.poll_errors + 1)
            return
        await _fail(rt, job, exc.code, exc.message, exc.detail)
        return
    except Exception as exc:
        log.exception("poll of job %s at %s crashed", job.id, dep.name)
        await _fail(rt, job, ErrorCode.internal, f"adapter {dep.adapter} crashed while polling: {type(exc).__name__}")
        return

    if isinstance(result, Pending):
        await _reschedule(
            rt,
            job,
            seq,
            result.poll_after,
            poll_errors=0,
            provider_handle=result.handle,
            progress=result.progress if result.progress is not None else job.progress,
            progress_message=result.message,
            queue_position=result.queue_position,
        )
    elif isinstance(result, Failed):
        await _fail(rt, job, result.code, result.message, result.detail)
    else:
        # claim the finish, so a duplicate poll of the same seq does not store twice
        claimed = await rt.ledger.transition(
            job.id,
            JobStatus.running,
            expect_poll_seq=seq,
            poll_seq=seq + 1,
            progress_message="storing outputs",
            next_poll_at=utcnow() + timedelta(seconds=rt.settings.reconcile_grace_seconds),
        )
        if claimed is not None:
            await _finish(rt, claimed, result)


async def _reschedule(rt: Runtime, job: Job, seq: int, delay: float, **changes: Any) -> None:
    moved = await rt.ledger.transition(
        job.id,
        JobStatus.running,
        expect_poll_seq=seq,
        poll_seq=seq + 1,
        next_poll_at=utcnow() + timedelta(seconds=delay),
        **changes,
    )
    if moved is not None:
        await enqueue_poll(rt.redis, rt.settings, job.id, job.modality, seq + 1, delay=delay)


async def _finish(rt: Runtime, job: Job, done: Done) -> None:
    """Stream every output into the blob store, then succeed with the assets attached."""
    key_base = f"{job.tenant}/{job.id}"
    assets: list[Asset] = []
    outputs: list[OutputRef] = [o for o in done.outputs if o.role == "output"] + [
        o for o in done.outputs if o.role != "output"
    ]
    if not outputs:
        await _fail(rt, job, ErrorCode.provider_error, "the provider reported success but returned no output")
        return
    try:
        for index, ref in enumerate(outputs):
            stored = await store_output(
                rt.store,
                rt.http,
                ref,
                key_base=key_base,
                index=index,
                max_bytes=rt.settings.max_output_bytes,
                max_image_pixels=rt.settings.max_image_pixels,
            )
            assets.append(
                Asset(
                    job_id=job.id,
                    index=index,
                    key=stored.key,
                    content_type=stored.content_type,
                    bytes=stored.bytes,
                    sha256=stored.sha256,
                    width=stored.width,
                    height=stored.height,
                    duration_seconds=stored.duration_seconds,
                    thumbnail_key=stored.thumbnail_key,
                )
            )
    except StorageError as exc:
        await _fail(rt, job, ErrorCode(exc.code), str(exc))
        return
    dep = _deployment(rt, job)
    delivered = [a for a, ref in zip(assets, outputs, strict=True) if ref.role == "output"]
    seconds = [a.duration_seconds for a in delivered if a.duration_seconds is not None]
    cost = (
        actual_cost(dep.price, job.modality, job.input, done.usage, outputs=len(delivered), output_seconds=sum(seconds) if seconds else None)
        if dep is not None and dep.price is not None
        else None
    )
    finished = await rt.ledger.transition(
        job.id, JobStatus.succeeded, assets=assets, progress_message="done", cost=cost, usage=done.usage
    )
    if finished is not None:
        await _release(rt, finished, success=True)


async def cancel_job(ctx: Ctx, job_id: str) -> None:
    """The API already marked the job canceled; ask the provider to stop, best effort."""
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status != JobStatus.canceled or job.provider_handle is None:
        return
    dep = _deployment(rt, job)
    if dep is not None:
        await _cancel_quietly(_adapter(ctx, dep), job.provider_handle)
    await _release(rt, job)


async def _cancel_quietly(adapter: Adapter, handle: dict[str, Any]) -> None:
    try:
        await adapter.cancel(handle)
    except Exception:
        log.warning("provider cancel failed (ignored)", exc_info=True)


async def reconcile(ctx: Ctx) -> dict[str, int]:
    """The DB is the truth: re-enqueue queued jobs whose run is gone, running jobs whose
    next poll is overdue, and time out queued jobs past their deadline."""
    rt = ctx["rt"]
    return await reconcile_once(rt)


async def reconcile_once(rt: Runtime, *, limit: int = 1000) -> dict[str, int]:
    s = rt.settings
    now = utcnow()
    stale = now - timedelta(seconds=s.reconcile_grace_seconds)
    counts = {"requeued": 0, "repolled": 0, "resubmitted": 0, "timed_out": 0}
    async with rt.sessions() as session:
        queued = (
            await session.exec(
                select(Job).where(Job.status == JobStatus.queued, Job.updated_at < stale).limit(limit)
            )
        ).all()
        running = (
            await session.exec(
                select(Job)
                .where(Job.status == JobStatus.running, Job.updated_at < stale)
                .limit(limit)
            )
        ).all()
    tag = f":r{int(time.time())}"
    for job in queued:
        if job.deadline_at is not None and now >= job.deadline_at:
            await _fail(rt, job, ErrorCode.timeout, "the job passed its deadline while queued")
            counts["timed_out"] += 1
        elif job.next_poll_at is not None and job.next_poll_at > stale:
            continue  # a submit retry is scheduled for then
        elif await rt.redis.exists(_waiting_key(rt, job.id)):
            continue  # its wait loop (for a slot, a rate window, the key's limit) is alive
        elif await enqueue_run(rt.redis, s, job.id, job.modality):
            counts["requeued"] += 1
    for job in running:
        if job.provider_handle is not None:
            if job.next_poll_at is None or job.next_poll_at < stale:
                await enqueue_poll(rt.redis, s, job.id, job.modality, job.poll_seq, delay=0, suffix=tag)
                counts["repolled"] += 1
        elif job.updated_at < now - timedelta(seconds=s.task_timeout_seconds + s.reconcile_grace_seconds):
            # a submit that never reported back: run_job decides whether it may be resent
            await enqueue_run(rt.redis, s, job.id, job.modality, suffix=tag)
            counts["resubmitted"] += 1
    # webhook deliveries that are due but whose deferred task was lost (Redis flushed, worker killed)
    from workers.webhooks import due_deliveries

    counts["webhooks"] = await due_deliveries(rt, older_than=s.reconcile_grace_seconds, limit=limit)
    # holds of chat calls whose API process died mid-call (jobs' holds close with the job)
    async with rt.sessions() as session:
        older = timedelta(seconds=s.deadline_text_seconds + s.reconcile_grace_seconds)
        counts["stale_holds"] = await release_stale_holds(session, prefix="chat_", older_than=older, limit=limit)
        await session.commit()
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts
