"""GET /v1/admin/deployments: each deployment of the catalog with its health right now.

Two sources, one answer per deployment:

    Redis (core.limits.Limiter.snapshot, one round trip)   in flight, rate window, cooldown,
                                                           consecutive failures, unhealthy mark
    SQL usage_records of the last `window` seconds          provider calls tried there, how many
                                                           failed, and their latency (avg, p95)

The recent figures come from the attempts each finished job and chat call already records
(core/models.py UsageRecord.attempts: deployment, duration_ms, error), so the worker's hot
path writes nothing more for them. The read is bounded: the newest MAX_RECORDS rows of the
window; the answer says when it hit that bound (`sampled`).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlmodel import col, select

from api.deps import AdminDep, RuntimeDep
from core.models import UsageRecord
from core.routing.catalog import Deployment
from core.runtime import Runtime

router = APIRouter(prefix="/v1/admin", tags=["admin"])
MAX_RECORDS = 5000


class Recent(BaseModel):
    window_seconds: int
    calls: int
    errors: int
    error_rate: float | None  # errors / calls; None without calls
    latency_ms_avg: int | None
    latency_ms_p95: int | None
    errors_by_code: dict[str, int]
    sampled: bool  # the window held more than MAX_RECORDS rows: figures from the newest ones


class DeploymentHealth(BaseModel):
    name: str
    object: Literal["deployment"] = "deployment"
    models: list[str]  # catalog models routed to it
    provider: str
    provider_model: str
    limits: dict[str, int | None]
    in_flight: int
    requests_in_window: int
    tokens_in_window: int
    failures: int  # consecutive counted failures
    cooldown_until: datetime | None
    unhealthy: bool  # marked (bad key, gone model) until the catalog or the key changes
    status: Literal["ok", "cooling_down", "unhealthy"]
    recent: Recent


class DeploymentList(BaseModel):
    object: Literal["list"] = "list"
    catalog_version: str
    data: list[DeploymentHealth]


def _p95(values: list[int]) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def _recent(rt: Runtime, window: int) -> tuple[dict[str, dict[str, Any]], bool]:
    since = datetime.now(UTC) - timedelta(seconds=window)
    q = (select(UsageRecord.attempts).where(col(UsageRecord.created_at) >= since)
         .order_by(col(UsageRecord.created_at).desc()).limit(MAX_RECORDS + 1))
    async with rt.sessions() as s:
        rows = list((await s.exec(q)).all())
    sampled = len(rows) > MAX_RECORDS
    stats: dict[str, dict[str, Any]] = defaultdict(lambda: {"latency": [], "errors": defaultdict(int)})
    for attempts in rows[:MAX_RECORDS]:
        for a in attempts or []:
            if not isinstance(a, dict) or not isinstance(a.get("deployment"), str):
                continue
            st = stats[a["deployment"]]
            if isinstance(a.get("duration_ms"), int):
                st["latency"].append(a["duration_ms"])
            st.setdefault("calls", 0)
            st["calls"] += 1
            err = a.get("error")
            if isinstance(err, dict):
                st["errors"][str(err.get("code") or "unknown")] += 1
    return stats, sampled


@router.get("/deployments", response_model=DeploymentList)
async def deployments(
    rt: RuntimeDep,
    _: AdminDep,
    window: Annotated[int, Query(ge=60, le=86400, description="seconds of recent calls to sum")] = 900,
) -> DeploymentList:
    cat = rt.catalog
    by_name: dict[str, Deployment] = {}
    models: dict[str, list[str]] = defaultdict(list)
    for m in cat.models:
        for d in m.deployments:
            by_name.setdefault(d.name, d)
            models[d.name].append(m.id)
    deps = list(by_name.values())
    snap = await rt.limiter.snapshot(deps, catalog_version=cat.version)
    recent, sampled = await _recent(rt, window)
    data = []
    for d in deps:
        state = snap.states[d.name]
        st = recent.get(d.name, {"latency": [], "errors": {}})
        calls = int(st.get("calls", 0))
        errors = sum(st["errors"].values())
        latency: list[int] = st["latency"]
        cooling = state.cooldown_until is not None
        data.append(DeploymentHealth(
            name=d.name, models=models[d.name], provider=d.adapter, provider_model=d.model,
            limits=d.limits.model_dump(), in_flight=state.in_flight, requests_in_window=state.requests_in_window,
            tokens_in_window=state.tokens_in_window, failures=state.failures,
            cooldown_until=datetime.fromtimestamp(state.cooldown_until, UTC) if state.cooldown_until else None,
            unhealthy=state.unhealthy,
            status="unhealthy" if state.unhealthy else "cooling_down" if cooling else "ok",
            recent=Recent(
                window_seconds=window, calls=calls, errors=errors,
                error_rate=round(errors / calls, 4) if calls else None,
                latency_ms_avg=sum(latency) // len(latency) if latency else None,
                latency_ms_p95=_p95(latency), errors_by_code=dict(st["errors"]), sampled=sampled,
            ),
        ))
    return DeploymentList(catalog_version=cat.version, data=data)
