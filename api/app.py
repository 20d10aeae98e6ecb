"""The FastAPI application. Its lifespan owns the DB engine, Redis/ARQ pool, blob store
and httpx client (core.runtime), built when the server starts, never at import."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from adapters.registry import AdapterCache
from api import dashboard, docs, errors
from api.admin import router as admin_router
from api.batches import router as batches_router
from api.callbacks import router as callbacks_router
from api.chat import router as chat_router
from api.deployments import router as deployments_router
from api.deps import KeyCache, KeyWatcher
from api.events import router as events_router
from api.files import router as files_router
from api.jobs import router as jobs_router
from api.limits import BodyLimit
from api.meta import router as meta_router
from api.observe import Observe
from api.openai_media import router as openai_media_router
from api.replicate import router as replicate_router
from api.streams import StreamGuard
from api.strict import RefuseNul
from api.usage import router as usage_router
from api.webhooks import router as webhooks_router
from core import logs, metrics
from core.billing.usage import UsageWriter
from core.events import EventHub
from core.keys import changed_channel
from core.limits.auth import AuthFailures
from core.runtime import open_runtime, unwatch_sighup, watch_sighup
from core.settings import Settings
from storage import build_store


def freeze_startup_heap() -> None:
    """Move what start-up made (modules, routes, schemas, the catalog, pools: ~200,000
    objects) out of the garbage collector's sight. They live as long as the process, yet
    every full collection walked them all: 50-150 ms each on a busy machine, a pause that
    any request in flight then waited out (BENCHMARKS.md, "Metrics scrape"). Frozen, a full
    collection walks only what serving made since. The cost: a reference cycle among them
    that start-up leaves (an old catalog after a reload) is never collected."""
    gc.collect()  # garbage of start-up is freed, not frozen
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.runtime = rt = await open_runtime(s, stack, build_store(s))
            rt.ledger.configure(s)
            rt.adapters = AdapterCache(rt.http)
            watch_sighup(rt)
            stack.callback(unwatch_sighup, rt)
            rt.usage = UsageWriter(rt.sessions)
            rt.usage.start()
            stack.push_async_callback(rt.usage.close)  # closed before the engine: rows are flushed
            app.state.key_cache = KeyCache(s.key_cache_seconds, negative_ttl=s.auth_negative_cache_seconds)
            app.state.auth_failures = AuthFailures(rt.redis, s.redis_prefix, limit=s.auth_failure_limit,
                                                   window_seconds=s.auth_failure_window_seconds)
            app.state.streams = streams = StreamGuard(rt)  # open websockets/SSE end when their key does
            streams.start()
            stack.push_async_callback(streams.close)
            watcher = KeyWatcher(s.redis_url, changed_channel(s.redis_prefix), app.state.key_cache,  # revocations
                                 on_change=streams.changed)
            await watcher.start()
            stack.push_async_callback(watcher.close)
            hub = EventHub(rt.redis, f"{s.redis_prefix}:hub")  # one pub/sub connection for all subscribers
            await hub.start()
            stack.push_async_callback(hub.close)
            app.state.event_hub = rt.hub = hub
            app.state.metrics = exposition = metrics.Exposition(  # GET /metrics (api/observe.py)
                metrics.probe_for(rt), refresh_seconds=s.metrics_refresh_seconds)
            await exposition.start()
            stack.push_async_callback(exposition.close)
            freeze_startup_heap()
            yield

    app = FastAPI(
        title="genroute",
        version="0.1.0",
        summary="One door to many AI generation providers: durable jobs, progress, outputs in your storage.",
        lifespan=lifespan,
        docs_url=None,  # api/docs.py serves /docs with local assets (no CDN)
        redoc_url=None,
    )
    errors.install(app)
    docs.install(app)
    errors.document(app)
    app.include_router(jobs_router)
    app.include_router(batches_router)
    app.include_router(meta_router)
    app.include_router(files_router)
    app.include_router(events_router)
    app.include_router(webhooks_router)
    app.include_router(callbacks_router)
    app.include_router(admin_router)
    app.include_router(deployments_router)
    app.include_router(usage_router)
    app.include_router(chat_router)  # OpenAI-compatible: errors in OpenAI's shape
    app.include_router(openai_media_router)
    dashboard.install(app)
    app.include_router(replicate_router)  # Replicate-compatible: errors in Replicate's shape
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes)
    app.add_middleware(RefuseNul)  # outermost: before any route or body is read
    if s.cors_origins:  # browser apps calling the API directly (GENROUTE_CORS_ORIGINS)
        app.add_middleware(
            CORSMiddleware, allow_origins=s.cors_origins, allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After", "Location"], max_age=600,
        )
    app.add_middleware(Observe)  # outermost: request ids and metrics see every answer, refusals too
    return app


def app_factory() -> FastAPI:
    """For `uvicorn --factory api.app:app_factory` (each uvicorn worker process calls it,
    so logging is set up here too, from GENROUTE_LOG_FORMAT / GENROUTE_LOG_LEVEL)."""
    if not logs.configured():
        logs.setup()
    return create_app()
