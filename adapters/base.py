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

from core.catalog import Deployment
from core.types import PollResult, ProviderRequest, SubmitResult


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
        return None
