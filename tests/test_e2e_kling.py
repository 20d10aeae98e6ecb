"""Kling end to end: API + worker processes, real Redis and S3 (SeaweedFS), the Kling fake
over real HTTP. Jobs through POST /v1/jobs and the OpenAI-compatible /v1/videos reach
`succeeded` with the video stored and the cost settled from the catalog's per-second price
(by resolution); moderation and expired result URLs fail clearly; a cancel is local and
stops the polls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes import kling
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

KEY = "kling-e2e-key"
PER_SECOND = {"default": 56000, "1080p": 98000}  # micro-USD per second of video, std / pro


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with serve(kling.create_app(api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("kling")
    catalog = {"models": [{
        "id": "kling-video", "modality": "video",
        "capabilities": {"durations": [5, 10], "aspect_ratios": ["16:9", "9:16", "1:1"], "resolutions": ["720p", "1080p"]},
        "deployments": [{"name": "relay-kling", "adapter": "kling", "model": "kling-v2-1-master", "base_url": fake,
                         "api_key_env": "E2E_KLING_KEY", "options": {"poll_interval": 0.05},
                         "price": {"per_second": PER_SECOND}}],
    }]}
    (root / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed, catalog=root / "catalog.yaml",
                          env={"E2E_KLING_KEY": KEY})
    async with running(st):
        yield st


async def _job(stack: Stack, inp: dict[str, Any], wait: int = 40) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "kling-video", "input": inp}, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        job = r.json()
        if job["status"] not in ("succeeded", "failed", "canceled"):  # a loaded machine: wait on
            job = await stack.wait_job(c, job["id"], timeout=60)
        return job


async def _stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"{url}/_control/stats")).json()


@pytest.mark.parametrize("inp,seconds,rate", [
    ({"prompt": "a paper boat on a river", "duration_seconds": 5, "aspect_ratio": "16:9"}, 5, PER_SECOND["default"]),
    ({"prompt": "a fox in snow", "duration_seconds": 10, "resolution": "1080p"}, 10, PER_SECOND["1080p"]),
], ids=["5s-720p", "10s-1080p"])
async def test_job_succeeds_with_the_video_stored_and_the_cost_settled(stack: Stack, inp: dict[str, Any], seconds: int, rate: int) -> None:
    job = await _job(stack, inp)
    assert job["status"] == "succeeded", (job["status"], job["error"], stack.log("worker")[-2000:])
    out = job["outputs"][0]
    assert out["content_type"] == "video/mp4" and out["bytes"] > 0
    assert out["duration_seconds"] == pytest.approx(seconds + 0.041, abs=0.01)
    async with httpx.AsyncClient(timeout=30) as c:
        assert len((await c.get(out["url"])).content) == out["bytes"]  # the bytes live in our bucket
    # held for the asked length, settled on the nominal seconds Kling reported (5.041 -> 5)
    assert job["cost"] == {"unit": "micro_usd", "status": "settled", "held": rate * seconds, "settled": rate * seconds}, job["cost"]


async def test_openai_videos_route_runs_a_kling_job(stack: Stack) -> None:
    job, got, content = await stack.openai_video({"model": "kling-video", "prompt": "waves at dusk", "seconds": "5",
                                                  "size": "1280x720"})
    assert got["status"] == "completed" and got["seconds"] == "5" and got["size"] == "1280x720", got
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4" and content.content[4:8] == b"ftyp"
    assert job["cost"]["settled"] == PER_SECOND["default"] * 5


@pytest.mark.parametrize("prompt,code,stage", [
    ("something [moderated]", "moderated", "input"),
    ("something [moderated-output]", "moderated", "output"),
    ("boom [fail]", "provider_error", None),
])
async def test_failed_tasks_fail_the_job_with_klings_reason(stack: Stack, prompt: str, code: str, stage: str | None) -> None:
    job = await _job(stack, {"prompt": prompt})
    assert job["status"] == "failed" and job["error"]["code"] == code, job
    if stage:
        assert job["error"]["details"]["stage"] == stage, job["error"]
    assert job["outputs"] == [] and job["cost"]["status"] == "released" and job["cost"]["settled"] == 0, job["cost"]


async def test_expired_result_url_fails_clearly_and_stores_nothing(stack: Stack) -> None:
    job = await _job(stack, {"prompt": "late [expired]"})
    assert job["status"] == "failed" and job["error"]["code"] == "provider_error", job
    assert "expired" in job["error"]["message"].lower() and job["outputs"] == []


async def test_cancel_is_local_and_the_polls_stop(stack: Stack, fake: str) -> None:
    """Kling cannot cancel a task: the job is canceled here and nobody polls it again."""
    async with httpx.AsyncClient() as c:
        await c.post(f"{fake}/_control/config", json={"slow_polls": 10**6})  # it never finishes by itself
    try:
        known = set((await _stats(fake))["polls_by_task"])
        async with stack.client() as c:
            job = (await c.post("/v1/jobs", json={"model": "kling-video", "input": {"prompt": "a long one [slow]"}})).json()
            task_id = None
            for _ in range(400):  # until the task exists upstream and is being polled
                task_id = next((t for t, n in (await _stats(fake))["polls_by_task"].items() if t not in known and n >= 2), None)
                if task_id is not None:
                    break
                await asyncio.sleep(0.05)
            assert task_id is not None, stack.log("worker")[-2000:]
            r = await c.post(f"/v1/jobs/{job['id']}/cancel")
            assert r.status_code in (200, 202), r.text
            canceled = await stack.wait_job(c, job["id"], timeout=20)
            assert canceled["status"] == "canceled", canceled
        await asyncio.sleep(1.0)  # twenty poll intervals: a poll already in flight lands
        polls = (await _stats(fake))["polls_by_task"][task_id]
        await asyncio.sleep(1.5)
        assert (await _stats(fake))["polls_by_task"][task_id] == polls, "a canceled job is still polled"
    finally:
        async with httpx.AsyncClient() as c:
            await c.post(f"{fake}/_control/config", json={"slow_polls": 12})


async def test_a_429_is_waited_out_and_the_job_then_runs_once(stack: Stack, fake: str) -> None:
    """Kling's 1303 (too many tasks for the resource pack) is a 429 with no Retry-After: the
    adapter names a 10 s wait, the worker keeps the job and tries again no sooner, and once a
    slot is free the job runs, with one task created upstream."""
    async with httpx.AsyncClient() as c:
        await c.post(f"{fake}/_control/config", json={"max_concurrency": 0})  # every create answers 1303
    try:
        before = await _stats(fake)
        async with stack.client() as c:
            job = (await c.post("/v1/jobs", json={"model": "kling-video", "input": {"prompt": "a busy day"}})).json()
            for _ in range(200):  # the first create is refused
                if (await _stats(fake))["creates"] > before["creates"]:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(4.0)  # well inside the 10 s the adapter asked for
            waiting = (await c.get(f"/v1/jobs/{job['id']}")).json()
            tried = (await _stats(fake))["creates"] - before["creates"]
            assert waiting["status"] in ("queued", "running") and tried == 1, (waiting["status"], tried, stack.log("worker")[-2000:])
            async with httpx.AsyncClient() as f:
                await f.post(f"{fake}/_control/config", json={"max_concurrency": None})
            done = await stack.wait_job(c, job["id"], timeout=60)
    finally:
        async with httpx.AsyncClient() as c:
            await c.post(f"{fake}/_control/config", json={"max_concurrency": None})
    assert done["status"] == "succeeded", (done["error"], stack.log("worker")[-2000:])
    after = await _stats(fake)
    assert after["accepted"] - before["accepted"] == 1, "one task upstream"
    assert 2 <= after["creates"] - before["creates"] <= 4, (after["creates"] - before["creates"])
