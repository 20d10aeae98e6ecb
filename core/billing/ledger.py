"""Billing by outcome: hold on submit, settle on success, release on failure.

    submit ──► hold(estimate) ── the budget check and the hold: one conditional UPDATE
       │        (402 budget_exceeded when budget − spent − held < estimate)
       ▼
    work ends ──► succeeded: settle(actual cost)          ── in the terminal transition's
              ├─► failed / moderated / timeout: release   ── own transaction (core/jobs/ledger.py),
              └─► canceled: release before the provider      so it happens exactly once
                  took the task; settle the hold after

Money is integer micro-USD. `billing_entries` is append-only (hold, settle, release per
subject, unique per kind): the truth, which `audit` and `ledger_sums` add up.

A tenant with a budget also keeps the sums on its row (`spent`, `held`), changed by the
same transactions as its entries: the budget check is then one conditional UPDATE, and
concurrent holds serialize on that row, so none can overdraw. A tenant without a budget
keeps no sums (its balance is added up from the entries when asked): its holds and settles
only take a *shared* lock on its row, which they do not wait on each other for, so its
submits never queue behind one another. Setting or removing a budget takes the row's
exclusive lock (waiting for every transaction that holds a shared one), recomputes the
sums from the entries and only then commits: from that moment every hold is counted.

A settle above its hold is charged as it is (exact cost; the hold is an upper bound, so
this only happens when a provider reports more than the price table predicts); `overrun`
in the settle's basis says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, literal, update
from sqlalchemy.orm import aliased
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core import metrics
from core.billing.pricing import estimate_cost
from core.billing.tenants import UNSET, check_budget, ensure_tenant, valid_tenant_id
from core.db import Sessions
from core.errors import BudgetExceeded, InvalidInput
from core.models import BillingEntry, Tenant, table_of, utcnow
from core.routing.catalog import Catalog, Model
from core.routing.router import reachable

ENTRIES = table_of(BillingEntry)


def hold_for(model: Model, catalog: Catalog | None, request: Mapping[str, Any]) -> int:
    """What to hold for `request`: the dearest estimate among the deployments that may serve
    it, fallbacks included, so whichever one runs it the hold covers the price."""
    return max(
        (estimate_cost(d.price, model.modality, request) for d in reachable(model, catalog) if d.price is not None),
        default=0,
    )


def usd(micros: int | None) -> str:
    return "n/a" if micros is None else f"${micros / 1_000_000:,.6f}".rstrip("0").rstrip(".")


async def _apply(s: AsyncSession, tenant: str, *, held: int, spent: int, need: int = 0, budgeted: bool = True) -> None:
    """Change a budgeted tenant's sums by (held, spent), refusing when `need` does not fit;
    for a tenant without a budget only share-lock its row, so a concurrent budget change
    waits for this transaction (and then counts what it wrote). `budgeted` is a hint of
    which to try first; a wrong hint costs a round trip, never a wrong result. Neither
    statement locks a row its WHERE leaves out, so a wrong first try holds nothing."""
    t = Tenant
    for _ in range(4):
        if budgeted:
            stmt = update(t).where(col(t.id) == tenant, col(t.budget).is_not(None))
            if need > 0:
                stmt = stmt.where(col(t.budget) - col(t.spent) - col(t.held) >= need)
            stmt = stmt.values(held=col(t.held) + held, spent=col(t.spent) + spent, updated_at=utcnow()).returning(col(t.id))
            stmt = stmt.execution_options(synchronize_session=False)  # no ORM bookkeeping: a third of its CPU
            if (await s.exec(stmt)).first() is not None:
                return
        unbudgeted = select(t.id).where(col(t.id) == tenant, col(t.budget).is_(None)).with_for_update(read=True)
        if (await s.exec(unbudgeted)).first() is not None:
            return  # the shared lock stays to the end of the transaction
        row = (await s.exec(select(t.budget, t.spent, t.held).where(t.id == tenant))).first()
        if row is None:  # a tenant named before tenants had rows: give it one
            await ensure_tenant(s, tenant)
        elif need > 0 and row[0] is not None and row[0] - row[1] - row[2] < need:
            budget, spent_, held_ = row
            available = budget - spent_ - held_
            metrics.refused("budget_exceeded")
            raise BudgetExceeded(
                f"tenant {tenant!r} has {usd(max(available, 0))} of its {usd(budget)} budget left "
                f"({usd(spent_)} spent, {usd(held_)} held by unfinished work); this request holds up to "
                f"{usd(need)}. Raise the budget (PATCH /v1/admin/tenants/{tenant}) or wait for running work to settle.",
                details={"budget": budget, "spent": spent_, "held": held_, "available": available, "required": need},
            )
        budgeted = True  # it has a budget (set meanwhile, or the hold fits now): try the UPDATE again
    raise RuntimeError(f"tenant {tenant!r}: its budget kept changing under a hold; try again")


async def hold(
    s: AsyncSession, *, tenant: str, key_id: str | None, subject_id: str, amount: int, model: str | None,
    budgeted: bool = True,
) -> None:
    """Hold `amount` against the tenant's budget inside the caller's transaction, or raise
    BudgetExceeded (the caller rolls back). Call it last before the commit: the caller's
    pending rows are flushed first (an IntegrityError comes before any lock), so a budgeted
    tenant's row is locked only for the UPDATE and the commit."""
    await s.flush()
    entry = {"tenant": tenant, "key_id": key_id, "subject_id": subject_id, "kind": "hold", "amount": amount,
             "model": model, "created_at": utcnow()}
    if amount > 0 and not budgeted:
        # the common case in one statement: the entry is written only if the tenant has no
        # budget, and that row is share-locked by the same statement (see _apply)
        t = Tenant
        src = select(*(literal(v, ENTRIES.c[k].type) for k, v in entry.items()))
        src = src.where(col(t.id) == tenant, col(t.budget).is_(None)).with_for_update(read=True)
        done = await s.exec(insert(ENTRIES).from_select(list(entry), src))
        if done.rowcount == 1:
            return
    await s.exec(insert(ENTRIES).values(**entry))  # Core: a third of the ORM's CPU
    if amount > 0:
        await _apply(s, tenant, held=amount, spent=0, need=amount, budgeted=True)


@dataclass(frozen=True, slots=True)
class Close:
    """The end of one subject's hold: `settle` charged (None: released, nothing charged)."""

    tenant: str
    key_id: str | None
    subject_id: str
    held: int  # what its hold took (0 when it held nothing)
    settle: int | None
    basis: str | None = None
    model: str | None = None
    deployment: str | None = None


async def close(s: AsyncSession, closes: Iterable[Close]) -> None:
    """Settle or release holds inside the caller's transaction: one entry each, and one
    statement per tenant for the sums (a batch of chat calls costs one per tenant)."""
    rows: list[dict[str, Any]] = []
    deltas: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # tenant -> [held, spent]
    now = utcnow()
    for c in closes:
        settled = c.settle is not None
        basis = c.basis
        if c.settle is not None and c.settle > c.held > 0:
            basis = f"{basis or 'cost'}; overrun"
        rows.append(
            dict(tenant=c.tenant, key_id=c.key_id, subject_id=c.subject_id, kind="settle" if settled else "release",
                 amount=c.settle if settled else c.held, model=c.model, deployment=c.deployment, basis=basis, created_at=now)
        )
        deltas[c.tenant][0] += c.held
        deltas[c.tenant][1] += c.settle or 0
    if not rows:
        return
    await s.flush()  # the caller's pending rows first: a budgeted tenant's row is locked from here to the commit
    await s.exec(insert(ENTRIES), params=rows)
    for tenant, (held, spent) in deltas.items():
        if held or spent:
            await _apply(s, tenant, held=-held, spent=spent)


async def ledger_sums(s: AsyncSession, tenant: str) -> tuple[int, int]:
    """(spent, held) added up from the tenant's entries: spent is the sum of settles; held
    the sum of holds whose subject has neither a settle nor a release yet."""
    e = BillingEntry
    closed = select(e.subject_id).where(col(e.tenant) == tenant, col(e.kind).in_(["settle", "release"]))
    spent = (await s.exec(select(func.coalesce(func.sum(e.amount), 0)).where(e.tenant == tenant, e.kind == "settle"))).one()
    held = (
        await s.exec(
            select(func.coalesce(func.sum(e.amount), 0)).where(
                col(e.tenant) == tenant, col(e.kind) == "hold", col(e.subject_id).not_in(closed)
            )
        )
    ).one()
    return int(spent), int(held)


async def balance(s: AsyncSession, row: Tenant) -> tuple[int, int]:
    """(spent, held) of a tenant: its row's sums when it has a budget, else its entries'."""
    return (row.spent, row.held) if row.budget is not None else await ledger_sums(s, row.id)


async def set_budget(s: AsyncSession, tenant: str, budget: int | None) -> bool:
    """Set (or remove, with None) a budget inside the caller's transaction: lock the row
    exclusively (every hold or settle in flight commits first), recompute the sums from the
    entries, write them with the budget. False when there is no such tenant."""
    # a write first: the row's exclusive lock on PostgreSQL, the database's write lock on
    # SQLite (whose reads would otherwise see a snapshot from before a hold in flight)
    locked = update(Tenant).where(col(Tenant.id) == tenant).values(updated_at=utcnow()).returning(col(Tenant.id))
    if (await s.exec(locked)).first() is None:
        return False
    spent, held = await ledger_sums(s, tenant)
    await s.exec(
        update(Tenant).where(col(Tenant.id) == tenant).values(budget=budget, spent=spent, held=held, updated_at=utcnow())
    )
    return True


@dataclass(frozen=True, slots=True)
class Audit:
    tenant: str
    spent: int  # as stored on the tenant row
    held: int
    ledger_spent: int  # recomputed from billing_entries
    ledger_held: int

    @property
    def ok(self) -> bool:
        return self.spent == self.ledger_spent and self.held == self.ledger_held


async def audit(s: AsyncSession, tenant: str) -> Audit:
    """Recompute a tenant's sums from its entries and compare them with its row (a tenant
    without a budget keeps no sums on its row: its row is taken as agreeing)."""
    spent, held = await ledger_sums(s, tenant)
    row = await s.get(Tenant, tenant)
    if row is None or row.budget is None:
        return Audit(tenant, spent, held, spent, held)
    return Audit(tenant, row.spent, row.held, spent, held)


async def release_stale_holds(
    s: AsyncSession, *, prefix: str, older_than: timedelta, window: timedelta = timedelta(days=1), limit: int = 1000
) -> int:
    """Release holds of inline calls (`prefix`: their subject ids' prefix) that never closed:
    the API process died between the hold and the end of the call. Only holds made in the
    `window` before `older_than` are looked at (the reconciler runs every few seconds, so
    older ones were seen already): an index range, not a scan of the whole ledger. Jobs need
    no sweep: their holds close with their terminal transition, which the reconciler guarantees."""
    e, c = BillingEntry, aliased(BillingEntry)
    until = utcnow() - older_than
    closed = select(c.id).where(col(c.subject_id) == col(e.subject_id), col(c.kind).in_(["settle", "release"]))
    stale = (
        await s.exec(
            select(e)
            .where(e.kind == "hold", e.created_at >= until - window, e.created_at < until)
            .where(col(e.subject_id).like(f"{prefix}%"), ~closed.exists())
            .limit(limit)
        )
    ).all()
    await close(s, [Close(h.tenant, h.key_id, h.subject_id, h.amount, None, "stale", h.model) for h in stale])
    return len(stale)


async def update_tenant(sessions: Sessions, tenant_id: str, *, name: Any = UNSET, budget: Any = UNSET) -> Tenant | None:
    """Change the name and/or budget (None: no cap); None if there is no such tenant.
    A budget change goes through set_budget, which recomputes spent/held."""
    if not valid_tenant_id(tenant_id):
        return None
    values: dict[str, Any] = {"updated_at": utcnow()}
    if name is not UNSET:
        if not isinstance(name, str) or not 1 <= len(name) <= 200:
            raise InvalidInput("name must be 1-200 characters", code="invalid_name")
        values["name"] = name
    if budget is not UNSET:
        check_budget(budget)
    async with sessions() as s:
        if budget is not UNSET and not await set_budget(s, tenant_id, budget):
            return None
        result = await s.exec(update(Tenant).where(col(Tenant.id) == tenant_id).values(**values))
        if result.rowcount == 0:
            return None
        await s.commit()
        return await s.get(Tenant, tenant_id)
