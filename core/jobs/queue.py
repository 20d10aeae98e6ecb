"""Putting job work on the ARQ queues. Ids are deterministic, so enqueueing twice is a no-op.

ARQ refuses a job id whose job key still exists (DESIGN.md §11): `run:{job}` is unique
while a run is pending (a wake-up, a timer or the reconciler add a suffix). Our tasks keep
no result (keep_result=0), so an id is free again as soon as its task ends. Polls are not
ARQ tasks: they live on the poll schedule (core/jobs/polls.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.connections import ArqRedis

from core import priorities
from core.settings import Settings

# ARQ starts due runs in score order, the score being the enqueue time (ms). A run due now
# is scored as if enqueued this much earlier, by priority, so a high job's run is picked
# before a backlog of normal and low ones (and normal before low); FIFO within one. (ARQ's
# own log line reports this head start as "delayed=…".) Woken runs already hold a slot:
# they go first of all.
HEAD_START = {0: timedelta(hours=2), 1: timedelta(hours=1), 2: timedelta(0)}
WOKEN_HEAD_START = timedelta(hours=3)
_EXPIRES = timedelta(days=1)  # ARQ's default lifetime of a job key, kept whatever the head start


def _due(head_start: timedelta) -> dict[str, Any]:
    if not head_start:
        return {}
    return {"_defer_until": datetime.now(UTC) - head_start, "_expires": _EXPIRES}


async def enqueue_run(
    redis: ArqRedis, settings: Settings, job_id: str, modality: str, *, suffix: str = "", delay: float = 0.0,
    priority: str | None = None,
) -> bool:
    """Run the job now (ahead of lower priorities' runs) or, with `delay`, at that time."""
    timing = {"_defer_by": delay} if delay else _due(HEAD_START[priorities.rank(priority)])
    job = await redis.enqueue_job(
        "run_job",
        job_id,
        _job_id=f"run:{job_id}{suffix}",
        _queue_name=settings.queue_for(modality),
        **timing,
    )
    return job is not None


# A canceled job's provider cancel (workers/cancel.py) is tracked by a marker in Redis:
# "queued" (enqueued, not started: lives 2 x reconcile_grace_seconds), "1" (a cancel_job is
# at it: beaten by `alive`), "done" (sent: kept CANCEL_WATCH_SECONDS). The reconciler
# re-enqueues the cancel of a job canceled within CANCEL_WATCH_SECONDS whose marker is gone:
# a worker SIGKILLed mid-cancel leaves ARQ's in-progress key for its longest task timeout
# (about an hour), and the provider's task would run on, paid by the operator, until then.
CANCEL_QUEUED, CANCEL_DONE = "queued", "done"
CANCEL_WATCH_SECONDS = 3600


def canceling_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:canceling:{job_id}"


async def enqueue_cancel(redis: ArqRedis, settings: Settings, job_id: str, modality: str, *, suffix: str = "") -> bool:
    await redis.set(canceling_key(settings.redis_prefix, job_id), CANCEL_QUEUED,
                    px=int(settings.reconcile_grace_seconds * 2000))
    job = await redis.enqueue_job(
        "cancel_job", job_id, _job_id=f"cancel:{job_id}{suffix}", _queue_name=settings.queue_for(modality)
    )
    return job is not None


async def enqueue_woken(redis: ArqRedis, settings: Settings, waits: Any, job_id: str, gate: str = "") -> bool:
    """Run a job a wait queue just handed a slot to (core/limits/waits.py). `gate`
    "d:{deployment}": its run tries that deployment first, where the slot is already its own."""
    modality = await redis.hget(waits.job_key(job_id), "_m")  # type: ignore[misc]  # redis-py types one method for its sync and async clients
    mod = modality.decode() if isinstance(modality, bytes) else (modality or "image")
    prefer = gate[2:] if gate.startswith("d:") else None
    job = await redis.enqueue_job(
        "run_job", job_id, prefer, _job_id=f"run:{job_id}:w{time.time_ns()}", _queue_name=settings.queue_for(mod),
        **_due(WOKEN_HEAD_START),
    )
    return job is not None


async def queue_position(redis: ArqRedis, settings: Settings, job_id: str, modality: str) -> int | None:
    """0-based place of a queued job's run in its queue (ARQ keeps a sorted set by time)."""
    rank = await redis.zrank(settings.queue_for(modality), f"run:{job_id}")
    return None if rank is None else int(rank)
