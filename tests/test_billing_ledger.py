"""core/billing/ledger.py against real PostgreSQL (and SQLite): the sums a budgeted tenant keeps on
its row stay equal to its entries through every interleaving of holds, settles and budget
changes, and a tenant without a budget never makes its holds wait on each other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.billing import ledger as billing
from core.db import create_engine, sessionmaker
from core.errors import BudgetExceeded
from core.migrate import upgrade
from core.models import Tenant, utcnow
from core.settings import Settings
from tests.services import fresh_postgres


@pytest.fixture(params=["postgresql", "sqlite"])
async def sessions(request: Any, tmp_path: Any) -> AsyncIterator[Any]:
    async def made(url: str) -> AsyncIterator[Any]:
        settings = Settings(database_url=url, data_dir=tmp_path)
        await asyncio.to_thread(upgrade, settings)
        engine = create_engine(settings)
        try:
            yield sessionmaker(engine)
        finally:
            await engine.dispose()

    if request.param == "sqlite":
        async for s in made(f"sqlite+aiosqlite:///{tmp_path}/b.db"):
            yield s
        return
    async with fresh_postgres() as url:
        async for s in made(url):
            yield s


async def _tenant(sessions: Any, tenant: str, budget: int | None) -> None:
    async with sessions() as s:
        s.add(Tenant(id=tenant, name=tenant, budget=budget, created_at=utcnow(), updated_at=utcnow()))
        await s.commit()


async def _hold(sessions: Any, tenant: str, subject: str, amount: int, budgeted: bool = True) -> None:
    async with sessions() as s:
        await billing.hold(s, tenant=tenant, key_id="k", subject_id=subject, amount=amount, model="m", budgeted=budgeted)
        await s.commit()


async def _audit(sessions: Any, tenant: str) -> billing.Audit:
    async with sessions() as s:
        return await billing.audit(s, tenant)


async def test_holds_settles_and_releases_keep_the_sums_equal_to_the_entries(sessions: Any) -> None:
    await _tenant(sessions, "t", 100)
    await _hold(sessions, "t", "a", 40)
    await _hold(sessions, "t", "b", 40)
    with pytest.raises(BudgetExceeded) as refused:
        await _hold(sessions, "t", "c", 40)
    assert refused.value.details == {"budget": 100, "spent": 0, "held": 80, "available": 20, "required": 40}
    async with sessions() as s:
        await billing.close(s, [billing.Close("t", "k", "a", 40, 30, "units"), billing.Close("t", "k", "b", 40, None)])
        await s.commit()
    a = await _audit(sessions, "t")
    assert a.ok and (a.spent, a.held) == (30, 0)
    await _hold(sessions, "t", "c", 70)  # 100 - 30 spent leaves exactly 70
    with pytest.raises(BudgetExceeded):
        await _hold(sessions, "t", "d", 1)
    assert (await _audit(sessions, "t")).ok


async def test_a_wrong_hint_costs_a_round_trip_not_a_wrong_sum(sessions: Any) -> None:
    await _tenant(sessions, "with", 1000)
    await _tenant(sessions, "without", None)
    await _hold(sessions, "with", "x", 10, budgeted=False)  # thought unbudgeted: still counted
    await _hold(sessions, "without", "y", 10, budgeted=True)  # thought budgeted: not counted
    async with sessions() as s:
        assert (await s.get(Tenant, "with")).held == 10  # type: ignore[union-attr]
        assert (await s.get(Tenant, "without")).held == 0  # type: ignore[union-attr]
        assert await billing.balance(s, (await s.get(Tenant, "without"))) == (0, 10)  # type: ignore[arg-type]


async def test_setting_a_budget_counts_what_was_held_before_and_during_it(sessions: Any) -> None:
    await _tenant(sessions, "t", None)
    await _hold(sessions, "t", "before", 25, budgeted=False)
    async with sessions() as s:  # a hold in flight: its transaction has not committed yet
        await billing.hold(s, tenant="t", key_id="k", subject_id="during", amount=15, model="m", budgeted=False)

        async def set_budget() -> None:
            async with sessions() as s2:
                assert await billing.set_budget(s2, "t", 100)
                await s2.commit()

        setting = asyncio.create_task(set_budget())
        await asyncio.sleep(0.3)
        if s.bind.dialect.name == "postgresql":
            assert not setting.done()  # it waits for the hold's shared lock
        await s.commit()
    await asyncio.wait_for(setting, 10)
    a = await _audit(sessions, "t")
    assert a.ok and a.held == 40, a
    async with sessions() as s:  # both close against the now-kept sums
        await billing.close(s, [billing.Close("t", "k", "before", 25, 25, "units"), billing.Close("t", "k", "during", 15, None)])
        await s.commit()
    a = await _audit(sessions, "t")
    assert a.ok and (a.spent, a.held) == (25, 0)
    with pytest.raises(BudgetExceeded):
        await _hold(sessions, "t", "big", 76)


async def test_holds_of_a_tenant_without_a_budget_do_not_wait_on_each_other() -> None:
    async with fresh_postgres() as url:
        settings = Settings(database_url=url)
        await asyncio.to_thread(upgrade, settings)
        engine = create_engine(settings)
        try:
            sessions = sessionmaker(engine)
            await _tenant(sessions, "free", None)
            async with sessions() as s1, sessions() as s2:
                await billing.hold(s1, tenant="free", key_id="k", subject_id="1", amount=5, model="m", budgeted=False)
                # s1 has not committed; a budgeted tenant's second hold would wait here
                await asyncio.wait_for(
                    billing.hold(s2, tenant="free", key_id="k", subject_id="2", amount=5, model="m", budgeted=False), 2
                )
                await s1.commit()
                await s2.commit()
            async with sessions() as s:
                assert await billing.ledger_sums(s, "free") == (0, 10)
        finally:
            await engine.dispose()


async def test_concurrent_holds_never_overdraw(sessions: Any) -> None:
    await _tenant(sessions, "t", 10 * 7)

    async def one(i: int) -> bool:
        try:
            await _hold(sessions, "t", f"s{i}", 7, budgeted=i % 2 == 0)  # half of them with the wrong hint
            return True
        except BudgetExceeded:
            return False

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(results) == 10
    a = await _audit(sessions, "t")
    assert a.ok and a.held == 70


async def test_the_sweep_releases_only_chat_holds_that_never_closed(sessions: Any) -> None:
    """An API process that died mid-call leaves a hold open: the reconciler's sweep releases it
    (and only it: not closed ones, not recent ones, not jobs'), once."""
    from datetime import timedelta

    from sqlalchemy import update

    from core.models import BillingEntry

    await _tenant(sessions, "t", 1000)
    for subject in ("chat_dead", "chat_done", "chat_live", "job_running"):
        await _hold(sessions, "t", subject, 10)
    async with sessions() as s:
        await billing.close(s, [billing.Close("t", "k", "chat_done", 10, 7, "tokens")])
        old = utcnow() - timedelta(hours=2)
        for subject in ("chat_dead", "chat_done", "job_running"):
            await s.exec(update(BillingEntry).where(BillingEntry.subject_id == subject).values(created_at=old))  # type: ignore[call-overload,arg-type]
        await s.commit()
    for expected in (1, 0):
        async with sessions() as s:
            assert await billing.release_stale_holds(s, prefix="chat_", older_than=timedelta(hours=1)) == expected
            await s.commit()
    a = await _audit(sessions, "t")
    assert a.ok and (a.spent, a.held) == (7, 20), a  # chat_live and job_running still held
