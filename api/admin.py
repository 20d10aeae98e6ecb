"""Operator endpoints, enabled by GENROUTE_ADMIN_KEY: `POST /v1/admin/catalog/reload`.

Each API process reloads its own catalog (send the call to every replica, or SIGHUP them);
workers reload on SIGHUP.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header

from api.deps import RuntimeDep
from core.catalog import CatalogError
from core.errors import GenrouteError, InvalidInput, Unauthorized
from core.runtime import reload_catalog

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class Forbidden(GenrouteError):
    status_code = 403
    code = "forbidden"


def _check_admin(rt: RuntimeDep, authorization: str | None) -> None:
    if not rt.settings.admin_key:
        raise Forbidden("the admin API is disabled: set GENROUTE_ADMIN_KEY to enable it")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), rt.settings.admin_key):
        raise Unauthorized("admin endpoints need `Authorization: Bearer <GENROUTE_ADMIN_KEY>`")


@router.post("/catalog/reload")
async def reload(rt: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> dict[str, object]:
    _check_admin(rt, authorization)
    try:
        new = await reload_catalog(rt)
    except CatalogError as exc:
        raise InvalidInput("catalog reload refused; the previous catalog keeps serving", code="invalid_catalog",
                           details=str(exc).splitlines()) from None
    return {"status": "reloaded", "version": new.version, "models": [m.id for m in new.models]}
