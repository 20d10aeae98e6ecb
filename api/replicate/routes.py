"""The Replicate-compatible endpoints (paths as the official client calls them, under /replicate).

    POST /replicate/v1/predictions                          {"version": hex | owner/name[:hex], "input", "webhook", ...}
    POST /replicate/v1/models/{owner}/{name}/predictions    {"input", "webhook", "webhook_events_filter"}
    POST /replicate/v1/deployments/{owner}/{name}/predictions
    GET  /replicate/v1/predictions  (cursor pages: {next, previous, results})
    GET  /replicate/v1/predictions/{id}      POST /replicate/v1/predictions/{id}/cancel
    GET  /replicate/v1/predictions/{id}/stream  (SSE: output, logs, error, done)
    GET  /replicate/v1/models/{owner}/{name}[/versions[/{id}]]
    GET  /replicate/v1/webhooks/default/secret  -> {"key": "whsec_..."}

`owner/name` is a catalog alias (core/routing/catalog.py `aliases`) or `genroute/<model id>`, so every
catalog model of every provider is reachable. Headers: `Prefer: wait[=N]` holds the create
until the prediction ends or N s pass (then it answers `starting`, which makes
`replicate.run` fall back to polling, as against Replicate); `Cancel-After: 2m` cancels a
prediction not finished by then (workers/deadlines.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import select

from api import jobs as jobs_api
from api.deps import PrincipalDep, RuntimeDep, WebhookManagerDep
from api.events import PING, follow_job
from api.pagination import page
from api.replicate.errors import ReplicateRoute
from api.replicate.inputs import to_job_input
from api.streams import Revoked, until_ended
from core import predictions
from core.errors import InvalidInput, NotFound
from core.events import Event
from core.jobs.ledger import TERMINAL
from core.keys import Principal
from core.models import Job
from core.routing.catalog import Model
from core.runtime import Runtime
from core.schemas import INPUT_SCHEMAS, JobCreate
from core.webhooks import secret_box, tenant_secret

router = APIRouter(prefix="/replicate/v1", route_class=ReplicateRoute, tags=["replicate"])

FilterEvent = Literal["start", "output", "logs", "completed"]


class PredictionCreate(BaseModel):
    """Replicate's create body (unknown fields are ignored, as Replicate does)."""

    model_config = ConfigDict(extra="ignore")

    version: Annotated[str, Field(min_length=1, max_length=300)] | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    webhook: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    webhook_completed: Annotated[str, Field(min_length=1, max_length=2000)] | None = None
    webhook_events_filter: list[FilterEvent] | None = Field(default=None, max_length=4)
    stream: bool | None = None


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/replicate"


def _model(rt: Runtime, owner: str, name: str) -> Model:
    """`owner/name`: a catalog alias or id, or `genroute/<id>` for any catalog model."""
    ref = f"{owner}/{name}"
    model = rt.catalog.get(ref) or (rt.catalog.get(name) if owner == "genroute" else None)
    if model is None:
        raise NotFound(f"Model not found: {ref}", code="model_not_found")
    return model


def _by_version(rt: Runtime, version: str) -> Model:
    """`owner/name:version`, `owner/name`, or a bare version id (predictions.version_id)."""
    ref = version.split(":", 1)[0]
    if "/" in ref:
        owner, _, name = ref.partition("/")
        return _model(rt, owner, name)
    found = next((m for m in rt.catalog.models if predictions.version_id(m.id) == version), None)
    if found is None:
        raise InvalidInput(f"Invalid version or not permitted: {version[:80]}", code="version_not_found")
    return found


async def _render(rt: Runtime, job: Job, base: str, *, status: str | None = None, with_logs: bool = True) -> dict[str, Any]:
    return await predictions.render(rt, job, base, status=status, with_logs=with_logs)


async def _create(rt: Runtime, principal: Principal, request: Request, response: Response, model: Model,
                  body: PredictionCreate, prefer: str | None, cancel_after: str | None,
                  idempotency_key: str | None) -> dict[str, Any]:
    wait = jobs_api.parse_prefer_wait(prefer, rt.settings.max_wait_seconds)
    url = body.webhook or body.webhook_completed
    filters = body.webhook_events_filter or (["completed"] if body.webhook is None and body.webhook_completed else None)
    job_body = JobCreate(
        model=model.id,
        input=to_job_input(model.modality, body.input),
        webhook_url=url,
        webhook_events=predictions.webhook_events(filters) if url else None,
    )
    options = jobs_api.SubmitOptions(
        cancel_after=jobs_api.parse_duration(cancel_after, "Cancel-After") if cancel_after else None,
        webhook_format=predictions.FORMAT if url else None,
    )
    job, _ = await jobs_api.submit_job(rt, principal, job_body, idempotency_key=idempotency_key, options=options)
    shown: str | None = None
    if wait is not None:
        job = await jobs_api.wait_for_terminal(rt, job, wait)
        if job.status not in TERMINAL:
            shown = "queued"  # Replicate answers `starting` when the wait ran out: the client then polls
        response.headers["Preference-Applied"] = f"wait={wait}"
    base = _base(request)
    response.status_code = 201
    response.headers["Location"] = f"{base}/v1/predictions/{job.id}"
    return await _render(rt, job, base, status=shown)


@router.post("/predictions", status_code=201)
async def create_prediction(
    body: PredictionCreate, request: Request, response: Response, rt: RuntimeDep, principal: PrincipalDep,
    prefer: Annotated[str | None, Header()] = None,
    cancel_after: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    if not body.version:
        raise InvalidInput("version is required (owner/name, owner/name:version or a version id)", code="invalid_input")
    return await _create(rt, principal, request, response, _by_version(rt, body.version), body, prefer, cancel_after,
                         idempotency_key)


@router.post("/models/{owner}/{name}/predictions", status_code=201)
@router.post("/deployments/{owner}/{name}/predictions", status_code=201)
async def create_model_prediction(
    owner: str, name: str, body: PredictionCreate, request: Request, response: Response, rt: RuntimeDep,
    principal: PrincipalDep,
    prefer: Annotated[str | None, Header()] = None,
    cancel_after: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    return await _create(rt, principal, request, response, _model(rt, owner, name), body, prefer, cancel_after,
                         idempotency_key)


async def _load(rt: Runtime, principal: Principal, pid: str) -> Job:
    job = await rt.ledger.get(pid) if len(pid) <= 40 else None
    if job is None or job.tenant != principal.tenant:
        raise NotFound(f"Prediction not found: {pid[:60]}")
    return job


@router.get("/predictions/{pid}")
async def get_prediction(pid: str, request: Request, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    return await _render(rt, await _load(rt, principal, pid), _base(request))


@router.post("/predictions/{pid}/cancel")
async def cancel_prediction(pid: str, request: Request, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    job = await _load(rt, principal, pid)
    if job.status not in TERMINAL:  # a finished prediction comes back unchanged, as on Replicate
        await jobs_api.cancel(pid, rt, principal)
        job = await _load(rt, principal, pid)
    return await _render(rt, job, _base(request))


@router.get("/predictions")
async def list_predictions(
    request: Request, rt: RuntimeDep, principal: PrincipalDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> dict[str, Any]:
    """Newest first, `replicate_page_size` (100, as Replicate) a page; `next` is the URL of the next page."""
    q = select(Job).where(Job.tenant == principal.tenant)
    rows, next_cursor = await page(rt.sessions, q, Job.id, cursor, rt.settings.replicate_page_size)
    base = _base(request)
    results = [await _render(rt, j, base, with_logs=False) for j in rows]
    return {"previous": None, "next": f"{base}/v1/predictions?cursor={next_cursor}" if next_cursor else None,
            "results": results}


@router.get("/predictions/{pid}/stream")
async def stream_prediction(pid: str, request: Request, rt: RuntimeDep, principal: PrincipalDep) -> StreamingResponse:
    """Replicate's SSE stream: `logs` per progress message, `output` per output URL, then
    `error` (failed) and `done` (`{"reason": "canceled"}` when canceled)."""
    await _load(rt, principal, pid)
    hub = request.app.state.event_hub
    guard = request.app.state.streams

    async def body() -> AsyncIterator[str]:
        # follow_job is an async generator (typed as its iterator): until_ended owns it, aclosing ends both
        try:
            with guard.watch(principal) as watch:  # a revoked key ends the stream (api/streams.py)
                items = until_ended(follow_job(rt, hub, principal.tenant, pid, (0, 0)), watch)  # every event, from the first
                async with contextlib.aclosing(items):
                    async for item in items:
                        if item is PING:
                            yield ": ping\n\n"
                        elif isinstance(item, Event):
                            async for line in _sse(rt, item):
                                yield line
        except Revoked as exc:
            yield f"event: error\ndata: unauthorized: {exc.reason}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


COMMIT_WAIT_SECONDS = 10.0  # how long a stream waits for the commit of an event it just read


async def _committed(rt: Runtime, ev: Event) -> Job | None:
    """A job's terminal events are published just before its row commits (core/jobs/ledger.py:
    published while the row is locked): read until the commit shows, so the stream's output
    URLs exist and a client that reads the prediction after `done` finds it finished."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COMMIT_WAIT_SECONDS
    while True:
        job = await rt.ledger.get(ev.job_id)
        if job is None or job.status in TERMINAL or loop.time() >= deadline:
            return job
        await asyncio.sleep(0.02)


async def _sse(rt: Runtime, ev: Event) -> AsyncIterator[str]:
    if ev.type in ("job.progress", "job.started") and ev.data.get("message"):
        yield f"event: logs\nid: {ev.id}\ndata: {ev.data['message']}\n\n"
        return
    if ev.terminal or ev.type == "job.output":
        await _committed(rt, ev)
    if ev.type == "job.output":
        assets = (await rt.ledger.assets([ev.job_id]))[ev.job_id]
        asset = next((a for a in assets if a.index == ev.data.get("index")), None)
        url = await rt.store.url(asset.key, expires_in=rt.settings.url_ttl_seconds) if asset else ""
        yield f"event: output\nid: {ev.id}\ndata: {url}\n\n"
    elif ev.type == "job.failed":
        yield f"event: error\nid: {ev.id}\ndata: {(ev.data.get('error') or {}).get('message') or 'failed'}\n\n"
        yield "event: done\ndata: {}\n\n"
    elif ev.type == "job.canceled":
        yield 'event: done\ndata: {"reason":"canceled"}\n\n'
    elif ev.type == "job.succeeded":
        yield "event: done\ndata: {}\n\n"


def _model_object(m: Model, base: str) -> dict[str, Any]:
    owner, _, name = m.replicate_name.partition("/")
    return {
        "url": f"{base}/v1/models/{owner}/{name}", "owner": owner, "name": name, "description": m.description,
        "visibility": "private", "github_url": None, "paper_url": None, "license_url": None, "run_count": 0,
        "cover_image_url": None, "default_example": None, "latest_version": _version_object(m),
    }


def _version_object(m: Model) -> dict[str, Any]:
    schema = INPUT_SCHEMAS[m.modality].model_json_schema() if m.modality in INPUT_SCHEMAS else {}
    return {"id": predictions.version_id(m.id), "created_at": "2026-01-01T00:00:00Z", "cog_version": "0.10.0",
            "openapi_schema": {"components": {"schemas": {"Input": schema, "Output": {"type": "string", "format": "uri"}}}}}


@router.get("/models/{owner}/{name}")
async def get_model(owner: str, name: str, request: Request, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    return _model_object(_model(rt, owner, name), _base(request))


@router.get("/models/{owner}/{name}/versions")
async def list_versions(owner: str, name: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"previous": None, "next": None, "results": [_version_object(_model(rt, owner, name))]}


@router.get("/models/{owner}/{name}/versions/{version}")
async def get_version(owner: str, name: str, version: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Any version id of a catalog model answers with its one version: the catalog decides what runs."""
    return _version_object(_model(rt, owner, name))


@router.get("/webhooks/default/secret")
async def webhook_secret(rt: RuntimeDep, principal: WebhookManagerDep) -> dict[str, str]:
    """The key Replicate-style webhooks are signed with (the tenant's, as for every webhook)."""
    return {"key": (await tenant_secret(rt.sessions, principal.tenant, secret_box(rt.settings))).secret}
