"""Tenants: who owns keys, jobs and a budget.

Operators make them (`POST /v1/admin/tenants`, `genroute tenants create`) and set the
budget; billing (core/billing/ledger.py) owns `spent` and `held` (a budget change goes through it).
Budgets are micro-USD (1 USD = 1,000,000); None means no cap.
"""

from __future__ import annotations

import re
from typing import Any, Final

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db import Sessions
from core.errors import Conflict, InvalidInput
from core.models import Tenant, utcnow

TENANT_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TENANT_ID_RULE: Final = "1-100 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
# The tenant id of GENROUTE_ADMIN_KEY's principal (api/deps.py): no tenant of an operator's
# may take it, in any letter case, or its jobs, usage and webhooks would mix with the admin's.
RESERVED_TENANT_IDS: Final = frozenset({"admin"})


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "leave as is", where None means something (no cap, no limit)


def valid_tenant_id(tenant_id: str) -> bool:
    return bool(TENANT_ID_RE.match(tenant_id))


def check_tenant_id(tenant_id: str) -> str:
    if not valid_tenant_id(tenant_id):
        raise InvalidInput(f"invalid tenant id {tenant_id[:120]!r}: use {TENANT_ID_RULE}", code="invalid_tenant_id")
    return tenant_id


def check_not_reserved(tenant_id: str) -> str:
    """For tenants an operator names (a new tenant, a new key's tenant)."""
    check_tenant_id(tenant_id)
    if tenant_id.lower() in RESERVED_TENANT_IDS:
        raise InvalidInput(f"tenant id {tenant_id!r} is reserved for the admin key's own principal: choose another",
                           code="reserved_tenant_id", details=[{"loc": ["id"], "reserved": sorted(RESERVED_TENANT_IDS)}])
    return tenant_id


def check_budget(budget: int | None) -> int | None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise InvalidInput(f"budget must be an integer >= 0 (micro-USD) or null for no cap, got {budget!r}",
                           code="invalid_budget")
    return budget


def _insert_if_missing(session: AsyncSession, tenant_id: str, name: str, budget: int | None) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING: concurrent callers never fail on each other (on
    PostgreSQL the second waits for the first to commit, then does nothing)."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    values = {"id": tenant_id, "name": name, "budget": budget, "spent": 0, "held": 0, "created_at": now, "updated_at": now}
    return insert(Tenant).values(**values).on_conflict_do_nothing(index_elements=["id"])


async def ensure_tenant(session_or_sessions: AsyncSession | Sessions, tenant_id: str, name: str | None = None) -> None:
    """Make the tenant's row unless it exists (no budget). Given a session, it runs in the
    caller's transaction and the caller commits; given a sessionmaker, it commits itself."""
    check_tenant_id(tenant_id)
    if isinstance(session_or_sessions, AsyncSession):
        await session_or_sessions.exec(_insert_if_missing(session_or_sessions, tenant_id, name or tenant_id, None))
        return
    async with session_or_sessions() as s:
        await s.exec(_insert_if_missing(s, tenant_id, name or tenant_id, None))
        await s.commit()


async def create_tenant(sessions: Sessions, tenant_id: str, *, name: str | None = None, budget: int | None = None) -> Tenant:
    check_not_reserved(tenant_id)
    """A new tenant; Conflict (`tenant_exists`) if the id is taken."""
    check_tenant_id(tenant_id)
    check_budget(budget)
    async with sessions() as s:
        result = await s.exec(_insert_if_missing(s, tenant_id, name or tenant_id, budget))
        if result.rowcount == 0:
            raise Conflict(f"tenant {tenant_id!r} already exists; PATCH /v1/admin/tenants/{tenant_id} changes it",
                           code="tenant_exists")
        await s.commit()
        row = await s.get(Tenant, tenant_id)
    assert row is not None
    return row


async def get_tenant(sessions: Sessions, tenant_id: str) -> Tenant | None:
    if not valid_tenant_id(tenant_id):
        return None
    async with sessions() as s:
        return await s.get(Tenant, tenant_id)


def list_tenants() -> Any:
    """The query behind the tenant list; the API pages it by id (api/pagination.py `page`)."""
    return select(Tenant)


def available(tenant: Tenant) -> int | None:
    """What the tenant may still spend: budget - spent - held (None: no cap). Only a tenant
    with a budget keeps spent/held on its row (core.billing.balance gives any tenant's)."""
    return None if tenant.budget is None else tenant.budget - tenant.spent - tenant.held
