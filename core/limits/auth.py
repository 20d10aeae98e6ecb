"""Failed authentications per client address, counted in Redis so the limit holds across
every API replica:

    P:authfail:{address}   STRING   failures in the current window (expires with the window)

An address that sent `limit` unknown, revoked or expired keys within `window_seconds` is
answered 429 `too_many_auth_failures` (Retry-After: the rest of the window) for any key the
API process has not already verified (a key in its cache still works), without a database
query. The window starts at the first failure (a fixed window: at most 2 x limit failures
in any span of one window). IPv6 addresses are counted per /64, as one host usually holds
the whole /64.

The address is the connection's peer as uvicorn reports it: behind a reverse proxy, let
uvicorn trust the proxy's X-Forwarded-For (FORWARDED_ALLOW_IPS, README "Trust boundaries"),
or every client shares the proxy's address.

When Redis does not answer, the limit fails open (logged once): unknown keys still cost a
query each, and the per-process negative cache (api/deps.py KeyCache) still answers a
repeated one.
"""

from __future__ import annotations

import ipaddress
import logging

from redis.asyncio import Redis

from core.outages import REDIS_DOWN

log = logging.getLogger("genroute.auth")

# KEYS: counter   ARGV: window_ms  -> failures so far (this one included)
_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return n
"""

# KEYS: counter   ARGV: limit  -> 0 (below the limit) | ms until the window ends
_CHECK = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[1]) then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 1 then return 1 end
return ttl
"""


def client_key(address: str | None) -> str:
    """What failures are counted by: the IPv4 address, the IPv6 /64, or the text as given
    (a unix socket, a test client)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class AuthFailures:
    def __init__(self, redis: Redis, prefix: str, *, limit: int, window_seconds: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.limit = limit
        self.window_ms = max(1, int(window_seconds * 1000))
        self._fail = redis.register_script(_FAIL)
        self._check = redis.register_script(_CHECK)
        self._down = False

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def _key(self, address: str | None) -> str:
        return f"{self.prefix}:authfail:{client_key(address)}"

    def _state(self, down: bool, exc: BaseException | None = None) -> None:
        if down and not self._down:
            log.warning("Redis unavailable (%s): failed authentications are not limited until it is back",
                        type(exc).__name__ if exc else "?")
        elif not down and self._down:
            log.warning("Redis is back: failed authentications are limited again")
        self._down = down

    async def retry_after(self, address: str | None) -> float | None:
        """None: the address may try a key; else the seconds until it may again."""
        if not self.enabled:
            return None
        try:
            ms = int(await self._check(keys=[self._key(address)], args=[self.limit]))
        except REDIS_DOWN as exc:
            self._state(True, exc)
            return None
        self._state(False)
        return ms / 1000 if ms else None

    async def failed(self, address: str | None) -> None:
        """Count one failed authentication of the address."""
        if not self.enabled:
            return
        try:
            await self._fail(keys=[self._key(address)], args=[self.window_ms])
        except REDIS_DOWN as exc:
            self._state(True, exc)
            return
        self._state(False)
