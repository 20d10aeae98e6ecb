"""The SiliconFlow adapter against its fake over real HTTP: the shared contract, plus what
is SiliconFlow's own: its image body (image_size, Kolors-only batch_size, edit models),
the video queue position, its error bodies (a bare-string 401, codes 20012/20015/30001/
50505, a 429 with no Retry-After), expiring signed links, and OpenAI-format chat on the
openai_compatible adapter whose usage comes from the last stream chunk."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters.base import Adapter
from adapters.registry import build_adapter
from adapters.siliconflow import DAILY_LIMIT_WAIT, RATE_LIMIT_WAIT, error
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.routing.catalog import Deployment
from core.types import Done, Failed, Pending
from storage import S3BlobStore, StorageError, store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.server import serve
from tests.fakes.siliconflow import API_KEY, create_app

KEY_ENV = "GENROUTE_TEST_SILICONFLOW_KEY"
KOLORS, QWEN, QWEN_EDIT = "Kwai-Kolors/Kolors", "Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit-2509"
FLUX, T2V, I2V = "black-forest-labs/FLUX.1-schnell", "Wan-AI/Wan2.2-T2V-A14B", "Wan-AI/Wan2.2-I2V-A14B"
IMAGE_URL = "https://example.com/first-frame.png"


def _data_uri(w: int = 64, h: int = 48) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DATA_URI = _data_uri()


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(create_app(api_key=API_KEY)) as url:
        yield Fake(url + "/v1", API_KEY)


async def _control(fake: Fake, path: str) -> Any:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"{fake.url.removesuffix('/v1')}{path}")).json()


def _image(model: str, prompt: str, **extra: Any) -> Case:
    return Case("image", model, {"prompt": prompt, **extra})


def _video(model: str, prompt: str, **extra: Any) -> Case:
    return Case("video", model, {"prompt": prompt, "duration_seconds": 4.0, "aspect_ratio": "16:9", "resolution": "720p", **extra})


class TestSiliconFlow(AdapterContract):
    adapter = "siliconflow"
    api_key_env = KEY_ENV
    supports_cancel = False  # SiliconFlow has no cancel
    task_id_key = "request_id"
    slow = None  # no progress figure: InQueue (with a position) then InProgress; see the queue test
    success = [
        Case("image", KOLORS, {"prompt": "a lighthouse at dusk", "size": "1024x1024", "seed": 7},
             content_type="image/png", size=(1024, 1024)),
        # Kolors batches: n=2 is batch_size 2; 3:4 is its 960x1280 (768x1024 too: the first listed wins)
        Case("image", KOLORS, {"prompt": "two foxes", "n": 2, "aspect_ratio": "3:4", "negative_prompt": "blurry",
                               "provider_params": {"num_inference_steps": 25, "guidance_scale": 5.0}},
             content_type="image/png", size=(960, 1280), outputs=2),
        Case("image", QWEN, {"prompt": "a poster", "aspect_ratio": "16:9", "provider_params": {"cfg": 4.0}},
             content_type="image/png", size=(1664, 928)),
        Case("image", QWEN, {"prompt": "no size given"}, content_type="image/png", size=(1328, 1328)),
        # an edit keeps the input image's size and takes no image_size
        Case("image", QWEN_EDIT, {"prompt": "make it snow", "input_images": [DATA_URI]}, content_type="image/png", size=(64, 48)),
        Case("image", FLUX, {"prompt": "a cabin", "size": "768x512"}, content_type="image/png", size=(768, 512)),
        Case("image", KOLORS, {"prompt": "restyle it", "input_images": [IMAGE_URL], "size": "720x1280"}, size=(720, 1280)),
        Case("video", T2V, {"prompt": "waves at dusk", "seed": 3}, content_type="video/mp4"),
        _video(I2V, "the frame comes alive", image=IMAGE_URL, aspect_ratio="9:16"),
        _video(T2V, "square", aspect_ratio="1:1", duration_seconds=5.0),
        Case("video", T2V, {"prompt": "five seconds", "duration_seconds": 5.0}, content_type="video/mp4", duration=5.0),
    ]
    failures = [
        Case("image", KOLORS, {"prompt": "something [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("video", T2V, {"prompt": "something [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("video", T2V, {"prompt": "render [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("video", T2V, {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        # FLUX takes any WxH here, SiliconFlow judges it: its 20015 is the user's invalid input
        Case("image", FLUX, {"prompt": "too big", "size": "4096x4096"}, code=ErrorCode.invalid_input),
        # 20012: the catalog names a model SiliconFlow does not have: not the user's fault
        Case("image", "nope/not-a-model", {"prompt": "who"}, code=ErrorCode.provider_unavailable),
        Case("image", KOLORS, {"prompt": "busy [503]"}, code=ErrorCode.provider_unavailable),
        Case("image", KOLORS, {"prompt": "no money [broke]"}, code=ErrorCode.provider_error),
    ]
    unsupported = [
        _image(QWEN, "two please", n=2),
        _image(FLUX, "two please", n=2),
        _image(KOLORS, "five please", n=5),
        _image(KOLORS, "jpeg", output_format="jpeg"),
        _image(KOLORS, "not a Kolors size", size="1000x1000"),
        _image(QWEN, "too wide", aspect_ratio="21:9"),
        _image(QWEN_EDIT, "edit what?"),
        _image(QWEN_EDIT, "sized edit", size="1024x1024", input_images=[DATA_URI]),
        _image(QWEN, "no image input", input_images=[DATA_URI]),
        _image(KOLORS, "two inputs", input_images=[DATA_URI, IMAGE_URL]),
        _image(QWEN, "guidance is Kolors-only", provider_params={"guidance_scale": 5}),
        _image(KOLORS, "cfg is Qwen-Image-only", provider_params={"cfg": 3}),
        _image(KOLORS, "steps", provider_params={"num_inference_steps": 101}),
        _image(KOLORS, "guidance", provider_params={"guidance_scale": 25}),
        _image(KOLORS, "size by params", provider_params={"image_size": "2048x2048"}),
        _image(KOLORS, "count by params", provider_params={"batch_size": 4}),
        _video(T2V, "4:3", aspect_ratio="4:3"),
        _video(T2V, "ten seconds", duration_seconds=10.0),
        _video(T2V, "1080p", resolution="1080p"),
        _video(T2V, "fps", fps=24),
        _video(T2V, "T2V takes no image", image=IMAGE_URL),
        _video(I2V, "I2V without an image"),
        Case("text", KOLORS, {"messages": [{"role": "user", "content": "hi"}]}),
    ]

    async def test_unsupported_parameters_are_refused_before_sending(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """The contract, except the text case: a catalog routing chat to this adapter is the
        operator's mistake (provider_unavailable), still refused before sending."""
        cases, self.unsupported = self.unsupported, [c for c in self.unsupported if c.modality != "text"]
        try:
            await super().test_unsupported_parameters_are_refused_before_sending(fake, http, monkeypatch)
        finally:
            self.unsupported = cases
        text = next(c for c in cases if c.modality == "text")
        before = (await fake.stats())["creates"]
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, text, http, monkeypatch).submit(self.request(text))
        assert exc.value.fault is Fault.operator and exc.value.code == ErrorCode.provider_unavailable
        assert "openai_compatible" in exc.value.message
        assert (await fake.stats())["creates"] == before


# -- SiliconFlow's own -------------------------------------------------------------------


def _adapter(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, model: str, *,
             adapter: str = "siliconflow", key: str | None = None, base_url: str | None = None) -> Adapter:
    monkeypatch.setenv(KEY_ENV, key if key is not None else fake.api_key)
    dep = Deployment(name=f"sf-{uuid.uuid4().hex[:6]}", adapter=adapter, model=model, base_url=base_url or fake.url,
                     api_key_env=KEY_ENV, options={"poll_interval": 0.02})
    return build_adapter(dep, http)


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def test_wire_body_batch_size_only_on_kolors_and_no_image_size_on_edits(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    req = TestSiliconFlow.request
    await _adapter(fake, http, monkeypatch, KOLORS).submit(req(_image(KOLORS, "pair", n=2, seed=11)))
    await _adapter(fake, http, monkeypatch, QWEN).submit(req(_image(QWEN, "one")))
    await _adapter(fake, http, monkeypatch, QWEN_EDIT).submit(req(_image(QWEN_EDIT, "edit", input_images=[IMAGE_URL])))
    kolors, qwen, edit = [r["body"] for r in (await _control(fake, "/_control/requests"))[-3:]]
    assert kolors == {"model": KOLORS, "prompt": "pair", "seed": 11, "batch_size": 2, "image_size": "1024x1024"}
    assert qwen == {"model": QWEN, "prompt": "one", "image_size": "1328x1328"}  # image_size is required: the default
    assert edit == {"model": QWEN_EDIT, "prompt": "edit", "image": IMAGE_URL}


async def test_image_outputs_are_signed_links_stored_at_once_without_the_key(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    done = await _adapter(fake, http, monkeypatch, KOLORS).submit(TestSiliconFlow.request(_image(KOLORS, "usage", seed=5)))
    assert isinstance(done, Done) and len(done.outputs) == 1
    ref = done.outputs[0]
    assert ref.url and "Expires=" in ref.url and "Signature=" in ref.url
    assert "authorization" not in {k.lower() for k in ref.headers}  # the key never goes to the file host
    assert done.usage["seed"] == 5 and done.usage["images"] == 1 and done.usage["inference_seconds"] > 0
    assert done.handle["trace_id"]  # x-siliconcloud-trace-id, kept for support


async def test_queue_position_surfaces_then_in_progress(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _adapter(fake, http, monkeypatch, T2V)
    result, seen = await drive(adapter, TestSiliconFlow.request(_video(T2V, "a long queue [slow]")), max_polls=100)
    assert isinstance(result, Done), result
    positions = [p.queue_position for p in seen if p.queue_position is not None]
    assert len(positions) >= 5 and positions == sorted(positions, reverse=True) and positions[0] > positions[-1], positions
    assert all(p.progress == 0.0 for p in seen if p.queue_position is not None)
    in_progress = [p for p in seen if p.message == "in progress"]
    assert in_progress and all(p.queue_position is None for p in in_progress)
    assert seen.index(in_progress[0]) > max(i for i, p in enumerate(seen) if p.queue_position is not None)


async def test_transient_500_on_status_is_retried(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _adapter(fake, http, monkeypatch, T2V)
    first = await adapter.submit(TestSiliconFlow.request(_video(T2V, "flaky [poll500]")))
    assert isinstance(first, Pending)
    with pytest.raises(ProviderError) as exc:
        await adapter.poll(first.handle)
    assert exc.value.retryable and exc.value.fault is Fault.provider
    result, _ = await drive(adapter, TestSiliconFlow.request(_video(T2V, "flaky again [poll500]")))
    assert isinstance(result, Done)


async def test_unknown_request_id_fails_the_job_as_provider_error(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _adapter(fake, http, monkeypatch, T2V)
    result = await adapter.poll({"kind": "video", "request_id": "no-such-request", "model": T2V})
    assert isinstance(result, Failed) and result.code == ErrorCode.provider_error
    assert "no-such-request" in result.message


async def test_video_link_expires_after_its_ttl(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, bucket: Any) -> None:
    adapter = _adapter(fake, http, monkeypatch, T2V)
    result, _ = await drive(adapter, TestSiliconFlow.request(_video(T2V, "too late [expired]")))
    assert isinstance(result, Done)
    async with httpx.AsyncClient() as c:
        got = await c.get(str(result.outputs[0].url))
    assert got.status_code == 403 and "<Code>AccessDenied</Code>" in got.text and "expired" in got.text
    with pytest.raises(StorageError) as exc:
        await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                           max_bytes=2**20, max_image_pixels=64_000_000)
    assert exc.value.code == ErrorCode.provider_error and "expired" in str(exc.value)


@pytest.fixture
async def bucket(seaweed: Any) -> Any:
    store = S3BlobStore(f"sf-{uuid.uuid4().hex[:12]}", endpoint_url=seaweed.endpoint_url, access_key_id=seaweed.access_key,
                        secret_access_key=seaweed.secret_key, create_bucket=True)
    await store.start()
    yield store
    await store.close()


async def test_bad_key_answer_is_a_bare_json_string(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProviderError) as exc:
        await _adapter(fake, http, monkeypatch, T2V, key="sk-wrong").submit(TestSiliconFlow.request(_video(T2V, "x")))
    assert exc.value.kind is ProviderErrorKind.auth and exc.value.fault is Fault.operator
    assert exc.value.message.endswith(": Invalid token") and exc.value.detail["body"] == "Invalid token"
    assert exc.value.detail["trace_id"]


async def test_429_without_retry_after_backs_off_by_the_limit_named(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProviderError) as exc:
        await _adapter(fake, http, monkeypatch, T2V).submit(TestSiliconFlow.request(_video(T2V, "busy [429]")))
    assert exc.value.code == ErrorCode.rate_limited and exc.value.resend_safe
    assert exc.value.retry_after == RATE_LIMIT_WAIT  # an RPM limit: a minute window
    daily = httpx.Response(429, json={"message": "Request was rejected due to rate limiting. Details:IPD limit reached.", "data": None},
                           request=httpx.Request("POST", "https://api.siliconflow.cn/v1/images/generations"))
    assert error(daily).retry_after == DAILY_LIMIT_WAIT
    told = httpx.Response(429, headers={"retry-after": "7"}, json={"message": "Details:TPM limit reached."},
                          request=httpx.Request("POST", "https://api.siliconflow.cn/v1/chat/completions"))
    assert error(told).retry_after == 7.0  # a Retry-After, should one ever come, wins


async def test_error_codes_say_whose_fault(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    req = TestSiliconFlow.request
    with pytest.raises(ProviderError) as missing:
        await _adapter(fake, http, monkeypatch, "nope/model").submit(req(_image("nope/model", "x")))
    assert missing.value.fault is Fault.operator and missing.value.resend_safe and missing.value.detail["body"]["code"] == 20012
    with pytest.raises(ProviderError) as broke:
        await _adapter(fake, http, monkeypatch, KOLORS).submit(req(_image(KOLORS, "x [broke]")))
    assert broke.value.kind is ProviderErrorKind.quota and broke.value.fault is Fault.operator
    with pytest.raises(ProviderError) as busy:
        await _adapter(fake, http, monkeypatch, KOLORS).submit(req(_image(KOLORS, "x [503]")))
    assert busy.value.retryable and busy.value.resend_safe and busy.value.fault is Fault.provider  # 50505: nothing started
    with pytest.raises(ProviderError) as bad:
        await _adapter(fake, http, monkeypatch, FLUX).submit(req(_image(FLUX, "x", size="4000x4000")))
    assert bad.value.fault is Fault.user and "image_size" in bad.value.message


async def test_wrong_base_url_gets_the_plain_text_404_as_a_misconfiguration(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _adapter(fake, http, monkeypatch, KOLORS, base_url=fake.url.removesuffix("/v1") + "/v2")
    with pytest.raises(ProviderError) as exc:
        await adapter.submit(TestSiliconFlow.request(_image(KOLORS, "x")))
    assert exc.value.fault is Fault.operator and exc.value.code == ErrorCode.provider_unavailable
    assert "404 page not found" in exc.value.message


# -- chat on openai_compatible -----------------------------------------------------------


CHAT = [{"role": "user", "content": "tell me five words"}]


async def test_chat_stream_usage_is_the_last_chunks(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """SiliconFlow puts a running usage in every chunk and sends no separate usage chunk:
    the last chunk's is the total."""
    adapter = _adapter(fake, http, monkeypatch, "deepseek-ai/DeepSeek-R1", adapter="openai_compatible")
    chunks = [c async for c in await adapter.chat({"messages": CHAT}, stream=True)]  # type: ignore[attr-defined]
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usages) == len(chunks) > 2 and usages[0]["completion_tokens"] < usages[-1]["completion_tokens"]
    assert all(c["choices"] for c in chunks)  # no `choices: []` usage chunk
    reasoning = [c["choices"][0]["delta"]["reasoning_content"] for c in chunks if c["choices"][0]["delta"].get("reasoning_content")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert reasoning and content.split() == ["word1", "word2", "word3", "word4", "word5"]
    assert usages[-1]["completion_tokens"] == len(reasoning) + 5
    whole = await adapter.chat({"messages": CHAT}, stream=False)  # type: ignore[attr-defined]
    assert whole["usage"]["completion_tokens"] == usages[-1]["completion_tokens"]
    assert whole["choices"][0]["message"]["reasoning_content"]


async def test_chat_errors_map_through_siliconflow_bodies(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = _adapter(fake, http, monkeypatch, "Qwen/Qwen2.5-7B-Instruct", adapter="openai_compatible")
    with pytest.raises(ProviderError) as flagged:
        await chat.chat({"messages": [{"role": "user", "content": "bad words [moderated]"}]}, stream=True)  # type: ignore[attr-defined]
    assert flagged.value.code == ErrorCode.moderated and flagged.value.detail["stage"] == "input"
    with pytest.raises(ProviderError) as limited:
        await chat.chat({"messages": [{"role": "user", "content": "many [429]"}]}, stream=False)  # type: ignore[attr-defined]
    assert limited.value.code == ErrorCode.rate_limited and limited.value.retry_after == RATE_LIMIT_WAIT
    missing = _adapter(fake, http, monkeypatch, "no/such-chat-model", adapter="openai_compatible")
    with pytest.raises(ProviderError) as exc:
        await missing.chat({"messages": CHAT}, stream=True)  # type: ignore[attr-defined]
    assert exc.value.fault is Fault.operator and exc.value.code == ErrorCode.provider_unavailable
    wrong_key = _adapter(fake, http, monkeypatch, "Qwen/Qwen2.5-7B-Instruct", adapter="openai_compatible", key="sk-nope")
    with pytest.raises(ProviderError) as auth:
        await wrong_key.chat({"messages": CHAT}, stream=False)  # type: ignore[attr-defined]
    assert auth.value.code == ErrorCode.provider_auth and "Invalid token" in auth.value.message
