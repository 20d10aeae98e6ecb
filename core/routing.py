"""Choosing a deployment for a model. The first router: the first healthy deployment.

Kept behind one function so the full router (strategies, limits, cooldowns) replaces it
without touching callers.
"""

from __future__ import annotations

from collections.abc import Container

from core.catalog import Deployment, Model


class NoDeployment(Exception):
    """Every deployment of the model is unusable (missing key, marked unhealthy)."""


def healthy(dep: Deployment, unhealthy: Container[str] = ()) -> bool:
    if dep.name in unhealthy:
        return False
    return not (dep.api_key_env and not dep.api_key())


def route(model: Model, *, unhealthy: Container[str] = ()) -> Deployment:
    for dep in model.deployments:
        if healthy(dep, unhealthy):
            return dep
    missing = [d.api_key_env for d in model.deployments if d.api_key_env and not d.api_key()]
    hint = f" (set {', '.join(missing)})" if missing else ""
    raise NoDeployment(f"no usable deployment for model {model.id!r}{hint}")
