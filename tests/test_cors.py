"""GENROUTE_CORS_ORIGINS: browser apps on the listed origins may call the API directly (a
preflight is answered, answers carry Access-Control-Allow-Origin and expose X-Request-Id);
other origins get no CORS headers, and with the default (none) no origin does."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from api.app import create_app
from core.settings import Settings

APP_ORIGIN = "https://app.example.com"


def _client(tmp_path: Path, **settings: object) -> httpx.AsyncClient:
    app = create_app(Settings(data_dir=tmp_path, secret_key="s", **settings))  # type: ignore[arg-type]  # pydantic-settings takes the fields as keywords
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")


def _preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}


@pytest.mark.parametrize("value", [[APP_ORIGIN], f"{APP_ORIGIN},https://other.example"])
async def test_a_listed_origin_may_call_the_api(tmp_path: Path, value: object) -> None:
    async with _client(tmp_path, cors_origins=value) as c:
        pre = await c.options("/v1/jobs", headers=_preflight(APP_ORIGIN))
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = await c.get("/openapi.json", headers={"Origin": APP_ORIGIN})
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        other = await c.options("/v1/jobs", headers=_preflight("https://evil.example"))
        assert "access-control-allow-origin" not in other.headers


async def test_by_default_no_origin_gets_cors_headers(tmp_path: Path) -> None:
    async with _client(tmp_path) as c:
        r = await c.get("/openapi.json", headers={"Origin": APP_ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = await c.options("/v1/jobs", headers=_preflight(APP_ORIGIN))
        assert "access-control-allow-origin" not in pre.headers
