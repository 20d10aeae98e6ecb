"""The Together adapter against its fake over real HTTP: the shared contract, plus what is
Together's own: width/height instead of size (the fake refuses `size`), url or b64_json
answers, the /v2 video API with frame_images, USD cost, files on another host fetched
without the key, and the 429's x-ratelimit-reset."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters.together import image_body, video_body, video_size
from core.errors import ErrorCode, ProviderError
from core.types import Done, Failed, Pending
from storage import store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes import together
from tests.fakes.server import serve

KEY = "together-test-key"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
KONTEXT = "black-forest-labs/FLUX.1-kontext-pro"
HAILUO = "minimax/hailuo-02"
IMAGE_URL = "https://example.com/reference.png"


def _data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 160, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DATA_URI = _data_uri()


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    state = together.TogetherState(api_key=KEY)
    with serve(together.create_files_app(state)) as files_url, serve(together.create_app(state=state, files_url=files_url)) as url:
        # the deployment names the OpenAI-style base (…/v1), as a chat deployment does
        yield Fake(url + "/v1", KEY, extra={"files_url": files_url, "root": url})


async def _control(fake: Fake, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as c:
        url = f"{fake.extra['root']}{path}"
        if body is None:
            return (await (c.post(url) if path.endswith("reset") else c.get(url))).json()
        resp = await c.post(url, json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()


async def _stats(fake: Fake) -> dict[str, Any]:
    return await _control(fake, "/_control/stats")


def _video(prompt: str, **extra: Any) -> Case:
    return Case("video", HAILUO, {"prompt": prompt, **extra})


def _image(model: str, prompt: str, **extra: Any) -> Case:
    return Case("image", model, {"prompt": prompt, **extra})


class TestTogether(AdapterContract):
    adapter = "together"
    api_key_env = "GENROUTE_TEST_TOGETHER_KEY"
    supports_cancel = False  # no cancel for /v2/videos: the job is canceled on our side
    task_id_key = "id"
    success = [
        # first: a video, its file on the other host (the expiry test needs a URL)
        Case("video", HAILUO, {"prompt": "a paper boat on a pond", "duration_seconds": 5, "aspect_ratio": "16:9"},
             content_type="video/mp4", duration=5),
        Case("image", SCHNELL, {"prompt": "a lighthouse", "size": "1024x768", "output_format": "jpeg", "seed": 3},
             content_type="image/jpeg", size=(1024, 768)),
        # an aspect ratio: ~1 MP on the 16 px grid
        Case("image", SCHNELL, {"prompt": "a fox", "aspect_ratio": "16:9", "provider_params": {"steps": 4}},
             content_type="image/png", size=(1360, 768)),
        Case("image", SCHNELL, {"prompt": "two cabins", "size": "512x512", "n": 2}, content_type="image/png",
             size=(512, 512), outputs=2),
        # links instead of bytes: fetched from the file host
        Case("image", SCHNELL, {"prompt": "a link", "size": "640x480", "provider_params": {"response_format": "url"}},
             content_type="image/png", size=(640, 480)),
        Case("image", KONTEXT, {"prompt": "make it snow", "input_images": [IMAGE_URL], "size": "768x768"},
             content_type="image/png", size=(768, 768)),
        Case("video", HAILUO, {"prompt": "first and last", "image": DATA_URI, "provider_params": {"last_frame": IMAGE_URL}},
             content_type="video/mp4"),
        Case("video", HAILUO, {"prompt": "webm", "provider_params": {"output_format": "WEBM"}}, content_type="video/webm"),
    ]
    failures = [
        Case("image", SCHNELL, {"prompt": "a thing [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("video", HAILUO, {"prompt": "a thing [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("video", HAILUO, {"prompt": "a thing [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("video", HAILUO, {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        # passed through, refused by Together: its 400 is the tenant's invalid_input
        Case("image", SCHNELL, {"prompt": "too many steps", "provider_params": {"steps": 30}}, code=ErrorCode.invalid_input),
        Case("image", SCHNELL, {"prompt": "too wide", "size": "4096x1024"}, code=ErrorCode.invalid_input),
    ]
    unsupported = [
        _image(SCHNELL, "five", n=5),
        _image(SCHNELL, "webp", output_format="webp"),
        _image(SCHNELL, "two refs", input_images=[IMAGE_URL, IMAGE_URL]),
        _image(KONTEXT, "inline ref", input_images=[DATA_URI]),
        _image(SCHNELL, "answer", provider_params={"response_format": "b64_json"}),
        _image(SCHNELL, "steps", provider_params={"steps": 0}),
        _image(SCHNELL, "width", provider_params={"width": "wide"}),
        _image(SCHNELL, "a size knob", provider_params={"size": "1024x1024"}),  # not settable: Together has no size
        _video("too long", duration_seconds=12),
        _video("too slow", fps=8),
        _video("resolution", resolution="high"),
        _video("format", provider_params={"output_format": "GIF"}),
        _video("steps", provider_params={"steps": 5}),
        _video("last frame", provider_params={"last_frame": "file:///etc/passwd"}),
        _video("no url knobs", provider_params={"video_url": "https://evil.example/x"}),
    ]

    # -- Together's own -------------------------------------------------------------------
    async def test_wire_bodies(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """width/height (never size), base64 answers by default; frame_images first and
        last with the data: prefix stripped; seconds as a string; the key as Bearer."""
        case = self.success[1]
        await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        sent = (await _control(fake, "/_control/requests"))[-1]
        assert sent["endpoint"] == "images"
        body = sent["body"]
        assert "size" not in body and (body["width"], body["height"]) == (1024, 768)
        assert body["response_format"] == "base64" and body["output_format"] == "jpeg" and body["seed"] == 3
        case = self.success[6]
        await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        sent = (await _control(fake, "/_control/requests"))[-1]
        assert sent["endpoint"] == "videos"
        frames = sent["body"]["frame_images"]
        assert [f["frame"] for f in frames] == ["first", "last"]
        assert not frames[0]["input_image"].startswith("data:") and frames[1]["input_image"] == IMAGE_URL
        case = self.success[0]
        await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        body = (await _control(fake, "/_control/requests"))[-1]["body"]
        assert (body["seconds"], body["width"], body["height"], body["output_format"]) == ("5", 1280, 720, "MP4")

    async def test_size_is_refused_by_the_provider(self, fake: Fake) -> None:
        """The fake is as strict as Together: OpenAI's `size` gets a 400 (so the mapping matters)."""
        async with httpx.AsyncClient() as c:
            resp = await c.post(f"{fake.extra['root']}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                                json={"model": SCHNELL, "prompt": "p", "size": "1024x1024"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "size"

    async def test_video_cost_is_reported_in_usd_credits(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        result, seen = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done), result
        assert result.usage == {"cost_credits": together.VIDEO_MODELS[HAILUO], "cost_unit": "usd"}
        assert {p.message for p in seen} >= {"queued", "in_progress"}

    async def test_files_are_fetched_without_the_key(self, fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[4]  # response_format url
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done)
        ref = result.outputs[0]
        assert ref.url and ref.url.startswith(fake.extra["files_url"]) and not ref.headers
        before = await _stats(fake)
        stored = await store_output(bucket, http, ref, key_base=f"t/{uuid.uuid4().hex}", index=0,
                                    max_bytes=2**22, max_image_pixels=64_000_000)
        assert (stored.width, stored.height) == (640, 480)
        after = await _stats(fake)
        assert after["file_gets"] == before["file_gets"] + 1 and after["file_saw_key"] == before["file_saw_key"]

    async def test_rate_limit_reads_x_ratelimit_reset(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = _image(SCHNELL, "busy [429]")
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 2.0
        assert "rate limit" in str(exc.value)

    async def test_transient_500_on_poll_is_retried(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = _video("flaky [poll500]")
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        with pytest.raises(ProviderError) as exc:
            await adapter.poll(first.handle)
        assert exc.value.retryable
        result, _ = await drive(adapter, self.request(case))
        assert isinstance(result, Done)

    async def test_unknown_video_is_provider_error(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch)
        result = await adapter.poll({"kind": "video", "id": "vid_nope", "model": HAILUO, "output_format": "MP4"})
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error and "vid_nope" in result.message

    async def test_cancel_is_local_and_a_cancelled_status_maps_to_canceled(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = _video("slow one [slow]")
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        before = await _stats(fake)
        await adapter.cancel(first.handle)  # nothing is sent: Together has no cancel here
        assert await _stats(fake) == before
        assert isinstance(await adapter.poll(first.handle), Pending)  # still rendering
        await _control(fake, f"/_control/cancel/{first.handle['id']}", {})  # stopped on Together's side
        cancelled = await adapter.poll(first.handle)
        assert isinstance(cancelled, Failed) and cancelled.code == ErrorCode.canceled, cancelled

    async def test_chat_deployment_base_url_works_for_media(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """A base URL without /v1 (the API root) reaches the same routes."""
        case = Case("image", SCHNELL, {"prompt": "root", "size": "256x256"}, options={})
        root = Fake(fake.extra["root"], KEY)
        result, _ = await drive(self.make(root, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done) and result.outputs[0].data


# -- mapping, without HTTP ---------------------------------------------------------------
@pytest.mark.parametrize(("ratio", "resolution", "expected"), [
    ("16:9", "720p", (1280, 720)), ("9:16", "720p", (720, 1280)), ("1:1", "1080p", (1080, 1080)),
    ("16:9", "1080p", (1920, 1080)), ("4:3", "480p", (640, 480)),
])
def test_video_size(ratio: str, resolution: str, expected: tuple[int, int]) -> None:
    assert video_size("m", ratio, resolution) == expected


def test_image_body_maps_and_provider_params_win() -> None:
    body = image_body(SCHNELL, {"prompt": "p", "size": "512x512", "negative_prompt": "blur",
                                "provider_params": {"width": 640, "steps": 4}})
    assert (body["width"], body["height"], body["steps"], body["negative_prompt"]) == (640, 512, 4, "blur")
    assert "size" not in body and "n" not in body


def test_video_body_without_shape_sends_no_size() -> None:
    body = video_body(HAILUO, {"prompt": "p"})
    assert body == {"model": HAILUO, "prompt": "p", "output_format": "MP4"}
