"""OpenAI adapter (and the OpenAI-compatible one) against the fake OpenAI API over real HTTP.

The contract runs once per modality (images, videos, speech); the tests below it cover
what is OpenAI's own: dall-e URL outputs that expire, edits from URLs with a mask, the
Sora thumbnail and duration, project webhooks, chat (plain, streamed, as a job), the
quota/rate-limit split, the aggregator adapter with another auth header, and the official
`openai` SDK pointed at the fake (proof that the fake speaks the real format).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
import wave
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.openai import nearest_size
from adapters.registry import build_adapter
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.routing.catalog import Deployment
from core.types import Done, Failed, Pending, ProviderRequest
from storage import StorageError, store_output
from storage.probe import mp4_duration
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.openai import create_app
from tests.fakes.server import serve

KEY = "sk-test-openai"
KEY_ENV = "GENROUTE_TEST_OPENAI_KEY"


def png_uri(w: int, h: int, mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, (w, h), (10, 200, 30, 255)[: len(mode)]).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    return base64.b64decode(png_uri(w, h, mode).split(",", 1)[1])


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(create_app(api_key=KEY)) as url:
        yield Fake(f"{url}/v1", KEY)


@pytest.fixture(scope="module")
def static_files() -> Iterator[str]:
    """A plain web server holding input images, for edits from URLs."""
    files = {"/in.png": png_bytes(1024, 1024), "/in2.png": png_bytes(1024, 1024), "/mask.png": png_bytes(1024, 1024, "RGBA")}

    async def get(request: Request) -> Response:
        data = files.get(request.url.path)
        return Response(data, media_type="image/png") if data else Response("nope", 404)

    with serve(Starlette(routes=[Route("/{name}", get)])) as url:
        yield url


def request_for(case: Case, **kwargs: Any) -> ProviderRequest:
    return ProviderRequest(job_id=f"job_{uuid.uuid4().hex}", tenant="t", modality=case.modality,
                           provider_model=case.model, input=case.input, **kwargs)


async def last(fake: Fake, endpoint: str) -> dict[str, Any]:
    return dict((await fake.stats())["last"][endpoint])


# -- the contract, once per modality ------------------------------------------------


class TestOpenAIImages(AdapterContract):
    adapter = "openai"
    api_key_env = KEY_ENV
    supports_cancel = False  # images finish inside submit
    success = [
        Case("image", "gpt-image-1", {"prompt": "a red fox", "size": "1536x1024"}, "image/png", (1536, 1024)),
        Case("image", "gpt-image-1-mini", {"prompt": "a fox", "aspect_ratio": "9:16", "output_format": "jpeg", "n": 2},
             "image/jpeg", (1024, 1536), outputs=2),
        Case("image", "gpt-image-1", {"prompt": "a sticker", "output_format": "webp",
                                      "provider_params": {"background": "transparent", "quality": "low"}}, "image/webp", (1024, 1024)),
        Case("image", "dall-e-3", {"prompt": "a fox", "aspect_ratio": "16:9", "provider_params": {"response_format": "url", "quality": "hd"}},
             "image/png", (1792, 1024)),
        Case("image", "dall-e-2", {"prompt": "a fox", "size": "256x256"}, "image/png", (256, 256)),
        Case("image", "gpt-image-1", {"prompt": "make it blue", "input_images": [png_uri(1024, 1024), png_uri(1024, 1024)]},
             "image/png", (1024, 1024)),
        Case("image", "dall-e-2", {"prompt": "make it blue", "input_images": [png_uri(512, 512)], "size": "512x512"},
             "image/png", (512, 512)),
    ]
    failures = [
        Case("image", "gpt-image-1", {"prompt": "bad [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("image", "gpt-image-1", {"prompt": "bad [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("image", "gpt-image-1", {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        Case("image", "gpt-image-1", {"prompt": "broke [quota]"}, code=ErrorCode.provider_error),
        # the provider's own 400 (dall-e takes no output_compression) -> invalid_input
        Case("image", "dall-e-2", {"prompt": "x", "provider_params": {"output_compression": 50}}, code=ErrorCode.invalid_input),
    ]
    unsupported = [
        Case("image", "dall-e-3", {"prompt": "x", "n": 2}),
        Case("image", "gpt-image-1", {"prompt": "x", "size": "512x512"}),
        Case("image", "gpt-image-1", {"prompt": "x", "provider_params": {"response_format": "url"}}),
        Case("image", "gpt-image-1", {"prompt": "x", "provider_params": {"quality": "hd"}}),
        Case("image", "gpt-image-1", {"prompt": "x", "output_format": "jpeg", "provider_params": {"background": "transparent"}}),
        Case("image", "gpt-image-1", {"prompt": "x", "seed": 3}),
        Case("image", "gpt-image-1", {"prompt": "x", "negative_prompt": "dogs"}),
        Case("image", "dall-e-3", {"prompt": "x", "input_images": [png_uri(64, 64)]}),
        Case("image", "dall-e-2", {"prompt": "x", "output_format": "webp"}),
        Case("image", "dall-e-2", {"prompt": "x", "input_images": [png_uri(64, 64), png_uri(64, 64)]}),
    ]

    async def test_usage_and_fields_sent(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-1", {"prompt": "a fox", "aspect_ratio": "3:2", "provider_params": {"quality": "high"}})
        result = await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert isinstance(result, Done) and result.usage["total_tokens"] > 0, result.usage
        sent = await last(fake, "images.generations")
        assert sent == {"model": "gpt-image-1", "prompt": "a fox", "size": "1536x1024", "output_format": "png", "quality": "high"}

    async def test_dalle_defaults_to_b64_so_nothing_can_expire(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "dall-e-2", {"prompt": "a fox"})
        result = await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert isinstance(result, Done) and result.outputs[0].data and result.outputs[0].url is None
        assert (await last(fake, "images.generations"))["response_format"] == "b64_json"

    async def test_dalle_url_is_returned_at_once_and_expiry_is_a_provider_error(
        self, fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        case = Case("image", "dall-e-3", {"prompt": "late [expired]", "provider_params": {"response_format": "url"}})
        result = await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert isinstance(result, Done) and result.outputs[0].url and "/files/" in result.outputs[0].url
        with pytest.raises(StorageError) as exc:
            await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                               max_bytes=2**24, max_image_pixels=64_000_000)
        assert exc.value.code == ErrorCode.provider_error and "expired" in str(exc.value)

    async def test_edit_from_urls_with_mask(self, fake: Fake, static_files: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-1", {"prompt": "paint the masked part",
                                             "input_images": [f"{static_files}/in.png", f"{static_files}/in2.png"],
                                             "provider_params": {"mask": f"{static_files}/mask.png", "input_fidelity": "high"}})
        result = await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert isinstance(result, Done) and len(result.outputs) == 1
        sent = await last(fake, "images.edits")
        assert sent["parts"] == ["image[]", "image[]"] and sent["mask"] is True and sent["input_fidelity"] == "high"

    async def test_unreachable_input_image_is_invalid_input(self,
            fake: Fake, static_files: str, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-1", {"prompt": "x", "input_images": [f"{static_files}/missing.png"]})
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert exc.value.code == ErrorCode.invalid_input

    async def test_rate_limit_prefers_retry_after_ms(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-1", {"prompt": "x [429]"})
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert exc.value.kind == ProviderErrorKind.rate_limited and exc.value.retry_after == 1.5

    async def test_insufficient_quota_is_quota_not_rate_limited(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-1", {"prompt": "x [quota]"})
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert exc.value.kind == ProviderErrorKind.quota and not exc.value.retryable

    async def test_503_with_should_retry_is_retryable(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-1", {"prompt": "x [503]"})
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert exc.value.kind == ProviderErrorKind.retryable and not exc.value.resend_safe  # may have started


def test_nearest_size() -> None:
    sizes = ("1024x1024", "1536x1024", "1024x1536")
    assert [nearest_size(r, sizes) for r in ("1:1", "16:9", "9:16", "4:3", "6:5")] == [
        "1024x1024", "1536x1024", "1024x1536", "1536x1024", "1024x1024"]
    assert nearest_size("16:9", ("256x256", "512x512", "1024x1024")) == "1024x1024"


class TestOpenAIVideos(AdapterContract):
    adapter = "openai"
    api_key_env = KEY_ENV
    # The Videos API has no cancel: DELETE /videos/{id} removes a finished video's assets
    supports_cancel = False
    success = [
        Case("video", "sora-2", {"prompt": "a cat surfing", "duration_seconds": 8, "aspect_ratio": "16:9"}, "video/mp4"),
        Case("video", "sora-2-pro", {"prompt": "a tall cat", "duration_seconds": 12, "aspect_ratio": "9:16", "resolution": "1024p"}, "video/mp4"),
        Case("video", "sora-2", {"prompt": "animate this", "image": png_uri(1280, 720)}, "video/mp4"),
    ]
    failures = [
        Case("video", "sora-2", {"prompt": "bad [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("video", "sora-2", {"prompt": "bad [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("video", "sora-2", {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        Case("video", "sora-2", {"prompt": "x [quota]"}, code=ErrorCode.provider_error),
        # the provider's 400: the reference image must match the video size
        Case("video", "sora-2", {"prompt": "x", "image": png_uri(640, 480)}, code=ErrorCode.invalid_input),
    ]
    slow = Case("video", "sora-2", {"prompt": "a long one [slow]"})
    unsupported = [
        Case("video", "sora-2", {"prompt": "x", "duration_seconds": 5}),
        Case("video", "sora-2", {"prompt": "x", "duration_seconds": 4.5}),
        Case("video", "sora-2", {"prompt": "x", "aspect_ratio": "1:1"}),
        Case("video", "sora-2", {"prompt": "x", "resolution": "1024p"}),
        Case("video", "sora-2-pro", {"prompt": "x", "resolution": "1080p"}),
        Case("video", "sora-2", {"prompt": "x", "seed": 1}),
        Case("video", "sora-2", {"prompt": "x", "fps": 24}),
        Case("video", "sora-2", {"prompt": "x", "negative_prompt": "dogs"}),
        Case("video", "sora-2", {"prompt": "x", "provider_params": {"size": "1792x1024"}}),
    ]

    async def test_outputs_thumbnail_duration_and_wire_fields(self, fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", "sora-2", {"prompt": "x [poll500]", "duration_seconds": 8, "aspect_ratio": "9:16"})
        result, seen = await drive(self.make(fake, case, http, monkeypatch), request_for(case))
        assert isinstance(result, Done) and seen[0].handle["video_id"].startswith("video_")
        # OpenAI's 0-100 becomes 0..1: the fake's in_progress step reports 10 -> 0.1
        assert [p.progress for p in seen if p.message == "in_progress"] == [0.1], seen
        sent = await last(fake, "videos")
        assert sent["seconds"] == "8" and sent["size"] == "720x1280"  # a string, as the API demands
        video, thumb = result.outputs
        assert video.role == "output" and thumb.role == "thumbnail" and thumb.url and thumb.url.endswith("variant=thumbnail")
        assert video.headers["Authorization"] == f"Bearer {KEY}"
        assert result.usage == {"model": "sora-2", "seconds": "8", "size": "720x1280"}
        stored = await store_output(bucket, http, video, key_base=f"t/{uuid.uuid4().hex}", index=0, max_bytes=2**24, max_image_pixels=10**8)
        assert stored.content_type == "video/mp4" and stored.duration_seconds == 8.0
        t = await store_output(bucket, http, thumb, key_base=f"t/{uuid.uuid4().hex}", index=1, max_bytes=2**24, max_image_pixels=10**8)
        assert t.content_type == "image/webp" and (t.width, t.height) == (180, 320)

    async def test_content_requires_the_key_and_is_404_before_completion(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", "sora-2", {"prompt": "x"})
        first = await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert isinstance(first, Pending) and first.progress == 0.0
        url = f"{fake.url}/videos/{first.handle['video_id']}/content"
        assert (await http.get(url)).status_code == 401
        assert (await http.get(url, headers={"Authorization": f"Bearer {KEY}"})).status_code == 404
        # the handle is plain JSON: a fresh adapter (another worker) can poll it
        handle = json.loads(json.dumps(first.handle))
        adapter = self.make(fake, case, http, monkeypatch)
        for _ in range(10):
            polled = await adapter.poll(handle)
            if not isinstance(polled, Pending):
                break
        assert isinstance(polled, Done)

    async def test_video_expired_before_the_poll_is_a_provider_error(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", "sora-2", {"prompt": "too late [expired]"})
        result, _ = await drive(self.make(fake, case, http, monkeypatch), request_for(case))
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error and "expired" in result.message

    async def test_unknown_video_id_fails_cleanly(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch)
        result = await adapter.poll({"kind": "video", "video_id": "video_gone", "model": "sora-2"})
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error


class TestOpenAISpeech(AdapterContract):
    adapter = "openai"
    api_key_env = KEY_ENV
    supports_cancel = False  # speech finishes inside submit
    success = [
        Case("audio", "tts-1", {"text": "hello there, world", "voice": "nova", "format": "wav"}, "audio/wav"),
        Case("audio", "tts-1-hd", {"text": "hello", "format": "mp3", "provider_params": {"speed": 1.5}}, "audio/mpeg"),
        Case("audio", "gpt-4o-mini-tts", {"prompt": "whisper this", "voice": "ballad", "format": "flac",
                                          "provider_params": {"instructions": "Speak softly."}}, "audio/flac"),
    ]
    failures = [
        Case("audio", "tts-1", {"text": "boom [fail]"}, code=ErrorCode.provider_error),
        Case("audio", "tts-1", {"text": "broke [quota]"}, code=ErrorCode.provider_error),
        Case("audio", "some-future-tts", {"text": "x"}, code=ErrorCode.invalid_input),  # unknown model: the provider refuses
    ]
    unsupported = [
        Case("audio", "tts-1", {"text": "x", "voice": "ballad"}),
        Case("audio", "tts-1", {"text": "x", "voice": "darth"}),
        Case("audio", "tts-1", {"text": "x", "provider_params": {"instructions": "be calm"}}),
        Case("audio", "tts-1", {"text": "x", "seed": 4}),
        Case("audio", "tts-1", {"text": "x", "duration_seconds": 3}),
        Case("audio", "tts-1", {"text": "x", "provider_params": {"speed": 9}}),
    ]

    async def test_audio_is_streamed_into_a_temp_file(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        result = await self.make(fake, case, http, monkeypatch).submit(request_for(case))
        assert isinstance(result, Done) and result.outputs[0].path and result.outputs[0].data is None
        assert result.outputs[0].content_type == "audio/wav"
        path = Path(result.outputs[0].path)
        try:
            with wave.open(str(path)) as w:
                assert w.getframerate() == 24000 and w.getnframes() > 0
        finally:
            path.unlink()
        assert result.usage["input_characters"] == len(case.input["text"])
        sent = await last(fake, "audio.speech")
        assert sent == {"model": "tts-1", "input": "hello there, world", "voice": "nova", "response_format": "wav"}

    async def test_fake_answers_chunked(self, fake: Fake, http: httpx.AsyncClient) -> None:
        resp = await http.post(f"{fake.url}/audio/speech", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": "tts-1", "input": "hi", "voice": "alloy"})
        assert resp.headers.get("transfer-encoding") == "chunked" and resp.headers["content-type"] == "audio/mpeg"
        assert resp.content[:2] == b"\xff\xfb"


# -- chat ---------------------------------------------------------------------------


def chat_adapter(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    monkeypatch.setenv(KEY_ENV, fake.api_key)
    dep = Deployment(name="chat", adapter="openai", model="gpt-4o-mini", base_url=fake.url, api_key_env=KEY_ENV, options=options)
    return build_adapter(dep, http)


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def test_chat_plain(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = chat_adapter(fake, http, monkeypatch)
    out = await adapter.chat({"model": "my-alias", "messages": [{"role": "user", "content": "hi there"}]}, stream=False)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == "You said: hi there"
    assert out["usage"]["total_tokens"] > 0
    assert (await last(fake, "chat.completions"))["model"] == "gpt-4o-mini"  # the deployment's model, not our alias


async def test_chat_stream_yields_chunks_and_usage(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = chat_adapter(fake, http, monkeypatch)
    chunks = [c async for c in await adapter.chat({"messages": [{"role": "user", "content": "one two"}]}, stream=True)]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == "You said: one two"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert (await last(fake, "chat.completions"))["stream_options"] == {"include_usage": True}


async def test_chat_stream_errors_raise_before_iterating(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = chat_adapter(fake, http, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "x [429]"}]}, stream=True)
    assert exc.value.kind == ProviderErrorKind.rate_limited and exc.value.retry_after == 1.5
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "x [quota]"}]}, stream=False)
    assert exc.value.kind == ProviderErrorKind.quota


async def test_chat_stream_stops_at_done_even_if_the_connection_stays_open(http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    async def lingering(request: Request) -> Response:
        async def body() -> Any:
            yield 'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
            yield "data: [DONE]\n\n"
            await asyncio.sleep(30)  # a proxy that keeps the connection open

        return StreamingResponse(body(), media_type="text/event-stream")

    with serve(Starlette(routes=[Route("/v1/chat/completions", lingering, methods=["POST"])])) as url:
        adapter = chat_adapter(Fake(f"{url}/v1", KEY), http, monkeypatch)
        stream = await adapter.chat({"messages": [{"role": "user", "content": "x"}]}, stream=True)
        chunks = await asyncio.wait_for(collect(stream), 2)
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["hi"]


async def collect(stream: Any) -> list[dict[str, Any]]:
    return [c async for c in stream]


async def test_text_job_is_done_with_the_completion_json(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = chat_adapter(fake, http, monkeypatch)
    req = ProviderRequest(job_id="j", tenant="t", modality="text", provider_model="gpt-4o-mini",
                          input={"messages": [{"role": "user", "content": "hey"}], "provider_params": {"temperature": 0.2}})
    result = await adapter.submit(req)
    assert isinstance(result, Done) and result.outputs[0].content_type == "application/json"
    assert json.loads(result.outputs[0].data or b"")["choices"][0]["message"]["content"] == "You said: hey"
    assert result.usage["total_tokens"] > 0 and (await last(fake, "chat.completions"))["temperature"] == 0.2


# -- project webhooks for videos ----------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> Response:
        got.append((dict(request.headers), await request.body()))
        return JSONResponse({"ok": True})

    with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        yield f"{url}/hook", got


async def test_video_webhook_is_verified_and_finishes_the_job(
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook_url, got = receiver
    with serve(create_app(api_key=KEY, webhook_url=hook_url, webhook_secret=SECRET, webhook_delay=0.05)) as url:
        monkeypatch.setenv(KEY_ENV, KEY)
        monkeypatch.setenv("GENROUTE_TEST_OPENAI_WHSEC", SECRET)
        dep = Deployment(name="v", adapter="openai", model="sora-2", base_url=f"{url}/v1", api_key_env=KEY_ENV,
                         options={"webhook_secret_env": "GENROUTE_TEST_OPENAI_WHSEC"})
        adapter = build_adapter(dep, http)
        case = Case("video", "sora-2", {"prompt": "hooked"})
        first = await adapter.submit(request_for(case, callback_url="https://ignored.example/cb"))
        assert isinstance(first, Pending)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        headers, body = got[-1]
        assert json.loads(body)["type"] == "video.completed"
        result = await adapter.verify_callback(headers, body, first.handle, None)
        assert isinstance(result, Done) and result.outputs[0].content_type == "video/mp4"
        # another video's event changes nothing for this job
        assert await adapter.verify_callback(headers, body, {"kind": "video", "video_id": "video_other"}, None) is None
        for bad_headers, bad_body in (
            (headers, body.replace(b"completed", b"failed")),  # tampered
            ({k: v for k, v in headers.items() if k != "webhook-signature"}, body),  # unsigned
            stale_but_signed(headers["webhook-id"], body),  # a replay of a real signature, an hour old
        ):
            with pytest.raises(ProviderError) as exc:
                await adapter.verify_callback(bad_headers, bad_body, first.handle, None)
            assert exc.value.kind == ProviderErrorKind.auth
        # cross-check: the reference Standard Webhooks library accepts what we accept
        Webhook(SECRET).verify(body, headers)


def stale_but_signed(msg_id: str, body: bytes) -> tuple[dict[str, str], bytes]:
    old = datetime.now(tz=UTC) - timedelta(hours=1)
    sig = Webhook(SECRET).sign(msg_id, old, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(old.timestamp())), "webhook-signature": sig}, body


# -- the OpenAI-compatible adapter --------------------------------------------------


async def test_compatible_adapter_with_another_auth_header(http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "agg-key")
    with serve(create_app(api_key="agg-key", auth_header="X-Api-Key", auth_scheme="")) as url:
        opts = {"auth_header": "X-Api-Key", "auth_scheme": ""}
        image_dep = Deployment(name="agg", adapter="openai_compatible", model="openai/gpt-image-1",
                               base_url=f"{url}/v1", api_key_env=KEY_ENV, options=opts)
        adapter = build_adapter(image_dep, http)
        result = await adapter.submit(request_for(Case("image", "openai/gpt-image-1", {"prompt": "agg", "size": "1024x1536"})))
        assert isinstance(result, Done) and Image.open(io.BytesIO(result.outputs[0].data or b"")).size == (1024, 1536)
        chat_dep = image_dep.model_copy(update={"model": "openai/gpt-4o-mini"})
        chunks = [c async for c in await build_adapter(chat_dep, http).chat({"messages": [{"role": "user", "content": "hi"}]}, stream=True)]
        assert chunks[-1]["usage"]["total_tokens"] > 0
        # the same key as Bearer is refused by this host: the header option is what made it work
        bearer = build_adapter(image_dep.model_copy(update={"options": {}}), http)
        with pytest.raises(ProviderError) as exc:
            await bearer.chat({"messages": [{"role": "user", "content": "hi"}]}, stream=False)
        assert exc.value.code == ErrorCode.provider_auth


async def test_compatible_adapter_needs_a_base_url(http: httpx.AsyncClient) -> None:
    dep = Deployment(name="agg", adapter="openai_compatible", model="m")
    with pytest.raises(ProviderError) as exc:
        await build_adapter(dep, http).chat({"messages": []}, stream=False)
    assert "base_url" in str(exc.value)


# -- the official SDK against the fake ----------------------------------------------


@pytest.fixture(scope="module")
def sdk(fake: Fake) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(api_key=KEY, base_url=fake.url, max_retries=0)
    yield client
    client.close()


def test_sdk_images(sdk: openai.OpenAI) -> None:
    b64 = sdk.images.generate(model="gpt-image-1", prompt="fox", size="1024x1536", output_format="jpeg")
    assert b64.usage is not None and b64.usage.total_tokens > 0 and b64.output_format == "jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(b64.data[0].b64_json or ""))).size == (1024, 1536)
    url = sdk.images.generate(model="dall-e-3", prompt="fox", response_format="url")
    assert url.data and url.data[0].url and httpx.get(url.data[0].url).status_code == 200
    assert url.data[0].revised_prompt
    edit = sdk.images.edit(model="gpt-image-1", prompt="blue", image=[("a.png", png_bytes(64, 64), "image/png")] * 2)
    assert edit.data and edit.data[0].b64_json
    events = list(sdk.images.generate(model="gpt-image-1", prompt="fox", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.images.generate(model="gpt-image-1", prompt="fox", response_format="url")
    assert exc.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.images.generate(model="gpt-image-1", prompt="x [moderated]")
    assert exc.value.code == "moderation_blocked"


def test_sdk_errors(sdk: openai.OpenAI, fake: Fake) -> None:
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.images.generate(model="gpt-image-1", prompt="x [429]")
    assert exc.value.code == "rate_limit_exceeded" and exc.value.response.headers["retry-after-ms"] == "1500"
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.images.generate(model="gpt-image-1", prompt="x [quota]")
    assert exc.value.code == "insufficient_quota"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nope", base_url=fake.url, max_retries=0).images.generate(model="gpt-image-1", prompt="x")


def test_sdk_speech(sdk: openai.OpenAI) -> None:
    audio = sdk.audio.speech.create(model="tts-1", voice="alloy", input="hello", response_format="wav")
    assert audio.content[:4] == b"RIFF" and audio.content[8:12] == b"WAVE"


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # shutdown 2026-09-24, see providers.md §4b
def test_sdk_videos(sdk: openai.OpenAI) -> None:
    video = sdk.videos.create(model="sora-2", prompt="cat", seconds="8", size="1280x720")
    assert video.status == "queued" and video.progress == 0
    for _ in range(10):
        video = sdk.videos.retrieve(video.id)
        if video.status == "completed":
            break
    assert video.status == "completed" and video.expires_at and video.completed_at
    mp4 = sdk.videos.download_content(video.id).content
    assert mp4[4:8] == b"ftyp" and mp4_duration(io.BytesIO(mp4)) == 8.0
    thumb = sdk.videos.download_content(video.id, variant="thumbnail").content
    assert Image.open(io.BytesIO(thumb)).format == "WEBP"
    ref = sdk.videos.create(model="sora-2", prompt="cat", size="1280x720", input_reference=("r.png", png_bytes(1280, 720), "image/png"))
    assert ref.status == "queued"
    with pytest.raises(openai.BadRequestError):
        sdk.videos.create(model="sora-2", prompt="cat", seconds="5")  # type: ignore[arg-type]
    deleted = sdk.videos.delete(video.id)
    assert deleted.deleted


def test_sdk_chat(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert done.choices[0].message.content == "You said: hello" and done.usage and done.usage.total_tokens > 0
    stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
