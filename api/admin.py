"""Operator endpoints, for admin keys (GENROUTE_ADMIN_KEY, or a key made with `admin: true`).

    POST  /v1/admin/catalog/reload              reload this process's catalog
    POST  /v1/admin/tenants                     {id, name?, budget?}                 201
    GET   /v1/admin/tenants                     ?limit&cursor (ordered by id, descending)
    GET   /v1/admin/tenants/{id}                budget, spent, held, available
    PATCH /v1/admin/tenants/{id}                {name?, budget?}
    POST  /v1/admin/keys                        {tenant, name, admin?, scopes?, rpm?, max_concurrency?,
                                                 queue_when_busy?, expires_at? | expires_in_seconds?}  201, key shown once
    GET   /v1/admin/keys                        ?tenant&limit&cursor (never a secret)
    GET   /v1/admin/keys/{id}
    PATCH /v1/admin/keys/{id}                   {name?, scopes?, rpm?, max_concurrency?, queue_when_busy?,
                                                 expires_at? | expires_in_seconds?}  (null clears)
    POST  /v1/admin/keys/{id}/revoke
    POST  /v1/admin/keys/{id}/rotate            {grace_seconds?}  new key shown once
    GET   /v1/admin/jobs/{id}                   any tenant's job, with the provider's own error words
                                                (error.details.provider; tenants get a cleaned message)

Money is micro-USD (1 USD = 1,000,000); a null budget means no cap. Each API process reloads
its own catalog (send the call to every replica, or SIGHUP them); workers reload on SIGHUP.
Key and budget changes reach every API process at once through Redis (api/deps.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator, model_validator

from api.deps import AdminDep, KeyCache, RuntimeDep
from api.pagination import page
from api.strict import StrictRoute
from api.views import job_public
from core import keys
from core.billing import ledger as billing
from core.billing import tenants
from core.billing.ledger import balance
from core.errors import InvalidInput, NotFound
from core.jobs.ledger import JobStatus
from core.models import ApiKey, Tenant, utcnow
from core.routing.catalog import CatalogError
from core.runtime import Runtime, reload_catalog
from core.schemas import JobPublic, Priority

router = APIRouter(route_class=StrictRoute, prefix="/v1/admin", tags=["admin"])

# request and response shapes ----------------------------------------------------------------
TenantId = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
TenantName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
KeyName = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Micros = Annotated[int, Field(ge=0, le=2**63 - 1, description="micro-USD (1 USD = 1,000,000)")]
Limit = Annotated[int, Field(ge=1, le=keys.MAX_LIMIT)]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_EXPIRES_IN = 10 * 366 * 86400


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(_Strict):
    id: TenantId
    name: TenantName | None = Field(default=None, description="default: the id")
    budget: Micros | None = Field(default=None, description="spend cap in micro-USD; null: no cap")


class TenantUpdate(_Strict):
    name: TenantName | None = None
    budget: Micros | None = Field(default=None, description="micro-USD; null removes the cap")

    @model_validator(mode="after")
    def _name_not_null(self) -> TenantUpdate:
        if "name" in self.model_fields_set and self.name is None:
            raise ValueError("name cannot be null; leave it out to keep it")
        return self


class TenantPublic(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    budget: int | None = Field(description="micro-USD; null: no cap")
    spent: int
    held: int
    available: int | None = Field(description="budget - spent - held; null: no cap")
    created_at: datetime
    updated_at: datetime


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantPublic]
    next_cursor: str | None = None


class KeyScopes(_Strict):
    """The key may use a model named in `models`, or any model of a modality in `modalities`;
    it manages the tenant's webhooks (/v1/webhooks/...) only with `webhooks: true`."""

    models: list[ModelId] = Field(default_factory=list, max_length=500)
    modalities: list[Literal["image", "video", "audio", "text"]] = Field(default_factory=list, max_length=4)
    webhooks: StrictBool = Field(default=False, description="may manage webhook endpoints, the signing secret and deliveries")

    @model_validator(mode="after")
    def _something(self) -> KeyScopes:
        if not self.models and not self.modalities and not self.webhooks:
            raise ValueError("scopes must name at least one model or modality, or grant webhooks; "
                             "use null (no scopes) for full access")
        return self


class _KeyPolicy(_Strict):
    scopes: KeyScopes | None = Field(default=None, description="null: full access (any model, and webhook management)")
    rpm: Limit | None = Field(default=None, description="requests per sliding minute; null: no limit")
    max_concurrency: Limit | None = Field(default=None, description="jobs and calls in flight; null: no limit")
    expires_at: datetime | None = Field(default=None, description="when the key stops working; null: never")
    default_priority: Priority | None = Field(default=None, description="a job's priority when it names none")
    max_priority: Priority | None = Field(default=None, description="the highest priority its jobs get")
    expires_in_seconds: Annotated[int, Field(ge=1, le=MAX_EXPIRES_IN)] | None = Field(
        default=None, description="instead of expires_at: this many seconds from now")

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("expires_at needs a time zone, e.g. 2030-01-01T00:00:00Z")
        return v

    @model_validator(mode="after")
    def _one_expiry(self) -> _KeyPolicy:
        if self.expires_at is not None and self.expires_in_seconds is not None:
            raise ValueError("give expires_at or expires_in_seconds, not both")
        return self

    def expiry(self) -> datetime | None:
        if self.expires_in_seconds is not None:
            return utcnow() + timedelta(seconds=self.expires_in_seconds)
        return self.expires_at

    def scopes_dict(self) -> dict[str, Any] | None:
        return None if self.scopes is None else self.scopes.model_dump()


class KeyCreate(_KeyPolicy):
    tenant: TenantId
    name: KeyName
    admin: bool = Field(default=False, description="may use /v1/admin/...")
    queue_when_busy: bool = Field(default=True, description="over max_concurrency: wait queued (false: 429)")
    cache_by_default: bool = Field(default=False, description="its jobs use the result cache unless they say cache: false")


class KeyUpdate(_KeyPolicy):
    """Only the fields given change; null clears scopes, a limit or the expiry."""

    name: KeyName | None = None
    queue_when_busy: bool | None = None
    cache_by_default: bool | None = None

    @model_validator(mode="after")
    def _not_null(self) -> KeyUpdate:
        for f in ("name", "queue_when_busy", "cache_by_default"):
            if f in self.model_fields_set and getattr(self, f) is None:
                raise ValueError(f"{f} cannot be null; leave it out to keep it")
        return self


class KeyRotate(_Strict):
    grace_seconds: Annotated[int, Field(ge=0, le=keys.MAX_GRACE_SECONDS)] = Field(
        default=0, description="the old key keeps working this long (0: revoked at once)")


class KeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    admin: bool
    scopes: dict[str, Any] | None
    rpm: int | None
    max_concurrency: int | None
    queue_when_busy: bool
    default_priority: str | None = None
    max_priority: str | None = None
    cache_by_default: bool = False
    expires_at: datetime | None
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown this once, never stored")


class KeyRotated(KeyCreated):
    previous: KeyPublic = Field(description="the key it replaces (revoked, or expiring at the end of the grace)")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyPublic]
    next_cursor: str | None = None


async def _tenant(rt: Runtime, t: Tenant) -> TenantPublic:
    async with rt.sessions() as s:
        spent, held = await balance(s, t)  # a tenant without a budget: added up from its entries
    return TenantPublic(id=t.id, name=t.name, budget=t.budget, spent=spent, held=held,
                        available=tenants.available(t), created_at=t.created_at, updated_at=t.updated_at)


def _key(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id, "tenant": k.tenant, "name": k.name, "prefix": k.prefix, "admin": k.is_admin, "scopes": k.scopes,
        "rpm": k.rpm, "max_concurrency": k.max_concurrency, "queue_when_busy": k.queue_when_busy,
        "default_priority": k.default_priority, "max_priority": k.max_priority, "cache_by_default": k.cache_by_default,
        "expires_at": k.expires_at, "status": keys.key_status(k), "created_at": k.created_at, "revoked_at": k.revoked_at,
    }


async def _changed(request: Request, rt: Runtime, what: str) -> None:
    """After a commit: drop this process's cache now, and tell every other API process."""
    cache: KeyCache = request.app.state.key_cache
    cache.clear()
    await keys.announce_change(rt.redis, rt.settings.redis_prefix, what)


def _no_tenant(tenant_id: str) -> NotFound:
    return NotFound(f"no tenant {tenant_id[:100]!r}; create it with POST /v1/admin/tenants", code="tenant_not_found")


def _no_key(key_id: str) -> NotFound:
    return NotFound(f"no API key {key_id[:100]!r}; GET /v1/admin/keys lists them", code="key_not_found")


# catalog ----------------------------------------------------------------------------------------
@router.post("/catalog/reload")
async def reload(rt: RuntimeDep, _: AdminDep) -> dict[str, object]:
    try:
        new = await reload_catalog(rt)
    except CatalogError as exc:
        raise InvalidInput("catalog reload refused; the previous catalog keeps serving", code="invalid_catalog",
                           details=str(exc).splitlines()) from None
    return {"status": "reloaded", "version": new.version, "models": [m.id for m in new.models]}


# tenants ----------------------------------------------------------------------------------------
@router.post("/tenants", status_code=201, response_model=TenantPublic)
async def create_tenant(body: TenantCreate, rt: RuntimeDep, _: AdminDep) -> TenantPublic:
    return await _tenant(rt, await tenants.create_tenant(rt.sessions, body.id, name=body.name, budget=body.budget))


@router.get("/tenants", response_model=TenantList)
async def list_tenants(
    rt: RuntimeDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=100, description="next_cursor of the previous page")] = None,
) -> TenantList:
    rows, next_cursor = await page(rt.sessions, tenants.list_tenants(), Tenant.id, cursor, limit)
    return TenantList(data=[await _tenant(rt, t) for t in rows], next_cursor=next_cursor)


@router.get("/tenants/{tenant_id}", response_model=TenantPublic)
async def get_tenant(tenant_id: str, rt: RuntimeDep, _: AdminDep) -> TenantPublic:
    row = await tenants.get_tenant(rt.sessions, tenant_id)
    if row is None:
        raise _no_tenant(tenant_id)
    return await _tenant(rt, row)


@router.patch("/tenants/{tenant_id}", response_model=TenantPublic)
async def update_tenant(tenant_id: str, body: TenantUpdate, request: Request, rt: RuntimeDep, _: AdminDep) -> TenantPublic:
    changes = body.model_dump(include=body.model_fields_set)
    row = await billing.update_tenant(rt.sessions, tenant_id, **changes)
    if row is None:
        raise _no_tenant(tenant_id)
    if "budget" in changes:  # a key's principal carries whether its tenant is budgeted
        await _changed(request, rt, f"tenant:{tenant_id}")
    return await _tenant(rt, row)


# keys -------------------------------------------------------------------------------------------
@router.post("/keys", status_code=201, response_model=KeyCreated)
async def create_key(body: KeyCreate, rt: RuntimeDep, _: AdminDep) -> KeyCreated:
    tenants.check_not_reserved(body.tenant)  # before the lookup: "create it" would be bad advice
    if await tenants.get_tenant(rt.sessions, body.tenant) is None:
        raise _no_tenant(body.tenant)
    row, plain = await keys.create_key(
        rt.sessions, name=body.name, tenant=body.tenant, admin=body.admin, scopes=body.scopes_dict(), rpm=body.rpm,
        max_concurrency=body.max_concurrency, queue_when_busy=body.queue_when_busy, expires_at=body.expiry(),
        catalog=rt.catalog, default_priority=body.default_priority, max_priority=body.max_priority,
        cache_by_default=body.cache_by_default,
    )
    return KeyCreated(**_key(row), key=plain)  # nothing cached knows a new key: no announcement


@router.get("/keys", response_model=KeyList)
async def list_keys(
    rt: RuntimeDep,
    _: AdminDep,
    tenant: Annotated[str | None, Query(max_length=100, description="only this tenant's keys")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=40, description="next_cursor of the previous page")] = None,
) -> KeyList:
    rows, next_cursor = await page(rt.sessions, keys.list_keys(tenant), ApiKey.id, cursor, limit)
    return KeyList(data=[KeyPublic(**_key(k)) for k in rows], next_cursor=next_cursor)


@router.get("/keys/{key_id}", response_model=KeyPublic)
async def get_key(key_id: str, rt: RuntimeDep, _: AdminDep) -> KeyPublic:
    row = await keys.get_key(rt.sessions, key_id)
    if row is None:
        raise _no_key(key_id)
    return KeyPublic(**_key(row))


@router.patch("/keys/{key_id}", response_model=KeyPublic)
async def update_key(key_id: str, body: KeyUpdate, request: Request, rt: RuntimeDep, _: AdminDep) -> KeyPublic:
    changes: dict[str, Any] = body.model_dump(include=body.model_fields_set - {"expires_in_seconds", "scopes"})
    if "scopes" in body.model_fields_set:
        changes["scopes"] = body.scopes_dict()
    if body.model_fields_set & {"expires_at", "expires_in_seconds"}:
        changes["expires_at"] = body.expiry()
    row = await keys.update_key(rt.sessions, key_id, catalog=rt.catalog, **changes)
    if row is None:
        raise _no_key(key_id)
    await _changed(request, rt, f"key:{key_id}")
    return KeyPublic(**_key(row))


@router.post("/keys/{key_id}/revoke", response_model=KeyPublic)
async def revoke_key(key_id: str, request: Request, rt: RuntimeDep, _: AdminDep) -> KeyPublic:
    row = await keys.revoke_key(rt.sessions, key_id)
    if row is None:
        raise _no_key(key_id)
    await _changed(request, rt, f"key:{key_id}")
    return KeyPublic(**_key(row))


@router.post("/keys/{key_id}/rotate", response_model=KeyRotated)
async def rotate_key(key_id: str, request: Request, rt: RuntimeDep, _: AdminDep, body: KeyRotate | None = None) -> KeyRotated:
    rotated = await keys.rotate_key(rt.sessions, key_id, grace_seconds=(body or KeyRotate()).grace_seconds)
    if rotated is None:
        raise _no_key(key_id)
    new, plain, old = rotated
    await _changed(request, rt, f"key:{key_id}")
    return KeyRotated(**_key(new), key=plain, previous=KeyPublic(**_key(old)))


# jobs -------------------------------------------------------------------------------------------
@router.get("/jobs/{job_id}", response_model=JobPublic)
async def job_detail(job_id: str, rt: RuntimeDep, _: AdminDep) -> JobPublic:
    """Any tenant's job as its owner sees it, plus what the provider itself answered when it
    failed (`error.details.provider`: its message and body), which tenants never get."""
    job = await rt.ledger.get(job_id) if len(job_id) <= 40 else None
    if job is None:
        raise NotFound(f"no job {job_id[:40]!r}")
    assets = (await rt.ledger.assets([job.id]))[job.id] if job.status == JobStatus.succeeded else []
    return await job_public(rt.store, job, assets, rt.settings.url_ttl_seconds, operator=True)
