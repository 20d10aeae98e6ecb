"""FastAPI dependencies: the runtime, and the caller's principal from `Authorization: Bearer`."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from core.errors import Unauthorized
from core.keys import Principal, hash_key, lookup
from core.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:  # async: a sync dependency costs a thread hop
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class KeyCache:
    """Valid keys are cached for a short time, so the hot path does not query SQL per request.
    Unknown keys are not cached (a revoked key stays usable at most `ttl` seconds)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, digest: str) -> Principal | None:
        hit = self._entries.get(digest)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, digest: str, principal: Principal) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (principal, time.monotonic() + self.ttl)


async def get_principal(request: Request, rt: RuntimeDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (make one with `genroute keys create --name NAME`)"
        )
    cache: KeyCache = request.app.state.key_cache
    digest = hash_key(token)
    principal = cache.get(digest)
    if principal is None:
        principal = await lookup(rt.sessions, token)
        if principal is None:
            raise Unauthorized("unknown or revoked API key")
        cache.put(digest, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
