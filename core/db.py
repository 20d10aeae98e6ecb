"""Database engine and sessions. SQLite (WAL) by default, PostgreSQL via GENROUTE_DATABASE_URL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from core.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


def normalize_url(url: str) -> str:
    """Accept the plain URLs people paste (postgresql://, sqlite://) and pick async drivers."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        url = "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


def create_engine(settings: Settings) -> AsyncEngine:
    url = normalize_url(settings.resolved_database_url())
    kwargs: dict[str, Any]
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 30}}
    else:
        # Connections past pool_size are closed on return, so a pool smaller than the usual
        # concurrency reconnects (TLS probe included) on every request. Recycling instead of
        # pre-ping saves a round trip per checkout.
        kwargs = {"pool_size": settings.db_pool_size, "max_overflow": settings.db_pool_size, "pool_recycle": 1800}
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def sessionmaker(engine: AsyncEngine) -> Sessions:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
