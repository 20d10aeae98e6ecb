"""Real services for tests: Redis (the machine's, or an embedded one), PostgreSQL (a fresh
database per use; skipped when none answers, except under CI=true), SeaweedFS for S3."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

PG_DSN = os.environ.get("GENROUTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


async def _pg_admin() -> asyncpg.Connection | None:
    try:
        return await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL does not answer at {PG_DSN} under CI: {exc}")
        pytest.skip(f"PostgreSQL does not answer at {PG_DSN} ({exc}); set GENROUTE_TEST_PG or start it")
        return None


@asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    """A new empty database; yields its SQLAlchemy URL and drops it afterwards."""
    admin = await _pg_admin()
    assert admin is not None
    name = f"genroute_t_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
