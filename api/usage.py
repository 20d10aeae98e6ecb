"""GET /v1/usage: what a tenant's keys did and what it cost, grouped by model, key or day.

Sums `usage_records` (one row per finished job and per chat call, core/models.py), so the
numbers are the same ones billing settled. A tenant key sees its own tenant; an admin key
may name any tenant with `tenant=`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from sqlalchemy import Date, case, cast, func
from sqlmodel import col, select

from api.deps import PrincipalDep, RuntimeDep
from api.strict import StrictRoute
from core.billing.ledger import balance
from core.errors import InvalidInput, NotFound
from core.models import Tenant, UsageRecord
from core.schemas import Balance, UsageGroup, UsageReport

router = APIRouter(route_class=StrictRoute, tags=["usage"])

MAX_RANGE_DAYS = 400


def _utc(v: datetime) -> datetime:
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


@router.get("/v1/usage", response_model=UsageReport)
async def usage(
    rt: RuntimeDep,
    principal: PrincipalDep,
    start: Annotated[datetime | None, Query(alias="from", description="ISO 8601; default: 30 days before `to`")] = None,
    end: Annotated[datetime | None, Query(alias="to", description="ISO 8601, exclusive; default: now")] = None,
    group_by: Literal["model", "key", "day"] = "model",
    tenant: Annotated[str | None, Query(max_length=100, description="admin keys only: whose usage")] = None,
) -> UsageReport:
    who = tenant or principal.tenant
    if who != principal.tenant and not principal.admin:
        raise NotFound(f"no tenant {who!r}")  # another tenant's usage does not exist for this key
    end = _utc(end) if end else datetime.now(UTC)
    start = _utc(start) if start else end - timedelta(days=30)
    if start >= end:
        raise InvalidInput("`from` must be before `to`", details=[{"loc": ["query", "from"], "msg": "after `to`", "type": "range"}])
    if end - start > timedelta(days=MAX_RANGE_DAYS):
        raise InvalidInput(f"the range may span at most {MAX_RANGE_DAYS} days; ask for several ranges",
                           details=[{"loc": ["query", "from"], "msg": "range too long", "type": "range"}])

    u = UsageRecord
    async with rt.sessions() as s:
        row = await s.get(Tenant, who)
        if row is None and who != principal.tenant:
            raise NotFound(f"no tenant {who!r}")
        if group_by == "model":
            key: Any = u.model
        elif group_by == "key":
            key = u.key_id
        elif s.get_bind().dialect.name == "postgresql":
            key = cast(func.timezone("UTC", u.created_at), Date)
        else:
            key = func.date(u.created_at)

        def status(name: str) -> Any:
            return func.sum(case((col(u.status) == name, 1), else_=0))

        columns = (
            func.count(),
            status("succeeded"),
            status("failed"),
            status("canceled"),
            status("incomplete"),
            func.coalesce(func.sum(u.duration_ms), 0),
            func.coalesce(func.sum(u.prompt_tokens), 0),
            func.coalesce(func.sum(u.completion_tokens), 0),
            func.coalesce(func.sum(u.cost), 0),
        )
        where = (col(u.tenant) == who, col(u.created_at) >= start, col(u.created_at) < end)
        rows = (await s.exec(select(key, *columns).where(*where).group_by(key).order_by(key))).all()  # type: ignore[call-overload]  # sqlmodel: no overload for this many columns
        spent, held = await balance(s, row) if row is not None else (0, 0)
    data = [_group(str(r[0]) if r[0] is not None else None, r[1:]) for r in rows]
    total = _group(None, [sum(int(r[i] or 0) for r in rows) for i in range(1, len(columns) + 1)])
    budget = row.budget if row is not None else None
    report_balance = Balance(budget=budget, spent=spent, held=held, available=None if budget is None else budget - spent - held)
    return UsageReport(tenant=who, start=start, end=end, group_by=group_by, data=data, total=total, balance=report_balance)


def _group(group: str | None, v: Any) -> UsageGroup:
    n, ok, failed, canceled, incomplete, duration, prompt, completion, cost = (int(x or 0) for x in v)
    return UsageGroup(
        group=group, requests=n, succeeded=ok, failed=failed, canceled=canceled, incomplete=incomplete,
        duration_ms_total=duration, duration_ms_avg=duration // n if n else 0,
        prompt_tokens=prompt, completion_tokens=completion, cost=cost,
    )
