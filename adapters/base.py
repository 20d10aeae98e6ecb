"""The adapter protocol (DESIGN.md §4).

    submit(request) -> Done | Pending
    poll(handle)    -> Pending | Done | Failed
    cancel(handle)  -> None          (best effort)

Adapters raise `core.errors.ProviderError` for every provider-side fault. They get an
httpx.AsyncClient from the process and borrow it: they never close it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from core import fetcher
from core.catalog import Deployment
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import PollResult, ProviderRequest, SubmitResult


INPUT_FETCH_SECONDS = 60.0  # one input file, every redirect and byte included


class Adapter:
    name: ClassVar[str]
    # True when submitting the same job twice cannot create a second provider task (the
    # provider dedupes on our job id). Only then may an interrupted submit be resent.
    idempotent_submit: ClassVar[bool] = False

    def __init__(self, deployment: Deployment, http: httpx.AsyncClient) -> None:
        self.deployment = deployment
        self.http = http
        self.api_key = deployment.api_key()

    async def submit(self, request: ProviderRequest) -> SubmitResult:
        raise NotImplementedError

    async def poll(self, handle: dict[str, Any]) -> PollResult:
        raise NotImplementedError

    async def cancel(self, handle: dict[str, Any]) -> None:
        """Ask the provider to stop (best effort). Providers without cancel do nothing."""
        return None

    async def verify_callback(
        self, headers: dict[str, str], body: bytes, handle: dict[str, Any], secret: str | None
    ) -> PollResult | None:
        """Check a provider webhook's signature and turn its body into a poll result
        (None: an intermediate event that changes nothing). Raise ProviderError(auth) when
        the signature does not verify. `secret` is the per-job secret this job was given
        (for providers that sign with ours). Providers without webhooks keep the default."""
        raise ProviderError(ProviderErrorKind.auth, f"{self.name} sends no callbacks")

    def poll_interval(self, default: float) -> float:
        """The adapter's cadence, or the deployment's `poll_interval` option (tests use 0.05)."""
        value = self.deployment.options.get("poll_interval")
        return float(value) if isinstance(value, int | float) and value > 0 else default

    def headers(self) -> dict[str, str]:
        """Extra headers from the deployment's `headers` option (gateways, org ids)."""
        extra = self.deployment.options.get("headers") or {}
        return {str(k): str(v) for k, v in extra.items()}

    def base_url(self, default: str) -> str:
        return (self.deployment.base_url or default).rstrip("/")

    async def fetch_input(self, url: str, *, what: str, max_bytes: int, timeout: float = INPUT_FETCH_SECONDS) -> bytes:
        """A tenant's input file (image, mask) by URL, through the guarded fetcher: the
        address checked on every hop, at most `max_bytes` streamed, `timeout` overall.
        Any refusal is the tenant's: invalid_input, with the fetcher's one reason."""
        try:
            async with fetcher.fetch(self.http, url, max_bytes=max_bytes, timeout=timeout) as got:
                status = got.response.status_code
                if not 200 <= status < 300:
                    raise ProviderError(
                        ProviderErrorKind.invalid, f"{what} URL answered HTTP {status}", code=ErrorCode.invalid_input
                    )
                return await got.read()
        except fetcher.FetchError as exc:
            raise ProviderError(
                ProviderErrorKind.invalid,
                f"{what} was not fetched: {exc.reason}",
                code=ErrorCode.invalid_input,
                detail={"fetch": exc.kind.value},
            ) from None
