"""/v1/jobs: create (idempotent, optionally waiting), read, list, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api.deps import PrincipalDep, RuntimeDep
from api.job_query import JobFilter
from api.pagination import page
from api.params import check_provider_params
from api.strict import StrictRoute
from api.views import job_public
from core import cache, logs, netguard, priorities
from core.billing.ledger import hold_for
from core.billing.pricing import Cost
from core.errors import Conflict, ErrorCode, InvalidInput, InvalidRequest, NotFound, Unavailable
from core.events import OVERFLOW, Event, EventHub, Subscription
from core.ids import new_id
from core.jobs.ledger import TERMINAL, JobStatus, deadline_for
from core.jobs.queue import enqueue_cancel, enqueue_run, queue_position
from core.keys import Principal
from core.limits.keys import admit, take_or_refuse
from core.limits.waits import Position
from core.models import Asset, Job, utcnow
from core.outages import REDIS_DOWN
from core.routing.catalog import Model
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
    for optional in ("webhook_url", "webhook_events", "cache", "priority", "start_within_seconds"):
        # absent: the same hash as before they existed
        if data.get(optional) is None:
            data.pop(optional, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _load(rt: Runtime, principal: Principal, job_id: str) -> Job:
    job = await rt.ledger.get(job_id) if len(job_id) <= 40 else None
    # another tenant's job does not exist; an admin key (the operator) sees every tenant's
    if job is None or (job.tenant != principal.tenant and not principal.admin):
        raise NotFound(f"no job {job_id!r}")
    return job


async def _public(rt: Runtime, job: Job, *, with_position: bool = False) -> JobPublic:
    assets = (await rt.ledger.assets([job.id]))[job.id] if job.status == JobStatus.succeeded else []
    await rt.ledger.overlay([job])
    position, eta = None, None
    if with_position and job.status == JobStatus.queued:
        position, eta = await _position(rt, job)
    return await job_public(rt.store, job, assets, rt.settings.url_ttl_seconds, position, eta)


async def _position(rt: Runtime, job: Job) -> tuple[int | None, float | None]:
    """A waiting job's place: in the wait queues of the deployments (or key) it waits for,
    or will wait for once its run reaches them (they order by priority and submit time, not
    by arrival), else in the ARQ queue it has not been picked from yet."""
    model = rt.catalog.get(job.model)
    deployments = model.deployments if model else []
    gates = {f"d:{d.name}": d.limits.max_concurrency or 1 for d in deployments}
    limited = {f"d:{d.name}": d.limits.max_concurrency for d in deployments if d.limits.max_concurrency}
    try:
        pos = await rt.waits.position(job.id, gates)
        if pos is None and limited:  # not in a wait queue (yet, or handed a slot): where it stands there
            pos = await rt.waits.ahead_of(job.priority, job.created_at, limited) or Position(0, None)
        if pos is not None:
            return pos.ahead, pos.eta_seconds
        return await queue_position(rt.redis, rt.settings, job.id, rt.catalog.lane(job.model, job.modality)), None
    except REDIS_DOWN:  # a hint only: the job itself is read from the database
        return None, None


async def wait_for_terminal(rt: Runtime, job: Job, seconds: float) -> Job:
    """Hold until the job is terminal or `seconds` pass, listening on the job's channel
    through the process's one shared subscription (`rt.hub`); the row, read once more
    after the terminal event, stays the truth."""
    hub: EventHub | None = rt.hub
    if job.status in TERMINAL or hub is None or rt.ledger.events is None:
        return job
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    sub = Subscription(64)
    channel = rt.ledger.events.job_channel(job.id)
    try:
        await hub.add(channel, sub)
    except REDIS_DOWN:  # no events to hear: the row alone, read every half second
        return await _poll_row(rt, job, deadline)
    try:
        fresh = await rt.ledger.get(job.id)  # after subscribing: no change slips between
        while fresh is not None and fresh.status not in TERMINAL:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return fresh
            try:
                # a missed message costs one re-read every 5 s
                item = await asyncio.wait_for(sub.get(), min(remaining, 5.0))
            except TimeoutError:
                fresh = await rt.ledger.get(job.id)
                continue
            if item is OVERFLOW:
                fresh = await rt.ledger.get(job.id)
                continue
            try:
                terminal = Event.from_json(item).terminal
            except (ValueError, KeyError, TypeError):
                terminal = False
            if terminal:
                # published just before the row commits: read until the commit shows
                for _ in range(50):
                    fresh = await rt.ledger.get(job.id)
                    if fresh is None or fresh.status in TERMINAL:
                        break
                    await asyncio.sleep(0.02)
                break
        return fresh or job
    finally:
        await hub.remove(channel, sub)


async def check_webhook_url(rt: Runtime, url: str, *, loc: str) -> None:
    """Refuse at once a webhook URL the deliverer would refuse (scheme, private address)."""
    try:
        await netguard.resolve(url)
    except netguard.UnsafeURL as exc:
        raise InvalidInput(
            f"{loc} is not allowed: {exc}", details=[{"loc": [loc], "msg": str(exc), "type": "url_not_allowed"}]
        ) from exc


def check_input_urls(normalized: dict[str, Any]) -> None:
    """Input images and masks the worker will fetch: refused at once when the URL alone
    says it may not be fetched (scheme, credentials, an address literal in any spelling
    that is not global). Names are resolved by the worker's fetcher, not here: DNS has no
    place on the submit path."""
    refs: list[tuple[list[Any], Any]] = [(["input", "input_images", i], u) for i, u in enumerate(normalized.get("input_images") or [])]
    refs.append((["input", "image"], normalized.get("image")))
    refs.append((["input", "provider_params", "mask"], (normalized.get("provider_params") or {}).get("mask")))
    for loc, ref in refs:
        if not isinstance(ref, str) or ref.startswith("data:"):
            continue
        try:
            netguard.check_syntax_and_literal(ref)
        except netguard.UnsafeURL as exc:
            where = ".".join(str(p) for p in loc)
            raise InvalidInput(
                f"{where} is not allowed: {exc}", details=[{"loc": loc, "msg": str(exc), "type": "url_not_allowed"}]
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
    cancel_after: Annotated[str | None, Header(description="a duration (2s, 5m, 1h30m): cancel the job if not done by then")] = None,
) -> JobPublic:
    wait = parse_prefer_wait(prefer, rt.settings.max_wait_seconds)
    options = SubmitOptions(cancel_after=parse_duration(cancel_after, "Cancel-After") if cancel_after else None)
    job, created = await submit_job(rt, principal, body, idempotency_key=idempotency_key, options=options)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        response.status_code = 200
    if wait is not None:
        job = await wait_for_terminal(rt, job, wait)
        response.status_code = _status_for_wait(job)
        response.headers["Preference-Applied"] = f"wait={wait}"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await _public(rt, job)


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """What a job may carry besides its body: set by headers (Cancel-After) or by the door it
    came through (the Replicate routes' webhook format, a batch)."""

    cancel_after: float | None = None  # seconds from creation
    webhook_format: str | None = None  # "replicate": the job's webhook gets Replicate's bodies
    batch_id: str | None = None


@dataclass(slots=True)
class Prepared:
    """A validated request, ready to insert: the job row (not yet saved) and its hold."""

    job: Job
    hold: int
    digest: str
    slot: bool  # a concurrency slot was taken for it (free it if the insert does not happen)


DURATION = re.compile(r"^(?:(\d{1,5})h)?(?:(\d{1,7})m(?!s))?(?:(\d{1,9})s)?(?:(\d{1,9})ms)?$")
MAX_CANCEL_AFTER = 7 * 86400


def parse_duration(value: str, name: str) -> float:
    """Replicate's duration strings: "2s", "5m", "1h30m", "1500ms", or bare seconds."""
    v = value.strip().lower()
    if v.replace(".", "", 1).isdigit():
        seconds = float(v)
    else:
        m = DURATION.match(v)
        if not v or m is None or not any(m.groups()):
            raise InvalidRequest(f"{name} must be a duration like 30s, 5m or 1h30m, got {value[:40]!r}")
        h, mi, sec, ms = (int(x) if x else 0 for x in m.groups())
        seconds = h * 3600 + mi * 60 + sec + ms / 1000
    if not 1 <= seconds <= MAX_CANCEL_AFTER:
        raise InvalidRequest(f"{name} must be between 1 s and {MAX_CANCEL_AFTER // 86400} days, got {value[:40]!r}")
    return seconds


def wants_cache(body: JobCreate, principal: Principal, model: Model) -> bool:
    if body.cache is not None:
        return body.cache
    return model.cache or principal.cache_by_default


async def prepare_job(rt: Runtime, principal: Principal, body: JobCreate, *, idempotency_key: str | None,
                      options: SubmitOptions, take_slot: bool = True) -> Prepared:
    """Check one request (scopes and rate, the input against the model, the webhook URL)
    and build its job row. Raises the request's error; inserts nothing."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    model = rt.catalog.get(body.model)
    if model is None:
        raise NotFound(f"unknown model {body.model!r}; GET /v1/models lists the models you can use", code="model_not_found")
    await admit(rt.ledger.quotas, principal, model.id, model.modality)
    normalized = rt.catalog.validate_input(model, body.input)
    check_provider_params(rt.catalog, model, normalized.get("provider_params") or {}, loc=("input", "provider_params"))
    check_input_urls(normalized)
    if body.webhook_url is not None:
        await check_webhook_url(rt, body.webhook_url, loc="webhook_url")
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
        request_hash=request_hash(body),
        created_at=now,
        updated_at=now,
        deadline_at=deadline_for(now, rt.settings.deadline_seconds(model.modality)),
        webhook_url=body.webhook_url,
        webhook_events=list(body.webhook_events) if body.webhook_events is not None else None,
        webhook_format=options.webhook_format,
        cancel_after_at=now + timedelta(seconds=options.cancel_after) if options.cancel_after else None,
        start_by_at=now + timedelta(seconds=body.start_within_seconds) if body.start_within_seconds else None,
        priority=priorities.effective(body.priority, principal),
        batch_id=options.batch_id,
        cache_key=cache.cache_key(model.id, normalized),
        request_id=logs.request_id(),
    )
    logs.bind_here(job_id=job.id)  # the rest of this request's lines are the job's
    slot = take_slot and principal.max_concurrency is not None and not principal.queue_when_busy
    if slot:  # this key refuses rather than queues: its slot is taken now (the worker renews it)
        await take_or_refuse(rt.ledger.quotas, principal, job.id)
    hold = 0 if (wants_cache(body, principal, model) and job.cache_key) else hold_for(model, rt.catalog, normalized)
    return Prepared(job, hold, job.request_hash or "", slot)


async def submit_job(rt: Runtime, principal: Principal, body: JobCreate, *, idempotency_key: str | None = None,
                     options: SubmitOptions | None = None) -> tuple[Job, bool]:
    """The core of POST /v1/jobs, shared with the OpenAI- and Replicate-compatible doors:
    the key's scopes and rate (core/limits/keys.py), the input against the model, then one
    transaction inserts the job with its billing hold (402 when the budget cannot cover
    it), once per Idempotency-Key; it is enqueued after the commit. A cacheable request
    that hits the result cache (core/cache.py) is answered by a job already succeeded.
    Returns the job and whether this call created it (False: a replay)."""
    options = options or SubmitOptions()
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    found = await _by_idempotency_key(rt, principal.tenant, idempotency_key) if idempotency_key is not None else None
    if found is not None:
        return _replay(found, request_hash(body), idempotency_key), False
    prepared = await prepare_job(rt, principal, body, idempotency_key=idempotency_key, options=options)
    job = prepared.job
    model = rt.catalog.get(job.model)
    hit = None
    if model is not None and job.cache_key and wants_cache(body, principal, model):
        hit = await cache.find(rt.sessions, principal.tenant, job.cache_key, rt.settings.cache_ttl_seconds)
    if hit is None and prepared.hold == 0 and model is not None:  # cacheable but a miss: hold the price
        prepared.hold = hold_for(model, rt.catalog, job.input)
    try:
        # one transaction: the INSERT and the hold; announces job.queued after the commit
        if hit is not None:
            job.cached, job.cached_from = True, hit[0].id
        job = await rt.ledger.create(job, hold=prepared.hold, budgeted=principal.budgeted)
    except IntegrityError:  # a concurrent request with the same key won the insert
        await _free(rt, principal, job.id, prepared.slot)
        found = await _by_idempotency_key(rt, principal.tenant, idempotency_key or "")
        if found is None:
            raise
        return _replay(found, prepared.digest, idempotency_key), False
    except BaseException:
        await _free(rt, principal, job.id, prepared.slot)
        raise
    if hit is not None:
        return await _serve_cached(rt, job, hit[1]), True
    # enqueue after the commit: a worker never sees a job the DB does not have
    return await _enqueue_created(rt, job), True


async def _serve_cached(rt: Runtime, job: Job, source: list[Asset]) -> Job:
    """Finish a cache hit through the ledger like any job (queued → running → succeeded),
    so its events, webhooks and usage row are the ordinary ones; it costs nothing."""
    started = await rt.ledger.transition(job.id, JobStatus.running, expect_version=job.version,
                                         progress_message="served from the result cache")
    if started is None:  # canceled in the instant between: leave it so
        return await rt.ledger.get(job.id) or job
    done = await rt.ledger.transition(job.id, JobStatus.succeeded, expect_version=started.version,
                                      assets=cache.shared_assets(job.id, source), cost=Cost(0, "units"))
    return done or await rt.ledger.get(job.id) or started


def _replay(job: Job, digest: str, idempotency_key: str | None) -> Job:
    if job.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} was already used with a different request body; "
            "use a new key for a new job",
            code="idempotency_conflict",
            details={"job_id": job.id},
        )
    return job


QUEUE_DOWN = "waiting for the queue (Redis is unavailable); the job starts when it is back"


async def _enqueue_created(rt: Runtime, job: Job) -> Job:
    """Enqueue a committed job. The row is the truth: when Redis does not answer, the job
    stays queued, says so in its progress message, and the reconciler enqueues it once
    Redis is back. The client still gets its 201 (a 5xx here made clients retry into a
    second job and a second charge)."""
    try:
        await enqueue_run(rt.redis, rt.settings, job.id, rt.catalog.lane(job.model, job.modality), priority=job.priority)
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
    deployment: Annotated[str | None, Query(max_length=200, description="the deployment that ran it last")] = None,
    start: Annotated[datetime | None, Query(alias="from", description="created at or after (ISO 8601)")] = None,
    end: Annotated[datetime | None, Query(alias="to", description="created before (ISO 8601)")] = None,
    q: Annotated[str | None, Query(max_length=200, description="text in the prompt (case-insensitive)")] = None,
    tenant: Annotated[str | None, Query(max_length=100, description="admin keys only: this tenant's jobs, or * for all")] = None,
) -> JobList:
    """Newest first. Queued jobs carry their place in the queue (`queue_position`)."""
    filters = JobFilter(status, model, deployment, start, end, q, tenant).check()
    rows, next_cursor = await page(rt.sessions, filters.query(principal), Job.id, cursor, limit)
    assets = await rt.ledger.assets([j.id for j in rows if j.status == JobStatus.succeeded])
    await rt.ledger.overlay(rows)
    ttl = rt.settings.url_ttl_seconds
    data = []
    for j in rows:
        position, eta = await _position(rt, j) if j.status == JobStatus.queued else (None, None)
        data.append(await job_public(rt.store, j, assets.get(j.id, []), ttl, position, eta))
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
                try:
                    await enqueue_cancel(rt.redis, rt.settings, job.id, job.modality)
                except REDIS_DOWN as exc:  # the row says canceled: the reconciler sends the provider cancel
                    log.warning("job %s canceled but its provider cancel not enqueued (%s); the reconciler "
                                "enqueues it when Redis is back", job.id, type(exc).__name__)
            return await _public(rt, moved)
        job = await _load(rt, principal, job_id)
    raise Conflict(f"job {job.id} kept changing; try the cancel again", code="job_busy")
