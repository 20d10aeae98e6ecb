"""Whose fault an adapter error is, and when a create may be sent again, against the fakes
over real HTTP and the router's limiter on real Redis.

    user      an unreachable input-image URL, a flagged prompt: no health effect, no fallback
    operator  a model the provider does not have: this deployment out, fallback allowed
    provider  5xx, throttling: counts against health; a 5xx on a create is not resent
"""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from PIL import Image

from adapters.google_veo import GoogleVeoAdapter
from adapters.openai import OpenAIAdapter
from adapters.openai_compatible import OpenAICompatibleAdapter
from adapters.replicate import ReplicateAdapter
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.limits.deployments import Limiter
from core.routing.catalog import Deployment
from core.routing.router import can_fall_back, health_effect
from core.types import Pending, ProviderRequest
from tests.fakes import google_veo as veo_fake
from tests.fakes import openai as openai_fake
from tests.fakes import replicate as replicate_fake
from tests.fakes.server import free_port, serve

KEY = "fake-key"


@pytest.fixture(scope="module")
def replicate_url() -> Iterator[str]:
    with serve(replicate_fake.create_app(api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def openai_url() -> Iterator[str]:
    with serve(openai_fake.create_app(api_key=KEY)) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def veo_url() -> Iterator[str]:
    state = veo_fake.VeoState()
    with serve(veo_fake.create_cdn_app(state)) as cdn, serve(veo_fake.create_app(state=state, cdn_url=cdn)) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


@pytest.fixture
async def limiter(redis_base: str) -> AsyncIterator[Limiter]:
    r = aioredis.Redis.from_url(f"{redis_base}/0")
    prefix = f"test-faults:{uuid.uuid4().hex[:12]}"
    yield Limiter(r, prefix, cooldown_failures=1)
    keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


def dep(adapter: str, model: str, url: str, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Deployment:
    monkeypatch.setenv("GENROUTE_TEST_FAULT_KEY", veo_fake.API_KEY if adapter == "google_veo" else KEY)
    return Deployment(name=f"{adapter}-{uuid.uuid4().hex[:6]}", adapter=adapter, model=model, base_url=url,
                      api_key_env="GENROUTE_TEST_FAULT_KEY", options={"poll_interval": 0.02, **options})


def request(model: str, inp: dict[str, Any], modality: str = "image", callback_url: str | None = None) -> ProviderRequest:
    return ProviderRequest(job_id=f"job_{uuid.uuid4().hex}", tenant="t", modality=modality, provider_model=model,
                           input=inp, callback_url=callback_url)


async def health_after(limiter: Limiter, d: Deployment, err: ProviderError) -> tuple[int, bool]:
    """Record `err` as the worker does; return (consecutive failures, marked unhealthy)."""
    await limiter.record_error(d, err, catalog_version="v1")
    snap = await limiter.snapshot([d], catalog_version="v1")
    st = snap.states[d.name]
    return st.failures, st.unhealthy


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf.getvalue().hex()


# -- whose fault ---------------------------------------------------------------------------


async def test_an_unreachable_input_image_is_the_users_fault_and_leaves_health_alone(
    openai_url: str, http: httpx.AsyncClient, limiter: Limiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = dep("openai", "gpt-image-1", openai_url, monkeypatch)
    adapter = OpenAIAdapter(d, http)
    dead = f"http://127.0.0.1:{free_port()}/in.png"  # nothing listens there
    for _ in range(3):  # three of these once opened the breaker for every tenant
        with pytest.raises(ProviderError) as exc:
            await adapter.submit(request("gpt-image-1", {"prompt": "edit it", "input_images": [dead]}))
        e = exc.value
        assert (e.fault, e.code, e.retryable) == (Fault.user, ErrorCode.invalid_input, False), e
        assert not can_fall_back(e)
        assert await health_after(limiter, d, e) == (0, False)


async def test_a_model_the_provider_does_not_have_is_the_operators_fault(
    replicate_url: str, openai_url: str, veo_url: str, http: httpx.AsyncClient, limiter: Limiter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases: list[tuple[Any, Deployment, ProviderRequest]] = []
    d = dep("replicate", "acme/missing-model", replicate_url, monkeypatch)
    cases.append((ReplicateAdapter(d, http), d, request("acme/missing-model", {"prompt": "a fox"})))
    d = dep("google_veo", "veo-9-unknown", veo_url, monkeypatch)
    cases.append((GoogleVeoAdapter(d, http), d, request("veo-9-unknown", {"prompt": "x", "duration_seconds": 8}, "video")))
    for adapter, d, req in cases:
        with pytest.raises(ProviderError) as exc:
            await adapter.submit(req)
        e = exc.value
        # not the user's invalid input: an operator error, reported as the provider being unavailable
        assert (e.fault, e.code) == (Fault.operator, ErrorCode.provider_unavailable), e
        assert "misconfigured" in e.message
        assert can_fall_back(e), "nothing started there: the next deployment may take it"
        assert await health_after(limiter, d, e) == (0, True)  # this deployment is out, nothing else


async def test_a_chat_model_404_is_the_operators_fault(
    openai_url: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = OpenAIAdapter(dep("openai", "gpt-nope", openai_url, monkeypatch), http)
    for stream in (False, True):
        with pytest.raises(ProviderError) as exc:
            await adapter.chat({"messages": [{"role": "user", "content": "hi [model404]"}]}, stream=stream)
        assert (exc.value.fault, exc.value.code) == (Fault.operator, ErrorCode.provider_unavailable)


async def test_provider_trouble_counts_against_health(
    replicate_url: str, http: httpx.AsyncClient, limiter: Limiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = dep("replicate", "black-forest-labs/flux-schnell", replicate_url, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await ReplicateAdapter(d, http).submit(request(d.model, {"prompt": "a fox [429]"}))
    assert exc.value.fault is Fault.provider
    failures, unhealthy = await health_after(limiter, d, exc.value)
    assert failures == 1 and not unhealthy


# -- moderation ------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_cls", [OpenAIAdapter, OpenAICompatibleAdapter])
async def test_a_flagged_chat_prompt_is_moderated(
    adapter_cls: type[OpenAIAdapter], openai_url: str, http: httpx.AsyncClient, limiter: Limiter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = dep(adapter_cls.name, "gpt-4o-mini", openai_url, monkeypatch)
    adapter = adapter_cls(d, http)
    for stream in (False, True):
        with pytest.raises(ProviderError) as exc:
            await adapter.chat({"messages": [{"role": "user", "content": "something bad [flagged]"}]}, stream=stream)
        e = exc.value
        assert (e.kind, e.code, e.fault) == (ProviderErrorKind.moderated, ErrorCode.moderated, Fault.user), e
        assert e.detail["stage"] == "input"
        assert not can_fall_back(e) and await health_after(limiter, d, e) == (0, False)


async def test_veo_filtering_at_submit_is_moderated_at_once(
    veo_url: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = dep("google_veo", "veo-3.0-generate-001", veo_url, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await GoogleVeoAdapter(d, http).submit(
            request(d.model, {"prompt": "a crowd [moderated] [filtered-at-create]", "duration_seconds": 8}, "video"))
    assert (exc.value.kind, exc.value.code) == (ProviderErrorKind.moderated, ErrorCode.moderated)
    assert exc.value.detail["stage"] == "input"


# -- resend safety -----------------------------------------------------------------------------


async def _predictions(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{url}/v1/predictions", headers={"Authorization": f"Bearer {KEY}"})
        return list(r.json()["results"])


async def test_a_502_after_replicate_accepted_is_not_resent_and_the_stray_prediction_is_canceled(
    replicate_url: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = dep("replicate", "black-forest-labs/flux-schnell", replicate_url, monkeypatch)
    prompt = f"a fox {uuid.uuid4().hex} [502-accepted]"
    with pytest.raises(ProviderError) as exc:
        await ReplicateAdapter(d, http).submit(request(d.model, {"prompt": prompt}))
    e = exc.value
    assert e.retryable and not e.resend_safe and not can_fall_back(e), "a second create could bill twice"
    mine = [p for p in await _predictions(replicate_url) if p["input"] and p["input"].get("prompt") == prompt]
    assert len(mine) == 1, "exactly the one prediction the interrupted create made"
    assert mine[0]["status"] == "canceled"
    assert e.detail["canceled_prediction"] == mine[0]["id"] and "canceled" in e.message


async def test_a_502_after_replicate_accepted_is_adopted_when_its_webhook_names_the_job(
    replicate_url: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = dep("replicate", "black-forest-labs/flux-schnell", replicate_url, monkeypatch)
    prompt = f"a fox {uuid.uuid4().hex} [502-accepted]"
    # an unroutable callback: the fake's deliveries fail quietly, the reference is what counts
    req = request(d.model, {"prompt": prompt}, callback_url=f"http://127.0.0.1:{free_port()}/v1/callbacks/replicate/job_x")
    result = await ReplicateAdapter(d, http).submit(req)
    assert isinstance(result, Pending), "found by its reference: the job goes on with it"
    mine = [p for p in await _predictions(replicate_url) if p["input"] and p["input"].get("prompt") == prompt]
    assert [p["id"] for p in mine] == [result.handle["id"]] and mine[0]["status"] != "canceled"


async def test_a_plain_5xx_on_a_create_is_not_resent(
    replicate_url: str, openai_url: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for adapter in (ReplicateAdapter(dep("replicate", "black-forest-labs/flux-schnell", replicate_url, monkeypatch), http),
                    OpenAIAdapter(dep("openai", "gpt-image-1", openai_url, monkeypatch), http)):
        with pytest.raises(ProviderError) as exc:
            await adapter.submit(request(adapter.deployment.model, {"prompt": "x [500]"}))
        assert exc.value.retryable and not exc.value.resend_safe and exc.value.fault is Fault.provider
        assert not can_fall_back(exc.value) and health_effect(exc.value).counts
