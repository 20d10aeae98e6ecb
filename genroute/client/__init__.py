"""A typed Python client for genroute's REST API.

    from genroute.client import Client

    with Client("http://127.0.0.1:8000", api_key="gr_...") as gr:
        job = gr.submit("local-image", {"prompt": "a lighthouse", "size": "512x512"})
        job = gr.wait(job.id)                 # follows the job's event stream (SSE)
        paths = gr.download(job, "out/")      # every output, sha256-checked

`AsyncClient` has the same methods, awaited. Results are the API's own pydantic models
(core/schemas.py: JobPublic, JobList, UsageReport, EventPublic). Errors are exceptions that
carry the API's stable error code (`exc.code`, e.g. "budget_exceeded").

Resilience, the same in both:
- submit makes an Idempotency-Key (unless given) and reuses it on every retry, so a retry
  after a dropped connection or a 5xx never makes a second job;
- requests retry connection errors and 429/502/503/504 with backoff, honouring Retry-After;
- wait follows /v1/jobs/{id}/events over SSE, reconnects after a drop with Last-Event-ID
  (nothing missed, nothing twice), checks the job by GET between reconnects (so it also
  rides out an API restart), and falls back to polling where the stream is unavailable.
"""

from core.schemas import AssetPublic, EventPublic, JobList, JobPublic, UsageReport
from genroute.client.aio import AsyncClient
from genroute.client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BudgetExceededError,
    ConflictError,
    DownloadError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    WaitTimeoutError,
)
from genroute.client.sync import Client

__all__ = [
    "APIConnectionError", "APIError", "AssetPublic", "AsyncClient", "AuthenticationError", "BudgetExceededError",
    "Client", "ConflictError", "DownloadError", "EventPublic", "InvalidRequestError", "JobFailedError", "JobList",
    "JobPublic", "NotFoundError", "RateLimitedError", "ServerError", "UsageReport", "WaitTimeoutError",
]
