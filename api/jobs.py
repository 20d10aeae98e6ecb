"""/v1/jobs: create (idempotent, optionally waiting), read, list, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api.deps import PrincipalDep, RuntimeDep
from api.pagination import page
from api.views import job_public
from api.strict import StrictRoute
from core import netguard
from core.billing import hold_for
from core.errors import Conflict, ErrorCode, InvalidInput, InvalidRequest, NotFound, Unavailable
from core.events import Event
from core.ids import new_id
from core.jobs import TERMINAL, JobStatus, deadline_for
from core.keys import Principal
from core.models import Job, utcnow
from core.queue import enqueue_cancel, enqueue_run, queue_position
from core.quotas import REDIS_DOWN, admit, take_or_refuse
from core.runtime import Runtime
from core.schemas import JobCreate, JobList, JobPublic

router = APIRouter(route_class=StrictRoute, prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("genroute.api.jobs")

PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait(?:\s*=\s*([^;,\s]*))?(?=$|[;,\s])", re.IGNORECASE)
WAIT_SECONDS = re.compile(r"[0-9]{1,6}")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def parse_prefer_wait(prefer: str | None, max_wait: int) -> int | None:
    """`Prefer: wait=N` (RFC 7240). Plain `wait` means the maximum. One rule for every
    value: N is a whole number of seconds from 1 to max_wait, anything else (0, -1, 1.5,
    abc, 5,000 digits) is a 400; a Prefer without `wait` is ignored."""
    if not prefer:
        return None
    m = PREFER_WAIT.search(prefer.strip())
    if m is None:
        return None
    if m[1] is None:
        return max_wait
    raw = m[1].strip('"')
    if not WAIT_SECONDS.fullmatch(raw) or not 1 <= int(raw) <= max_wait:
        raise InvalidRequest(
            f"Prefer: wait=N takes a whole number of seconds from 1 to {max_wait}, got {m[1][:20]!r}"
        )
    return int(raw)


def request_hash(body: JobCreate) -> str:
    data = body.model_dump(mode="json")
    for optional in ("webhook_url", "webhook_events"):  # absent: the same hash as before they existed
        if data.get(optional) is None:
            data.pop(optional, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _load(rt: Runtime, principal: Principal, job_id: str) -> Job:
    job = await rt.ledger.get(job_id) if len(job_id) <= 40 else None
    if job is None or job.tenant != principal.tenant:  # another tenant's job does not exist
        raise NotFound(f"no job {job_id!r}")
    return job


async def _public(rt: Runtime, job: Job, *, with_position: bool = False) -> JobPublic:
    assets = (await rt.ledger.assets([job.id]))[job.id] if job.status == JobStatus.succeeded else []
    position = None
    if with_position and job.status == JobStatus.queued:
        try:
            position = await queue_position(rt.redis, rt.settings, job.id, job.modality)
        except REDIS_DOWN:  # a hint only: the job itself is read from the database
            position = None
    return await job_public(rt.store, job, assets, rt.settings.url_ttl_seconds, position)


async def wait_for_terminal(rt: Runtime, job: Job, seconds: float) -> Job:
    """Hold until the job is terminal or `seconds` pass. Listens on the job's channel
    (where its events are published) and re-reads the row, which stays the truth."""
    if job.status in TERMINAL:
        return job
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pubsub = rt.redis.pubsub()
    terminal_heard = False
    try:
        try:
            await pubsub.subscribe(rt.ledger.channel(job.id))
        except REDIS_DOWN:  # no events to hear: the row alone, read every half second
            return await _poll_row(rt, job, deadline)
        while True:
            fresh = await rt.ledger.get(job.id)  # after subscribing: no change slips between
            if fresh is None or fresh.status in TERMINAL:
                return fresh or job
            job = fresh
            remaining = deadline - loop.time()
            if remaining <= 0:
                return job
            if terminal_heard:
                # events are published just before their row commits: read again shortly
                await asyncio.sleep(min(remaining, 0.02))
                continue
            # a missed message only costs a re-read every 2 s
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(remaining, 2.0))
            except REDIS_DOWN:
                return await _poll_row(rt, job, deadline)
            if msg is not None:
                try:
                    terminal_heard = Event.from_json(msg["data"]).terminal
                except (ValueError, KeyError, TypeError):
                    pass
    finally:
        with contextlib.suppress(*REDIS_DOWN):
            await pubsub.aclose()


async def check_webhook_url(rt: Runtime, url: str, *, loc: str) -> None:
    """Refuse at once a webhook URL the deliverer would refuse (scheme, private address)."""
    try:
        await netguard.resolve(url, netguard.networks(rt.settings.webhook_allowlist))
    except netguard.UnsafeURL as exc:
        raise InvalidInput(
            f"{loc} is not allowed: {exc}", details=[{"loc": [loc], "msg": str(exc), "type": "url_not_allowed"}]
        ) from exc


async def _poll_row(rt: Runtime, job: Job, deadline: float) -> Job:
    loop = asyncio.get_running_loop()
    while True:
        fresh = await rt.ledger.get(job.id)
        if fresh is None or fresh.status in TERMINAL:
            return fresh or job
        job = fresh
        remaining = deadline - loop.time()
        if remaining <= 0:
            return job
        await asyncio.sleep(min(remaining, 0.5))


def _status_for_wait(job: Job) -> int:
    return 200 if job.status in TERMINAL else 202


@router.post("", status_code=201, response_model=JobPublic)
async def create_job(
    body: JobCreate,
    rt: RuntimeDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
    prefer: Annotated[str | None, Header()] = None,
) -> JobPublic:
    wait = parse_prefer_wait(prefer, rt.settings.max_wait_seconds)
    job, created = await submit_job(rt, principal, body, idempotency_key=idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        response.status_code = 200
    if wait is not None:
        job = await wait_for_terminal(rt, job, wait)
        response.status_code = _status_for_wait(job)
        response.headers["Preference-Applied"] = f"wait={wait}"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await _public(rt, job)


async def submit_job(rt: Runtime, principal: Principal, body: JobCreate, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """The core of POST /v1/jobs, shared with the OpenAI-compatible facades: the key's
    scopes and rate (core/quotas.py), the input against the model, then one transaction
    inserts the job with its billing hold (402 when the budget cannot cover it), once per
    Idempotency-Key; it is enqueued after the commit. Returns the job and whether this
    call created it (False: a replay)."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    model = rt.catalog.get(body.model)
    if model is None:
        raise NotFound(f"unknown model {body.model!r}; GET /v1/models lists the models you can use", code="model_not_found")
    await admit(rt.ledger.quotas, principal, model.id, model.modality)
    normalized = rt.catalog.validate_input(model, body.input)
    if body.webhook_url is not None:
        await check_webhook_url(rt, body.webhook_url, loc="webhook_url")
    digest = request_hash(body)

    job: Job | None = None
    if idempotency_key is not None:
        job = await _by_idempotency_key(rt, principal.tenant, idempotency_key)
    if job is None:
        now = utcnow()
        job = Job(
            id=new_id("job"),
            tenant=principal.tenant,
            key_id=principal.key_id,
            model=model.id,
            modality=model.modality,
            input=normalized,
            meta=dict(body.metadata),
            status=JobStatus.queued.value,
            idempotency_key=idempotency_key,
            request_hash=digest,
            created_at=now,
            updated_at=now,
            deadline_at=deadline_for(now, rt.settings.deadline_seconds(model.modality)),
            webhook_url=body.webhook_url,
            webhook_events=list(body.webhook_events) if body.webhook_events is not None else None,
        )
        slot = principal.max_concurrency is not None and not principal.queue_when_busy
        if slot:  # this key refuses rather than queues: its slot is taken now (the worker renews it)
            await take_or_refuse(rt.ledger.quotas, principal, job.id)
        try:
            # one transaction: the INSERT and the hold; announces job.queued after the commit
            job = await rt.ledger.create(job, hold=hold_for(model, rt.catalog, normalized), budgeted=principal.budgeted)
        except IntegrityError:  # a concurrent request with the same key won the insert
            await _free(rt, principal, job.id, slot)
            job = await _by_idempotency_key(rt, principal.tenant, idempotency_key or "")
            if job is None:
                raise
        except BaseException:
            await _free(rt, principal, job.id, slot)
            raise
        else:
            # enqueue after the commit: a worker never sees a job the DB does not have
            return await _enqueue_created(rt, job), True
    if job.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request body; "
            "use a new key for a new job",
            code="idempotency_conflict",
            details={"job_id": job.id},
        )
    return job, False


QUEUE_DOWN = "waiting for the queue (Redis is unavailable); the job starts when it is back"


async def _enqueue_created(rt: Runtime, job: Job) -> Job:
    """Enqueue a committed job. The row is the truth: when Redis does not answer, the job
    stays queued, says so in its progress message, and the reconciler enqueues it once
    Redis is back. The client still gets its 201 (a 5xx here made clients retry into a
    second job and a second charge)."""
    try:
        await enqueue_run(rt.redis, rt.settings, job.id, job.modality)
        return job
    except REDIS_DOWN as exc:
        log.warning("job %s committed but not enqueued (%s: %s); the reconciler enqueues it when Redis is back",
                    job.id, type(exc).__name__, str(exc)[:200])
    noted = await rt.ledger.transition(job.id, JobStatus.queued, expect_version=job.version, progress_message=QUEUE_DOWN)
    return noted or job


async def queue_reachable(rt: Runtime) -> None:
    """Raise Unavailable (503, nothing created) when the queue does not answer: for the
    synchronous OpenAI-compatible routes, which must answer with the result, not a 201."""
    try:
        await rt.redis.ping()
    except REDIS_DOWN as exc:
        raise Unavailable("the job queue (Redis) is unavailable; nothing was created; retry shortly",
                          headers={"Retry-After": "1"}) from exc


async def _free(rt: Runtime, principal: Principal, lease_id: str, taken: bool) -> None:
    if taken and rt.ledger.quotas is not None:
        try:
            await rt.ledger.quotas.free(principal.key_id, lease_id)
        except REDIS_DOWN:  # the lease expires by itself
            log.warning("could not free key slot %s: Redis unavailable", lease_id)


async def _by_idempotency_key(rt: Runtime, tenant: str, key: str) -> Job | None:
    async with rt.sessions() as s:
        return (await s.exec(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))).first()


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str,
    rt: RuntimeDep,
    principal: PrincipalDep,
    response: Response,
    prefer: Annotated[str | None, Header()] = None,
) -> JobPublic:
    wait = parse_prefer_wait(prefer, rt.settings.max_wait_seconds)
    job = await _load(rt, principal, job_id)
    if wait is not None:
        job = await wait_for_terminal(rt, job, wait)
        response.status_code = _status_for_wait(job)
        response.headers["Preference-Applied"] = f"wait={wait}"
    return await _public(rt, job, with_position=True)


@router.get("/{job_id}/outputs/{index}", status_code=307, response_class=RedirectResponse)
async def get_output(
    job_id: str,
    index: Annotated[int, Path(ge=0, le=1000)],
    rt: RuntimeDep,
    principal: PrincipalDep,
    thumbnail: bool = False,
) -> RedirectResponse:
    """A fresh download URL for one output (the URLs in a job expire): 307 to it."""
    job = await _load(rt, principal, job_id)
    asset = next((a for a in (await rt.ledger.assets([job.id]))[job.id] if a.index == index), None)
    if asset is None:
        raise NotFound(f"job {job.id} has no output {index}" + ("" if job.status == JobStatus.succeeded else f" (it is {job.status})"))
    key = asset.thumbnail_key if thumbnail else asset.key
    if key is None:
        raise NotFound(f"output {index} of job {job.id} has no thumbnail")
    return RedirectResponse(await rt.store.url(key, expires_in=rt.settings.url_ttl_seconds), status_code=307)


@router.get("", response_model=JobList)
async def list_jobs(
    rt: RuntimeDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=40, description="next_cursor of the previous page")] = None,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
) -> JobList:
    q = select(Job).where(Job.tenant == principal.tenant)
    if status is not None:
        q = q.where(Job.status == status.value)
    if model:
        q = q.where(Job.model == model)
    rows, next_cursor = await page(rt.sessions, q, Job.id, cursor, limit)
    assets = await rt.ledger.assets([j.id for j in rows if j.status == JobStatus.succeeded])
    ttl = rt.settings.url_ttl_seconds
    data = [await job_public(rt.store, j, assets.get(j.id, []), ttl) for j in rows]
    return JobList(data=data, next_cursor=next_cursor)


@router.post("/{job_id}/cancel", response_model=JobPublic)
async def cancel(job_id: str, rt: RuntimeDep, principal: PrincipalDep) -> JobPublic:
    job = await _load(rt, principal, job_id)
    for _ in range(5):  # the job may move while we try; re-read and decide again
        if job.status in TERMINAL:  # canceled too: README promises 409 for every finished job
            raise Conflict(f"job {job.id} already {job.status}; only queued or running jobs can be canceled",
                           code="job_not_cancelable", details={"status": job.status})
        moved = await rt.ledger.transition(
            job.id, JobStatus.canceled, expect_version=job.version, error=(ErrorCode.canceled, "canceled by the client")
        )
        if moved is not None:
            if job.status == JobStatus.running:
                await enqueue_cancel(rt.redis, rt.settings, job.id, job.modality)
            return await _public(rt, moved)
        job = await _load(rt, principal, job_id)
    raise Conflict(f"job {job.id} kept changing; try the cancel again", code="job_busy")
