"""Adapters by name. A catalog deployment names its adapter; the worker builds it here.

The table of names is `core.routing.catalog.ADAPTERS` (a catalog naming another adapter is
refused when it loads). Modules are imported when first used, so a deployment of one
provider never loads the others' code.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

import httpx

from adapters.base import Adapter
from adapters.http import CALL_TIMEOUT
from core import logs, metrics
from core.errors import ProviderError
from core.routing.catalog import ADAPTERS, Deployment
from core.types import Done, Failed, Pending


class UnknownAdapter(LookupError):
    pass


def adapter_class(name: str) -> type[Adapter]:
    try:
        module, _, attr = ADAPTERS[name].partition(":")
    except KeyError:
        raise UnknownAdapter(f"unknown adapter {name!r}; known: {sorted(ADAPTERS)}") from None
    cls: type[Adapter] = getattr(importlib.import_module(module), attr)
    return cls


def longest_timeout(deployments: list[Deployment], shape: str) -> float:
    """The longest `shape` timeout any of these deployments may take (0 for none): what
    a worker task that makes such calls must outlast."""
    return max((adapter_class(d.adapter).timeout_for(d, shape) for d in deployments), default=0.0)


def build_adapter(deployment: Deployment, http: httpx.AsyncClient) -> Adapter:
    try:
        cls = adapter_class(deployment.adapter)
    except UnknownAdapter:
        raise UnknownAdapter(
            f"deployment {deployment.name!r} names adapter {deployment.adapter!r}; known: {sorted(ADAPTERS)}"
        ) from None
    return observed(cls(deployment, http))


def observed(adapter: Adapter) -> Adapter:
    """Time and count the adapter's provider calls (genroute_provider_calls_total by
    deployment, call and outcome), with `deployment` bound to every log line inside them."""
    name = adapter.deployment.name
    for call, shape in (("submit", "create"), ("poll", "poll"), ("cancel", "poll")):
        setattr(adapter, call, _observed_call(getattr(adapter, call), name, call, adapter.timeout(shape)))
    return adapter


def _outcome(result: Any) -> str:
    if isinstance(result, Failed):
        return "failed"
    if isinstance(result, Pending):
        return "pending"
    return "done" if isinstance(result, Done) else "ok"


def _observed_call(
    fn: Callable[..., Awaitable[Any]], deployment: str, call: str, timeout: float
) -> Callable[..., Awaitable[Any]]:
    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        outcome = "crashed"
        token = CALL_TIMEOUT.set(timeout)  # the read timeout of every request inside (adapters/http.py)
        try:
            with logs.bind(deployment=deployment):
                result = await fn(*args, **kwargs)
            outcome = _outcome(result)
            return result
        except ProviderError as exc:
            outcome = exc.kind.value
            raise
        finally:
            CALL_TIMEOUT.reset(token)
            metrics.provider_call(deployment, call, outcome, time.perf_counter() - t0)

    return wrapper


class AdapterCache:
    """The one adapter registry of a process (on the Runtime, as `rt.adapters`): one adapter
    per deployment, built on first use and rebuilt when a catalog reload replaces the
    deployment, so what an adapter caches (an account's webhook secret, a JWKS) is fetched
    once. The worker, inline chat and the callback receiver all take adapters from here."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self._by_name: dict[str, tuple[Deployment, Adapter]] = {}

    def get(self, deployment: Deployment) -> Adapter:
        hit = self._by_name.get(deployment.name)
        if hit is None or hit[0] is not deployment:
            hit = (deployment, build_adapter(deployment, self.http))
            self._by_name[deployment.name] = hit
        return hit[1]
