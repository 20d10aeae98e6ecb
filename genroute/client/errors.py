"""Client exceptions. Every error the API answers becomes an APIError subclass (by status)
carrying the stable `code` from the body (`{"error": {"code", "message", "details"}}`, or
the Replicate routes' problem+json), so callers match on `exc.code`, never on text.

    GenrouteClientError
     ├─ APIError (status_code, code, message, details)
     │   ├─ InvalidRequestError   400, 422
     │   ├─ AuthenticationError   401, 403
     │   ├─ BudgetExceededError   402
     │   ├─ NotFoundError         404
     │   ├─ ConflictError         409
     │   ├─ RateLimitedError      429 (retry_after)
     │   └─ ServerError           5xx
     ├─ APIConnectionError        no answer after the retries
     ├─ JobFailedError            run(): the job ended failed or canceled (.job, .code)
     ├─ WaitTimeoutError          wait(): the timeout passed first (.job: its last state)
     └─ DownloadError             an output's bytes did not match its sha256
"""

from __future__ import annotations

from typing import Any

import httpx

from core.schemas import JobPublic


class GenrouteClientError(Exception):
    pass


class APIError(GenrouteClientError):
    def __init__(self, status_code: int, code: str, message: str, details: Any = None,
                 headers: httpx.Headers | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or httpx.Headers()


class InvalidRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class BudgetExceededError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class RateLimitedError(APIError):
    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers)


class ServerError(APIError):
    pass


class APIConnectionError(GenrouteClientError):
    pass


class JobFailedError(GenrouteClientError):
    def __init__(self, job: JobPublic) -> None:
        self.job = job
        self.code = job.error.code if job.error else job.status
        super().__init__(f"job {job.id} {job.status}: {self.code}: {job.error.message if job.error else ''}".rstrip(": "))


class WaitTimeoutError(GenrouteClientError):
    def __init__(self, job: JobPublic | None, seconds: float) -> None:
        self.job = job
        super().__init__(f"job {job.id if job else '?'} still {job.status if job else 'unknown'} after {seconds:g} s")


class DownloadError(GenrouteClientError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {400: InvalidRequestError, 422: InvalidRequestError, 401: AuthenticationError,
                                         403: AuthenticationError, 402: BudgetExceededError, 404: NotFoundError,
                                         409: ConflictError, 429: RateLimitedError}


def retry_after(headers: httpx.Headers) -> float | None:
    raw = headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def from_response(resp: httpx.Response) -> APIError:
    """The exception for an error response, in either of the API's error shapes."""
    code, message, details = "error", resp.reason_phrase or "error", None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code, message, details = str(err.get("code") or code), str(err.get("message") or message), err.get("details")
        elif "detail" in body:  # problem+json (the /replicate routes)
            code, message = str(body.get("code") or code), str(body.get("detail"))
    cls = _BY_STATUS.get(resp.status_code, ServerError if resp.status_code >= 500 else APIError)
    return cls(resp.status_code, code, message, details, resp.headers)
