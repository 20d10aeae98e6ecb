"""`deliver_webhook`: send signed webhook deliveries, in seq order per (job, URL), with retries.

    deliver_webhook(id)   find the head of its chain (the lowest-seq pending delivery of the
                          same job to the same URL), claim it, POST it, record the attempt;
                          on success walk on to the next, on failure defer a retry

A chain never sends seq n+1 before seq n is delivered or exhausted, so a receiver gets one
job's events in order even after an outage. The claim is a compare-and-set that moves
`next_attempt_at` past the attempt's timeout (a lease): a duplicate task, or the
reconciler's re-enqueue, finds nothing due and returns, and a worker killed mid-attempt
only delays the retry until the lease ends.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import update
from sqlmodel import col, select

from core import fetcher, logs, metrics, predictions
from core.models import Job, WebhookDelivery, utcnow
from core.runtime import Runtime
from core.webhooks import active_secrets, enqueue_delivery, retry_delay, secret_box, signed_headers, tenant_secret

log = logging.getLogger("genroute.webhooks")

MAX_ATTEMPTS_KEPT = 50
USER_AGENT = "genroute-webhooks/1"


async def deliver_webhook(ctx: dict[str, Any], delivery_id: str) -> None:
    rt: Runtime = ctx["rt"]
    async with rt.sessions() as s:
        d = await s.get(WebhookDelivery, delivery_id)
        if d is None or d.status != "pending":
            return
        # the request that submitted the job: named in these lines, sent to the receiver
        rid = (await s.exec(select(Job.request_id).where(col(Job.id) == d.job_id))).first()
    with logs.bind(job_id=d.job_id, tenant=d.tenant, request_id=rid):
        await _walk(rt, d)


async def _walk(rt: Runtime, d: WebhookDelivery) -> None:
    """Deliver the chain of `d`'s (job, URL) from its head, while attempts succeed."""
    budget = time.monotonic() + max(5.0, rt.settings.webhook_timeout_seconds * 2)
    while True:
        head = await _head(rt, d.job_id, d.url)
        if head is None:
            return
        now = utcnow()
        if head.next_attempt_at is not None and head.next_attempt_at > now:
            return  # waiting for its retry (its own deferred task) or in flight elsewhere
        if time.monotonic() > budget:  # a long backlog: hand the rest to a fresh task
            await enqueue_delivery(rt.redis, rt.settings.redis_prefix, head.id, tag=f":{head.attempt_count}c")
            return
        claimed = await _claim(rt, head)
        if claimed is None:
            return
        if not await _attempt(rt, claimed):
            return  # a retry is scheduled; the chain waits behind it


async def _head(rt: Runtime, job_id: str, url: str) -> WebhookDelivery | None:
    async with rt.sessions() as s:
        q = (
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id, WebhookDelivery.url == url, WebhookDelivery.status == "pending")
            .order_by(col(WebhookDelivery.seq), col(WebhookDelivery.created_at))
            .limit(1)
        )
        return (await s.exec(q)).first()


async def _claim(rt: Runtime, d: WebhookDelivery) -> WebhookDelivery | None:
    now = utcnow()
    lease = now + timedelta(seconds=rt.settings.webhook_timeout_seconds + 30)
    stmt = (
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.id) == d.id,
            col(WebhookDelivery.status) == "pending",
            col(WebhookDelivery.attempt_count) == d.attempt_count,
        )
        .values(next_attempt_at=lease, attempt_count=WebhookDelivery.attempt_count + 1, updated_at=now)
        .returning(WebhookDelivery)
        .execution_options(synchronize_session=False)
    )
    async with rt.sessions() as s:
        row = (await s.exec(stmt)).scalar_one_or_none()
        await s.commit()
    return row


async def _send(rt: Runtime, d: WebhookDelivery, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
    """POST through the guarded fetcher (the checked address, never a second DNS answer);
    no redirects; at most webhook_max_response_bytes of the answer are read."""
    s = rt.settings
    rid = logs.request_id()
    if rid is not None:
        headers = {**headers, "x-request-id": rid}
    try:
        async with fetcher.fetch(
            rt.http,
            d.url,
            method="POST",
            content=body,
            headers={**headers, "user-agent": USER_AGENT},
            max_bytes=2**62,  # the answer is read up to webhook_max_response_bytes below, then dropped
            timeout=s.webhook_timeout_seconds,
            connect_timeout=min(5.0, s.webhook_timeout_seconds),
            max_redirects=0,
        ) as got:
            read = 0
            async for chunk in got.response.aiter_raw():
                read += len(chunk)
                if read >= s.webhook_max_response_bytes:
                    break
            return got.response.status_code, None
    except fetcher.FetchError as exc:
        if exc.kind == fetcher.FetchFailure.timeout:
            return None, f"timeout after {s.webhook_timeout_seconds:g} s"
        prefix = "refused: " if exc.kind == fetcher.FetchFailure.refused else ""
        return None, f"{prefix}{exc.reason}"[:300]
    except httpx.TimeoutException:
        return None, f"timeout after {s.webhook_timeout_seconds:g} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}"[:300]


async def _attempt(rt: Runtime, d: WebhookDelivery) -> bool:
    """One attempt of a claimed delivery. True when the chain may move on (delivered or exhausted)."""
    secret = await tenant_secret(rt.sessions, d.tenant, secret_box(rt.settings))
    body = json.dumps(await _payload(rt, d), separators=(",", ":"), default=str).encode()
    started = time.monotonic()
    status_code, error = await _send(rt, d, body, signed_headers(active_secrets(secret), d.id, body))
    latency_ms = int((time.monotonic() - started) * 1000)
    ok = status_code is not None and 200 <= status_code < 300
    if status_code is not None and not ok:
        error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")
    now = utcnow()
    attempt = {"at": now.isoformat(), "status_code": status_code, "latency_ms": latency_ms, "error": error}
    values: dict[str, Any] = {
        "attempts": [*d.attempts, attempt][-MAX_ATTEMPTS_KEPT:],
        "last_status_code": status_code,
        "last_error": error[:500] if error else None,
        "updated_at": now,
    }
    delay = None
    if ok:
        values.update(status="delivered", delivered_at=now, next_attempt_at=None)
    else:
        delay = retry_delay(rt.settings.webhook_backoff_seconds, d.attempt_count)
        if delay is None:
            values.update(status="exhausted", next_attempt_at=None)
        else:
            values.update(next_attempt_at=now + timedelta(seconds=delay))
    async with rt.sessions() as s:
        await s.exec(update(WebhookDelivery).where(col(WebhookDelivery.id) == d.id).values(**values))
        await s.commit()
    refused = status_code is None and (error or "").startswith("refused:")
    outcome = "delivered" if ok else "refused" if refused else "failed" if delay is not None else "exhausted"
    metrics.webhook_delivery(outcome, latency_ms / 1000)
    if delay is not None:
        await enqueue_delivery(rt.redis, rt.settings.redis_prefix, d.id, defer=delay, tag=f":{d.attempt_count}")
        return False
    if not ok:
        log.warning("webhook delivery %s to %s exhausted after %d attempts: %s", d.id, d.url, d.attempt_count, error)
    return True


async def _payload(rt: Runtime, d: WebhookDelivery) -> dict[str, Any]:
    """What to POST: the event; for a job that asked for Replicate-style webhooks (the job's
    own URL, set through /replicate), the prediction object at that event instead."""
    if d.endpoint_id is None and d.payload.get("job_id"):
        async with rt.sessions() as s:
            job = await s.get(Job, d.job_id)
        if job is not None and job.webhook_format == predictions.FORMAT:
            return await predictions.webhook_body(rt, job, d.payload)
    return d.payload


async def due_deliveries(rt: Runtime, *, older_than: float, limit: int = 1000) -> int:
    """Re-enqueue pending deliveries whose time has passed (their task was lost); for the reconciler."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    async with rt.sessions() as s:
        rows = (
            await s.exec(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.status == "pending", col(WebhookDelivery.next_attempt_at) < cutoff)
                .limit(limit)
            )
        ).all()
    tag = f":r{int(time.time())}"
    n = 0
    for delivery_id in rows:
        n += await enqueue_delivery(rt.redis, rt.settings.redis_prefix, delivery_id, tag=tag)
    return n
