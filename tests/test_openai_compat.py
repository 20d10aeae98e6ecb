"""The official `openai` SDK against genroute's OpenAI-compatible routes: a real API and
worker (tests/stack.py), real Redis, the OpenAI fake over HTTP serving some models and the
built-in local provider serving the others. Each media call's job shows in /v1/jobs."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import AsyncOpenAI
from PIL import Image
from sqlmodel import select

from core.db import create_engine, sessionmaker
from core.models import UsageRecord
from core.routing.catalog import DEFAULT_CATALOG
from tests.fakes import openai as openai_fake
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running

KEY = "sk-compat"
KEY_ENV = "COMPAT_OPENAI_KEY"


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with serve(openai_fake.create_app(api_key=KEY)) as url:
        yield url + "/v1"


def _catalog(path: Path, url: str) -> Path:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())  # local-image, local-video, local-audio, local-text

    def dep(name: str, model: str) -> dict[str, Any]:
        return {"name": name, "adapter": "openai", "model": model, "base_url": url, "api_key_env": KEY_ENV,
                "options": {"poll_interval": 0.05}}

    local_text = {"name": "local-text", "adapter": "local", "model": "text"}
    data["models"] += [
        {"id": "gpt-image-1", "modality": "image", "deployments": [dep("openai-gpt-image-1", "gpt-image-1")]},
        {"id": "sora-2", "modality": "video", "deployments": [dep("openai-sora-2", "sora-2")]},
        {"id": "tts-1", "modality": "audio", "deployments": [dep("openai-tts-1", "tts-1")]},
        {"id": "gpt-4o-mini", "modality": "text", "deployments": [
            {**dep("openai-gpt-4o-mini", "gpt-4o-mini"), "price": {"per_1k_input_tokens": 150, "per_1k_output_tokens": 600}}]},
    ]
    # primary at the fake (scripted by [500]/[429] in the prompt), secondary local; one primary
    # per case, so no case finds it cooling down after another's failure
    for status in ("500", "429"):
        for mode in ("plain", "stream"):
            data["models"].append({"id": f"chat-fb-{status}-{mode}", "modality": "text",
                                   "deployments": [dep(f"fb{status}-{mode}-primary", "gpt-4o-mini"), local_text]})
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("openai_compat")
    st = await make_stack(root, redis_url=f"{redis_base}/0", catalog=_catalog(root / "catalog.yaml", fake),
                          env={KEY_ENV: KEY})
    async with running(st):
        yield st


@pytest.fixture
def client(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.api_url + "/v1", api_key=stack.keys["alice"], max_retries=0, timeout=60)


async def _usage(stack: Stack, request_id: str) -> UsageRecord:
    """The call's usage row: written after the response, so it may trail it a little."""
    engine = create_engine(stack.settings())
    try:
        for _ in range(100):
            async with sessionmaker(engine)() as s:
                row = (await s.exec(select(UsageRecord).where(UsageRecord.id == request_id))).first()
            if row is not None:
                return row
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    raise AssertionError(f"no usage row for {request_id}")


async def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    async with stack.client() as c:
        listed = (await c.get("/v1/jobs", params={"limit": 100})).json()["data"]
    match = [j for j in listed if j["id"] == job_id]
    assert match, f"job {job_id} is not in /v1/jobs"
    return match[0]


# -- chat -----------------------------------------------------------------------------


@pytest.mark.parametrize("model,deployment", [("local-text", "local-text"), ("gpt-4o-mini", "openai-gpt-4o-mini")])
async def test_chat_plain(stack: Stack, client: AsyncOpenAI, model: str, deployment: str) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there world"}])
    done = raw.parse()
    assert done.model == model and done.object == "chat.completion"
    text = done.choices[0].message.content or ""
    if model == "local-text":
        assert text == "local-text heard: world there hello"
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 5)
    else:
        assert text == "You said: hello there world"
    row = await _usage(stack, raw.headers["x-genroute-request-id"])
    assert (row.deployment, row.status, row.tenant, row.stream) == (deployment, "succeeded", "alice", False)
    assert (row.prompt_tokens, row.completion_tokens) == (done.usage.prompt_tokens, done.usage.completion_tokens)
    if model == "gpt-4o-mini":  # priced: 150 / 600 micro-USD per 1k tokens
        assert row.cost == -(-(150 * row.prompt_tokens + 600 * row.completion_tokens) // 1000)


@pytest.mark.parametrize("model", ["local-text", "gpt-4o-mini"])
async def test_chat_streamed(stack: Stack, client: AsyncOpenAI, model: str) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "one two three four"}], stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    parts: list[str] = []
    usage = None
    chunks = 0
    async for chunk in raw.parse():
        chunks += 1
        assert chunk.model == model
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
        usage = chunk.usage or usage
    text = "".join(parts)
    assert text == ("local-text heard: four three two one" if model == "local-text" else "You said: one two three four")
    assert chunks >= 5 and usage is not None  # token by token, then the usage chunk
    row = await _usage(stack, raw.headers["x-genroute-request-id"])
    assert row.stream and row.status == "succeeded"
    assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)


async def test_chat_stream_without_include_usage_sends_no_usage_but_records_it(stack: Stack, client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="local-text", messages=[{"role": "user", "content": "a b"}], stream=True)
    chunks = [c async for c in raw.parse()]
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    row = await _usage(stack, raw.headers["x-genroute-request-id"])
    assert (row.prompt_tokens, row.completion_tokens) == (2, 4)


@pytest.mark.parametrize("status,code", [("500", "provider_unavailable"), ("429", "rate_limited")])
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_falls_back_before_the_first_byte(stack: Stack, client: AsyncOpenAI, status: str, code: str, stream: bool) -> None:
    mode = "stream" if stream else "plain"
    model = f"chat-fb-{status}-{mode}"
    messages = [{"role": "user", "content": f"please [{status}]"}]
    if stream:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    else:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages)
        text = raw.parse().choices[0].message.content or ""
    assert text == f"local-text heard: [{status}] please"  # the secondary (local) answered
    assert raw.headers["x-genroute-deployment"] == "local-text"
    row = await _usage(stack, raw.headers["x-genroute-request-id"])
    tried = [(a["deployment"], (a.get("error") or {}).get("code")) for a in row.attempts]
    assert tried == [(f"fb{status}-{mode}-primary", code), ("local-text", None)], row.attempts
    assert row.model == model and row.status == "succeeded"


async def test_chat_with_every_deployment_failing_is_an_openai_error(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as e:  # the fake's 500, passed on as 503
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "[500]"}])
    assert e.value.status_code == 503 and e.value.code == "provider_unavailable"


async def test_text_job_through_v1_jobs(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", headers={"Prefer": "wait=20"}, json={
            "model": "local-text", "input": {"messages": [{"role": "user", "content": "batch me"}], "max_tokens": 3}})
        job = r.json()
        assert job["status"] == "succeeded", job
        out = job["outputs"][0]
        assert out["content_type"] == "application/json"
        completion = (await c.get(out["url"])).json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "local-text heard: me"
    assert completion["choices"][0]["finish_reason"] == "length"


# -- images, speech -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["local-image", "gpt-image-1"])
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_images_generate(stack: Stack, client: AsyncOpenAI, model: str, response_format: str) -> None:
    raw = await client.images.with_raw_response.generate(
        model=model, prompt="a lighthouse at dusk", size="1024x1024", response_format=response_format)  # type: ignore[arg-type]
    res = raw.parse()
    assert res.created > 0 and len(res.data) == 1
    if response_format == "b64_json":
        data = base64.b64decode(res.data[0].b64_json or "")
    else:
        async with httpx.AsyncClient() as h:
            data = (await h.get(res.data[0].url or "")).content
    assert Image.open(io.BytesIO(data)).size == (1024, 1024)
    job = await _job(stack, raw.headers["x-genroute-job-id"])
    assert (job["model"], job["status"], job["metadata"]["via"]) == (model, "succeeded", "openai.images.generations")


@pytest.mark.parametrize("model", ["local-image", "gpt-image-1"])
async def test_images_edit(stack: Stack, client: AsyncOpenAI, model: str) -> None:
    src = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(src, "PNG")
    raw = await client.images.with_raw_response.edit(
        model=model, image=("in.png", src.getvalue(), "image/png"), prompt="make it blue", size="1024x1024")
    res = raw.parse()
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json or ""))).size == (1024, 1024)
    job = await _job(stack, raw.headers["x-genroute-job-id"])
    assert job["input"]["input_images"][0].startswith("data:image/png;base64,")
    assert job["status"] == "succeeded"


@pytest.mark.parametrize("model,voice,fmt,ctype,magic", [
    ("local-audio", "alloy", "wav", "audio/wav", b"RIFF"),
    ("tts-1", "nova", "mp3", "audio/mpeg", b"\xff\xfb"),
])
async def test_audio_speech(stack: Stack, client: AsyncOpenAI, model: str, voice: str, fmt: str, ctype: str, magic: bytes) -> None:
    resp = await client.audio.speech.create(model=model, voice=voice, input="hello from genroute", response_format=fmt)  # type: ignore[arg-type]
    assert resp.response.headers["content-type"].startswith(ctype)
    data = resp.read()
    assert data.startswith(magic) and len(data) > 1000
    job = await _job(stack, resp.response.headers["x-genroute-job-id"])
    assert job["outputs"][0]["bytes"] == len(data)


# -- videos ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("model,size,ctype,magic", [
    ("local-video", "1280x720", "image/webp", b"RIFF"),  # local video is animated WebP: served as stored
    ("sora-2", "1280x720", "video/mp4", b"\x00\x00\x00"),
])
async def test_videos_create_and_poll_then_download(stack: Stack, client: AsyncOpenAI, model: str, size: str,
                                                   ctype: str, magic: bytes) -> None:
    t0 = time.monotonic()
    video = await client.videos.create_and_poll(model=model, prompt="waves at dusk", seconds="4", size=size)  # type: ignore[arg-type]
    assert video.status == "completed", video
    assert (video.object, video.model, video.seconds, video.size, video.progress) == ("video", model, "4", size, 100)
    assert time.monotonic() - t0 < 20
    content = await client.videos.download_content(video.id)
    assert content.response.headers["content-type"].startswith(ctype)
    data = content.read()
    assert data.startswith(magic) and len(data) > 100
    if ctype == "video/mp4":
        assert data[4:8] == b"ftyp"
    thumb = await client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.response.headers["content-type"].startswith("image/")
    assert Image.open(io.BytesIO(thumb.read())).size[0] > 0
    job = await _job(stack, video.id)
    assert job["modality"] == "video" and job["status"] == "succeeded" and job["input"]["duration_seconds"] == 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_video_retrieve_reports_progress_while_running(stack: Stack, client: AsyncOpenAI) -> None:
    video = await client.videos.create(model="local-video", prompt="slow one", seconds="2",
                                       extra_body={})  # type: ignore[arg-type]
    assert video.status in ("queued", "in_progress", "completed") and video.progress in range(101)
    again = await client.videos.retrieve(video.id)
    assert again.id == video.id and again.object == "video"
    with pytest.raises(openai.NotFoundError):
        await client.videos.retrieve("job_doesnotexist")


# -- errors in OpenAI's shape ---------------------------------------------------------


async def test_bad_key_is_an_authentication_error(stack: Stack) -> None:
    bad = AsyncOpenAI(base_url=stack.api_url + "/v1", api_key="gr_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        await bad.chat.completions.create(model="local-text", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await bad.images.generate(model="local-image", prompt="x")


async def test_unknown_model_is_not_found(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.images.generate(model="no-such-model", prompt="x")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_bad_params_are_bad_requests_naming_the_param(client: AsyncOpenAI) -> None:
    cases = [
        (client.chat.completions.create(model="local-text", messages=[]), "messages"),
        (client.chat.completions.create(model="local-image", messages=[{"role": "user", "content": "hi"}]), "model"),
        (client.images.generate(model="local-image", prompt="x", size="999x999"), "size"),
        (client.images.generate(model="local-image", prompt="x", n=9), "n"),
        (client.audio.speech.create(model="local-audio", voice="alloy", input="hi", response_format="mp3"), "response_format"),
        (client.videos.create(model="local-video", prompt="x", seconds="60"), "seconds"),  # type: ignore[arg-type]
        (client.videos.create(model="local-video", prompt="x", size="1792x1024"), "size"),  # type: ignore[arg-type]
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            await call
        assert e.value.status_code == 400 and e.value.param == param, (param, e.value.body)
        assert set(e.value.body) >= {"message", "type", "param", "code"}  # type: ignore[arg-type]


async def test_other_routes_keep_genroute_error_shape(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={"model": "nope", "input": {}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "details" in r.json()["error"]



@pytest.fixture(scope="module")
async def s3_stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str, seaweed: Any) -> AsyncIterator[Stack]:
    """The default catalog with S3 storage: outputs are read back through presigned URLs."""
    st = await make_stack(tmp_path_factory.mktemp("openai_compat_s3"), redis_url=f"{redis_base}/0", storage="s3", s3=seaweed)
    async with running(st):
        yield st


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_outputs_are_served_from_s3_storage(s3_stack: Stack) -> None:
    client = AsyncOpenAI(base_url=s3_stack.api_url + "/v1", api_key=s3_stack.keys["alice"], max_retries=0, timeout=60)
    res = await client.images.generate(model="local-image", prompt="from s3", size="512x512")
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json or ""))).size == (512, 512)
    speech = await client.audio.speech.create(model="local-audio", voice="alloy", input="from s3")
    assert speech.read().startswith(b"RIFF")
    video = await client.videos.create_and_poll(model="local-video", prompt="from s3", seconds="2", size="720x1280")  # type: ignore[arg-type]
    assert video.status == "completed" and video.size == "720x1280"
    data = (await client.videos.download_content(video.id)).read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert "Traceback" not in s3_stack.log("api", tail=None)

def test_logs_have_no_tracebacks(stack: Stack) -> None:
    for name in ("api", "worker"):
        assert "Traceback" not in stack.log(name, tail=None), stack.log(name)
