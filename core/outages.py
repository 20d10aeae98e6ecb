"""Our own infrastructure away (the database, Redis, the network): never the tenant's or the
provider's fault, so it is retried or waited out, never ends a job and never counts against
a provider's health.

Apart from core.errors because these read the driver exceptions (asyncpg, SQLAlchemy,
redis-py): core.errors stays plain types, which adapters and storage import without
pulling in a database or Redis client (the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

import socket

import asyncpg
import redis.exceptions
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError

# SQLSTATE classes that mean "the database cannot take this now", not "this request is wrong":
# 08 connection exception, 53 insufficient resources (too many connections), 57P0x shutdown
# (57P03: the database system is starting up)
_DB_BUSY = ("08", "53", "57P0")
# a socket that does not open or broke: refused, reset, unresolvable, timed out
_UNREACHABLE = (ConnectionError, TimeoutError, socket.gaierror, asyncpg.InterfaceError)


def database_busy(exc: BaseException) -> bool:
    """The database is overloaded or away (pool exhausted, too many connections, restarting,
    not answering at all)."""
    if isinstance(exc, (SATimeoutError, *_UNREACHABLE)):
        return True
    if isinstance(exc, asyncpg.PostgresError):  # raised raw while connecting
        return str(getattr(exc, "sqlstate", "") or "").startswith(_DB_BUSY)
    if not isinstance(exc, DBAPIError):
        return False
    code = str(getattr(exc.orig, "sqlstate", "") or "")
    return code.startswith(_DB_BUSY) or bool(exc.connection_invalidated)


# what redis-py raises when the server does not answer (refused, reset, timed out), for
# `except` clauses; redis_lost() also knows the WatchError a broken connection becomes
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def redis_lost(exc: BaseException) -> bool:
    """redis-py's word for a connection that failed or broke. A connection that breaks
    while a key is WATCHed comes out as a WatchError ("A ConnectionError occurred on while
    watching one or more keys"), not as the ConnectionError it is."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    return isinstance(exc, redis.exceptions.WatchError) and "ConnectionError" in str(exc)


def unavailable(exc: BaseException) -> str | None:
    """Which dependency `exc` says is away ("the database", "Redis"), or None."""
    if redis_lost(exc):
        return "Redis"
    if database_busy(exc):
        return "the database"
    return None


def infra_down(exc: BaseException) -> bool:
    """Our own Redis, database or network is away: retry or wait, never end a job for it."""
    return unavailable(exc) is not None or isinstance(exc, OSError)
