"""The submit-time check of provider parameters (core/params.py): a parameter a request
may not set is refused with 422 naming it, before a job row exists or a chat is routed.

A parameter must be settable on every deployment the model's plan may reach (its
fallback models' included), so a fallback never meets a parameter its adapter refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.registry import UnknownAdapter, adapter_class
from core import params
from core.errors import InvalidInput
from core.routing.catalog import Catalog, Deployment, Model
from core.routing.router import reachable


class ParamNotAllowed(InvalidInput):
    code = "param_not_allowed"


def settable(dep: Deployment, modality: str) -> frozenset[str]:
    try:
        return adapter_class(dep.adapter).settable(dep, modality)
    except UnknownAdapter:
        return frozenset()


def check_provider_params(catalog: Catalog, model: Model, given: Mapping[str, Any], *, loc: tuple[str, ...]) -> None:
    """Raise ParamNotAllowed for the first parameter of `given` (by name) a request may
    not set on `model`; `loc` is where the parameters sit in the request."""
    if not given:
        return
    deployments = reachable(model, catalog)
    allowed = frozenset.intersection(*(settable(d, model.modality) for d in deployments)) if deployments else frozenset()
    bad = params.refused(allowed, given)
    if not bad:
        return
    name, why = bad[0]
    path = ".".join((*loc, name))
    raise ParamNotAllowed(
        f"{path} is not allowed: {why}",
        details=[{"loc": [*loc, *_parts(name)], "msg": why, "type": "param_not_allowed"} for name, why in bad],
    )


def _parts(path: str) -> list[str | int]:
    """A nested parameter's dotted path as a loc (`referenceImages.0.image.uri`)."""
    return [int(p) if p.isdigit() else p for p in path.split(".")]
