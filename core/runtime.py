"""The resources a process owns, built at start and closed at exit (no import-time state).

The API's lifespan and the worker's startup both call `open_runtime` inside an
AsyncExitStack; the blob store is built by the caller (core does not know storage/).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
from arq.connections import ArqRedis, RedisSettings, create_pool

from core import netguard
from core.db import Sessions, create_engine, sessionmaker
from core.jobs.ledger import Ledger
from core.jobs.polls import PollSchedule
from core.limits.deployments import Limiter
from core.limits.waits import WaitQueues
from core.routing.catalog import Catalog, load_catalog
from core.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    sessions: Sessions
    redis: ArqRedis
    ledger: Ledger
    catalog: Catalog
    http: httpx.AsyncClient
    store: Any  # storage.BlobStore (typed as Any: core does not import storage)
    limiter: Limiter  # per-deployment slots, rate windows, cooldowns: shared through Redis
    usage: Any = None  # core.billing.usage.UsageWriter in the API process (chat calls' usage rows)
    # adapters.registry.AdapterCache, one adapter per deployment (Any: core does not import
    # adapters/); the API's lifespan and the worker's startup set it
    adapters: Any = None
    hub: Any = None  # core.events.EventHub: the API process's one pub/sub subscription
    polls: PollSchedule = field(init=False)  # jobs running at a provider: when each is polled next
    waits: WaitQueues = field(init=False)  # jobs waiting for a deployment's or a key's free slot

    def __post_init__(self) -> None:
        self.polls = PollSchedule(self.redis, self.settings)
        self.waits = WaitQueues(self.redis, self.settings.redis_prefix)
        self.ledger.waits = self.waits


def redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.redis_url)
    rs.conn_timeout = 5
    rs.conn_retries = 2
    return rs


async def open_runtime(settings: Settings, stack: AsyncExitStack, store: Any) -> Runtime:
    catalog = load_catalog(settings.catalog)
    netguard.configure(settings.outbound_networks(), resolve_timeout=settings.outbound_resolve_timeout_seconds)
    engine = create_engine(settings)
    stack.push_async_callback(engine.dispose)
    sessions = sessionmaker(engine)
    redis = await create_pool(redis_settings(settings))
    stack.push_async_callback(redis.aclose)
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.http_timeout_seconds, connect=10.0),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        follow_redirects=False,
    )
    stack.push_async_callback(http.aclose)
    await store.start()
    stack.push_async_callback(store.close)
    ledger = Ledger(sessions, redis, settings.redis_prefix)
    return Runtime(settings, sessions, redis, ledger, catalog, http, store, Limiter.from_settings(redis, settings))


async def reload_catalog(rt: Runtime) -> Catalog:
    """Load the catalog file again and swap it in. Requests already routed keep the object
    they hold, so nothing in flight is dropped; a broken file raises CatalogError and the
    old catalog keeps serving. provider_auth marks are lifted (the operator fixed a key)."""
    new = load_catalog(rt.settings.catalog)
    rt.catalog = new
    await rt.limiter.clear_unhealthy([d.name for m in new.models for d in m.deployments])
    return new


_WATCHED: list[Runtime] = []  # runtimes of this process that reload on SIGHUP (dev mode has two)


def watch_sighup(rt: Runtime) -> None:
    """Reload the catalog of every watched runtime on SIGHUP (`kill -HUP <pid>`)."""
    import asyncio
    import logging
    import signal

    log = logging.getLogger("genroute.catalog")

    async def reload_all() -> None:
        for watched in list(_WATCHED):
            try:
                new = await reload_catalog(watched)
                log.warning("catalog reloaded on SIGHUP: %d models, version %s", len(new.models), new.version)
            except Exception as exc:  # a bad file must not take the process down
                log.error("catalog reload refused, the previous catalog keeps serving: %s", exc)

    _WATCHED.append(rt)
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_all()))
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals
        pass


def unwatch_sighup(rt: Runtime) -> None:
    if rt in _WATCHED:
        _WATCHED.remove(rt)
