"""The result cache (opt-in): an identical seeded request is answered by an earlier job's outputs.

    submit(cache, seed) ─► cache_key(model, input) ─► newest succeeded job of the SAME tenant
                            with that key, finished within cache_ttl_seconds
        hit  ─► a new job: queued → running → succeeded through the ledger (events, webhooks,
                usage row as any job), cached=true, cached_from=<source>, hold 0, settled 0;
                its Asset rows name the source's blobs (same key, same sha256): one blob, stored once
        miss ─► an ordinary job; it carries the key, so later identical requests can hit it

Only requests with an explicit `seed` are cacheable: without one, two runs are meant to
differ. The key covers the catalog model and the whole normalized input (provider_params
included: they reach the provider), never the tenant's key or metadata; the lookup is
always scoped by tenant, so one tenant is never served another's outputs.

Blobs are never deleted by genroute (no code path calls BlobStore.delete on outputs), so an
output stays stored while any job references it. A future retention sweep must delete a
blob only when no Asset row names its key.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlmodel import col, select

from core.db import Sessions
from core.models import Asset, Job, utcnow


def cache_key(model_id: str, normalized_input: dict[str, Any]) -> str | None:
    """The cache key of a request, or None when it has no explicit seed (not cacheable)."""
    if normalized_input.get("seed") is None:
        return None
    canonical = json.dumps({"model": model_id, "input": normalized_input}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def find(sessions: Sessions, tenant: str, key: str, ttl_seconds: int) -> tuple[Job, list[Asset]] | None:
    """The newest job of `tenant` with `key` that ran and succeeded inside the TTL, and its
    outputs. Cached jobs are never sources: a hit names the job that made the outputs, and
    the TTL counts from when they were made (a hit does not renew it)."""
    since = utcnow() - timedelta(seconds=ttl_seconds)
    async with sessions() as s:
        q = (
            select(Job)
            .where(Job.tenant == tenant, Job.cache_key == key, Job.status == "succeeded", col(Job.cached).is_(False),
                   col(Job.finished_at) >= since)
            .order_by(col(Job.finished_at).desc())
            .limit(1)
        )
        job = (await s.exec(q)).first()
        if job is None:
            return None
        assets = list((await s.exec(select(Asset).where(Asset.job_id == job.id).order_by(col(Asset.index)))).all())
    return (job, assets) if assets else None


def shared_assets(job_id: str, source: list[Asset]) -> list[Asset]:
    """New Asset rows for `job_id` naming the same stored blobs as `source` (no copy is made)."""
    now = utcnow()
    return [
        Asset(job_id=job_id, index=a.index, key=a.key, content_type=a.content_type, bytes=a.bytes, sha256=a.sha256,
              width=a.width, height=a.height, duration_seconds=a.duration_seconds, thumbnail_key=a.thumbnail_key,
              created_at=now)
        for a in source
    ]
