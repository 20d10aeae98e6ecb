"""The OpenAI-style video relays end to end: API + worker processes, real Redis and S3
(SeaweedFS), the CometAPI, DMXAPI and poloapi fakes over real HTTP, and the shipped
catalogs' own video deployments and options (only the hosts swapped for the fakes', a price
added: the shipped files publish none). Jobs through POST /v1/jobs and the OpenAI-compatible
/v1/videos reach `succeeded` with the video stored (its length read from the file) and the
cost settled from the catalog's price; moderation fails with its stage, the hold released."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.openai_relay import API_KEY, create_app
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

ROOT = Path(__file__).resolve().parent.parent
PER_SECOND = 100_000  # micro-USD per second of a Sora clip
PER_CLIP = 400_000  # micro-USD per Veo clip (a fixed length: per_request)
# shipped catalog -> (its video provider, the models taken from it, their price)
TAKEN = {
    "cometapi": ("cometapi-video", {"sora-2-cometapi": {"per_second": PER_SECOND}, "veo3-fast-cometapi": {"per_request": PER_CLIP}}),
    "dmxapi": ("dmxapi-video", {"sora-2-dmxapi": {"per_second": PER_SECOND}}),
    "poloapi": ("poloapi-video", {"veo3.1-fast-poloapi": {"per_request": PER_CLIP}}),
}
KEYS = {"COMETAPI_KEY": API_KEY, "DMXAPI_KEY": API_KEY, "POLOAPI_KEY": API_KEY}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        yield {flavor: stack.enter_context(serve(create_app(flavor=flavor, api_key=API_KEY))) for flavor in TAKEN}


def _catalog(path: Path, fakes: dict[str, str]) -> Path:
    data: dict[str, Any] = {"providers": {}, "models": []}
    for name, (provider, models) in TAKEN.items():
        shipped = yaml.safe_load((ROOT / "catalogs" / f"{name}.yaml").read_text())
        video = shipped["providers"][provider]
        video["base_url"] = f"{fakes[name]}/v1"
        video["options"] = {**video.get("options", {}), "poll_interval": 0.05}
        data["providers"][provider] = video
        for model in shipped["models"]:
            if model["id"] in models:
                for dep in model["deployments"]:
                    dep["price"] = models[model["id"]]
                data["models"].append(model)
    assert len(data["models"]) == sum(len(m) for _, m in TAKEN.values()), "a taken model left the shipped catalogs"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fakes: dict[str, str], tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("relays")
    catalog = _catalog(root / "catalog.yaml", fakes)
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed, catalog=catalog, env=dict(KEYS))
    async with running(st):
        yield st


async def _job(stack: Stack, model: str, inp: dict[str, Any]) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": model, "input": inp}, headers={"Prefer": "wait=40"})
        assert r.status_code in (200, 202), r.text
        job = r.json()
        if job["status"] not in ("succeeded", "failed", "canceled"):  # a loaded machine: wait on
            job = await stack.wait_job(c, job["id"], timeout=60)
        return job


CASES = [  # model, input, stored seconds, settled cost
    ("sora-2-cometapi", {"prompt": "a cat surfing", "duration_seconds": 8, "aspect_ratio": "9:16"}, 8, 8 * PER_SECOND),
    ("veo3-fast-cometapi", {"prompt": "waves at dusk", "aspect_ratio": "16:9"}, 8, PER_CLIP),
    ("sora-2-dmxapi", {"prompt": "a paper boat", "duration_seconds": 4}, 4, 4 * PER_SECOND),
    ("veo3.1-fast-poloapi", {"prompt": "a lighthouse", "provider_params": {"size": "1280x720"}}, 8, PER_CLIP),
    # poloapi's link only at /content, which answers JSON
    ("veo3.1-fast-poloapi", {"prompt": "a lighthouse [no-url-in-poll]"}, 8, PER_CLIP),
]


@pytest.mark.parametrize("model,inp,seconds,cost", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
async def test_relay_video_job_is_stored_and_settled_from_the_catalog(stack: Stack, model: str, inp: dict[str, Any],
                                                                      seconds: int, cost: int) -> None:
    job = await _job(stack, model, inp)
    assert job["status"] == "succeeded", (job["status"], job["error"], stack.log("worker")[-3000:])
    out = job["outputs"][0]  # CometAPI's Sora adds its thumbnail; DMXAPI's has none, and it is not asked
    assert out["content_type"] == "video/mp4" and len(job["outputs"]) == (2 if model == "sora-2-cometapi" else 1), job["outputs"]
    assert out["duration_seconds"] == seconds, out
    async with httpx.AsyncClient(timeout=30) as c:
        data = (await c.get(out["url"])).content  # a presigned S3 URL: the bytes live in our bucket
    assert len(data) == out["bytes"] > 0 and data[4:8] == b"ftyp"
    assert job["cost"]["status"] == "settled" and job["cost"]["settled"] == cost, job["cost"]


@pytest.mark.parametrize("model", ["sora-2-cometapi", "sora-2-dmxapi", "veo3.1-fast-poloapi"])
@pytest.mark.parametrize("keyword,stage", [("[moderated]", "input"), ("[moderated-output]", "output")])
async def test_relay_moderation_fails_with_its_stage_and_releases_the_hold(stack: Stack, model: str, keyword: str,
                                                                          stage: str) -> None:
    job = await _job(stack, model, {"prompt": f"something {keyword}"})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated", job
    assert job["error"]["details"]["stage"] == stage, job["error"]
    assert job["outputs"] == [] and job["cost"]["status"] == "released" and job["cost"]["settled"] == 0, job["cost"]


async def test_openai_videos_route_runs_a_relay_job(stack: Stack) -> None:
    job, got, content = await stack.openai_video({"model": "sora-2-cometapi", "prompt": "a fox", "seconds": "4",
                                                  "size": "720x1280"})
    assert got["status"] == "completed" and got["seconds"] == "4" and got["size"] == "720x1280", got
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4" and content.content[4:8] == b"ftyp"
    assert job["cost"]["settled"] == 4 * PER_SECOND
