"""GrsAi end to end: `genroute api` + `genroute worker` processes, real Redis and S3
(SeaweedFS), the shipped catalogs/grsai.yaml pointed at the GrsAi fake over real HTTP.
Jobs reach `succeeded` with stored outputs and their cost settled from the catalog's
prices; moderation and expired files fail clearly and are not charged; the OpenAI-compatible
image and video routes serve GrsAi models; an unsigned GrsAi callback finishes a job only
through the poll it prompts, and a forged one changes nothing."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import AsyncOpenAI
from PIL import Image

from tests.fakes import grsai
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-grsai-e2e"
# test prices (micro-USD): GrsAi's own are not in our reference, the shipped catalog sets none
PRICES: dict[str, dict[str, Any]] = {
    "nano-banana-fast": {"per_image": 20000},
    "nano-banana-pro": {"per_image": 90000},
    "nano-banana-2": {"per_image": 40000},
    "gpt-image-2": {"per_image": {"default": 30000, "1536x1024": 45000}},
    "flux-kontext-pro": {"per_image": 35000},
    "veo3.1-fast": {"per_second": 50000},
    "sora-2": {"per_second": 20000},
}


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    # a task nobody polls (a webHook run) takes a step every 0.3 s: its callback comes after
    # the worker saved the handle, as a real render's does minutes later
    with serve(grsai.create_app(api_key=KEY, tick=0.3)) as url:
        yield url


def _catalog(path: Path, url: str) -> Path:
    """The shipped catalog, aimed at the fake, with prices, fast polls and two deployments
    that poll once a minute (within a test only a callback can make them poll sooner)."""
    data = yaml.safe_load((ROOT / "catalogs/grsai.yaml").read_text())
    data["providers"]["grsai"].update(base_url=url, api_key_env="E2E_GRSAI_KEY")
    for model in data["models"]:
        for dep in model["deployments"]:
            dep["options"] = {**dep.get("options", {}), "poll_interval": 0.05}
            dep["price"] = PRICES[model["id"]]
    slow = {"poll_interval": 60}
    data["models"] += [
        {"id": "banana-cb", "modality": "image", "deployments": [
            {"name": "grsai-banana-cb", "provider": "grsai", "model": "nano-banana-fast",
             "options": {**slow, "callbacks": True}, "price": PRICES["nano-banana-fast"]}]},
        {"id": "banana-slow-poll", "modality": "image", "deployments": [
            {"name": "grsai-banana-slow-poll", "provider": "grsai", "model": "nano-banana-fast", "options": slow}]},
    ]
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("grsai")
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed,
                          catalog=_catalog(root / "catalog.yaml", fake), env={"E2E_GRSAI_KEY": KEY})
    async with running(st):
        yield st


async def _job(stack: Stack, body: dict[str, Any], wait: int = 40) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        job = r.json()
        if job["status"] not in ("succeeded", "failed", "canceled"):
            job = await stack.wait_job(c, job["id"], timeout=wait)
        return job


async def _fake(url: str, path: str) -> Any:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"{url}{path}")).json()


CASES = [
    ("nano-banana-fast", {"prompt": "a red fox", "aspect_ratio": "16:9"}, "image/png", (1024, 576), 20000),
    ("nano-banana-pro", {"prompt": "a bay", "size": "1024x1024", "provider_params": {"imageSize": "2K"}},
     "image/png", (2048, 2048), 90000),  # a size on a ratio model: its shape (1:1), at the 2K tier
    ("nano-banana-2", {"prompt": "a long banner", "aspect_ratio": "4:1"}, "image/png", (1024, 256), 40000),  # generate API
    ("gpt-image-2", {"prompt": "a lighthouse", "size": "1536x1024"}, "image/png", (1536, 1024), 45000),
    ("flux-kontext-pro", {"prompt": "make it snow", "output_format": "jpeg", "input_images": ["https://example.com/a.png"]},
     "image/jpeg", (1024, 1024), 35000),
    ("veo3.1-fast", {"prompt": "waves at dusk", "aspect_ratio": "9:16"}, "video/mp4", None, 8 * 50000),
    ("sora-2", {"prompt": "a cat surfing", "duration_seconds": 15, "resolution": "1024p"}, "video/mp4", None, 15 * 20000),
]


@pytest.mark.parametrize("model,inp,content_type,size,cost", CASES, ids=[c[0] for c in CASES])
async def test_each_grsai_model_succeeds_stored_and_settled(stack: Stack, model: str, inp: dict[str, Any],
                                                             content_type: str, size: tuple[int, int] | None, cost: int) -> None:
    job = await _job(stack, {"model": model, "input": inp})
    assert job["status"] == "succeeded", (job["status"], job["error"], stack.log("worker")[-2000:])
    out = job["outputs"][0]
    assert out["content_type"] == content_type and out["bytes"] > 0
    async with httpx.AsyncClient(timeout=30) as c:
        data = (await c.get(out["url"])).content  # a presigned S3 URL: the bytes live in our bucket
    assert len(data) == out["bytes"]
    if size:
        assert Image.open(io.BytesIO(data)).size == size == (out["width"], out["height"])
    if content_type == "video/mp4":  # the stored file's own length: Veo's fixed 8 s, Sora's asked 15 s
        assert out["duration_seconds"] == {"veo3.1-fast": 8, "sora-2": 15}[model], out
    assert job["cost"]["status"] == "settled" and job["cost"]["settled"] == cost, job["cost"]


@pytest.mark.parametrize("model,prompt,stage", [
    ("nano-banana-fast", "something [moderated]", "input"),
    ("gpt-image-2", "something [moderated-output]", "output"),
    ("nano-banana-2", "something [moderated-output]", "output"),  # violation on the generate API
])
async def test_moderation_fails_with_its_stage_and_is_not_charged(stack: Stack, model: str, prompt: str, stage: str) -> None:
    job = await _job(stack, {"model": model, "input": {"prompt": prompt}})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated", job
    assert job["error"]["details"]["stage"] == stage, job["error"]
    assert job["cost"]["status"] == "released" and job["cost"]["settled"] == 0, job["cost"]


async def test_expired_result_file_fails_clearly_and_stores_nothing(stack: Stack) -> None:
    job = await _job(stack, {"model": "nano-banana-fast", "input": {"prompt": "late [expired]"}})
    assert job["status"] == "failed" and job["error"]["code"] == "provider_error", job
    assert "expired" in job["error"]["message"].lower() and job["outputs"] == []


async def test_bad_parameter_is_refused_before_anything_runs(stack: Stack, fake: str) -> None:
    before = (await _fake(fake, "/_control/stats"))["creates"]
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "sora-2", "input": {"prompt": "p", "duration_seconds": 8}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", r.text
    assert (await _fake(fake, "/_control/stats"))["creates"] == before


async def test_openai_images_route_serves_a_grsai_model(stack: Stack) -> None:
    client = AsyncOpenAI(base_url=stack.api_url + "/v1", api_key=stack.keys["alice"], max_retries=0, timeout=60)
    got = await client.images.generate(model="nano-banana-fast", prompt="a lighthouse", size="1024x1024")
    image = Image.open(io.BytesIO(base64.b64decode(got.data[0].b64_json or "")))
    assert image.size == (1024, 1024)  # a size on a ratio model: sent as 1:1


async def test_openai_videos_route_serves_sora_on_grsai(stack: Stack) -> None:
    client = AsyncOpenAI(base_url=stack.api_url + "/v1", api_key=stack.keys["alice"], max_retries=0, timeout=60)
    video = await client.videos.create_and_poll(model="sora-2", prompt="waves", seconds="10", size="1280x720")  # type: ignore[arg-type]
    assert video.status == "completed", video
    data = (await client.videos.download_content(video.id)).read()
    assert data[4:8] == b"ftyp"
    async with stack.client() as c:
        job = (await c.get(f"/v1/jobs/{video.id}")).json()
    assert job["cost"]["settled"] == 10 * 20000


async def test_unsigned_callback_finishes_the_job_through_a_verifying_poll(stack: Stack, fake: str) -> None:
    before = await _fake(fake, "/_control/stats")
    t0 = time.monotonic()
    job = await _job(stack, {"model": "banana-cb", "input": {"prompt": "called back", "aspect_ratio": "1:1"}}, wait=30)
    assert job["status"] == "succeeded", (job["error"], stack.log("api")[-2000:], stack.log("worker")[-2000:])
    assert time.monotonic() - t0 < 25  # the deployment polls once a minute: the callback made it poll now
    after = await _fake(fake, "/_control/stats")
    assert after["callbacks_sent"] > before["callbacks_sent"]
    assert after["polls"] > before["polls"], "the job was finished without asking GrsAi"
    assert job["cost"]["settled"] == 20000
    sent = (await _fake(fake, "/_control/requests"))
    assert any(str(r.get("webHook", "")).startswith(stack.api_url + "/v1/callbacks/grsai/") for r in sent)


async def test_forged_callback_prompts_a_poll_and_changes_nothing_else(stack: Stack, fake: str) -> None:
    from core.callbacks import callback_token

    async with stack.client() as c:
        job = (await c.post("/v1/jobs", json={"model": "banana-slow-poll", "input": {"prompt": "slow [slow]"}})).json()
        for _ in range(400):  # until GrsAi took it (the handle is saved)
            j = (await c.get(f"/v1/jobs/{job['id']}")).json()
            if j["status"] == "running" and (j["progress"]["message"] or "").startswith("submitted"):
                break
            await asyncio.sleep(0.05)
        assert j["status"] == "running", j
        polls = (await _fake(fake, "/_control/stats"))["polls"]
        token = callback_token(stack.env["GENROUTE_SECRET_KEY"], job["id"])
        row = await _row(stack, job["id"])
        task_id = row["provider_handle"]["id"]
        forged = {"id": task_id, "status": "succeeded", "progress": 100, "results": [{"url": "http://127.0.0.1:1/evil.png"}]}
        r = await c.post(f"/v1/callbacks/grsai/{token}", json=forged)
        assert r.status_code == 202, r.text
        other = {**forged, "id": "someone-elses-task"}
        r = await c.post(f"/v1/callbacks/grsai/{token}", json={**other, "progress": 99})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        for _ in range(100):  # the verifying poll (GrsAi says: still running)
            if (await _fake(fake, "/_control/stats"))["polls"] > polls:
                break
            await asyncio.sleep(0.05)
        assert (await _fake(fake, "/_control/stats"))["polls"] > polls, "the callback did not prompt a poll"
        await asyncio.sleep(0.5)
        j = (await c.get(f"/v1/jobs/{job['id']}")).json()
        assert j["status"] == "running" and j["outputs"] == [], j
        await c.post(f"/v1/jobs/{job['id']}/cancel")


async def _row(stack: Stack, job_id: str) -> dict[str, Any]:
    """The job's provider handle, read from the ledger (the public job hides it)."""
    from core.db import create_engine, sessionmaker
    from core.models import Job

    engine = create_engine(stack.settings())
    try:
        async with sessionmaker(engine)() as session:
            row = await session.get(Job, job_id)
            assert row is not None
            return {"provider_handle": row.provider_handle}
    finally:
        await engine.dispose()
