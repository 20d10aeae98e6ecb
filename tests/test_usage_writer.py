"""UsageWriter: rows are batched into few INSERTs and none is lost at shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import event, func
from sqlmodel import select

from core.billing.usage import UsageWriter
from core.db import create_engine, sessionmaker
from core.migrate import upgrade
from core.models import UsageRecord
from core.settings import Settings


def _row(i: int) -> UsageRecord:
    return UsageRecord(id=f"chat_{i}", tenant="t", key_id="k", model="m", status="succeeded", prompt_tokens=i)


async def test_rows_are_batched_and_flushed_on_close(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    await asyncio.to_thread(upgrade, settings)
    engine = create_engine(settings)
    inserts: list[int] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO usage_records"):
            inserts.append(1)

    try:
        sessions = sessionmaker(engine)
        writer = UsageWriter(sessions, interval=0.05)
        writer.start()
        for i in range(300):
            writer.add(_row(i))
        await asyncio.sleep(0.3)
        for i in range(300, 310):  # added just before shutdown: close must write them
            writer.add(_row(i))
        await writer.close()
        async with sessions() as s:
            n = (await s.exec(select(func.count()).select_from(UsageRecord))).one()
        assert n == 310
        assert len(inserts) <= 3, inserts  # one executemany per batch, not one per row
    finally:
        await engine.dispose()
