"""Signed download URLs of the local-directory blob store (S3 serves its own presigned URLs)."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api.deps import RuntimeDep
from api.strict import StrictRoute
from core.errors import NotFound

router = APIRouter(route_class=StrictRoute, tags=["files"])


@router.get("/v1/files/{key:path}")
async def download(
    key: str,
    rt: RuntimeDep,
    exp: int = Query(0, description="expiry, unix seconds"),
    sig: str = Query("", max_length=128),
) -> FileResponse:
    verify = getattr(rt.store, "verify", None)
    if verify is None:
        raise NotFound("file not found or link expired")
    path = verify(key, exp, sig)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})
