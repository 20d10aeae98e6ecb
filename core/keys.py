"""API keys: made once, shown once, stored as a sha256 hash.

Keys carry 256 bits of randomness, so a plain sha256 is a safe store (no password
stretching is needed) and lets the hot path look a key up by its hash in one query.

A key belongs to a tenant and may be an admin key, be scoped to models or modalities
(and, separately, to webhook management: `WEBHOOKS_SCOPE`), carry limits (rpm, max_concurrency, queue_when_busy) and expire. Every change made here
is announced on `changed_channel(prefix)` (`announce_change`), so each API process drops
its key cache (api/deps.py) within moments instead of waiting out the cache's TTL.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from core.billing.tenants import UNSET, check_not_reserved, ensure_tenant
from core.db import Sessions
from core.errors import Conflict, InvalidInput
from core.ids import new_id
from core.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "gr_"
MODALITIES = ("image", "video", "audio", "text")
log = logging.getLogger("genroute.keys")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the API's key cache keeps it (so the hot path reads no SQL)."""

    key_id: str
    tenant: str
    admin: bool = False  # may use /v1/admin/... and read any tenant's usage
    models: frozenset[str] | None = None  # scopes: None (with modalities None) means any model
    modalities: frozenset[str] | None = None
    rpm: int | None = None  # generation requests per sliding minute (core/limits/keys.py)
    max_concurrency: int | None = None  # jobs and chat calls in flight at once
    queue_when_busy: bool = True  # over max_concurrency: wait queued (False: 429 at submit)
    expires_at: float | None = None  # epoch seconds; the cache checks it on every hit
    budgeted: bool = False  # the tenant has a budget, so chat calls hold before they run
    default_priority: str | None = None  # a job's priority when it names none (core/priorities.py)
    max_priority: str | None = None  # the highest a job of this key gets (a higher ask is lowered)
    cache_by_default: bool = False  # its jobs use the result cache unless they say cache: false
    webhooks: bool = True  # may manage the tenant's webhook endpoints, signing secret and deliveries

    def allows(self, model_id: str, modality: str) -> bool:
        """Whether the key's scopes let it use this model (named, or by its modality)."""
        if self.models is None and self.modalities is None:
            return True
        return model_id in (self.models or ()) or modality in (self.modalities or ())


# validation: shared by the admin API and the CLI -------------------------------------------
MAX_LIMIT = 1_000_000_000  # fits the INTEGER columns
MAX_GRACE_SECONDS = 30 * 86400


WEBHOOKS_SCOPE = "webhooks"  # scopes["webhooks"] = true: may manage webhooks (api/webhooks.py)


def check_scopes(scopes: dict[str, Any] | None, catalog: Any = None) -> dict[str, Any] | None:
    """`{"models": [...], "modalities": [...], "webhooks": true}` (any may be left out) or None
    for full access. A key with scopes may use only the models they name, and manages the
    tenant's webhooks only with `"webhooks": true` (a key with no scopes does both). Model
    ids are checked against `catalog` (a core.routing.catalog.Catalog) when one is given."""
    if scopes is None:
        return None
    if not isinstance(scopes, dict) or set(scopes) - {"models", "modalities", WEBHOOKS_SCOPE}:
        raise InvalidInput('scopes must be {"models": [...], "modalities": [...], "webhooks": true} or null for full access',
                           code="invalid_scopes")
    models = sorted(set(scopes.get("models") or ()))
    modalities = sorted(set(scopes.get("modalities") or ()))
    webhooks = scopes.get(WEBHOOKS_SCOPE, False)
    if not isinstance(webhooks, bool):
        raise InvalidInput("scopes.webhooks must be true or false", code="invalid_scopes")
    if not models and not modalities and not webhooks:
        raise InvalidInput("scopes must name at least one model or modality, or grant webhooks; "
                           "use null (no scopes) for full access", code="invalid_scopes")
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise InvalidInput(f"scopes.modalities: unknown modality {bad[0]!r}; use any of {', '.join(MODALITIES)}",
                           code="invalid_scopes", details={"modalities": bad})
    if catalog is not None:
        unknown = [m for m in models if catalog.get(m) is None]
        if unknown:
            raise InvalidInput(f"scopes.models: {', '.join(map(repr, unknown))} not in the catalog; GET /v1/models lists the ids",
                               code="unknown_model", details={"models": unknown})
    out: dict[str, Any] = {}
    if models:
        out["models"] = models
    if modalities:
        out["modalities"] = modalities
    if webhooks:
        out[WEBHOOKS_SCOPE] = True
    return out


def _check_limit(field: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT):
        raise InvalidInput(f"{field} must be an integer from 1 to {MAX_LIMIT}, or null for no limit; got {value!r}",
                           code="invalid_limit")
    return value


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 100:
        raise InvalidInput("name must be 1-100 characters", code="invalid_name")
    return name


def _check_expiry(expires_at: datetime | None) -> datetime | None:
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        raise InvalidInput("expires_at needs a time zone, e.g. 2030-01-01T00:00:00Z", code="invalid_expiry")
    if expires_at <= utcnow():
        raise InvalidInput("expires_at is in the past; to stop a key now, revoke it", code="invalid_expiry")
    return expires_at


def key_status(row: ApiKey) -> str:
    """active | revoked | expired."""
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= utcnow():
        return "expired"
    return "active"


def principal_of(row: ApiKey, *, budgeted: bool) -> Principal:
    scoped = bool(row.scopes)  # no scopes: any model, and webhook management
    scopes = row.scopes or {}
    models, modalities = scopes.get("models"), scopes.get("modalities")
    return Principal(
        key_id=row.id,
        tenant=row.tenant,
        admin=row.is_admin,
        # scoped: empty sets, not None, so a webhooks-only key may use no model
        models=frozenset(models or ()) if scoped else None,
        modalities=frozenset(modalities or ()) if scoped else None,
        webhooks=not scoped or scopes.get(WEBHOOKS_SCOPE) is True,
        rpm=row.rpm,
        max_concurrency=row.max_concurrency,
        queue_when_busy=row.queue_when_busy,
        expires_at=row.expires_at.timestamp() if row.expires_at is not None else None,
        budgeted=budgeted,
        default_priority=row.default_priority,
        max_priority=row.max_priority,
        cache_by_default=row.cache_by_default,
    )


def _check_priority(field: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value in ("high", "normal", "low")):
        return value
    raise InvalidInput(f"{field} must be high, normal, low or null", code="invalid_priority")


# keys ----------------------------------------------------------------------------------------
def _new_secret() -> tuple[str, str, str]:
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    return plain, plain[:10], hash_key(plain)


async def create_key(
    sessions: Sessions,
    *,
    name: str,
    tenant: str | None = None,
    admin: bool = False,
    scopes: dict[str, Any] | None = None,
    rpm: int | None = None,
    max_concurrency: int | None = None,
    queue_when_busy: bool = True,
    expires_at: datetime | None = None,
    catalog: Any = None,
    default_priority: str | None = None,
    max_priority: str | None = None,
    cache_by_default: bool = False,
) -> tuple[ApiKey, str]:
    """Make a key (and its tenant's row if missing; tenant defaults to the name); returns
    the row and the key itself, which is never stored. `catalog` checks scoped model ids."""
    plain, prefix, digest = _new_secret()
    row = ApiKey(
        id=new_id("key"), tenant=check_not_reserved(tenant or name), name=_check_name(name), prefix=prefix, key_hash=digest,
        is_admin=bool(admin), scopes=check_scopes(scopes, catalog), rpm=_check_limit("rpm", rpm),
        max_concurrency=_check_limit("max_concurrency", max_concurrency), queue_when_busy=bool(queue_when_busy),
        expires_at=_check_expiry(expires_at), default_priority=_check_priority("default_priority", default_priority),
        max_priority=_check_priority("max_priority", max_priority), cache_by_default=bool(cache_by_default),
    )
    async with sessions() as s:
        await ensure_tenant(s, row.tenant)  # same transaction: no key without its tenant
        s.add(row)
        await s.commit()
    return row, plain


async def lookup(sessions: Sessions, plain: str) -> Principal | None:
    """The caller behind a key, in one query (the key joined to its tenant's budget);
    None for an unknown, revoked or expired key."""
    stmt = (
        select(ApiKey, Tenant.budget)
        .outerjoin(Tenant, col(Tenant.id) == col(ApiKey.tenant))
        .where(ApiKey.key_hash == hash_key(plain))
    )
    async with sessions() as s:
        found = (await s.exec(stmt)).first()
    if found is None:
        return None
    row, budget = found
    if key_status(row) != "active":
        return None
    return principal_of(row, budgeted=budget is not None)


def list_keys(tenant: str | None = None) -> Any:
    """The query behind the key list (one tenant's, or all); the API pages it by id."""
    q = select(ApiKey)
    return q.where(ApiKey.tenant == tenant) if tenant is not None else q


async def get_key(sessions: Sessions, key_id: str) -> ApiKey | None:
    if not key_id or len(key_id) > 40:
        return None
    async with sessions() as s:
        return await s.get(ApiKey, key_id)


async def update_key(
    sessions: Sessions,
    key_id: str,
    *,
    name: Any = UNSET,
    scopes: Any = UNSET,
    rpm: Any = UNSET,
    max_concurrency: Any = UNSET,
    queue_when_busy: Any = UNSET,
    expires_at: Any = UNSET,
    catalog: Any = None,
    default_priority: Any = UNSET,
    max_priority: Any = UNSET,
    cache_by_default: Any = UNSET,
) -> ApiKey | None:
    """Change what is given (None clears scopes, a limit or the expiry); None if there is no
    such key, Conflict (`key_revoked`) for a revoked one. The secret never changes here."""
    values: dict[str, Any] = {}
    if name is not UNSET:
        values["name"] = _check_name(name)
    if scopes is not UNSET:
        values["scopes"] = check_scopes(scopes, catalog)
    if rpm is not UNSET:
        values["rpm"] = _check_limit("rpm", rpm)
    if max_concurrency is not UNSET:
        values["max_concurrency"] = _check_limit("max_concurrency", max_concurrency)
    if queue_when_busy is not UNSET:
        values["queue_when_busy"] = bool(queue_when_busy)
    if expires_at is not UNSET:
        values["expires_at"] = _check_expiry(expires_at)
    for name_, v in (("default_priority", default_priority), ("max_priority", max_priority)):
        if v is not UNSET:
            values[name_] = _check_priority(name_, v)
    if cache_by_default is not UNSET:
        values["cache_by_default"] = bool(cache_by_default)
    if not key_id or len(key_id) > 40:
        return None
    async with sessions() as s:
        row = await s.get(ApiKey, key_id)
        if row is None:
            return None
        if values:
            stmt = update(ApiKey).where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None)).values(**values)
            changed = (await s.exec(stmt)).rowcount
            await s.commit()
            row = await s.get(ApiKey, key_id, populate_existing=True)
            assert row is not None
        else:
            changed = row.revoked_at is None
    if not changed:
        raise Conflict(f"key {key_id!r} is revoked; a revoked key cannot change (create a new one)", code="key_revoked")
    return row


async def revoke_key(sessions: Sessions, key_id: str) -> ApiKey | None:
    """Revoke now (a second call changes nothing); None if there is no such key."""
    if not key_id or len(key_id) > 40:
        return None
    async with sessions() as s:
        stmt = update(ApiKey).where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None)).values(revoked_at=utcnow())
        await s.exec(stmt)
        await s.commit()
        return await s.get(ApiKey, key_id)


async def rotate_key(sessions: Sessions, key_id: str, *, grace_seconds: float = 0) -> tuple[ApiKey, str, ApiKey] | None:
    """A new key (new secret; same tenant, name, admin flag, scopes, limits and expiry) in
    place of `key_id`: returns (new row, new key, old row), or None if there is no such key.
    The old key is revoked at once, or with `grace_seconds` > 0 keeps working until then
    (its expires_at is brought forward; it never gets later)."""
    if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
        raise InvalidInput(f"grace_seconds must be from 0 to {MAX_GRACE_SECONDS}", code="invalid_grace")
    if not key_id or len(key_id) > 40:
        return None
    async with sessions() as s:
        old = (await s.exec(select(ApiKey).where(ApiKey.id == key_id).with_for_update())).first()
        if old is None:
            return None
        status = key_status(old)
        if status != "active":
            raise Conflict(f"key {key_id!r} is {status}; only an active key can be rotated (create a new one)",
                           code=f"key_{status}")
        plain, prefix, digest = _new_secret()
        new = ApiKey(
            id=new_id("key"), tenant=old.tenant, name=old.name, prefix=prefix, key_hash=digest, is_admin=old.is_admin,
            scopes=old.scopes, rpm=old.rpm, max_concurrency=old.max_concurrency, queue_when_busy=old.queue_when_busy,
            expires_at=old.expires_at, default_priority=old.default_priority, max_priority=old.max_priority,
            cache_by_default=old.cache_by_default,
        )
        now = utcnow()
        if grace_seconds > 0:
            until = now + timedelta(seconds=grace_seconds)
            old.expires_at = min(old.expires_at, until) if old.expires_at is not None else until
        else:
            old.revoked_at = now
        s.add(new)
        s.add(old)
        await s.commit()
    return new, plain, old


# cache invalidation --------------------------------------------------------------------------
def changed_channel(redis_prefix: str) -> str:
    """The Redis channel every API process listens on to drop its key cache."""
    return f"{redis_prefix}:keys:changed"


async def announce_change(redis: Any, redis_prefix: str, what: str = "*") -> bool:
    """Tell every API process that keys or tenant budgets changed. Best effort: the change is
    already committed, and if Redis is unreachable the caches' TTL still ends stale entries."""
    try:
        await redis.publish(changed_channel(redis_prefix), what)
        return True
    except Exception as exc:  # one line: an expected outage (or dev's embedded Redis, seen from the CLI)
        log.warning("could not announce a key change on Redis (%s: %s); API caches catch up within "
                    "key_cache_seconds", type(exc).__name__, exc)
        return False
