"""The operator's and tenant's web dashboard at /dashboard, served by the API process.

Static files only (api/dashboard/: index.html, plain ES modules, CSS; nothing fetched from
another origin, no build step). The page holds no secret: the browser asks for an API key,
keeps it in sessionStorage and sends it as `Authorization: Bearer` to the same REST API and
`/v1/ws` any client uses, so the dashboard can do nothing the key could not do with curl.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

ROOT = Path(__file__).parent / "dashboard"
# same-origin scripts and styles only; outputs may come from a presigned S3 host, so media
# may load from anywhere; the websocket goes to this host
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src * data: blob:; media-src * data: blob:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
async def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=308)


@router.get("/dashboard/")
async def dashboard() -> FileResponse:
    return FileResponse(ROOT / "index.html", media_type="text/html", headers=HEADERS)


class _Assets(StaticFiles):
    """StaticFiles with the dashboard's headers (no-cache: a new release is picked up at once)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/assets", _Assets(directory=ROOT / "assets"), name="dashboard-assets")
