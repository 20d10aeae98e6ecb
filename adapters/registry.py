"""Adapters by name. A catalog deployment names its adapter; the worker builds it here."""

from __future__ import annotations

import httpx

from adapters.base import Adapter
from adapters.local import LocalAdapter
from core.catalog import Deployment

ADAPTERS: dict[str, type[Adapter]] = {cls.name: cls for cls in (LocalAdapter,)}


class UnknownAdapter(LookupError):
    pass


def build_adapter(deployment: Deployment, http: httpx.AsyncClient) -> Adapter:
    try:
        cls = ADAPTERS[deployment.adapter]
    except KeyError:
        raise UnknownAdapter(
            f"deployment {deployment.name!r} names adapter {deployment.adapter!r}; known: {sorted(ADAPTERS)}"
        ) from None
    return cls(deployment, http)
