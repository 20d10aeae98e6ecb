"""Adapters by name. A catalog deployment names its adapter; the worker builds it here.

Modules are imported when first used, so a deployment of one provider never loads the
others' code.
"""

from __future__ import annotations

import importlib

import httpx

from adapters.base import Adapter
from core.catalog import Deployment

ADAPTERS: dict[str, str] = {
    "local": "adapters.local:LocalAdapter",
    "openai": "adapters.openai:OpenAIAdapter",
    "openai_compatible": "adapters.openai_compatible:OpenAICompatibleAdapter",
    "bfl": "adapters.bfl:BFLAdapter",
    "google_veo": "adapters.google_veo:GoogleVeoAdapter",
    "replicate": "adapters.replicate:ReplicateAdapter",
    "fal": "adapters.fal:FalAdapter",
}


class UnknownAdapter(LookupError):
    pass


def adapter_class(name: str) -> type[Adapter]:
    try:
        module, _, attr = ADAPTERS[name].partition(":")
    except KeyError:
        raise UnknownAdapter(f"unknown adapter {name!r}; known: {sorted(ADAPTERS)}") from None
    cls: type[Adapter] = getattr(importlib.import_module(module), attr)
    return cls


def build_adapter(deployment: Deployment, http: httpx.AsyncClient) -> Adapter:
    try:
        cls = adapter_class(deployment.adapter)
    except UnknownAdapter:
        raise UnknownAdapter(
            f"deployment {deployment.name!r} names adapter {deployment.adapter!r}; known: {sorted(ADAPTERS)}"
        ) from None
    return cls(deployment, http)
