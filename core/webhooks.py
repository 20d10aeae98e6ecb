"""Webhooks: Standard Webhooks signing, tenant secrets, and planning delivery rows.

Signing follows https://www.standardwebhooks.com exactly:

    webhook-id:        the delivery id (the same on every retry of one delivery)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))
                       space-separated, one per active secret (two during a rotation)

where `key` is the base64-decoded part of the tenant's `whsec_...` secret. Secrets are
stored encrypted (core/secretbox.py); the functions below read and write them through the
process's SecretBox.

Delivery rows are planned by the ledger inside the transaction of the transition that
causes them (`plan`), and sent by `workers.webhooks.deliver_webhook` on the webhooks queue.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import Sessions
from core.errors import Unavailable
from core.events import TERMINAL_EVENTS, Event
from core.ids import new_id
from core.models import Job, WebhookDelivery, WebhookEndpoint, WebhookSecret, utcnow
from core.secretbox import NoKey, SecretBox, Undecryptable, is_encrypted, require_box
from core.settings import queue_name

SECRET_PREFIX = "whsec_"
DEFAULT_EVENTS: frozenset[str] = TERMINAL_EVENTS


# signing -------------------------------------------------------------------------------
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secrets: list[str], msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(sign(s, msg_id, ts, body) for s in secrets),
        "content-type": "application/json",
    }


# tenant secrets ------------------------------------------------------------------------
# Stored encrypted (core/secretbox.py); these functions take the process's box and hand out
# a TenantSecret in plaintext, which is never written back as it is.
@dataclass(frozen=True)
class TenantSecret:
    tenant: str
    secret: str
    previous_secret: str | None
    previous_expires_at: datetime | None
    rotated_at: datetime | None


def secret_box(settings: Any) -> SecretBox:
    """The process's box, or 503 `unavailable` (saying which setting is missing) without one."""
    try:
        return require_box(settings)
    except NoKey as exc:
        raise Unavailable(str(exc), code="webhook_secrets_unavailable") from None


def _context(tenant: str) -> str:
    return f"webhook_secrets:{tenant}"  # associated data: a row's ciphertext opens only as that tenant's


def _open(box: SecretBox, row: WebhookSecret) -> TenantSecret:
    try:
        ctx = _context(row.tenant)
        return TenantSecret(
            tenant=row.tenant,
            secret=box.decrypt(row.secret, ctx),
            previous_secret=box.decrypt(row.previous_secret, ctx) if row.previous_secret else None,
            previous_expires_at=row.previous_expires_at,
            rotated_at=row.rotated_at,
        )
    except Undecryptable as exc:
        raise Unavailable(f"the webhook signing secret cannot be read: {exc}", code="webhook_secrets_unavailable") from None


async def seal(session: AsyncSession, box: SecretBox, row: WebhookSecret) -> bool:
    """Rewrite `row` under the box's current key if it is plaintext or under an older key
    (compare-and-set on the stored values, so a concurrent rotation wins). True if rewritten."""
    if box.is_current(row.secret) and box.is_current(row.previous_secret):
        return False
    opened = _open(box, row)
    ctx = _context(row.tenant)
    stmt = (
        update(WebhookSecret)
        .where(col(WebhookSecret.tenant) == row.tenant, col(WebhookSecret.secret) == row.secret)
        .values(secret=box.encrypt(opened.secret, ctx),
                previous_secret=box.encrypt(opened.previous_secret, ctx) if opened.previous_secret else None)
    )
    changed = (await session.exec(stmt)).rowcount
    await session.commit()
    return bool(changed)


def active_secrets(row: TenantSecret, now: datetime | None = None) -> list[str]:
    now = now or utcnow()
    out = [row.secret]
    if row.previous_secret and row.previous_expires_at is not None and row.previous_expires_at > now:
        out.append(row.previous_secret)
    return out


async def tenant_secret(sessions: Sessions, tenant: str, box: SecretBox) -> TenantSecret:
    """The tenant's secret, made on first use. A row stored in plaintext (before encryption
    at rest) or under an older key is encrypted with the current key on this read."""
    async with sessions() as s:
        row = await s.get(WebhookSecret, tenant)
        if row is not None:
            opened = _open(box, row)
            await seal(s, box, row)
            return opened
        plain = new_secret()
        row = WebhookSecret(tenant=tenant, secret=box.encrypt(plain, _context(tenant)))
        s.add(row)
        try:
            await s.commit()
            return TenantSecret(tenant, plain, None, None, None)
        except IntegrityError:  # made concurrently: use that one
            await s.rollback()
    async with sessions() as s:
        found = await s.get(WebhookSecret, tenant)
        assert found is not None
        return _open(box, found)


async def rotate_secret(sessions: Sessions, tenant: str, overlap_seconds: int, box: SecretBox) -> TenantSecret:
    """A new secret; the old one keeps signing (a second signature) for `overlap_seconds`."""
    await tenant_secret(sessions, tenant, box)
    async with sessions() as s:
        row = await s.get(WebhookSecret, tenant, with_for_update=True)
        assert row is not None
        old = _open(box, row)
        now = utcnow()
        ctx = _context(tenant)
        plain = new_secret()
        row.previous_secret = box.encrypt(old.secret, ctx)
        row.previous_expires_at = now + timedelta(seconds=overlap_seconds)
        row.secret = box.encrypt(plain, ctx)
        row.rotated_at = now
        s.add(row)
        await s.commit()
        return TenantSecret(tenant, plain, old.secret, row.previous_expires_at, now)


async def reencrypt_all(sessions: Sessions, box: SecretBox) -> dict[str, int]:
    """Every tenant's row under the current key (for a key rotation, and for rows still in
    plaintext). Raises Unavailable naming a row no configured key opens."""
    counts = {"rows": 0, "rewritten": 0, "plaintext": 0}
    async with sessions() as s:
        tenants = list((await s.exec(select(WebhookSecret.tenant).order_by(col(WebhookSecret.tenant)))).all())
    for tenant in tenants:
        async with sessions() as s:
            row = await s.get(WebhookSecret, tenant, with_for_update=True)
            if row is None:
                continue
            counts["rows"] += 1
            counts["plaintext"] += not is_encrypted(row.secret)
            counts["rewritten"] += await seal(s, box, row)
    return counts


# planning deliveries -------------------------------------------------------------------
class WebhookPlanner:
    """Turns events into delivery rows. A tenant's endpoints are cached for a few seconds,
    so a transition adds no query in the common case."""

    def __init__(self, cache_seconds: float = 5.0) -> None:
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, list[tuple[str, str, frozenset[str]]]]] = {}

    def invalidate(self, tenant: str) -> None:
        self._cache.pop(tenant, None)

    async def endpoints(self, session: AsyncSession, tenant: str) -> list[tuple[str, str, frozenset[str]]]:
        hit = self._cache.get(tenant)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        rows = (await session.exec(select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant))).all()
        found = [(r.id, r.url, frozenset(r.events)) for r in rows]
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[tenant] = (time.monotonic() + self.cache_seconds, found)
        return found

    async def plan(self, session: AsyncSession, job: Job, events: list[Event]) -> list[WebhookDelivery]:
        if not events:
            return []
        targets: list[tuple[str | None, str, frozenset[str]]] = []
        if job.webhook_url:
            targets.append((None, job.webhook_url, frozenset(job.webhook_events) if job.webhook_events else DEFAULT_EVENTS))
        targets += await self.endpoints(session, job.tenant)
        now = utcnow()
        return [
            WebhookDelivery(
                id=new_id("whd"),
                tenant=job.tenant,
                job_id=job.id,
                endpoint_id=endpoint_id,
                url=url,
                event_id=e.id,
                event_type=e.type,
                seq=e.seq,
                payload=e.to_dict(),
                status="pending",
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            for endpoint_id, url, wanted in targets
            for e in events
            if e.type in wanted
        ]


def retry_delay(schedule: list[float], attempts_made: int) -> float | None:
    """Seconds until the next try after `attempts_made` failed tries; None when exhausted."""
    return schedule[attempts_made - 1] if 1 <= attempts_made <= len(schedule) else None


async def enqueue_delivery(redis: Any, prefix: str, delivery_id: str, *, defer: float = 0.0, tag: str = "") -> bool:
    """Put `deliver_webhook(delivery_id)` on the webhooks queue (after the rows are committed)."""
    if not isinstance(redis, ArqRedis):
        return False
    job = await redis.enqueue_job(
        "deliver_webhook",
        delivery_id,
        _job_id=f"whd:{delivery_id}{tag}",
        _queue_name=queue_name(prefix, "webhooks"),
        _defer_by=max(0.0, defer) or None,
    )
    return job is not None
