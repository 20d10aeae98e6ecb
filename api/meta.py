"""Model listing, health and readiness."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import PrincipalDep, RuntimeDep
from api.strict import StrictRoute
from core.schemas import INPUT_SCHEMAS, ModelList, ModelPublic

router = APIRouter(route_class=StrictRoute)


def _parameters(modality: str) -> dict[str, Any]:
    schema = INPUT_SCHEMAS.get(modality)
    if schema is None:
        return {}
    js = schema.model_json_schema()
    return {"properties": js.get("properties", {}), "required": js.get("required", [])}


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(rt: RuntimeDep, principal: PrincipalDep) -> ModelList:
    """The models this key may use (its scopes), with their deployments' prices."""
    return ModelList(
        data=[
            ModelPublic(
                id=m.id,
                modality=m.modality,
                description=m.description,
                parameters=_parameters(m.modality),
                capabilities=m.capabilities.model_dump(exclude_none=True),
                providers=sorted({d.adapter for d in m.deployments}),
                strategy=m.strategy,
                deployments=[
                    {"name": d.name, "provider": d.adapter, "model": d.model,
                     "price": d.price.model_dump(exclude_defaults=True) if d.price else None}
                    for d in m.deployments
                ],
                fallback_models=list(m.fallback_models),
            )
            for m in rt.catalog.models
            if principal.allows(m.id, m.modality)
        ]
    )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(rt: RuntimeDep) -> JSONResponse:
    async def db() -> None:
        async with rt.sessions() as s:
            await s.exec(text("SELECT 1"))  # type: ignore[call-overload]  # sqlmodel types exec() for select() only

    async def redis() -> None:
        await rt.redis.ping()

    checks = {"database": db(), "redis": redis(), "storage": rt.store.check()}
    results = await asyncio.gather(*(asyncio.wait_for(c, 5) for c in checks.values()), return_exceptions=True)
    report = {
        name: "ok" if not isinstance(r, BaseException) else f"error: {type(r).__name__}: {r}"[:300]
        for name, r in zip(checks, results, strict=True)
    }
    ok = all(v == "ok" for v in report.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": report}, status_code=200 if ok else 503)
