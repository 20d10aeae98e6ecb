"""Running workers: one ARQ Worker per queue (media, video, webhooks) and one poller for
the poll schedules of its media/video queues, sharing one Runtime.

`genroute worker` runs them in their own process; `genroute dev` runs them beside the API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from arq import cron, func
from arq.worker import Worker

from adapters.registry import AdapterCache, longest_timeout
from core.metrics import Exposition, probe_for, serve_metrics
from core.outages import REDIS_DOWN, redis_lost
from core.routing.catalog import Deployment
from core.runtime import Runtime, open_runtime, unwatch_sighup, watch_sighup
from core.settings import QUEUES, Settings, queue_name
from storage import build_store
from workers.batches import complete_batches
from workers.cancel import cancel_job
from workers.deadlines import enforce_deadlines
from workers.poll import Poller
from workers.reconcile import reconcile
from workers.run import run_job
from workers.store import store_outputs
from workers.webhooks import deliver_webhook

log = logging.getLogger("genroute.worker")

# ARQ rewrites each queue's health-check key this often (it lives 1 s longer), from its
# poll loop: a hung worker's key is gone within this, which `genroute worker --healthcheck`
# (the container healthcheck) notices. ARQ's default, an hour, noticed nothing.
HEALTH_CHECK_SECONDS = 15
REDIS_BACKOFF_MAX = 5.0  # seconds between tries while Redis does not answer


def build_workers(rt: Runtime, queues: list[str] | None = None) -> list[Worker]:
    s = rt.settings
    names = [queue_name(s.redis_prefix, q) for q in queues] if queues else s.queues
    timeout = s.task_timeout_seconds
    # A run makes create calls (a fallback perhaps a second one): its task outlasts the
    # longest create timeout of the deployments its queue's jobs may call (a catalog reload
    # that raises it takes effect for this task limit at the worker's next start). Long
    # synchronous creates run on the "sync" queue (Catalog.lane), so the other queues keep
    # short run limits. A store's downloads are cut by stalls (`timeouts.download`, an idle
    # timeout), not by their length: its task outlasts the store ceiling (store_max_seconds,
    # or the longest job deadline) so a slow healthy download is never cut by ARQ.
    lanes: dict[str, list[Deployment]] = {}
    for m in rt.catalog.models:
        lane = rt.catalog.lane(m.id, m.modality)
        lanes.setdefault("video" if lane == "video" else "sync" if lane == "sync" else "media", []).extend(
            rt.catalog.reachable(m.id))
    deadlines = max(s.deadline_seconds(m) for m in ("image", "audio", "video", "text"))
    store_timeout = max(timeout, s.store_max_seconds, deadlines) + 120

    def run(queue: str) -> Any:
        run_timeout = max(timeout, int(2 * longest_timeout(lanes.get(queue, []), "create")) + 30)
        return func(run_job, name="run_job", keep_result=0, timeout=run_timeout, max_tries=20)  # type: ignore[arg-type]  # arq types ctx as dict[Any, Any]; our tasks take the Ctx TypedDict

    webhook = func(deliver_webhook, name="deliver_webhook", keep_result=0,
                   timeout=int(s.webhook_timeout_seconds) * 3 + 30, max_tries=5)
    # Each queue's worker knows only the tasks put on its queue, so ARQ's in-progress key (the
    # longest of them + 10 s) is as short as that queue's work allows.
    functions: dict[str, list[Any]] = {
        "sync": [run("sync")],
        "webhooks": [webhook],
        **{q: [
            run(q),
            func(store_outputs, name="store_outputs", keep_result=0, timeout=store_timeout, max_tries=20),  # type: ignore[arg-type]  # as above
            func(cancel_job, name="cancel_job", keep_result=0, timeout=60, max_tries=3),  # type: ignore[arg-type]  # as above
        ] for q in ("media", "video")},
    }
    every = max(1, s.reconcile_every_seconds)
    crons = [cron(reconcile, name=f"{s.redis_prefix}:reconcile", second=set(range(0, 60, every)),  # type: ignore[arg-type]  # as above
                  run_at_startup=True, keep_result=0, timeout=timeout)]
    # issue 14: Cancel-After / start_within_seconds, and batch completion, scanned every second
    crons += [
        cron(enforce_deadlines, name=f"{s.redis_prefix}:deadlines", second=set(range(60)), keep_result=0, timeout=30),
        cron(complete_batches, name=f"{s.redis_prefix}:batches", second=set(range(60)), keep_result=0, timeout=30),
    ]
    workers = []
    for i, q in enumerate(names):
        workers.append(
            Worker(
                functions=functions[q.rsplit(":", 1)[-1]],
                cron_jobs=crons if i == 0 else None,
                queue_name=q,
                redis_pool=rt.redis,
                ctx={"rt": rt},
                handle_signals=False,
                max_jobs=s.worker_max_jobs,
                poll_delay=s.worker_poll_delay,
                keep_result=0,
                job_timeout=timeout,
                health_check_key=f"{q}:health-check",
                health_check_interval=HEALTH_CHECK_SECONDS,
            )
        )
    return workers


async def ride_out_redis(rt: Runtime, name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run `run` (an ARQ worker's loop, the poller) through Redis outages of any length:
    when it dies of a lost connection, wait for Redis to answer (backing off to
    REDIS_BACKOFF_MAX seconds between tries), then start it again. One log line when Redis
    goes and one when it is back. The reconciler then puts back, from the database, what a
    Redis that came back empty lost (queued runs, poll schedules, stores)."""
    while True:
        try:
            await run()
            return
        except Exception as exc:
            if not (redis_lost(exc) or isinstance(exc, OSError)):
                raise
            log.warning("%s lost Redis (%s: %s); waiting for it", name, type(exc).__name__, str(exc)[:200])
        delay = 0.2
        started = time.monotonic()
        while True:
            await asyncio.sleep(delay)
            try:
                await rt.redis.ping()
                break
            except REDIS_DOWN:
                delay = min(delay * 2, REDIS_BACKOFF_MAX)
        log.warning("%s: Redis is back after %.1f s; carrying on", name, time.monotonic() - started)


def polling(workers: list[Worker]) -> bool:
    """Whether every worker's poll loop has run lately: ARQ records its health from that
    loop, so a stale record means a hung worker (Redis stuck, the loop blocked)."""
    now = time.time()
    return all(now - w._last_health_check < 2 * HEALTH_CHECK_SECONDS + 5 for w in workers)  # noqa: SLF001  # ARQ keeps it private


async def serve_workers(
    settings: Settings, queues: list[str] | None = None, *, ready: asyncio.Event | None = None, metrics_port: int | None = None
) -> None:
    """Run the workers until cancelled, then close them and the runtime. `metrics_port`:
    serve Prometheus metrics there (core/metrics.py)."""
    async with AsyncExitStack() as stack:
        rt = await open_runtime(settings, stack, build_store(settings))
        rt.ledger.configure(settings)
        rt.adapters = AdapterCache(rt.http)
        watch_sighup(rt)
        stack.callback(unwatch_sighup, rt)
        workers = build_workers(rt, queues)
        if metrics_port is not None:
            exposition = Exposition(probe_for(rt), refresh_seconds=settings.metrics_refresh_seconds)
            await exposition.start()
            stack.push_async_callback(exposition.close)
            server = await serve_metrics(metrics_port, exposition, healthy=lambda: polling(workers))
            stack.callback(server.close)
            log.info("metrics on http://0.0.0.0:%d/metrics, health at /healthz", metrics_port)
        log.info("worker listening on %s (max_jobs=%d)", [w.queue_name for w in workers], settings.worker_max_jobs)
        if ready is not None:
            ready.set()
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(ride_out_redis(rt, f"worker {w.queue_name}", w.async_run)) for w in workers
        ]
        poll_queues = [q for q in (queues or list(QUEUES)) if q in ("media", "video")]  # the poll schedules
        if poll_queues:
            tasks.append(asyncio.create_task(ride_out_redis(rt, "poller", lambda: Poller(rt, poll_queues).run()), name="poller"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Let in-flight tasks end (they are short: waiting is deferred polls). Worker.close()
            # would close the shared Redis pool under the other workers, so it is not used.
            running = [t for w in workers for t in w.tasks.values()]
            if running:
                await asyncio.wait(running, timeout=settings.task_timeout_seconds)
