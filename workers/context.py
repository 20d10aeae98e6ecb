"""What every task shares: the ARQ context, ending a job, freeing its slot, a provider
request for a job. Tasks take ids, re-read what they need and return early when there is
nothing to do, so running one twice is harmless (ARQ is at-least-once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypedDict, TypeVar

from core import logs
from core.callbacks import callback_secret, callback_url
from core.disclosure import PRIVATE
from core.errors import ErrorCode
from core.jobs.ledger import JobStatus
from core.models import Job
from core.outages import infra_down, unavailable
from core.routing.catalog import Deployment
from core.routing.dispatch import release as release_slot
from core.runtime import Runtime
from core.types import ProviderRequest

log = logging.getLogger("genroute.worker")


def bind_job(job: Job) -> None:
    """Every later log line of this task names the job, its tenant and deployment and the
    request that submitted it, and its provider calls send that request id on
    (adapters/http.py). ARQ runs each task in an asyncio task of its own, so this ends with it."""
    logs.bind_here(job_id=job.id, tenant=job.tenant, deployment=job.deployment, request_id=job.request_id)
T = TypeVar("T")
KEEP_TRYING_SECONDS = 300.0  # how long a write that must not be lost waits for our database


async def keep_trying(what: str, write: Callable[[], Awaitable[T]]) -> T:
    """A write that must not be lost to a blip of our own database or Redis (a provider's
    handle just received: without it the task upstream is orphaned and a resend could run
    it twice). Retried with backoff while the blip lasts; the caller's `alive` marker keeps
    beating meanwhile, so no other run of the job acts on it."""
    delay, give_up, told = 0.25, time.monotonic() + KEEP_TRYING_SECONDS, False
    while True:
        try:
            return await write()
        except Exception as exc:
            if not infra_down(exc) or time.monotonic() > give_up:
                raise
            if not told:
                log.warning("%s: %s is unreachable (%s); retrying until it answers", what,
                            unavailable(exc) or "the network", type(exc).__name__)
                told = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Ctx(TypedDict, total=False):
    rt: Runtime
    redis: Any
    key_limits: dict[str, tuple[int | None, float]]


def deployment_of(rt: Runtime, job: Job) -> Deployment | None:
    return rt.catalog.deployment(job.deployment)  # it may serve a fallback model


async def fail(rt: Runtime, job: Job, code: ErrorCode, message: str, detail: Any = None, **changes: Any) -> Job | None:
    if detail is not None:
        changes["error_detail"] = detail
    private = detail.get(PRIVATE) if isinstance(detail, dict) else None
    if isinstance(private, dict):  # the provider's own words: for the operator's log, never the tenant
        log.warning("job %s failed (%s): %s; provider detail: %s", job.id, code.value, str(private.get("message"))[:1000],
                    str(private.get("detail"))[:2000])
    failed = await rt.ledger.transition(job.id, JobStatus.failed, error=(code, message), **changes)
    if failed is not None:
        await release(rt, failed)
    return failed


async def release(rt: Runtime, job: Job, *, success: bool = False) -> None:
    """Free the job's slot at its deployment (idempotent: lease id = job id), wake the
    next job waiting for it, and take it off the poll schedule."""
    await rt.polls.remove(job.id, job.modality)
    if job.deployment:
        started = job.started_at.timestamp() if job.started_at is not None else None
        await release_slot(rt, job.deployment, job.id, success=success, started_at=started)


def request_for(rt: Runtime, job: Job, dep: Deployment) -> ProviderRequest:
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


@contextlib.asynccontextmanager
async def alive(rt: Runtime, key: str) -> AsyncIterator[None]:
    """A Redis marker that lives while this block runs (renewed every third of its
    lifetime, `submit_marker_seconds`): when it is gone, the work died with its worker,
    and the reconciler may act at once instead of after a task timeout."""
    ttl = rt.settings.submit_marker_seconds

    async def mark() -> None:
        with contextlib.suppress(Exception):
            await rt.redis.set(key, "1", px=int(ttl * 1000))

    async def beat() -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            await mark()

    await mark()  # before the block runs: a second run looking in the meantime must see it
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(Exception):
            await rt.redis.delete(key)


async def cancel_quietly(adapter: Any, handle: dict[str, Any]) -> None:
    try:
        await adapter.cancel(handle)
    except Exception:
        log.warning("provider cancel failed (ignored)", exc_info=True)
