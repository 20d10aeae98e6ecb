"""Together and Fireworks end to end: API + worker processes, real Redis and S3
(SeaweedFS), each provider's fake over real HTTP, and the catalogs the project ships
(catalogs/together.yaml, catalogs/fireworks.yaml) pointed at the fakes. Jobs reach
`succeeded` with stored outputs and the cost settled from the catalog's prices; the
OpenAI-compatible doors (images, videos, chat) serve the same models."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from tests.fakes import fireworks, together
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"TOGETHER_API_KEY": "tg-e2e-key", "FIREWORKS_API_KEY": "fw-e2e-key"}
VIDEO_HOLD = 600_000  # above what the fake reports (0.49 USD): the settle must come from the report


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        tg = together.TogetherState(api_key=KEYS["TOGETHER_API_KEY"])
        files = stack.enter_context(serve(together.create_files_app(tg)))
        fw = fireworks.FireworksState(api_key=KEYS["FIREWORKS_API_KEY"])
        delivery = stack.enter_context(serve(fireworks.create_delivery_app(fw)))
        yield {
            "together": stack.enter_context(serve(together.create_app(state=tg, files_url=files))),
            "fireworks": stack.enter_context(serve(fireworks.create_app(state=fw, delivery_url=delivery))),
        }


def _catalog(path: Path, f: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """Both shipped catalogs in one, their providers pointed at the fakes, polled fast."""
    data: dict[str, Any] = {"providers": {}, "models": []}
    for name, base in (("together", f"{f['together']}/v1"), ("fireworks", f"{f['fireworks']}/inference/v1")):
        shipped = yaml.safe_load((ROOT / "catalogs" / f"{name}.yaml").read_text())
        for provider in shipped["providers"].values():
            provider["base_url"] = base
            provider["options"] = {**provider.get("options", {}), "poll_interval": 0.05}
        data["providers"].update(shipped["providers"])
        data["models"] += shipped["models"]
    for model in data["models"]:
        for dep in model["deployments"]:
            dep.get("options", {}).pop("poll_interval", None)  # the provider's fast cadence applies
            if dep["name"] == "together-hailuo-02":
                dep["price"]["hold"] = VIDEO_HOLD
    path.write_text(yaml.safe_dump(data))
    prices = {m["id"]: m["deployments"][0]["price"] for m in data["models"]}
    return path, prices


@pytest.fixture(scope="module")
async def env(fakes: dict[str, str], tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[tuple[Stack, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("togfire")
    catalog, prices = _catalog(root / "catalog.yaml", fakes)
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed, catalog=catalog, env=dict(KEYS))
    async with running(st):
        yield st, prices


async def _job(stack: Stack, body: dict[str, Any], wait: int = 40) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        job = r.json()
        if job["status"] not in ("succeeded", "failed", "canceled"):
            job = await stack.wait_job(c, job["id"])
        return job


CASES = [
    # model, input, content type, size, the settled cost (micro-USD) from the catalog's price
    ("flux-schnell-together", {"prompt": "a red fox", "size": "1024x1024", "output_format": "jpeg"}, "image/jpeg",
     (1024, 1024), lambda p: p["per_image"]["default"]),
    ("flux-schnell-together", {"prompt": "two foxes", "size": "1536x1024", "n": 2}, "image/png",
     (1536, 1024), lambda p: 2 * p["per_image"]["1536x1024"]),
    ("hailuo-02-together", {"prompt": "a paper boat", "duration_seconds": 5, "aspect_ratio": "16:9"}, "video/mp4",
     None, lambda p: round(together.VIDEO_MODELS["minimax/hailuo-02"] * p["per_credit"])),
    ("flux-schnell-fireworks", {"prompt": "a cabin", "aspect_ratio": "1:1"}, "image/png", (1024, 1024),
     lambda p: p["per_image"]),
    ("flux-kontext-pro-fireworks", {"prompt": "make it snow", "aspect_ratio": "16:9", "output_format": "jpeg"},
     "image/jpeg", (1376, 768), lambda p: p["per_image"]),
]


@pytest.mark.parametrize("model,inp,content_type,size,cost", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
async def test_job_succeeds_with_stored_outputs_and_settled_cost(env: tuple[Stack, dict[str, Any]], model: str, inp: dict,
                                                                 content_type: str, size: tuple | None, cost: Any) -> None:
    stack, prices = env
    job = await _job(stack, {"model": model, "input": inp})
    assert job["status"] == "succeeded", (job["status"], job["error"], stack.log("worker")[-3000:])
    assert len(job["outputs"]) == inp.get("n", 1)
    out = job["outputs"][0]
    assert out["content_type"] == content_type and out["bytes"] > 0
    async with httpx.AsyncClient(timeout=30) as c:
        data = (await c.get(out["url"])).content  # a presigned S3 URL: the bytes live in our bucket
    assert len(data) == out["bytes"]
    if size:
        assert Image.open(io.BytesIO(data)).size == size == (out["width"], out["height"])
    if content_type == "video/mp4":  # the stored file's own length
        assert out["duration_seconds"] == inp["duration_seconds"], out
    expected = cost(prices[model])
    assert job["cost"]["status"] == "settled" and job["cost"]["settled"] == expected, job["cost"]
    if model == "hailuo-02-together":
        assert job["cost"]["held"] == VIDEO_HOLD > expected  # held the catalog's hold, charged the reported cost


@pytest.mark.parametrize("model,inp,stage", [
    ("flux-schnell-fireworks", {"prompt": "something [moderated-output]"}, "output"),
    ("flux-kontext-pro-fireworks", {"prompt": "something [moderated]"}, "input"),
    ("flux-schnell-together", {"prompt": "something [moderated]"}, "input"),
    ("hailuo-02-together", {"prompt": "something [moderated-output]"}, "output"),
])
async def test_moderation_fails_the_job_moderated_and_charges_nothing(env: tuple[Stack, dict[str, Any]], model: str, inp: dict, stage: str) -> None:
    stack, _ = env
    job = await _job(stack, {"model": model, "input": inp})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated", job
    assert job["error"]["details"]["stage"] == stage, job["error"]
    assert job["outputs"] == [] and job["cost"]["status"] == "released" and job["cost"]["settled"] == 0, job["cost"]


async def test_expired_sample_fails_clearly_and_stores_nothing(env: tuple[Stack, dict[str, Any]]) -> None:
    stack, _ = env
    job = await _job(stack, {"model": "flux-kontext-pro-fireworks", "input": {"prompt": "late [expired]"}})
    assert job["status"] == "failed" and job["error"]["code"] == "provider_error", job
    assert "expired" in job["error"]["message"].lower() and job["outputs"] == []


# -- the OpenAI-compatible doors -------------------------------------------------------------
@pytest.mark.parametrize("model,size", [("flux-schnell-fireworks", "1024x1024"), ("flux-schnell-together", "768x512")])
async def test_images_generations(env: tuple[Stack, dict[str, Any]], model: str, size: str) -> None:
    stack, _ = env
    async with stack.client() as c:
        r = await c.post("/v1/images/generations", json={"model": model, "prompt": "a harbour", "size": size,
                                                          "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    w, h = (int(x) for x in size.split("x"))
    assert image.size == (w, h)


async def test_videos_create_poll_and_content(env: tuple[Stack, dict[str, Any]]) -> None:
    stack, _ = env
    async with stack.client() as c:
        r = await c.post("/v1/videos", json={"model": "hailuo-02-together", "prompt": "waves", "seconds": "6", "size": "1280x720"})
        assert r.status_code == 200, r.text
        video = r.json()
        for _ in range(200):
            video = (await c.get(f"/v1/videos/{video['id']}")).json()
            if video["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.1)
        assert video["status"] == "completed", video
        content = await c.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4" and len(content.content) > 100


@pytest.mark.parametrize("model", ["llama-3.3-70b-together", "llama-3.3-70b-fireworks"])
async def test_chat_completions_through_openai_compatible(env: tuple[Stack, dict[str, Any]], model: str) -> None:
    stack, prices = env
    async with stack.client() as c:
        r = await c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["choices"][0]["message"]["content"] == "You said: hello there" and done["model"] == model
    assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > 0


async def test_cancel_of_a_together_video_is_local(env: tuple[Stack, dict[str, Any]], fakes: dict[str, str]) -> None:
    """Together has no cancel for videos: the job is canceled here at once, no second
    task is created, and nothing more is stored or charged beyond the started task."""
    stack, _ = env
    async with httpx.AsyncClient() as fake:
        await fake.post(f"{fakes['together']}/_control/config", json={"slow_polls": 100_000})
        try:
            async with stack.client() as c:
                job = (await c.post("/v1/jobs", json={"model": "hailuo-02-together", "input": {"prompt": "long [slow]"}})).json()
                for _ in range(400):  # until the provider has the task (the handle is saved)
                    j = (await c.get(f"/v1/jobs/{job['id']}")).json()
                    if j["status"] == "running" and j["progress"]["message"] in ("queued", "in_progress"):
                        break
                    await asyncio.sleep(0.05)
                assert j["status"] == "running", j
                creates = (await fake.get(f"{fakes['together']}/_control/stats")).json()["creates"]
                r = await c.post(f"/v1/jobs/{job['id']}/cancel")
                assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
                done = await stack.wait_job(c, job["id"])
            assert done["status"] == "canceled" and done["outputs"] == []
            # the render goes on (and bills) at Together: the hold is settled, not released
            assert done["cost"]["status"] == "settled" and done["cost"]["settled"] == VIDEO_HOLD, done["cost"]
            videos = (await fake.get(f"{fakes['together']}/_control/requests")).json()
            assert (await fake.get(f"{fakes['together']}/_control/stats")).json()["creates"] == creates
            assert videos[-1]["body"]["prompt"] == "long [slow]"
        finally:
            await fake.post(f"{fakes['together']}/_control/config", json={"slow_polls": 20})
