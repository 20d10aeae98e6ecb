"""Domain errors with stable codes.

    GenrouteError            base: code + HTTP status + message + details
     ├─ InvalidRequest       400 malformed request (broken JSON, bad header)
     ├─ InvalidInput         422 input fails the model's schema (details: field paths)
     ├─ Unauthorized         401 missing or unknown API key
     ├─ BudgetExceeded       402 the tenant's budget cannot cover the request's hold
     ├─ Forbidden            403 the key may not do this (admin route, model outside its scopes)
     ├─ NotFound             404 job / model / file not found for this tenant
     ├─ Conflict             409 idempotency key reused with another body, job not cancelable
     ├─ PayloadTooLarge      413 request body over the limit
     ├─ RateLimited          429 the key's request rate or concurrency limit (Retry-After)
     └─ Unavailable          503 a dependency does not answer

    ProviderError            raised by adapters; `kind` decides retry and the job's error code,
                             `fault` whose fault it is (decided once, where the error is translated)

One table in api/errors.py turns these into HTTP responses; no route raises HTTPException.
"""

from __future__ import annotations

import math
import socket
from enum import StrEnum
from typing import Any

import asyncpg
import redis.exceptions
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError


class ErrorCode(StrEnum):
    """The fixed taxonomy a failed job carries (DESIGN.md §3). Stable: clients match on it."""

    invalid_input = "invalid_input"
    moderated = "moderated"
    rate_limited = "rate_limited"
    provider_error = "provider_error"
    provider_unavailable = "provider_unavailable"
    provider_auth = "provider_auth"
    timeout = "timeout"
    canceled = "canceled"
    storage_error = "storage_error"
    budget_exceeded = "budget_exceeded"
    internal = "internal"


class GenrouteError(Exception):
    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details
        self.headers = headers


class InvalidRequest(GenrouteError):
    status_code = 400
    code = "invalid_request"


class InvalidInput(GenrouteError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(GenrouteError):
    status_code = 401
    code = "unauthorized"


class BudgetExceeded(GenrouteError):
    status_code = 402
    code = "budget_exceeded"


class Forbidden(GenrouteError):
    status_code = 403
    code = "forbidden"


class NotFound(GenrouteError):
    status_code = 404
    code = "not_found"


class Conflict(GenrouteError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(GenrouteError):
    status_code = 413
    code = "payload_too_large"


class RateLimited(GenrouteError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None, details: Any = None) -> None:
        super().__init__(message, code=code, details=details, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})
        self.retry_after = retry_after


class Unavailable(GenrouteError):
    status_code = 503
    code = "unavailable"


class ProviderErrorKind(StrEnum):
    retryable = "retryable"  # 5xx, connection reset, timeouts: try again (maybe elsewhere)
    rate_limited = "rate_limited"  # 429: retry after `retry_after`
    invalid = "invalid"  # the provider refused our input: the user's mistake
    moderated = "moderated"  # input or output flagged
    auth = "auth"  # bad or missing key: the deployment is unusable
    quota = "quota"  # out of credits: do not retry
    failed = "failed"  # the provider ran the task and it failed


class Fault(StrEnum):
    """Whose fault a provider-side error is (DESIGN.md §12). Only `provider` counts against a
    deployment's health; `operator` marks the one deployment unusable until the catalog
    reloads; `user` and `ours` never touch health."""

    user = "user"  # the request: bad input, flagged content, an input URL that does not answer
    provider = "provider"  # the provider's trouble: 5xx, timeouts, throttling, a task that failed
    operator = "operator"  # the catalog or account: bad key, wrong model or base URL, no credits
    ours = "ours"  # genroute's own infrastructure or code


_KIND_TO_FAULT = {
    ProviderErrorKind.retryable: Fault.provider,
    ProviderErrorKind.rate_limited: Fault.provider,
    ProviderErrorKind.invalid: Fault.user,
    ProviderErrorKind.moderated: Fault.user,
    ProviderErrorKind.auth: Fault.operator,
    ProviderErrorKind.quota: Fault.operator,
    ProviderErrorKind.failed: Fault.provider,
}

_KIND_TO_CODE = {
    ProviderErrorKind.retryable: ErrorCode.provider_unavailable,
    ProviderErrorKind.rate_limited: ErrorCode.rate_limited,
    ProviderErrorKind.invalid: ErrorCode.invalid_input,
    ProviderErrorKind.moderated: ErrorCode.moderated,
    ProviderErrorKind.auth: ErrorCode.provider_auth,
    ProviderErrorKind.quota: ErrorCode.provider_error,
    ProviderErrorKind.failed: ErrorCode.provider_error,
}


class ProviderError(Exception):
    """The one error adapters raise. `detail` keeps the provider's own words for operators
    (for moderation: `{"stage": "input"|"output", "reasons": [...]}`)."""

    def __init__(
        self,
        kind: ProviderErrorKind,
        message: str,
        *,
        retry_after: float | None = None,
        detail: Any = None,
        code: ErrorCode | None = None,
        resend_safe: bool = False,
        fault: Fault | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.detail = detail
        self.fault = fault or _KIND_TO_FAULT[kind]
        # an operator's mistake is never reported to the user as their invalid input
        self.code = code or (ErrorCode.provider_unavailable if self.fault is Fault.operator and kind is ProviderErrorKind.invalid
                             else _KIND_TO_CODE[kind])
        # True when a create provably did not start a provider task: the connection never
        # opened, the provider refused it (429, a 404 for a wrong model), or the adapter
        # checked upstream that no task exists. Only then may a create be sent again.
        self.resend_safe = resend_safe

    @property
    def retryable(self) -> bool:
        return self.kind in (ProviderErrorKind.retryable, ProviderErrorKind.rate_limited)


# --- our own infrastructure away: never the tenant's or the provider's fault -------------

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
