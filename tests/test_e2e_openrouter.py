"""OpenRouter end to end: API + worker processes, real Redis, PostgreSQL/SQLite and S3
(SeaweedFS), the OpenRouter fake over real HTTP. Jobs (text, images through chat, video)
and the OpenAI-compatible routes (/v1/chat/completions, /v1/images/generations) run
through the catalog's `models` / `provider` routing; the cost settled is what OpenRouter
reported for the model that answered (not the catalog's estimate), and the usage row names
that model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image
from sqlmodel import select

from core.db import create_engine, sessionmaker
from core.models import UsageRecord
from tests.fakes import openrouter
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

KEY_ENV = "E2E_OPENROUTER_KEY"
PROVIDER = {"order": ["openai", "anthropic"], "allow_fallbacks": True, "data_collection": "deny", "zdr": True,
            "max_price": {"prompt": 2, "completion": 8}}
# The catalog's prices are deliberately not the fake's: a cost equal to OpenRouter's
# reported one proves the settle used it (per_credit: one OpenRouter credit is one USD).
CHAT_PRICE = {"per_1k_input_tokens": 900, "per_1k_output_tokens": 5000, "per_credit": 1_000_000}
IMAGE_PRICE = {"per_image": 50_000, "per_credit": 1_000_000}
VIDEO_PRICE = {"per_second": 500_000, "per_credit": 1_000_000}


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with serve(openrouter.create_app()) as url:
        yield url + "/api/v1"


def _catalog(path: Path, url: str) -> Path:
    def model(mid: str, modality: str, provider_model: str, price: dict[str, Any], **options: Any) -> dict[str, Any]:
        return {"id": mid, "modality": modality, "deployments": [{
            "name": f"openrouter-{mid}", "adapter": "openrouter", "model": provider_model, "base_url": url,
            "api_key_env": KEY_ENV, "price": price, "options": {"poll_interval": 0.05, **options}}]}

    data = {"models": [
        model("or-chat", "text", "openai/gpt-4o-mini", CHAT_PRICE, models=["anthropic/claude-3.5-haiku"], provider=PROVIDER),
        model("or-image", "image", "google/gemini-2.5-flash-image", IMAGE_PRICE),
        model("or-video", "video", "google/veo-3.1", VIDEO_PRICE),
    ]}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("openrouter")
    # A long reconcile grace: on a loaded machine the first job can wait on the queue past
    # the default 2 s, and the reconciler then starts a second run of a job whose run is
    # live (a race of workers/reconcile.py, not of this adapter) that fails it.
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed, catalog=_catalog(root / "catalog.yaml", fake),
                          env={KEY_ENV: openrouter.API_KEY}, reconcile_grace_seconds="30")
    async with running(st):
        yield st


async def _job(stack: Stack, body: dict[str, Any], wait: int = 40) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        job = r.json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else await stack.wait_job(c, job["id"])


async def _usage(stack: Stack, row_id: str) -> UsageRecord:
    """The usage row: a chat call's is written after its response, so it may trail it."""
    engine = create_engine(stack.settings())
    try:
        for _ in range(100):
            async with sessionmaker(engine)() as s:
                row = (await s.exec(select(UsageRecord).where(UsageRecord.id == row_id))).first()
            if row is not None:
                return row
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    raise AssertionError(f"no usage row for {row_id}")


async def _last(fake: str, endpoint: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return dict((await c.get(f"{fake}/_control/stats")).json()["last"][endpoint])


def _chat_micros(model: str, prompt_tokens: int, completion_tokens: int) -> int:
    """What the fake reports (USD, rounded as it sends it), in micro-USD rounded up."""
    _, pin, pout = openrouter.TEXT_MODELS[model]
    usd = round((prompt_tokens * pin + completion_tokens * pout) / 1e6, 8)
    return math.ceil(Fraction(repr(usd)) * 1_000_000)


async def _stored(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=30) as c:
        return (await c.get(url)).content


# -- jobs ---------------------------------------------------------------------------


async def test_text_job_falls_back_inside_openrouter_and_settles_its_cost(stack: Stack, fake: str) -> None:
    job = await _job(stack, {"model": "or-chat", "input": {"messages": [{"role": "user", "content": "hi [primary-down]"}]}})
    assert job["status"] == "succeeded", (job["error"], stack.log("worker")[-2000:])
    sent = await _last(fake, "chat")
    assert sent["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"] and sent["provider"] == PROVIDER
    answer = json.loads(await _stored(job["outputs"][0]["url"]))
    assert answer["model"] == "anthropic/claude-3.5-haiku" and "cost" not in answer["usage"] and "provider" not in answer
    usage = answer["usage"]
    expected = _chat_micros("anthropic/claude-3.5-haiku", usage["prompt_tokens"], usage["completion_tokens"])
    assert job["cost"]["status"] == "settled" and job["cost"]["settled"] == expected, job["cost"]
    row = await _usage(stack, job["id"])
    assert row.cost == expected and row.attempts[-1]["answered_model"] == "anthropic/claude-3.5-haiku"


async def test_image_job_through_chat_is_stored_and_settled_on_the_reported_cost(stack: Stack, fake: str) -> None:
    job = await _job(stack, {"model": "or-image", "input": {"prompt": "a lighthouse", "aspect_ratio": "16:9"}})
    assert job["status"] == "succeeded", (job["error"], stack.log("worker")[-2000:])
    out = job["outputs"][0]
    assert out["content_type"] == "image/png" and (out["width"], out["height"]) == (1344, 768)
    assert Image.open(io.BytesIO(await _stored(out["url"]))).size == (1344, 768)
    sent = await _last(fake, "chat")
    assert sent["modalities"] == ["image", "text"] and sent["image_config"] == {"aspect_ratio": "16:9"}
    assert job["cost"]["settled"] == 39_000  # the fake's $0.039, not the catalog's 50000 per image


async def test_images_generations_route_serves_an_openrouter_image_model(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/images/generations", json={"model": "or-image", "prompt": "a fox"})
        assert r.status_code == 200, r.text
        body = r.json()
        job = (await c.get(f"/v1/jobs/{r.headers['x-genroute-job-id']}")).json()
    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert img.size == (1024, 1024) and body["output_format"] == "png"
    assert job["status"] == "succeeded" and job["cost"]["settled"] == 39_000


async def test_video_job_polls_downloads_with_the_key_and_settles_usage_cost(stack: Stack, fake: str) -> None:
    job = await _job(stack, {"model": "or-video", "input": {"prompt": "waves at dusk", "duration_seconds": 8,
                                                            "aspect_ratio": "16:9", "resolution": "720p"}}, wait=50)
    assert job["status"] == "succeeded", (job["error"], stack.log("worker")[-2000:])
    out = job["outputs"][0]
    assert out["content_type"] == "video/mp4" and len(await _stored(out["url"])) == out["bytes"] > 0
    assert out["duration_seconds"] == 8.0, out  # read from the stored file
    assert (await _last(fake, "videos"))["duration"] == 8
    # OpenRouter's usage.cost ($0.40 x 8 s), not the catalog's 500000 per second
    assert job["cost"] == {"unit": "micro_usd", "status": "settled", "held": 4_000_000, "settled": 3_200_000}


async def test_video_failure_and_moderation_map_to_job_errors(stack: Stack) -> None:
    failed = await _job(stack, {"model": "or-video", "input": {"prompt": "boom [fail]"}}, wait=50)
    assert failed["status"] == "failed" and failed["error"]["code"] == "provider_error", failed["error"]
    assert failed["cost"]["status"] == "released" and failed["cost"]["settled"] == 0, failed["cost"]
    for prompt, stage in (("bad [moderated]", "input"), ("bad [moderated-output]", "output")):
        flagged = await _job(stack, {"model": "or-video", "input": {"prompt": prompt}}, wait=50)
        assert flagged["status"] == "failed" and flagged["error"]["code"] == "moderated", flagged["error"]
        assert flagged["error"]["details"]["stage"] == stage, flagged["error"]
        assert flagged["cost"]["status"] == "released" and flagged["cost"]["settled"] == 0, flagged["cost"]


# -- /v1/chat/completions -----------------------------------------------------------


async def test_chat_route_records_the_answering_model_and_settles_openrouters_cost(stack: Stack, fake: str) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/chat/completions", json={"model": "or-chat", "messages": [
            {"role": "user", "content": "hello there [primary-down]"}]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == "or-chat"  # our name; the upstream model and provider are not shown
    assert answer["choices"][0]["message"]["content"].startswith("[anthropic/claude-3.5-haiku]")
    assert "provider" not in answer and not {"cost", "cost_credits", "is_byok", "cost_details"} & set(answer["usage"])
    sent = await _last(fake, "chat")
    assert sent["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"] and sent["provider"] == PROVIDER
    row = await _usage(stack, r.headers["x-genroute-request-id"])
    assert row.attempts[-1]["answered_model"] == "anthropic/claude-3.5-haiku"
    assert row.cost == _chat_micros("anthropic/claude-3.5-haiku", row.prompt_tokens, row.completion_tokens)


async def test_chat_route_stream_skips_keepalives_and_hides_billing(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/chat/completions", json={"model": "or-chat", "stream": True, "stream_options": {"include_usage": True},
                                                       "messages": [{"role": "user", "content": "one two three"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    lines = [ln for ln in r.text.splitlines() if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines  # no keep-alive comment reaches the tenant
    chunks = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
    text = "".join((ch["choices"][0]["delta"].get("content") or "") for ch in chunks if ch["choices"])
    assert text == "[openai/gpt-4o-mini] You said: one two three"
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] > 0 and "cost" not in usage and all("provider" not in ch for ch in chunks)
    row = await _usage(stack, r.headers["x-genroute-request-id"])
    assert row.stream and row.attempts[-1]["answered_model"] == "openai/gpt-4o-mini"
    assert row.cost == _chat_micros("openai/gpt-4o-mini", row.prompt_tokens, row.completion_tokens)


@pytest.mark.parametrize("name,value", [("models", ["openai/gpt-4o"]), ("provider", {"order": ["openai"]}),
                                        ("route", "fallback")])
async def test_a_tenant_cannot_set_openrouter_routing(stack: Stack, fake: str, name: str, value: Any) -> None:
    async with httpx.AsyncClient() as c:
        before = (await c.get(f"{fake}/_control/stats")).json()["creates"]
    async with stack.client() as c:
        r = await c.post("/v1/chat/completions", json={"model": "or-chat", "messages": [{"role": "user", "content": "hi"}],
                                                       name: value})
        assert r.status_code == 422 and name in r.json()["error"]["message"], r.text
        r = await c.post("/v1/jobs", json={"model": "or-chat", "input": {
            "messages": [{"role": "user", "content": "hi"}], "provider_params": {name: value}}})
        assert r.status_code == 422 and f"provider_params.{name}" in r.text, r.text
        assert r.json()["error"]["code"] == "param_not_allowed"
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{fake}/_control/stats")).json()["creates"] == before, "a refused request reached OpenRouter"
