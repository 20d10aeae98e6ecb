"""Migration 0007 (batches, deadlines, priority, cache columns) upgrades, downgrades to 0005
and matches the table models, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from core.db import normalize_url
from core.migrate import alembic_config, upgrade
from core.settings import Settings
from tests.services import fresh_postgres


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
async def test_migration_0007_upgrades_downgrades_and_matches_the_models(db: str, tmp_path: Path) -> None:
    async def check(url: str) -> None:
        settings = Settings(data_dir=tmp_path, database_url=url)
        await asyncio.to_thread(upgrade, settings, "0005")
        await asyncio.to_thread(upgrade, settings)
        await asyncio.to_thread(command.downgrade, alembic_config(settings), "0005")
        await asyncio.to_thread(upgrade, settings)
        engine = create_async_engine(normalize_url(url))
        try:
            async with engine.connect() as conn:
                diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata))
        finally:
            await engine.dispose()
        assert diff == [], diff

    if db == "sqlite":
        await check(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    else:
        async with fresh_postgres() as url:
            await check(url)
