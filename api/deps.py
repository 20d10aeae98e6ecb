"""FastAPI dependencies: the runtime, and the caller's principal from `Authorization: Bearer`.

Keys are cached per process so the hot path reads no SQL. A change to a key or a tenant's
budget is announced on Redis (core.keys.announce_change); every API process listens
(KeyWatcher) and drops its whole cache, so a revoked key stops working everywhere within
moments. The cache's TTL (`key_cache_seconds`) is only the backstop for lost messages.

    admin API ── commit ── PUBLISH {prefix}:keys:changed ──► KeyWatcher (each API process)
                                                             └─► KeyCache.clear()

A key that is not found is remembered too, briefly (`auth_negative_cache_seconds`), so a
client repeating a bogus key costs no query; and failures are counted per client address in
Redis (core/limits/auth.py), so an address past `auth_failure_limit` gets 429 before any
lookup, on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from core import logs, metrics
from core.errors import Forbidden, RateLimited, Unauthorized
from core.keys import Principal, hash_key, lookup
from core.limits.auth import AuthFailures
from core.runtime import Runtime

log = logging.getLogger("genroute.keys")


async def get_runtime(request: Request) -> Runtime:  # async: a sync dependency costs a thread hop
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class KeyCache:
    """Valid keys are cached for a short time, so the hot path does not query SQL per request.
    Unknown (or revoked, expired) key hashes are remembered for `negative_ttl`, so a repeated
    bogus key costs no query either. `clear()` (on every announced change) drops both and
    bumps `generation`: a lookup that started before a clear must not store what it read
    (it may be stale)."""

    def __init__(self, ttl: float, max_entries: int = 10_000, negative_ttl: float = 0.0) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.generation = 0
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._unknown: dict[str, float] = {}  # digest -> until (monotonic)

    def is_unknown(self, digest: str) -> bool:
        until = self._unknown.get(digest)
        if until is None:
            return False
        if until < time.monotonic():
            self._unknown.pop(digest, None)
            return False
        return True

    def put_unknown(self, digest: str, generation: int | None = None) -> None:
        if self.negative_ttl <= 0 or (generation is not None and generation != self.generation):
            return
        if len(self._unknown) >= self.max_entries:  # a flood of random keys: start over
            self._unknown.clear()
        self._unknown[digest] = time.monotonic() + self.negative_ttl

    def get(self, digest: str) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        principal, until = hit
        if until < time.monotonic() or (principal.expires_at is not None and principal.expires_at <= time.time()):
            self._entries.pop(digest, None)
            return None
        return principal

    def put(self, digest: str, principal: Principal, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation:
            return  # cleared while the lookup ran
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (principal, time.monotonic() + self.ttl)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._unknown.clear()


class KeyWatcher:
    """Clears a KeyCache whenever a key change is announced on `channel`. It owns its Redis
    connection (named, so operators can see it in CLIENT LIST) and re-subscribes after any
    error; each (re)subscription clears the cache too, as messages may have been missed."""

    def __init__(self, redis_url: str, channel: str, cache: KeyCache, client_name: str | None = None,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.channel = channel
        self.cache = cache
        self.on_change = on_change  # told what changed ("*" after a (re)subscription): open streams recheck
        self._redis: Redis = Redis.from_url(redis_url, client_name=client_name or channel,
                                            socket_connect_timeout=5, health_check_interval=30)
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self, timeout: float = 5.0) -> None:
        """Start listening; waits (up to `timeout`) for the first subscription, so changes made
        once the process serves are not missed. If Redis is down, it keeps trying in the background."""
        self._task = asyncio.create_task(self._run(), name="key-watcher")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            pubsub: Any = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None:
                        continue
                    # "subscribe" also arrives when redis-py reconnects on its own: clear then too
                    if msg["type"] in ("message", "subscribe"):
                        self.cache.clear()
                        if self.on_change is not None:
                            data = msg.get("data") if msg["type"] == "message" else b"*"
                            self.on_change(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
                    if msg["type"] == "subscribe":
                        self._subscribed.set()
                        delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("key watcher lost Redis; re-subscribing in %.1f s (cache TTL covers the gap)", delay,
                            exc_info=True)
                self.cache.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _admin_key_matches(token: str, admin_key: str) -> bool:
    return bool(admin_key) and hmac.compare_digest(token.encode(), admin_key.encode())


ADMIN = Principal(key_id="admin", tenant="admin", admin=True)  # the settings' GENROUTE_ADMIN_KEY


async def resolve_principal(cache: KeyCache, rt: Runtime, token: str, *, address: str | None = None,
                            failures: AuthFailures | None = None) -> Principal | None:
    """The principal behind a key, or None: the cache first (a key verified lately), then, if
    `address` is not over its failure limit (else RateLimited), the settings' admin key, the
    negative cache, SQL. Every None is counted against `address`."""
    digest = hash_key(token)
    principal = cache.get(digest)
    if principal is not None:
        return principal
    if failures is not None:
        retry = await failures.retry_after(address)
        if retry is not None:
            metrics.auth_failure("limited")
            raise RateLimited(
                f"too many requests with an unknown, revoked or expired key from this address; retry in {math.ceil(retry)} s",
                retry_after=retry, code="too_many_auth_failures",
            )
    generation = cache.generation
    if _admin_key_matches(token, rt.settings.admin_key):
        cache.put(digest, ADMIN, generation)
        return ADMIN
    if cache.is_unknown(digest):
        metrics.auth_failure("cached")
    else:
        principal = await lookup(rt.sessions, token)
        if principal is not None:
            cache.put(digest, principal, generation)
            return principal
        metrics.auth_failure("looked_up")
        cache.put_unknown(digest, generation)
    if failures is not None:
        await failures.failed(address)
    return None


def client_address(conn: HTTPConnection) -> str | None:
    """The client's address as uvicorn reports it (X-Forwarded-For only from trusted proxies)."""
    return conn.client.host if conn.client else None


async def get_principal(request: Request, rt: RuntimeDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (make one with `genroute keys create --name NAME`)"
        )
    principal = await resolve_principal(request.app.state.key_cache, rt, token, address=client_address(request),
                                        failures=getattr(request.app.state, "auth_failures", None))
    if principal is None:
        raise Unauthorized("unknown, revoked or expired API key")
    logs.bind_here(tenant=principal.tenant)  # every line of this request names its tenant
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_admin(principal: PrincipalDep) -> Principal:
    if not principal.admin:
        raise Forbidden("this endpoint needs an admin key (GENROUTE_ADMIN_KEY, or a key made with admin: true)")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]


async def get_webhook_manager(principal: PrincipalDep) -> Principal:
    """Webhook management (endpoints, the signing secret, deliveries) needs the `webhooks`
    scope: a key with no scopes has it; a key scoped to models has it only when granted."""
    if not principal.webhooks:
        raise Forbidden(
            "this key may not manage webhooks: its scopes do not grant it. An admin can add it with "
            'PATCH /v1/admin/keys/KEY_ID {"scopes": {..., "webhooks": true}}',
            code="webhooks_not_allowed",
        )
    return principal


WebhookManagerDep = Annotated[Principal, Depends(get_webhook_manager)]
