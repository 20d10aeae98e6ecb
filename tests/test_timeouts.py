"""Timeouts that fit the work: per call shape (create, poll, download) and per deployment
in the catalog, with defaults that fit each adapter; worker tasks outlast them."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import ValidationError

from adapters.registry import build_adapter, longest_timeout
from core.errors import ProviderError, ProviderErrorKind
from core.routing.catalog import Deployment
from core.types import Done, ProviderRequest
from tests.fakes.server import serve

SLOW = 2.0  # seconds the fake takes to answer a create


@pytest.fixture(scope="module")
def slow_provider() -> Iterator[str]:
    app = FastAPI()

    png = io.BytesIO()
    Image.new("RGB", (1024, 1024), "navy").save(png, "PNG")
    b64 = base64.b64encode(png.getvalue()).decode()

    @app.post("/v1/images/generations")
    async def generate() -> JSONResponse:
        await asyncio.sleep(SLOW)
        return JSONResponse({"created": 1, "data": [{"b64_json": b64}], "output_format": "png"})

    with serve(app) as url:
        yield url + "/v1"


def _dep(url: str, **timeouts: float) -> Deployment:
    return Deployment(name="slow-openai", adapter="openai", model="gpt-image-1", base_url=url,
                      api_key_env="TIMEOUTS_TEST_KEY", timeouts=timeouts)


def test_defaults_fit_each_adapter_and_the_catalog_overrides_them() -> None:
    openai = Deployment(name="o", adapter="openai", model="gpt-image-1")
    bfl = Deployment(name="b", adapter="bfl", model="flux-pro-1.1", timeouts={"poll": 5})
    async_client = httpx.AsyncClient()
    try:
        a = build_adapter(openai, async_client)
        assert a.timeout("create") >= 120  # GPT Image at high quality answers after a minute or more
        b = build_adapter(bfl, async_client)
        assert (b.timeout("create"), b.timeout("poll")) == (60.0, 5.0)
    finally:
        asyncio.run(async_client.aclose())
    assert longest_timeout([openai, bfl], "create") == a.timeout("create")
    assert longest_timeout([], "create") == 0.0


@pytest.mark.parametrize("bad", [{"create": 0}, {"poll": -1}, {"download": 10_000}, {"read": 5}])
def test_a_bad_timeout_is_refused_when_the_catalog_loads(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Deployment(name="x", adapter="openai", model="m", timeouts=bad)


async def test_a_create_gets_the_deployments_create_timeout(slow_provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMEOUTS_TEST_KEY", "sk-test")
    req = ProviderRequest(job_id="job_timeouts", tenant="alice", modality="image", provider_model="gpt-image-1",
                          input={"prompt": "a slow lighthouse", "size": "1024x1024"})
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as http:
        short = build_adapter(_dep(slow_provider, create=0.5), http)
        t0 = time.monotonic()
        with pytest.raises(ProviderError) as info:
            await short.submit(req)
        took = time.monotonic() - t0
        assert took < SLOW, took  # cut at the deployment's 0.5 s, not the client's 60 s
        assert info.value.kind is ProviderErrorKind.retryable
        assert info.value.resend_safe is False  # the create was sent: resending could bill twice
        # the same call with room to finish is not cut
        roomy = build_adapter(_dep(slow_provider, create=SLOW * 5), http)
        done = await roomy.submit(req)
        assert isinstance(done, Done) and len(done.outputs) == 1
