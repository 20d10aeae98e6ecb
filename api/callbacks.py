"""Provider webhooks: `POST /v1/callbacks/{provider}/{token}`.

The token names the job and proves we issued it (core.callbacks). The job's adapter
verifies the provider's signature (Standard Webhooks for Replicate, Ed25519 for fal,
HMAC for BFL). A final result is handed to the worker, which stores the outputs and
finishes the job exactly once; polling stays on as the fallback. Unverified or replayed
callbacks get 401 and leave the job untouched. An unsigned callback (GrsAi) is never a
result: its adapter answers PollNow, and the job's next poll is made due now.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from adapters.base import Adapter
from adapters.registry import UnknownAdapter
from api.deps import RuntimeDep
from api.strict import StrictRoute
from core.callbacks import callback_secret, dump_result, job_id_from_token
from core.errors import ProviderError, ProviderErrorKind, Unauthorized
from core.jobs.ledger import JobStatus
from core.types import Pending, PollNow

router = APIRouter(route_class=StrictRoute, tags=["callbacks"])

REPLAY_WINDOW_SECONDS = 900


@router.post("/v1/callbacks/{provider}/{token}")
async def receive_callback(provider: str, token: str, request: Request, rt: RuntimeDep) -> JSONResponse:
    s = rt.settings
    job_id = job_id_from_token(s.secret_key, token) if s.secret_key else None
    job = await rt.ledger.get(job_id) if job_id else None
    dep = rt.catalog.deployment(job.deployment) if job and job.deployment else None  # a fallback's too
    if job is None or dep is None or dep.adapter != provider:
        raise Unauthorized("unknown callback address")
    if job.status != JobStatus.running or job.provider_handle is None:
        return JSONResponse({"status": "ignored", "reason": f"job is {job.status}"})
    body = await request.body()
    try:
        # the process's one adapter per deployment: what it caches (an account's webhook
        # secret, a JWKS) is fetched once, not on every callback
        adapter: Adapter = rt.adapters.get(dep)
        result = await adapter.verify_callback(dict(request.headers), body, job.provider_handle, callback_secret(s.secret_key, job.id))
    except UnknownAdapter:
        raise Unauthorized("unknown callback address") from None
    except ProviderError as exc:
        if exc.kind is ProviderErrorKind.auth:
            raise Unauthorized(f"callback signature does not verify: {exc.message}") from None
        raise
    # A verified body seen before is a replay (providers re-send only what we did not 2xx).
    digest = hashlib.sha256(token.encode() + b"\n" + body).hexdigest()
    if not await rt.redis.set(f"{s.redis_prefix}:callback-seen:{digest}", "1", nx=True, ex=REPLAY_WINDOW_SECONDS):
        raise Unauthorized("callback already received (replay)")
    if result is None:
        return JSONResponse({"status": "ok"})
    if isinstance(result, PollNow):  # unsigned (GrsAi): never a result, only a reason to poll now
        await rt.polls.due_now(job.id, job.modality)
        return JSONResponse({"status": "accepted"}, status_code=202)
    if isinstance(result, Pending):
        await rt.ledger.transition(
            job.id,
            JobStatus.running,
            progress=result.progress if result.progress is not None else job.progress,
            progress_message=result.message,
            queue_position=result.queue_position,
        )
        return JSONResponse({"status": "ok"})
    # the job's next poll, due now, takes this result instead of asking the provider
    await rt.polls.kick(job.id, job.modality, dump_result(result))
    return JSONResponse({"status": "accepted"}, status_code=202)
