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
from enum import StrEnum
from typing import Any


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
