"""/v1/batches: up to 1,000 job requests in one call, each validated on its own.

    POST /v1/batches  {"jobs": [{model, input, ..., idempotency_key?}, ...], "webhook_url"?, "metadata"?}
      -> 201 {batch, items: [{index, job_id, status, replayed, error}]}
    GET  /v1/batches/{id}?limit&cursor -> counts by status, and the batch's jobs (pages)

Every item is checked like POST /v1/jobs (schema, model, scopes, input, webhook URL,
its own Idempotency-Key): a bad item gets its error in its slot and the good ones are
accepted. The accepted jobs, their holds (per item, core/batches.py says why) and their
webhook rows are inserted in ONE transaction, then enqueued. An item whose idempotency key
already names a job of the tenant is a replay (that job, `replayed: true`), or a conflict
when its body differs. A key's rate limit (rpm) counts the batch once per distinct model.
The batch's webhook (`batch.completed`, Standard Webhooks signed) is sent once every job
has ended (workers/batches.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, func, select

from api import jobs as jobs_api
from api.deps import PrincipalDep, RuntimeDep
from api.pagination import page
from api.views import job_public
from core import batches as batch_store
from core.errors import BudgetExceeded, GenrouteError, InvalidInput, NotFound
from core.ids import new_id
from core.jobs.ledger import JobStatus
from core.jobs.queue import enqueue_run
from core.keys import Principal
from core.models import Batch, Job, utcnow
from core.runtime import Runtime
from core.schemas import ErrorPublic, JobCreate, JobPublic, Metadata

router = APIRouter(prefix="/v1/batches", tags=["batches"])
STATUSES = tuple(s.value for s in JobStatus)


class BatchItem(JobCreate):
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[dict[str, Any]] = Field(min_length=1, description="job requests (POST /v1/jobs bodies, plus idempotency_key)")
    webhook_url: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = Field(
        default=None, description="called once (batch.completed, signed) when every job of the batch has ended")
    metadata: Metadata = Field(default_factory=dict)


class BatchItemResult(BaseModel):
    index: int
    job_id: str | None = None
    status: str | None = None
    replayed: bool = False
    error: ErrorPublic | None = None


class BatchPublic(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    status: Literal["processing", "completed"]
    total: int  # jobs accepted
    rejected: int  # items refused at submit
    counts: dict[str, int]
    metadata: dict[str, Any]
    webhook_url: str | None = None
    created_at: Any
    completed_at: Any = None


class BatchCreated(BaseModel):
    batch: BatchPublic
    items: list[BatchItemResult]


class BatchDetail(BatchPublic):
    jobs: list[JobPublic]
    next_cursor: str | None = None


def _error(exc: GenrouteError) -> ErrorPublic:
    return ErrorPublic(code=exc.code, message=exc.message, details=exc.details)


async def _validate(rt: Runtime, principal: Principal, index: int, raw: Any, batch_id: str,
                    admitted: set[str]) -> tuple[BatchItem | None, jobs_api.Prepared | None, BatchItemResult | None]:
    try:
        item = BatchItem.model_validate(raw)
    except ValidationError as exc:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                   for e in exc.errors(include_url=False, include_context=False, include_input=False)]
        return None, None, BatchItemResult(index=index, error=ErrorPublic(
            code="invalid_input", message="item does not match the job schema; see details", details=details))
    body = JobCreate.model_validate(item.model_dump(exclude={"idempotency_key"}, exclude_unset=True))
    try:
        model = rt.catalog.get(body.model)
        # the key's scopes per item, its rate once per distinct model
        probe = principal if model is None or model.id not in admitted else _no_rpm(principal)
        prepared = await jobs_api.prepare_job(rt, probe, body, idempotency_key=item.idempotency_key,
                                              options=jobs_api.SubmitOptions(batch_id=batch_id))
        if model is not None:
            admitted.add(model.id)
    except GenrouteError as exc:
        return item, None, BatchItemResult(index=index, error=_error(exc))
    return item, prepared, None


def _no_rpm(principal: Principal) -> Principal:
    return replace(principal, rpm=None)


@router.post("", status_code=201, response_model=BatchCreated)
async def create_batch(body: BatchCreate, rt: RuntimeDep, principal: PrincipalDep) -> BatchCreated:
    limit = rt.settings.max_batch_items
    if len(body.jobs) > limit:
        raise InvalidInput(f"a batch takes at most {limit} jobs, got {len(body.jobs)}; split it",
                           details=[{"loc": ["jobs"], "msg": f"at most {limit} items", "type": "too_long"}])
    if body.webhook_url is not None:
        await jobs_api.check_webhook_url(rt, body.webhook_url, loc="webhook_url")
    batch_id = new_id("bat")
    admitted: set[str] = set()
    results: dict[int, BatchItemResult] = {}
    candidates: list[tuple[int, jobs_api.Prepared]] = []
    seen_keys: dict[str, int] = {}
    for i, raw in enumerate(body.jobs):
        item, prepared, failed = await _validate(rt, principal, i, raw, batch_id, admitted)
        if failed is not None:
            results[i] = failed
            continue
        assert item is not None and prepared is not None
        key = item.idempotency_key
        if key is not None and key in seen_keys:
            results[i] = BatchItemResult(index=i, error=ErrorPublic(
                code="idempotency_conflict", message=f"idempotency_key {key!r} is also used by item {seen_keys[key]}"))
            continue
        if key is not None:
            seen_keys[key] = i
        candidates.append((i, prepared))

    for attempt in range(3):  # a concurrent request may take one of our idempotency keys: re-read, retry
        fresh = await _replays(rt, principal, candidates, results)
        batch = Batch(id=batch_id, tenant=principal.tenant, key_id=principal.key_id, total=0, rejected=0,
                      webhook_url=body.webhook_url, meta=dict(body.metadata), created_at=utcnow())
        items = [batch_store.Item(p.job, p.hold) for _, p in fresh]
        batch.total = len(items)
        batch.rejected = sum(1 for r in results.values() if r.error is not None)
        try:
            try:
                done = await batch_store.create_batch(rt.ledger, batch, items, budgeted=principal.budgeted)
            except BudgetExceeded:  # the hint said no budget, but there is one: per-item holds with savepoints
                done = await batch_store.create_batch(rt.ledger, batch, items, budgeted=True)
        except IntegrityError:
            if attempt == 2:
                raise
            continue
        break
    refused = 0
    for (i, _), it in zip(fresh, done, strict=True):
        if it.refused is not None:
            refused += 1
            results[i] = BatchItemResult(index=i, error=_error(it.refused))
        else:
            results[i] = BatchItemResult(index=i, job_id=it.job.id, status=it.job.status)
    if refused:
        async with rt.sessions() as s:
            row = await s.get(Batch, batch_id)
            if row is not None:
                row.total -= refused
                row.rejected += refused
                s.add(row)
                await s.commit()
                batch = row
    sem = asyncio.Semaphore(50)

    async def run(job: Job) -> None:
        async with sem:  # enqueue after the commit: a worker never sees a job the DB does not have
            await enqueue_run(rt.redis, rt.settings, job.id, rt.catalog.lane(job.model, job.modality), priority=job.priority)

    await asyncio.gather(*(run(it.job) for it in done if it.refused is None))
    counts = Counter(it.job.status for it in done if it.refused is None)
    return BatchCreated(batch=_public(batch, dict(counts)), items=[results[i] for i in sorted(results)])


async def _replays(rt: Runtime, principal: Principal, candidates: list[tuple[int, jobs_api.Prepared]],
                   results: dict[int, BatchItemResult]) -> list[tuple[int, jobs_api.Prepared]]:
    """Items whose idempotency key already names a job: answered as replays (or conflicts),
    in one query; the rest are returned to be inserted."""
    keys = [p.job.idempotency_key for _, p in candidates if p.job.idempotency_key]
    existing: dict[str, Job] = {}
    if keys:
        async with rt.sessions() as s:
            rows = await s.exec(select(Job).where(Job.tenant == principal.tenant, col(Job.idempotency_key).in_(keys)))
            existing = {j.idempotency_key or "": j for j in rows}
    fresh = []
    for i, p in candidates:
        old = existing.get(p.job.idempotency_key or "")
        if old is None:
            fresh.append((i, p))
        elif old.request_hash == p.digest:
            results[i] = BatchItemResult(index=i, job_id=old.id, status=old.status, replayed=True)
        else:
            results[i] = BatchItemResult(index=i, error=ErrorPublic(
                code="idempotency_conflict", details={"job_id": old.id},
                message=f"idempotency_key {p.job.idempotency_key!r} was already used with a different request body"))
    return fresh


def _public(batch: Batch, counts: dict[str, int]) -> BatchPublic:
    full = {s: counts.get(s, 0) for s in STATUSES}
    return BatchPublic(
        id=batch.id, status="completed" if batch.completed_at else "processing", total=batch.total,
        rejected=batch.rejected, counts=full, metadata=batch.meta, webhook_url=batch.webhook_url,
        created_at=batch.created_at, completed_at=batch.completed_at,
    )


async def status_counts(rt: Runtime, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
    async with rt.sessions() as s:
        rows = await s.exec(select(Job.batch_id, Job.status, func.count()).where(col(Job.batch_id).in_(batch_ids))
                            .group_by(Job.batch_id, Job.status))
        for bid, status, n in rows:
            out[bid or ""][status] = int(n)
    return out


@router.get("/{batch_id}", response_model=BatchDetail)
async def get_batch(
    batch_id: str, rt: RuntimeDep, principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> BatchDetail:
    async with rt.sessions() as s:
        batch = await s.get(Batch, batch_id) if len(batch_id) <= 40 else None
    if batch is None or batch.tenant != principal.tenant:
        raise NotFound(f"no batch {batch_id[:60]!r}")
    counts = (await status_counts(rt, [batch.id]))[batch.id]
    rows, next_cursor = await page(rt.sessions, select(Job).where(Job.batch_id == batch.id), Job.id, cursor, limit)
    assets = await rt.ledger.assets([j.id for j in rows if j.status == "succeeded"])
    ttl = rt.settings.url_ttl_seconds
    data = [await job_public(rt.store, j, assets.get(j.id, []), ttl) for j in rows]
    return BatchDetail(**_public(batch, counts).model_dump(), jobs=data, next_cursor=next_cursor)
