"""Table rows -> public JSON (core.schemas), with download URLs made per read."""

from __future__ import annotations

from typing import Any

from core.disclosure import without_private
from core.jobs.ledger import charged
from core.models import Asset, Job
from core.schemas import AssetPublic, AttemptPublic, CostPublic, ErrorPublic, JobPublic, ProgressPublic


async def asset_public(store: Any, asset: Asset, ttl: int) -> AssetPublic:
    return AssetPublic(
        index=asset.index,
        url=await store.url(asset.key, expires_in=ttl),
        content_type=asset.content_type,
        bytes=asset.bytes,
        sha256=asset.sha256,
        width=asset.width,
        height=asset.height,
        duration_seconds=asset.duration_seconds,
        thumbnail_url=await store.url(asset.thumbnail_key, expires_in=ttl) if asset.thumbnail_key else None,
    )


async def job_public(store: Any, job: Job, assets: list[Asset], ttl: int, queue_position: int | None = None,
                     eta_seconds: float | None = None, *, operator: bool = False) -> JobPublic:
    """`operator`: the admin view, with the provider's own error words (core/disclosure.py)."""
    return JobPublic(
        id=job.id,
        tenant=job.tenant,
        model=job.model,
        modality=job.modality,
        status=job.status,
        input=job.input,
        metadata=job.meta,
        progress=ProgressPublic(fraction=job.progress, message=job.progress_message),
        queue_position=queue_position if queue_position is not None else job.queue_position,
        eta_seconds=round(eta_seconds, 1) if eta_seconds is not None else None,
        outputs=[await asset_public(store, a, ttl) for a in assets],
        error=ErrorPublic(code=job.error_code, message=job.error_message or "",
                          details=job.error_detail if operator else without_private(job.error_detail))
        if job.error_code
        else None,
        deployment=job.deployment,
        attempt=job.attempt,
        attempts=[AttemptPublic.model_validate(a) for a in job.attempts or []],
        idempotency_key=job.idempotency_key,
        cost=_cost(job),
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        deadline_at=job.deadline_at,
        cancel_after_at=job.cancel_after_at,
        start_by_at=job.start_by_at,
        priority=job.priority or "normal",
        batch_id=job.batch_id,
        cached=job.cached,
        cached_from=job.cached_from,
    )


def _cost(job: Job) -> CostPublic | None:
    if job.cost_held is None:
        return None
    if job.cost_settled is None:
        return CostPublic(status="held", held=job.cost_held)
    return CostPublic(status="settled" if charged(job) else "released", held=job.cost_held, settled=job.cost_settled)
