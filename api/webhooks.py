"""/v1/webhooks: tenant endpoints, the signing secret, and the delivery log.

    POST   /v1/webhooks/endpoints                    register a default endpoint for all jobs
    GET    /v1/webhooks/endpoints                    list them
    DELETE /v1/webhooks/endpoints/{id}               remove one
    GET    /v1/webhooks/secret                       the tenant's whsec_ secret (made on first use)
    POST   /v1/webhooks/secret/rotate                a new secret; the old one also signs for a while
    GET    /v1/webhooks/deliveries                   deliveries with their attempts, newest first
    GET    /v1/webhooks/deliveries/{id}
    POST   /v1/webhooks/deliveries/{id}/redeliver    send again now (one more attempt)

Every route here needs a key with the `webhooks` scope (api/deps.py WebhookManagerDep): a
key with no scopes has it, a key scoped to models or modalities only when granted; any
other key gets 403 `webhooks_not_allowed`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from sqlmodel import col, select

from api.deps import RuntimeDep, WebhookManagerDep
from api.jobs import check_webhook_url
from api.pagination import page
from api.strict import StrictRoute
from core.errors import Conflict, NotFound
from core.ids import new_id
from core.keys import Principal
from core.models import WebhookDelivery, WebhookEndpoint, utcnow
from core.runtime import Runtime
from core.schemas import (
    WebhookAttemptPublic,
    WebhookDeliveryList,
    WebhookDeliveryPublic,
    WebhookEndpointCreate,
    WebhookEndpointList,
    WebhookEndpointPublic,
    WebhookSecretPublic,
)
from core.webhooks import TenantSecret, enqueue_delivery, rotate_secret, secret_box, tenant_secret

router = APIRouter(route_class=StrictRoute, prefix="/v1/webhooks", tags=["webhooks"])
MAX_ENDPOINTS = 20


def _endpoint(e: WebhookEndpoint) -> WebhookEndpointPublic:
    return WebhookEndpointPublic(id=e.id, url=e.url, events=e.events, description=e.description, created_at=e.created_at)


def _secret(row: TenantSecret) -> WebhookSecretPublic:
    now = utcnow()
    current = row.previous_expires_at is not None and row.previous_expires_at > now
    return WebhookSecretPublic(
        secret=row.secret,
        previous_secret=row.previous_secret if current else None,
        previous_expires_at=row.previous_expires_at if current else None,
        rotated_at=row.rotated_at,
    )


def _delivery(d: WebhookDelivery) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic(
        id=d.id,
        job_id=d.job_id,
        endpoint_id=d.endpoint_id,
        url=d.url,
        event_id=d.event_id,
        event_type=d.event_type,
        seq=d.seq,
        status=d.status,
        attempt_count=d.attempt_count,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        attempts=[WebhookAttemptPublic(**a) for a in d.attempts],
        created_at=d.created_at,
        delivered_at=d.delivered_at,
    )


@router.post("/endpoints", status_code=201, response_model=WebhookEndpointPublic)
async def create_endpoint(body: WebhookEndpointCreate, rt: RuntimeDep, principal: WebhookManagerDep) -> WebhookEndpointPublic:
    await check_webhook_url(rt, body.url, loc="url")
    async with rt.sessions() as s:
        count = len((await s.exec(select(WebhookEndpoint.id).where(WebhookEndpoint.tenant == principal.tenant))).all())
        if count >= MAX_ENDPOINTS:
            raise Conflict(f"at most {MAX_ENDPOINTS} webhook endpoints per tenant", code="too_many_endpoints")
        row = WebhookEndpoint(
            id=new_id("whe"), tenant=principal.tenant, url=body.url, events=list(dict.fromkeys(body.events)), description=body.description
        )
        s.add(row)
        await s.commit()
    rt.ledger.webhooks.invalidate(principal.tenant)  # other processes see it within webhook_endpoint_cache_seconds
    return _endpoint(row)


@router.get("/endpoints", response_model=WebhookEndpointList)
async def list_endpoints(rt: RuntimeDep, principal: WebhookManagerDep) -> WebhookEndpointList:
    async with rt.sessions() as s:
        rows = (await s.exec(select(WebhookEndpoint).where(WebhookEndpoint.tenant == principal.tenant).order_by(col(WebhookEndpoint.id)))).all()
    return WebhookEndpointList(data=[_endpoint(r) for r in rows])


@router.delete("/endpoints/{endpoint_id}", status_code=204)
async def delete_endpoint(endpoint_id: str, rt: RuntimeDep, principal: WebhookManagerDep) -> Response:
    async with rt.sessions() as s:
        row = await s.get(WebhookEndpoint, endpoint_id) if len(endpoint_id) <= 40 else None
        if row is None or row.tenant != principal.tenant:
            raise NotFound(f"no webhook endpoint {endpoint_id[:100]!r}")
        await s.delete(row)
        await s.commit()
    rt.ledger.webhooks.invalidate(principal.tenant)
    return Response(status_code=204)


@router.get("/secret", response_model=WebhookSecretPublic)
async def get_secret(rt: RuntimeDep, principal: WebhookManagerDep) -> WebhookSecretPublic:
    return _secret(await tenant_secret(rt.sessions, principal.tenant, secret_box(rt.settings)))


@router.post("/secret/rotate", response_model=WebhookSecretPublic)
async def rotate(rt: RuntimeDep, principal: WebhookManagerDep) -> WebhookSecretPublic:
    return _secret(await rotate_secret(rt.sessions, principal.tenant, rt.settings.webhook_secret_rotation_seconds,
                                       secret_box(rt.settings)))


@router.get("/deliveries", response_model=WebhookDeliveryList)
async def list_deliveries(
    rt: RuntimeDep,
    principal: WebhookManagerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=40, description="next_cursor of the previous page")] = None,
    job_id: Annotated[str | None, Query(max_length=40)] = None,
    status: Literal["pending", "delivered", "exhausted"] | None = None,
) -> WebhookDeliveryList:
    q = select(WebhookDelivery)
    if not (principal.admin and job_id):  # the operator sees any job's deliveries
        q = q.where(WebhookDelivery.tenant == principal.tenant)
    if job_id:
        q = q.where(WebhookDelivery.job_id == job_id)
    if status:
        q = q.where(WebhookDelivery.status == status)
    rows, next_cursor = await page(rt.sessions, q, WebhookDelivery.id, cursor, limit)
    return WebhookDeliveryList(data=[_delivery(d) for d in rows], next_cursor=next_cursor)


async def _load(rt: Runtime, principal: Principal, delivery_id: str) -> WebhookDelivery:
    async with rt.sessions() as s:
        row = await s.get(WebhookDelivery, delivery_id) if len(delivery_id) <= 40 else None
    if row is None or (row.tenant != principal.tenant and not principal.admin):
        raise NotFound(f"no webhook delivery {delivery_id[:100]!r}")
    return row


@router.get("/deliveries/{delivery_id}", response_model=WebhookDeliveryPublic)
async def get_delivery(delivery_id: str, rt: RuntimeDep, principal: WebhookManagerDep) -> WebhookDeliveryPublic:
    return _delivery(await _load(rt, principal, delivery_id))


@router.post("/deliveries/{delivery_id}/redeliver", status_code=202, response_model=WebhookDeliveryPublic)
async def redeliver(delivery_id: str, rt: RuntimeDep, principal: WebhookManagerDep) -> WebhookDeliveryPublic:
    """Send the delivery again now, whatever its status: one more attempt (no new backoff)."""
    row = await _load(rt, principal, delivery_id)
    async with rt.sessions() as s:
        row = await s.get(WebhookDelivery, row.id, with_for_update=True) or row
        now = utcnow()
        row.status = "pending"
        row.next_attempt_at = now
        row.updated_at = now
        s.add(row)
        await s.commit()
    await enqueue_delivery(rt.redis, rt.settings.redis_prefix, row.id, tag=f":again{row.attempt_count}")
    return _delivery(row)
