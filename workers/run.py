"""run_job: take the key's slot, route, submit, and hand the job to the poll schedule.

    run_job(id) ─► key slot (core.limits.keys) ─ full ─► wait queue of the key
               ─► dispatch (core.routing.dispatch): route → acquire → submit → fall back
                     Placed(Pending) ─► save handle ─► poll schedule (workers/poll.py)
                     Placed(Done)    ─► save handle ─► store_outputs (workers/store.py)
                     Refused         ─► retry later (provably not started) or fail
                     Unplaced        ─► wait queue of each busy deployment, woken by a release;
                                        a timer only for rate windows and cooldowns
"""

from __future__ import annotations

import contextlib
import random
import time
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import select

from core import disclosure, metrics
from core.errors import ErrorCode, ProviderError
from core.jobs.ledger import TERMINAL, JobStatus
from core.jobs.queue import enqueue_run, enqueue_woken
from core.limits.waits import Gate
from core.models import ApiKey, Job, utcnow
from core.outages import infra_down, unavailable
from core.routing.catalog import Model
from core.routing.dispatch import Placed, Refused, Stopped, Unplaced, deployment_gate, dispatch
from core.routing.router import Candidate
from core.runtime import Runtime
from core.types import Done, Pending
from workers.context import Ctx, alive, bind_job, cancel_quietly, deployment_of, fail, keep_trying, log, release, request_for
from workers.store import hand_to_store


async def run_job(ctx: Ctx, job_id: str, prefer: str | None = None) -> None:
    rt = ctx["rt"]
    job = await rt.ledger.get(job_id)
    if job is None or job.status in TERMINAL:
        await _stop_waiting(rt, job_id)
        return
    bind_job(job)
    if job.deadline_at is not None and utcnow() >= job.deadline_at:
        await _stop_waiting(rt, job_id)
        await fail(rt, job, ErrorCode.timeout, "the job passed its deadline before it could start")
        return
    if job.status == JobStatus.running:
        await _resume(ctx, job)
        return
    model = rt.catalog.get(job.model)
    if model is None:
        await _stop_waiting(rt, job_id)
        await fail(rt, job, ErrorCode.invalid_input, f"model {job.model!r} is no longer in the catalog")
        return
    if not await _key_slot(ctx, job):
        return
    await _route_and_submit(ctx, job, model, prefer)


async def _stop_waiting(rt: Runtime, job_id: str, kept: str | None = None) -> None:
    """Out of every wait queue; a slot handed to it elsewhere goes to the next in line."""
    for gate_name in await rt.waits.leave(job_id, kept):
        kind, _, name = gate_name.partition(":")
        if kind == "d":
            dep = rt.catalog.deployment(name)
            if dep is not None:
                gate = deployment_gate(rt, dep)
                woken = await rt.waits.wake(gate)
                if woken is not None:
                    await enqueue_woken(rt.redis, rt.settings, rt.waits, woken, gate.name)


def _key_gate(rt: Runtime, key_id: str, limit: int) -> Gate:
    assert rt.ledger.quotas is not None
    return Gate(f"k:{key_id}", rt.ledger.quotas.slots_key(key_id), limit)


async def _key_slot(ctx: Ctx, job: Job) -> bool:
    """Take the submitting key's concurrency slot (core/limits/keys.py), or wait in the
    key's queue, saying why; the slot is freed by the job's terminal transition, which
    hands it to the next job in that queue."""
    rt = ctx["rt"]
    if not job.key_id or rt.ledger.quotas is None:
        return True
    limit = await _key_limit(ctx, job.key_id)
    if limit is None or await rt.ledger.quotas.take(job.key_id, job.id, limit) is None:
        return True
    gate = _key_gate(rt, job.key_id, limit)
    woken = await rt.waits.enter(job.id, rt.catalog.lane(job.model, job.modality), [gate], job.priority, job.created_at)
    if (gate.name, job.id) in woken:  # a slot freed meanwhile and is ours
        return True
    for name, other in woken:
        await enqueue_woken(rt.redis, rt.settings, rt.waits, other, name)
    await _say_waiting(rt, job, f"waiting: its API key has {limit} jobs in flight, its concurrency limit", {gate.name: limit})
    metrics.job_run("waiting")
    return False


async def _say_waiting(rt: Runtime, job: Job, message: str, gates: dict[str, int]) -> None:
    """One write when a job starts waiting: why, where it stands, and an ETA."""
    pos = await rt.waits.position(job.id, gates)
    position = pos.ahead if pos is not None else None
    if job.progress_message != message or job.queue_position != position:
        await rt.ledger.transition(job.id, JobStatus.queued, expect_version=job.version, progress_message=message,
                                   queue_position=position)


async def _key_limit(ctx: Ctx, key_id: str) -> int | None:
    """The key's max_concurrency, read at most every few seconds per worker."""
    cache = ctx.setdefault("key_limits", {})
    hit = cache.get(key_id)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    rt = ctx["rt"]
    async with rt.sessions() as s:
        limit = (await s.exec(select(ApiKey.max_concurrency).where(ApiKey.id == key_id))).first()
    if len(cache) > 10_000:
        cache.clear()
    cache[key_id] = (limit, time.monotonic() + rt.settings.key_cache_seconds)
    return limit


async def _route_and_submit(ctx: Ctx, job: Job, model: Model, prefer: str | None) -> None:
    rt = ctx["rt"]
    state: dict[str, Job] = {"job": job}
    called: list[str] = []  # set once a create is sent: from then on the provider may have a task

    async def start(cand: Candidate, attempts: list[dict[str, Any]]) -> bool:
        now = state["job"]
        started = await rt.ledger.transition(
            job.id, JobStatus.running, expect_version=now.version, deployment=cand.deployment.name,
            attempt=now.attempt + 1, attempts=attempts, queue_position=None,
            progress_message=f"submitting to {cand.deployment.name}" + (f" (fallback for {model.id})" if cand.fallback else ""),
        )
        if started is None:  # canceled meanwhile, or another run started it
            return False
        state["job"] = started
        await _stop_waiting(rt, job.id, kept=f"d:{cand.deployment.name}")
        return True

    async def submit(cand: Candidate, adapter: Any, attempts: list[dict[str, Any]]) -> Pending | Done:
        called.append(cand.deployment.name)
        result: Pending | Done = await adapter.submit(request_for(rt, state["job"], cand.deployment))
        return result

    # The submitting marker covers the whole step, from before the job is marked running
    # until its provider handle is saved: another run of the job (a reconciler's, a
    # duplicate wake-up) that finds it running with no handle knows this one is alive.
    async with submitting(rt, job.id):
        try:
            out = await dispatch(rt, model, job.input, job.id, submit, start=start, attempts=list(job.attempts or []),
                                 prefer=prefer)
        except Exception as exc:
            if infra_down(exc) and not called:  # our Redis or database, before any create was sent
                await _requeue_after_outage(rt, state["job"], exc)
                return
            # an adapter bug must not strand the job
            log.exception("submit of job %s crashed", job.id)
            await fail(rt, state["job"], ErrorCode.internal, f"adapter crashed: {type(exc).__name__}")
            return
        if isinstance(out, Placed):
            metrics.job_run("started")
            await submitted(rt, state["job"], rt.adapters.get(out.deployment), out.value, out.attempts)
            return
    metrics.job_run("waiting" if isinstance(out, Unplaced) and out.plan.status != "unavailable" else "ended")
    if isinstance(out, Refused):
        dep = rt.catalog.deployment(out.attempts[-1]["deployment"])
        adapter = rt.adapters.get(dep) if dep is not None else None
        await _submit_failed(rt, state["job"], adapter, out.error, attempts=out.attempts)
    elif isinstance(out, Stopped):
        now = await rt.ledger.get(job.id)
        if now is not None and now.status in TERMINAL:
            await release(rt, now)
    elif isinstance(out, Unplaced):
        if out.plan.status == "unavailable":
            await _stop_waiting(rt, job.id)
            await fail(rt, job, ErrorCode.provider_unavailable, out.plan.message(), attempts=out.attempts or None)
            return
        await _wait(rt, job, out)


async def _requeue_after_outage(rt: Runtime, job: Job, exc: Exception) -> None:
    """Redis or the database went away while routing, before anything reached a provider:
    the job goes back to queued, unharmed, and runs again shortly. If even that write
    cannot be made, the reconciler finds the job when the database answers again."""
    log.warning("job %s: %s (%s) while routing; it runs again shortly", job.id,
                unavailable(exc) or "the network", type(exc).__name__)
    try:
        if job.provider_handle is None:
            undo: dict[str, Any] = {}
            if job.status == JobStatus.running:  # the attempt never happened
                undo = {"attempt": max(0, job.attempt - 1), "attempts": list(job.attempts or [])[:-1]}
            back = await rt.ledger.transition(
                job.id, JobStatus.queued, expect_version=job.version, deployment=None, queue_position=None, **undo,
                progress_message=f"waiting: {unavailable(exc) or 'our network'} was unreachable; retrying")
            if back is None:
                return  # canceled, or another run moved it on
        await enqueue_run(rt.redis, rt.settings, job.id, rt.catalog.lane(job.model, job.modality), suffix=f":outage{time.time_ns()}", delay=2.0,
                          priority=job.priority)
    except Exception as again:
        if not infra_down(again):
            raise
        log.warning("job %s: still unreachable (%s); the reconciler re-enqueues it", job.id, type(again).__name__)


async def _wait(rt: Runtime, job: Job, out: Unplaced) -> None:
    """Nothing can take the job now. Busy deployments: wait in their queues (a release
    wakes the job); rate windows and cooldowns: look again when they open."""
    gates: list[Gate] = []
    for name in out.busy:
        dep = rt.catalog.deployment(name)
        if dep is not None and dep.limits.max_concurrency:
            gates.append(deployment_gate(rt, dep))
    if gates:
        woken = await rt.waits.enter(job.id, rt.catalog.lane(job.model, job.modality), gates, job.priority, job.created_at)
        for name, other in woken:  # this job too, when a slot freed meanwhile: its run takes it
            await enqueue_woken(rt.redis, rt.settings, rt.waits, other, name)
        if not any(other == job.id for _, other in woken):
            await _say_waiting(rt, job, out.plan.message(), {g.name: g.max_concurrency for g in gates})
        return
    if job.progress_message != out.plan.message():
        await rt.ledger.transition(job.id, JobStatus.queued, expect_version=job.version, progress_message=out.plan.message())
    await rt.redis.set(waiting_key(rt, job.id), "t", px=int((out.retry_in() + rt.settings.reconcile_grace_seconds) * 1000))
    await enqueue_run(rt.redis, rt.settings, job.id, rt.catalog.lane(job.model, job.modality), suffix=f":t{time.time_ns()}", delay=out.retry_in(),
                      priority=job.priority)


def waiting_key(rt: Runtime, job_id: str) -> str:
    """Marks a job whose timer (a rate window, a cooldown) is set: the reconciler leaves it."""
    return f"{rt.settings.redis_prefix}:waiting:{job_id}"


def submitting_key(rt: Runtime, job_id: str) -> str:
    return f"{rt.settings.redis_prefix}:submitting:{job_id}"


def submitting(rt: Runtime, job_id: str) -> contextlib.AbstractAsyncContextManager[None]:
    """Marks that this process is inside the job's create call: when the marker is gone
    and the row has no handle, the submit died with its worker."""
    return alive(rt, submitting_key(rt, job_id))


async def _resume(ctx: Ctx, job: Job) -> None:
    """A run found the job already running: a worker died after (or during) its submit."""
    rt = ctx["rt"]
    if job.provider_handle is not None:
        if not job.provider_handle.get("done_at_submit"):  # else its store step (or the reconciler) has it
            await schedule_poll(rt, job, delay=0)
        return
    if await rt.redis.exists(submitting_key(rt, job.id)):
        return  # another process is inside its submit right now
    dep = deployment_of(rt, job)
    if dep is None:
        await fail(rt, job, ErrorCode.internal, f"deployment {job.deployment!r} left the catalog mid-job")
        return
    adapter = rt.adapters.get(dep)
    if not adapter.idempotent_submit:
        await fail(
            rt, job, ErrorCode.provider_error,
            f"the submit to {dep.name} was interrupted and its outcome is unknown; "
            "it was not resent, so the provider cannot run (and bill) it twice",
        )
        return
    again = await rt.ledger.transition(job.id, JobStatus.running, expect_version=job.version, attempt=job.attempt + 1)
    if again is None:
        return
    async with submitting(rt, job.id):  # until the handle is saved, as in _route_and_submit
        try:
            result = await adapter.submit(request_for(rt, again, dep))
        except ProviderError as exc:
            await _submit_failed(rt, again, adapter, exc)
            return
        except Exception as exc:  # an adapter bug must not strand the job
            log.exception("submit of job %s to %s crashed", job.id, dep.name)
            await fail(rt, again, ErrorCode.internal, f"adapter {dep.adapter} crashed: {type(exc).__name__}")
            return
        await submitted(rt, again, adapter, result, list(again.attempts or []))


async def submitted(rt: Runtime, job: Job, adapter: Any, result: Pending | Done, attempts: list[dict[str, Any]]) -> None:
    """The handle is saved before anything else, so a crash from here on resumes, never resubmits."""
    if isinstance(result, Pending):
        saved = await keep_trying(f"saving job {job.id}'s provider handle", lambda: rt.ledger.transition(
            job.id, JobStatus.running, expect_version=job.version, provider_handle=result.handle, poll_seq=1,
            progress=result.progress or 0.0, progress_message=result.message, queue_position=result.queue_position,
            next_poll_at=utcnow() + timedelta(seconds=result.poll_after), attempts=attempts,
        ))
        if saved is None:  # canceled while we were submitting: tell the provider
            await cancel_quietly(adapter, result.handle)
            await release(rt, job)
            return
        if job.deployment:
            await rt.limiter.record_success(job.deployment)  # the slot stays held until the end
        await schedule_poll(rt, saved, delay=result.poll_after)
        return
    saved = await keep_trying(f"saving job {job.id}'s result", lambda: rt.ledger.transition(
        job.id, JobStatus.running, expect_version=job.version, provider_handle={**(result.handle or {}), "done_at_submit": True},
        attempts=attempts, progress_message="storing outputs", queue_position=None, poll_seq=job.poll_seq + 1,
        next_poll_at=utcnow() + timedelta(seconds=rt.settings.reconcile_grace_seconds),
    ))
    if saved is not None:
        await hand_to_store(rt, saved, result)


async def schedule_poll(rt: Runtime, job: Job, *, delay: float) -> None:
    """Put a running job with a saved handle on the poll schedule (workers/poll.py)."""
    assert job.provider_handle is not None
    deadline_ms = int(job.deadline_at.timestamp() * 1000) if job.deadline_at is not None else 0
    await rt.polls.schedule(
        job_id=job.id, modality=job.modality, deployment=job.deployment or "", tenant=job.tenant, key_id=job.key_id,
        handle=job.provider_handle, seq=job.poll_seq, deadline_ms=deadline_ms, delay=delay,
        webhooks=await wants_progress_webhooks(rt, job), started_ms=task_started_ms(job),
    )


def task_started_ms(job: Job) -> int:
    """When the job's current provider task began (its last attempt's start, epoch ms), so
    a poll schedule rebuilt by the reconciler keeps the task's age; 0 when unknown."""
    started = (job.attempts or [{}])[-1].get("started_at")
    try:
        return int(datetime.fromisoformat(started).timestamp() * 1000) if isinstance(started, str) else 0
    except ValueError:
        return 0


async def wants_progress_webhooks(rt: Runtime, job: Job) -> bool:
    """Whether anyone subscribed to this job's job.progress webhooks: then its progress
    goes through the ledger (a row write, a delivery row), else out as events only."""
    if job.webhook_url and "job.progress" in (job.webhook_events or ()):
        return True
    async with rt.sessions() as s:
        endpoints = await rt.ledger.webhooks.endpoints(s, job.tenant)
    return any("job.progress" in events for _, _, events in endpoints)


async def _submit_failed(
    rt: Runtime, job: Job, adapter: Any, exc: ProviderError, *, attempts: list[dict[str, Any]] | None = None
) -> None:
    """A create failed. Retry it only when it provably started nothing upstream."""
    s = rt.settings
    extra: dict[str, Any] = {"attempts": attempts} if attempts is not None else {}
    told = disclosure.of_provider_error(exc)  # the tenant's words; the provider's kept for operators
    if exc.retryable and not (exc.resend_safe or (adapter is not None and adapter.idempotent_submit)):
        await fail(
            rt, job, ErrorCode.provider_unavailable,
            f"{told.message}; the request may have reached the provider, so it was not resent "
            "(a second create could run and bill the job twice)", told.detail, **extra,
        )
        return
    if exc.retryable and job.attempt < s.submit_attempts:
        backoff = s.submit_backoff_seconds * 2 ** (job.attempt - 1) * random.uniform(0.8, 1.2)
        delay = min(60.0, max(exc.retry_after or 0.0, backoff))
        waiting = await rt.ledger.transition(
            job.id, JobStatus.queued, expect_version=job.version,
            progress_message=f"attempt {job.attempt} refused ({exc.code.value}: {told.message[:200]}); retrying in {delay:.1f}s",
            next_poll_at=utcnow() + timedelta(seconds=delay),  # the reconciler waits for it too
            **extra,
        )
        if waiting is not None:
            await enqueue_run(rt.redis, s, job.id, rt.catalog.lane(job.model, job.modality), suffix=f":retry{job.attempt}", delay=delay, priority=job.priority)
        return
    await fail(rt, job, exc.code, told.message, told.detail, **extra)

