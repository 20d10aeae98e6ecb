"""Every provider end to end: API + worker processes, real Redis and S3 (SeaweedFS), each
provider's fake over real HTTP. A job per catalog model reaches `succeeded` with stored
outputs; moderation, expired upstream URLs and provider callbacks behave as promised."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from tests.fakes import bfl, fal, google_veo, openai, replicate
from tests.fakes.server import free_port, serve
from tests.stack import Stack, make_stack, running

KEYS = {"BFL": "bfl-e2e", "OPENAI": "sk-e2e", "VEO": google_veo.API_KEY, "REPLICATE": "r8_e2e", "FAL": fal.API_KEY}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        poll_port = free_port()
        bfl_app = bfl.create_app(api_key=KEYS["BFL"], polling_base=f"http://127.0.0.1:{poll_port}")
        urls = {"bfl": stack.enter_context(serve(bfl_app))}
        stack.enter_context(serve(bfl_app, port=poll_port))
        urls["openai"] = stack.enter_context(serve(openai.create_app(api_key=KEYS["OPENAI"]))) + "/v1"
        veo_state = google_veo.VeoState()
        cdn = stack.enter_context(serve(google_veo.create_cdn_app(veo_state)))
        urls["veo"] = stack.enter_context(serve(google_veo.create_app(state=veo_state, cdn_url=cdn)))
        urls["replicate"] = stack.enter_context(serve(replicate.create_app(api_key=KEYS["REPLICATE"])))
        urls["fal"] = stack.enter_context(serve(fal.create_app()))
        yield urls


def _catalog(path: Path, f: dict[str, str]) -> Path:
    fast = {"poll_interval": 0.05}
    # callback deployments poll once a minute: within the test, only a webhook can finish them
    slow_poll_callbacks = {"poll_interval": 60, "callbacks": True}

    def model(mid: str, modality: str, adapter: str, provider_model: str, url: str, key: str, **opts: Any) -> dict[str, Any]:
        return {"id": mid, "modality": modality, "deployments": [{
            "name": f"{adapter}-{mid}", "adapter": adapter, "model": provider_model, "base_url": url,
            "api_key_env": f"E2E_{key}_KEY", "options": {**fast, **opts}}]}

    data = {"models": [
        model("flux-pro-1.1", "image", "bfl", "flux-pro-1.1", f["bfl"], "BFL"),
        model("gpt-image-1", "image", "openai", "gpt-image-1", f["openai"], "OPENAI"),
        model("veo-3", "video", "google_veo", "veo-3.0-generate-001", f["veo"], "VEO"),
        model("wan-video", "video", "replicate", "wan-video/wan-2.2-t2v-fast", f["replicate"], "REPLICATE"),
        model("flux-schnell", "image", "fal", "fal-ai/flux/schnell", f["fal"], "FAL"),
        model("sora-2", "video", "openai", "sora-2", f["openai"], "OPENAI"),
        model("tts-1", "audio", "openai", "tts-1", f["openai"], "OPENAI"),
        model("replicate-cb", "image", "replicate", "black-forest-labs/flux-schnell", f["replicate"], "REPLICATE",
              **slow_poll_callbacks),
        model("fal-cb", "image", "fal", "fal-ai/flux/schnell", f["fal"], "FAL", **slow_poll_callbacks,
              jwks_url=f"{f['fal']}/.well-known/jwks.json"),
    ]}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fakes: dict[str, str], tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("providers")
    st = await make_stack(root, redis_url=f"{redis_base}/0", storage="s3", s3=seaweed,
                          catalog=_catalog(root / "catalog.yaml", fakes),
                          env={f"E2E_{k}_KEY": v for k, v in KEYS.items()}, submit_attempts="3", submit_backoff_seconds="0.2")
    async with running(st):
        yield st


async def _job(stack: Stack, body: dict[str, Any], wait: int = 40) -> dict[str, Any]:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=body, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        return r.json()


CASES = [
    ("flux-pro-1.1", {"prompt": "a red fox", "size": "1024x768", "output_format": "jpeg"}, "image/jpeg", (1024, 768)),
    ("gpt-image-1", {"prompt": "a lighthouse", "size": "1024x1024"}, "image/png", (1024, 1024)),
    ("veo-3", {"prompt": "waves at dusk", "duration_seconds": 8, "aspect_ratio": "16:9"}, "video/mp4", None),
    ("wan-video", {"prompt": "a paper boat", "duration_seconds": 5}, "video/mp4", None),
    ("flux-schnell", {"prompt": "a cabin", "size": "640x480"}, "image/jpeg", (640, 480)),  # fal defaults to jpeg
    ("sora-2", {"prompt": "a cat surfing", "duration_seconds": 4, "aspect_ratio": "16:9"}, "video/mp4", None),
    ("tts-1", {"text": "hello from genroute", "voice": "alloy", "format": "wav"}, "audio/wav", None),
]


@pytest.mark.parametrize("model,inp,content_type,size", CASES, ids=[c[0] for c in CASES])
async def test_each_provider_job_succeeds_with_stored_outputs(stack: Stack, model: str, inp: dict, content_type: str, size: tuple | None) -> None:
    job = await _job(stack, {"model": model, "input": inp})
    assert job["status"] == "succeeded", (job["status"], job["error"], stack.log("worker")[-2000:])
    out = job["outputs"][0]
    assert out["content_type"] == content_type and out["bytes"] > 0
    async with httpx.AsyncClient(timeout=30) as c:
        data = (await c.get(out["url"])).content  # a presigned S3 URL: the bytes live in our bucket
    assert len(data) == out["bytes"]
    if size:
        assert Image.open(io.BytesIO(data)).size == size
        assert (out["width"], out["height"]) == size


@pytest.mark.parametrize("model,inp,stage", [
    ("flux-pro-1.1", {"prompt": "something [moderated]"}, "input"),
    ("gpt-image-1", {"prompt": "something [moderated]", "size": "1024x1024"}, "input"),
    ("veo-3", {"prompt": "something [moderated-output]", "duration_seconds": 8}, "output"),
])
async def test_moderated_prompt_fails_with_the_providers_reasons(stack: Stack, model: str, inp: dict, stage: str) -> None:
    job = await _job(stack, {"model": model, "input": inp})
    assert job["status"] == "failed" and job["error"]["code"] == "moderated", job
    assert job["error"]["details"]["stage"] == stage, job["error"]


async def test_expired_upstream_url_fails_clearly_and_stores_nothing(stack: Stack) -> None:
    job = await _job(stack, {"model": "flux-pro-1.1", "input": {"prompt": "late [expired]"}})
    assert job["status"] == "failed" and job["error"]["code"] == "provider_error", job
    assert "expired" in job["error"]["message"].lower() and job["outputs"] == []


async def _stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"{url.removesuffix('/v1')}/_control/stats")).json()


@pytest.mark.parametrize("model,provider", [("replicate-cb", "replicate"), ("fal-cb", "fal")])
async def test_signed_callback_finishes_the_job_without_polling(stack: Stack, fakes: dict[str, str], model: str, provider: str) -> None:
    before = await _stats(fakes[provider])
    t0 = time.monotonic()
    job = await _job(stack, {"model": model, "input": {"prompt": "called back", "aspect_ratio": "1:1"}}, wait=30)
    assert job["status"] == "succeeded", (job["error"], stack.log("api")[-2000:])
    assert time.monotonic() - t0 < 25  # the deployment polls once a minute: the webhook did it
    after = await _stats(fakes[provider])
    assert after["polls"] == before["polls"], "the job was finished by polling, not by the callback"


async def test_forged_callback_is_refused_and_leaves_the_job_alone(stack: Stack) -> None:
    async with stack.client() as c:
        job = (await c.post("/v1/jobs", json={"model": "replicate-cb", "input": {"prompt": "slow [slow]", "aspect_ratio": "1:1"}})).json()
        for _ in range(400):  # until the provider accepted it (the handle is saved)
            j = (await c.get(f"/v1/jobs/{job['id']}")).json()
            if j["status"] == "running" and not (j["progress"]["message"] or "").startswith("submitting"):
                break
            await asyncio.sleep(0.05)
        assert j["status"] == "running", j
        from core.callbacks import callback_token

        token = callback_token(stack.env["GENROUTE_SECRET_KEY"], job["id"])
        forged = {"id": "x", "status": "succeeded", "output": ["http://127.0.0.1:1/evil.png"]}
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,AAAA"}
        r = await c.post(f"/v1/callbacks/replicate/{token}", json=forged, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        r = await c.post(f"/v1/callbacks/replicate/{job['id']}.0000", json=forged, headers=headers)
        assert r.status_code == 401  # a token we did not issue
        j = (await c.get(f"/v1/jobs/{job['id']}")).json()
        assert j["status"] == "running" and j["outputs"] == []
        await c.post(f"/v1/jobs/{job['id']}/cancel")


async def test_rate_limited_create_is_retried_then_fails_with_rate_limited(stack: Stack, fakes: dict[str, str]) -> None:
    """The provider answers 429 to every create: the worker retries (it is resend-safe),
    the job shows it is waiting, and after the configured attempts ends `rate_limited`."""
    before = (await _stats(fakes["bfl"]))["creates"]
    job = await _job(stack, {"model": "flux-pro-1.1", "input": {"prompt": "busy [429]"}}, wait=45)
    assert job["status"] == "failed" and job["error"]["code"] == "rate_limited", job
    assert job["attempt"] == 3
    assert (await _stats(fakes["bfl"]))["creates"] - before == 3


async def test_a_provider_that_reports_no_progress_still_reads_as_a_number(stack: Stack) -> None:
    """Veo's operations say nothing of progress: a read while it runs answers 200 with a
    fraction (what was last shown, 0 at first), never a 500 for a null."""
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "veo-3", "input": {"prompt": "a slow tide [slow]", "duration_seconds": 8}})
        assert r.status_code == 201, r.text
        job = r.json()
    seen: list[float] = []
    async with stack.client() as c:
        for _ in range(100):
            r = await c.get(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200, r.text
            body = r.json()
            assert isinstance(body["progress"]["fraction"], int | float), body["progress"]
            if body["status"] == "running":
                seen.append(body["progress"]["fraction"])
            if body["status"] in ("succeeded", "failed", "canceled"):
                break
            await asyncio.sleep(0.1)
    assert seen, "the job was never read while running"
    assert body["status"] == "succeeded", body
