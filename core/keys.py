"""API keys: made once, shown once, stored as a sha256 hash.

Keys carry 256 bits of randomness, so a plain sha256 is a safe store (no password
stretching is needed) and lets the hot path look a key up by its hash in one query.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlmodel import select

from core.db import Sessions
from core.ids import new_id
from core.models import ApiKey

KEY_PREFIX = "gr_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tenant: str


async def create_key(sessions: Sessions, *, name: str, tenant: str | None = None) -> tuple[ApiKey, str]:
    """Make a key; returns the row and the key itself, which is never stored."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant=tenant or name, name=name, prefix=plain[:10], key_hash=hash_key(plain))
    async with sessions() as s:
        s.add(row)
        await s.commit()
    return row, plain


async def lookup(sessions: Sessions, plain: str) -> Principal | None:
    async with sessions() as s:
        row = (await s.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(plain)))).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, tenant=row.tenant)
