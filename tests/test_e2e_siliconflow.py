"""SiliconFlow end to end: API + worker processes, real Redis, PostgreSQL-or-SQLite and S3
(SeaweedFS), the SiliconFlow fake over real HTTP. Images and Wan video through POST
/v1/jobs and the OpenAI-compatible routes, chat through /v1/chat/completions on the
openai_compatible adapter; each one's cost settled from the catalog's prices (chat from
the usage in the stream's last chunk)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from tests.fakes import siliconflow
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

KEY_ENV = "E2E_SILICONFLOW_KEY"
PER_IMAGE, PER_VIDEO = 3_000, 350_000  # test prices, micro-USD
CHAT_PRICE = {"per_1k_input_tokens": 1_000, "per_1k_output_tokens": 4_000}


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with serve(siliconflow.create_app(queue_polls=2, progress_polls=2, slow_polls=60)) as url:
        yield url


def _catalog(path: Path, url: str) -> Path:
    provider = {"adapter": "siliconflow", "base_url": f"{url}/v1", "api_key_env": KEY_ENV, "options": {"poll_interval": 0.05}}

    def model(mid: str, modality: str, provider_model: str, price: dict[str, Any], adapter: str = "siliconflow") -> dict[str, Any]:
        return {"id": mid, "modality": modality, "deployments": [{
            "name": f"sf-{mid}", "provider": "siliconflow", "adapter": adapter, "model": provider_model, "price": price}]}

    data = {"providers": {"siliconflow": provider}, "models": [
        model("kolors", "image", "Kwai-Kolors/Kolors", {"per_image": PER_IMAGE}),
        model("wan-t2v", "video", "Wan-AI/Wan2.2-T2V-A14B", {"per_request": PER_VIDEO}),
        model("deepseek-r1", "text", "deepseek-ai/DeepSeek-R1", CHAT_PRICE, adapter="openai_compatible"),
    ]}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("siliconflow")
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed, catalog=_catalog(root / "catalog.yaml", fake),
                          env={KEY_ENV: siliconflow.API_KEY}, tenants=("alice", "bob", "chatter"))
    async with running(st):
        yield st


async def _job(stack: Stack, body: dict[str, Any], wait: int = 40) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        return r.json()


async def _bytes(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=30) as c:
        return (await c.get(url)).content  # a presigned S3 URL: the bytes live in our bucket


async def test_kolors_batch_job_succeeds_and_settles_per_image(stack: Stack) -> None:
    job = await _job(stack, {"model": "kolors", "input": {"prompt": "two red foxes", "n": 2, "size": "768x1024"}})
    assert job["status"] == "succeeded", (job["error"], stack.log("worker"))
    assert len(job["outputs"]) == 2
    for out in job["outputs"]:
        assert out["content_type"] == "image/png" and (out["width"], out["height"]) == (768, 1024)
        assert Image.open(io.BytesIO(await _bytes(out["url"]))).size == (768, 1024)
    assert job["cost"] == {"unit": "micro_usd", "status": "settled", "held": 2 * PER_IMAGE, "settled": 2 * PER_IMAGE}, job["cost"]


async def test_wan_video_job_succeeds_and_settles_per_video(stack: Stack) -> None:
    job = await _job(stack, {"model": "wan-t2v", "input": {"prompt": "waves at dusk", "aspect_ratio": "9:16"}})
    assert job["status"] == "succeeded", (job["error"], stack.log("worker"))
    out = job["outputs"][0]
    assert out["content_type"] == "video/mp4" and len(await _bytes(out["url"])) == out["bytes"] > 0
    assert out["duration_seconds"] == 5.0, out  # Wan2.2 renders 5 s clips, read from the stored file
    assert job["cost"]["status"] == "settled" and job["cost"]["settled"] == PER_VIDEO, job["cost"]


async def test_video_queue_position_is_the_jobs_queue_position(stack: Stack) -> None:
    """While SiliconFlow says InQueue, the job shows its place there, counting down."""
    async with stack.client() as c:
        job = (await c.post("/v1/jobs", json={"model": "wan-t2v", "input": {"prompt": "a long queue [slow]"}})).json()
        positions: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            j = (await c.get(f"/v1/jobs/{job['id']}")).json()
            if j["status"] == "running" and j["queue_position"] is not None:
                positions.append(j["queue_position"])
            if j["status"] in ("succeeded", "failed") or len(set(positions)) >= 3:
                break
            await asyncio.sleep(0.1)
        assert len(set(positions)) >= 3, (positions, j)
        assert positions == sorted(positions, reverse=True), positions
        done = await stack.wait_job(c, job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["queue_position"] is None, done


async def test_moderated_and_unknown_model_fail_with_stable_codes(stack: Stack) -> None:
    job = await _job(stack, {"model": "kolors", "input": {"prompt": "bad words [moderated]"}})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated", job["error"]
    assert job["error"]["details"]["stage"] == "input"
    assert job["cost"]["status"] == "released" and job["cost"]["settled"] == 0, job["cost"]
    job = await _job(stack, {"model": "wan-t2v", "input": {"prompt": "render [moderated-output]"}})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated", job["error"]
    assert job["error"]["details"]["stage"] == "output" and job["outputs"] == []
    assert job["cost"]["status"] == "released" and job["cost"]["settled"] == 0, job["cost"]


async def test_refused_parameters_are_a_4xx_naming_the_param(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "kolors", "input": {"prompt": "x", "provider_params": {"batch_size": 4}}})
        assert r.status_code == 422 and "batch_size" in r.text, r.text
    job = await _job(stack, {"model": "kolors", "input": {"prompt": "x", "size": "1000x1000"}})
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input", job["error"]
    assert "1024x1024" in job["error"]["message"]  # it says what the model takes


async def test_images_generations_route(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/images/generations", json={"model": "kolors", "prompt": "a lighthouse", "size": "1024x1024",
                                                          "response_format": "url"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) == 1 and body["data"][0]["url"]
        assert Image.open(io.BytesIO(await _bytes(body["data"][0]["url"]))).size == (1024, 1024)
        job = (await c.get(f"/v1/jobs/{r.headers['x-genroute-job-id']}")).json()
    assert job["cost"]["settled"] == PER_IMAGE, job["cost"]


def _chat_cost(prompt_tokens: int, completion_tokens: int) -> int:
    return math.ceil((CHAT_PRICE["per_1k_input_tokens"] * prompt_tokens + CHAT_PRICE["per_1k_output_tokens"] * completion_tokens) / 1000)


async def _usage(stack: Stack, tenant: str, requests: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    async with stack.client(tenant) as c:
        while True:
            report = (await c.get("/v1/usage", params={"group_by": "model"})).json()
            group = next((g for g in report["data"] if g["group"] == "deepseek-r1"), None)
            if group is not None and group["requests"] >= requests or time.monotonic() > deadline:
                assert group is not None, report
                return group
            await asyncio.sleep(0.1)


async def test_chat_stream_is_charged_from_the_last_chunks_usage(stack: Stack) -> None:
    """SiliconFlow sends a running usage in every chunk and no separate usage chunk: the
    call is recorded and charged with the last one (3 reasoning + 5 content tokens)."""
    prompt = "name five words"
    async with stack.client("chatter") as c:
        async with c.stream("POST", "/v1/chat/completions", json={
            "model": "deepseek-r1", "stream": True, "messages": [{"role": "user", "content": prompt}]}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in ch for ch in chunks)  # not asked for: stripped, but recorded
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks).split() == [f"word{i}" for i in range(1, 6)]
    group = await _usage(stack, "chatter", 1)
    assert (group["prompt_tokens"], group["completion_tokens"]) == (3, 8), group
    assert group["cost"] == _chat_cost(3, 8) and group["succeeded"] == 1, group

    async with stack.client("chatter") as c:
        r = await c.post("/v1/chat/completions", json={"model": "deepseek-r1", "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8 and r.json()["model"] == "deepseek-r1"
    group = await _usage(stack, "chatter", 2)
    assert group["cost"] == 2 * _chat_cost(3, 8), group


async def test_chat_moderation_is_an_openai_style_400(stack: Stack) -> None:
    async with stack.client("bob") as c:
        r = await c.post("/v1/chat/completions", json={"model": "deepseek-r1", "messages": [{"role": "user", "content": "x [moderated]"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("moderated", "content_policy_violation"), r.json()


async def test_in_progress_video_reads_fine_without_a_progress_figure(stack: Stack, fake: str) -> None:
    """SiliconFlow gives no percentage: InProgress polls carry no progress, and the job
    still reads as running (no queue position), then succeeds."""
    async with httpx.AsyncClient() as h:
        assert (await h.post(f"{fake}/_control/config", json={"progress_polls": 60})).status_code == 200
    try:
        async with stack.client() as c:
            job = (await c.post("/v1/jobs", json={"model": "wan-t2v", "input": {"prompt": "rendering"}})).json()
            seen: list[dict[str, Any]] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = await c.get(f"/v1/jobs/{job['id']}")
                assert r.status_code == 200, r.text
                j = r.json()
                if j["status"] == "running" and j["progress"]["message"] == "in progress":
                    seen.append(j)
                if len(seen) >= 3 or j["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert seen and all(s["queue_position"] is None for s in seen), seen
            done = await stack.wait_job(c, job["id"], timeout=60)
        assert done["status"] == "succeeded", done
    finally:
        async with httpx.AsyncClient() as h:
            await h.post(f"{fake}/_control/config", json={"progress_polls": 2})
