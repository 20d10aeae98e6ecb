"""Open streams (websockets, SSE) and the key behind each: a revoked or expired key's
streams are closed, and each key holds at most `ws_max_per_key` websockets at once.

Revocation. Every stream registers a Watch for its principal. When a key change is
announced (core.keys.announce_change, heard by api/deps.py KeyWatcher), the streams of that
key are rechecked at once (one query per key): a key no longer active ends them, so a
revoked key's streams close within the bound the README states for requests (about 0.1 s;
a lost announcement: key_cache_seconds, when every open key is rechecked anyway). A key's
expiry (expires_at, or the end of a rotation's grace) ends its streams within a second,
with no query. Websockets close with 4401, SSE streams end with an `error` event.

Websockets per key, across replicas, in Redis:

    P:ws:{key_id}   ZSET  connection id -> lease expiry (ms)

A connection takes a place when it opens (refused with 4409 when the key has
`ws_max_per_key` open) and frees it when it closes; each process renews its connections'
leases every few seconds, so a process that dies frees its places within LEASE_SECONDS.
Redis not answering: the cap fails open (logged once), as the per-key limits do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from core.keys import Principal, get_key, key_status
from core.outages import REDIS_DOWN
from core.runtime import Runtime

log = logging.getLogger("genroute.streams")

LEASE_SECONDS = 30.0
TICK_SECONDS = 1.0  # expiry checks; a lease is renewed every LEASE_SECONDS / 3

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: sockets   ARGV: conn_id lease_ms max  -> 1 taken | 0 full
_TAKE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return 1
"""
# KEYS: sockets (one per connection)   ARGV: lease_ms, conn ids (one per key)
_RENEW = _NOW + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease + 1000)
end
return #KEYS
"""


class Revoked(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Watch:
    """One open stream of `principal`. `ended` is set when its key stops being valid."""

    principal: Principal
    expires_at: float | None = None
    reason: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()


class StreamGuard:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.prefix = rt.settings.redis_prefix
        self.max_per_key = rt.settings.ws_max_per_key
        self._watches: set[Watch] = set()
        self._sockets: dict[str, str] = {}  # connection id -> key id (this process's, for renewals)
        self._take = rt.redis.register_script(_TAKE)
        self._renew = rt.redis.register_script(_RENEW)
        self._task: asyncio.Task[None] | None = None
        self._rechecks: set[asyncio.Task[None]] = set()
        self._down = False

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-guard")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._rechecks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # revocation -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def watch(self, principal: Principal) -> Any:
        w = Watch(principal, principal.expires_at)
        self._watches.add(w)
        try:
            yield w
        finally:
            self._watches.discard(w)

    def changed(self, what: str) -> None:
        """A key change was announced (`key:ID`, `tenant:ID`, `*`): recheck the streams it may end."""
        if what.startswith("tenant:"):
            return  # a budget: streams do not depend on it
        key_ids = {what.removeprefix("key:")} if what.startswith("key:") else None
        task = asyncio.create_task(self.recheck(key_ids))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def recheck(self, key_ids: set[str] | None = None) -> None:
        """Look up the keys of the open streams (`key_ids` only, if given); end the streams of
        a key that is no longer active, and learn a changed expiry (a rotation's grace)."""
        open_keys = {w.principal.key_id for w in self._watches if w.principal.key_id != "admin"}  # the settings' key: no row
        for key_id in open_keys if key_ids is None else open_keys & key_ids:
            try:
                row = await get_key(self.rt.sessions, key_id)
            except Exception:
                log.warning("could not recheck key %s for its open streams; the next recheck tries again", key_id,
                            exc_info=True)
                continue
            status = key_status(row) if row is not None else "revoked"
            for w in [w for w in self._watches if w.principal.key_id == key_id]:
                if status != "active":
                    w.end(f"key {status}")
                else:
                    w.expires_at = row.expires_at.timestamp() if row is not None and row.expires_at is not None else None

    def _expire(self) -> None:
        now = time.time()
        for w in list(self._watches):
            if w.expires_at is not None and w.expires_at <= now:
                w.end("key expired")

    async def _run(self) -> None:
        backstop = max(TICK_SECONDS, self.rt.settings.key_cache_seconds)
        last_recheck = last_renew = time.monotonic()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self._expire()
                now = time.monotonic()
                if now - last_recheck >= backstop:  # announcements can be lost: recheck every open key
                    last_recheck = now
                    await self.recheck()
                if now - last_renew >= LEASE_SECONDS / 3:
                    last_renew = now
                    await self._renew_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("stream guard tick failed", exc_info=True)

    # websockets per key ---------------------------------------------------------------------
    def _key(self, key_id: str) -> str:
        return f"{self.prefix}:ws:{key_id}"

    def _state(self, down: bool, exc: BaseException | None = None) -> None:
        if down and not self._down:
            log.warning("Redis unavailable (%s): websockets per key are not capped until it is back",
                        type(exc).__name__ if exc else "?")
        elif not down and self._down:
            log.warning("Redis is back: websockets per key are capped again")
        self._down = down

    async def take_socket(self, key_id: str) -> str | None:
        """A place for one more websocket of the key: its connection id, or None when full."""
        conn = uuid.uuid4().hex
        if self.max_per_key > 0:
            try:
                ok = await self._take(keys=[self._key(key_id)], args=[conn, int(LEASE_SECONDS * 1000), self.max_per_key])
            except REDIS_DOWN as exc:
                self._state(True, exc)
                ok = 1
            else:
                self._state(False)
            if not int(ok):
                return None
        self._sockets[conn] = key_id
        return conn

    async def free_socket(self, conn: str) -> None:
        key_id = self._sockets.pop(conn, None)
        if key_id is None or self.max_per_key <= 0:
            return
        with contextlib.suppress(*REDIS_DOWN):
            await self.rt.redis.zrem(self._key(key_id), conn)

    async def _renew_all(self) -> None:
        if self.max_per_key <= 0 or not self._sockets:
            return
        items = list(self._sockets.items())
        for i in range(0, len(items), 500):
            batch = items[i:i + 500]
            try:
                await self._renew(keys=[self._key(k) for _, k in batch], args=[int(LEASE_SECONDS * 1000), *[c for c, _ in batch]])
            except REDIS_DOWN as exc:
                self._state(True, exc)
                return
        self._state(False)


async def until_ended(items: AsyncIterator[Any], watch: Watch) -> AsyncGenerator[Any, None]:
    """The items of the generator `items` until `watch` ends (then Revoked). It owns `items`
    and closes it: wrap this one in contextlib.aclosing, not `items`. Each item is awaited in
    a task of its own, raced with the watch; when the watch wins, or this is cancelled (the
    client went away), that task is cancelled and `items` ends inside it."""
    ended = asyncio.ensure_future(watch.ended.wait())
    nxt: asyncio.Future[Any] | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(anext(items))
            await asyncio.wait({nxt, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                nxt = None
                raise Revoked(watch.reason)
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            finally:
                nxt = None
            yield item
    finally:
        ended.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()  # cancelled while awaiting an item: `items` ends in that task
        else:
            closer = getattr(items, "aclose", None)  # an async generator; a bare iterator has nothing to close
            if closer is not None:
                await closer()
