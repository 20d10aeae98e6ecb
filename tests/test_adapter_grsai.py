"""The GrsAi adapter against its fake over real HTTP: the shared contract, plus what is
GrsAi's own: API errors as HTTP 200 with code != 0, the -22 grace right after submit,
violation / failure_reason stages on both APIs, progress 0-100, the draw-or-generate
choice per deployment, result expiry, and unsigned callbacks that only prompt a poll."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters.grsai import build_body, route_for
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, Pending, PollNow, ProviderRequest
from storage import StorageError, store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.grsai import create_app
from tests.fakes.server import serve

KEY = "sk-grsai-contract"


def _data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DATA_URI = _data_uri()
IMAGE_URL = "https://example.com/reference.png"
GENERATE = {"api": "generate"}


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(create_app(api_key=KEY)) as url:
        # the fake does not know a new task for its first poll: the grace must carry it
        yield Fake(url, KEY, extra={"options": {"not_found_grace_seconds": 0}})


async def _control(fake: Fake, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as c:
        if path.endswith("reset"):
            return (await c.post(f"{fake.url}{path}")).json()
        if body is None:
            return (await c.get(f"{fake.url}{path}")).json()
        resp = await c.post(f"{fake.url}{path}", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()


def _image(model: str, prompt: str, **extra: Any) -> Case:
    return Case("image", model, {"prompt": prompt, **extra})


def _video(model: str, prompt: str, **extra: Any) -> Case:
    return Case("video", model, {"prompt": prompt, **extra})


class TestGrsAi(AdapterContract):
    adapter = "grsai"
    api_key_env = "GENROUTE_TEST_GRSAI_KEY"
    supports_cancel = False  # GrsAi has no cancel endpoint
    task_id_key = "id"
    success = [
        Case("image", "nano-banana-fast", {"prompt": "a lighthouse", "aspect_ratio": "16:9"},
             content_type="image/png", size=(1024, 576)),
        # a size on a ratio model: its shape, at the 2K tier
        Case("image", "nano-banana-pro", {"prompt": "a fox", "size": "1024x1024", "input_images": [DATA_URI],
                                          "provider_params": {"imageSize": "2K"}}, content_type="image/png", size=(2048, 2048)),
        # gpt-image takes pixel sizes in aspectRatio
        Case("image", "gpt-image-2", {"prompt": "a teapot", "size": "1536x1024", "input_images": [IMAGE_URL],
                                      "provider_params": {"quality": "high"}}, content_type="image/png", size=(1536, 1024)),
        Case("image", "gpt-image-2", {"prompt": "a tower", "aspect_ratio": "2:3"}, content_type="image/png", size=(1024, 1536)),
        Case("image", "flux-kontext-pro", {"prompt": "make it snow", "output_format": "jpeg", "seed": 3,
                                           "input_images": [IMAGE_URL], "provider_params": {"safetyTolerance": 2}},
             content_type="image/jpeg", size=(1024, 1024)),
        Case("video", "veo3.1-fast", {"prompt": "waves at dusk", "aspect_ratio": "16:9", "duration_seconds": 8},
             content_type="video/mp4", duration=8),
        Case("video", "sora-2", {"prompt": "a cat surfing", "aspect_ratio": "9:16", "duration_seconds": 15,
                                 "resolution": "720p", "image": DATA_URI}, content_type="video/mp4", duration=15),
        # the newer API, chosen by the deployment
        Case("image", "nano-banana-2", {"prompt": "a cabin", "aspect_ratio": "4:1", "input_images": [IMAGE_URL]},
             content_type="image/png", size=(1024, 256), options=GENERATE),
    ]
    failures = [
        Case("image", "nano-banana-fast", {"prompt": "something [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("image", "gpt-image-2", {"prompt": "something [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("image", "nano-banana-2", {"prompt": "x [moderated]"}, code=ErrorCode.moderated, stage="input", options=GENERATE),
        Case("image", "nano-banana-2", {"prompt": "x [moderated-output]"}, code=ErrorCode.moderated, stage="output",
             options=GENERATE),
        Case("video", "sora-2", {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        Case("image", "gpt-image-2", {"prompt": "boom [fail]"}, code=ErrorCode.provider_error, options=GENERATE),
        # a model this adapter does not know is sent as asked: GrsAi's refusal (code != 0) is the user's
        Case("video", "minimax-h3", {"prompt": "a ship", "aspect_ratio": "16:9"}, code=ErrorCode.invalid_input),
    ]
    slow = Case("image", "nano-banana-fast", {"prompt": "a slow one [slow]"})
    unsupported = [
        _image("nano-banana-fast", "two please", n=2),
        _image("nano-banana-fast", "negative", negative_prompt="blurry"),
        _image("nano-banana-fast", "odd ratio", aspect_ratio="7:3"),
        _image("nano-banana-fast", "far from any ratio", size="1000x130"),
        _image("nano-banana-fast", "not on 1:4", aspect_ratio="1:4"),  # the nano-banana-2 family only
        _image("nano-banana-fast", "no tiers", provider_params={"imageSize": "2K"}),
        _image("nano-banana-pro-4k-vip", "4K only", provider_params={"imageSize": "1K"}),
        _image("nano-banana-fast", "no seed", seed=1),
        _image("nano-banana-fast", "own format", output_format="jpeg"),
        _image("nano-banana-fast", "flux params", provider_params={"steps": 20}),
        _image("gpt-image-2", "not a listed size", size="1000x1000"),
        _image("gpt-image-2", "no such shape", aspect_ratio="21:9"),
        _image("flux-kontext-pro", "webp", output_format="webp"),
        _image("flux-kontext-pro", "no 5:4", aspect_ratio="5:4"),
        _image("nano-banana-fast", "webhook is ours", provider_params={"webHook": "https://evil.example/x"}),
        _video("veo3.1-fast", "fixed length", duration_seconds=4),
        _video("veo3.1-fast", "no resolution", resolution="1080p"),
        _video("veo3.1-fast", "no first frame", image=IMAGE_URL),
        _video("veo3.1-fast", "square", aspect_ratio="1:1"),
        _video("sora-2", "10 or 15", duration_seconds=8),
        _video("sora-2", "small or large", resolution="480p"),
        _video("sora-2", "no fps", fps=30),
        Case("video", "gpt-image-2", {"prompt": "an image model"}),
    ]

    # -- GrsAi's own ----------------------------------------------------------------------
    async def test_wire_bodies(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """What reaches GrsAi: webHook -1 on the draw API, replyType async on the new one,
        urls vs images, a Bearer key."""
        for case, expected in (
            (self.success[1], {"webHook": "-1", "aspectRatio": "1:1", "imageSize": "2K", "model": "nano-banana-pro"}),
            (self.success[6], {"webHook": "-1", "aspectRatio": "9:16", "duration": 15, "size": "small"}),
            (self.success[7], {"replyType": "async", "aspectRatio": "4:1", "images": [IMAGE_URL]}),
        ):
            first = await self.make(fake, case, http, monkeypatch).submit(self.request(case))
            assert isinstance(first, Pending) and first.progress == 0.0
            sent = (await _control(fake, "/_control/requests"))[-1]
            assert {k: sent.get(k) for k in expected} == expected, sent
        assert "urls" in sent or "images" in sent
        assert "webHook" not in sent and "urls" not in sent  # the new API's names only

    async def test_api_error_on_http_200_is_an_error(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """`code != 0` on HTTP 200: credits out is quota (the operator's), a model the route
        does not serve is the catalog's mistake; neither creates a task, so both may be resent."""
        await _control(fake, "/_control/config", {"out_of_credits": True})
        try:
            case = self.success[0]
            with pytest.raises(ProviderError) as exc:
                await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        finally:
            await _control(fake, "/_control/config", {"out_of_credits": False})
        assert exc.value.kind is ProviderErrorKind.quota and exc.value.fault is Fault.operator
        assert exc.value.resend_safe and not exc.value.retryable and "credits" in exc.value.message
        wrong = Case("image", "nano-banana-9", {"prompt": "p"}, options={"draw_path": "/v1/draw/flux"})
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, wrong, http, monkeypatch).submit(self.request(wrong))
        assert exc.value.fault is Fault.operator and exc.value.code == ErrorCode.provider_unavailable
        assert exc.value.detail["provider_code"] == -1 and "not supported" in exc.value.message

    async def test_not_found_right_after_submit_is_waited_out(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/config", {"init_polls": 2})
        try:
            case = Case("image", "nano-banana-fast", {"prompt": "a late one"})
            adapter = self.make(fake, case, http, monkeypatch)
            result, seen = await drive(adapter, self.request(case))
        finally:
            await _control(fake, "/_control/config", {"init_polls": 1})
        assert isinstance(result, Done), result
        waiting = [p for p in seen if p.message == "GrsAi has not registered the task yet"]
        assert len(waiting) == 2 and waiting[-1].handle["misses"] == 2

    async def test_not_found_after_the_grace_is_expired(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for api in ("draw", "generate"):
            case = Case("image", "nano-banana-2", {"prompt": "p"}, options={"api": api, "not_found_grace_polls": 2})
            adapter = self.make(fake, case, http, monkeypatch)
            handle = {"id": f"no-such-{api}", "api": api, "model": "nano-banana-2", "submitted_at": 0, "seen": False,
                      "misses": 0, "modality": "image"}
            results = []
            for _ in range(3):
                result = await adapter.poll(handle)
                results.append(result)
                if not isinstance(result, Pending):
                    break
                handle = result.handle
            assert [type(r) for r in results] == [Pending, Pending, Failed], results
            last = results[-1]
            assert isinstance(last, Failed) and last.code == ErrorCode.provider_error
            assert "no-such" in last.message and "expired" in last.message and last.detail["provider_code"] == -22

    async def test_not_found_after_the_task_was_seen_fails_at_once(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/config", {"task_ttl": 0.0})
        try:
            case = Case("image", "nano-banana-fast", {"prompt": "a short-lived one"},
                        options={"not_found_grace_seconds": 3600, "not_found_grace_polls": 50})
            adapter = self.make(fake, case, http, monkeypatch)
            result, _ = await drive(adapter, self.request(case))
            assert isinstance(result, Done) and result.handle["seen"]
            late = await adapter.poll(result.handle)  # forgotten at once: -22 with no grace left
        finally:
            await _control(fake, "/_control/config", {"task_ttl": 7200.0})
        assert isinstance(late, Failed) and late.code == ErrorCode.provider_error and late.detail["seen"]

    async def test_progress_is_reported_as_a_fraction_on_both_apis(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for options in ({}, GENERATE):
            case = Case("image", "nano-banana-2", {"prompt": "slowly [slow]"}, options=options)
            result, seen = await drive(self.make(fake, case, http, monkeypatch), self.request(case), max_polls=500)
            assert isinstance(result, Done)
            progress = [p.progress for p in seen if p.progress is not None]
            assert all(0.0 <= p <= 1.0 for p in progress) and max(progress) > 0.5, progress
            assert progress == sorted(progress), progress

    async def test_moderation_keeps_the_providers_words(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for case in self.failures[:4]:
            result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
            assert isinstance(result, Failed) and result.code == ErrorCode.moderated
            expected = "input_moderation" if case.stage == "input" else "output_moderation"
            assert expected in result.detail["reasons"] and len(result.detail["reasons"]) == 2, result.detail
            status = "violation" if case.options == GENERATE else "failed"
            assert result.detail["provider_status"] == status

    async def test_video_usage_carries_seconds(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for case, seconds in ((self.success[5], 8), (self.success[6], 15),
                              (_video("sora-2", "default length"), 10), (_video("veo3-fast", "default"), 8)):
            result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
            assert isinstance(result, Done), result
            assert result.usage == {"videos": 1, "video_seconds": seconds}, result.usage

    async def test_429_without_retry_after_waits_about_5_seconds(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/reset")
        await _control(fake, "/_control/config", {"concurrency_limit": 2})
        try:
            case = self.slow
            adapter = self.make(fake, case, http, monkeypatch)
            for _ in range(2):
                assert isinstance(await adapter.submit(self.request(case)), Pending)
            with pytest.raises(ProviderError) as exc:
                await adapter.submit(self.request(case))
        finally:
            await _control(fake, "/_control/reset")
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 5.0 and exc.value.resend_safe

    async def test_transient_500_on_poll_is_retried(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "gpt-image-2", {"prompt": "flaky [poll500]"}, options={"not_found_grace_polls": 0})
        monkeypatch.setenv(self.api_key_env, KEY)
        await _control(fake, "/_control/config", {"init_polls": 0})
        try:
            adapter = self.make(fake, case, http, monkeypatch)
            first = await adapter.submit(self.request(case))
            assert isinstance(first, Pending)
            with pytest.raises(ProviderError) as exc:
                await adapter.poll(first.handle)
            assert exc.value.retryable and exc.value.code == ErrorCode.provider_unavailable
            result = first
            while isinstance(result, Pending):
                result = await adapter.poll(result.handle)
        finally:
            await _control(fake, "/_control/config", {"init_polls": 1})
        assert isinstance(result, Done)

    async def test_result_files_expire(self, fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/config", {"file_ttl": 0.3})
        try:
            case = self.success[0]
            result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
            assert isinstance(result, Done)
            await asyncio.sleep(0.5)
            with pytest.raises(StorageError) as exc:
                await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                                   max_bytes=2**22, max_image_pixels=64_000_000)
            assert exc.value.code == ErrorCode.provider_error and "expired" in str(exc.value)
        finally:
            await _control(fake, "/_control/config", {"file_ttl": 7200.0})

    async def test_missing_key_is_refused_before_sending(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        before = (await fake.stats())["creates"]
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, self.success[0], http, monkeypatch, key="").submit(self.request(self.success[0]))
        assert exc.value.code == ErrorCode.provider_auth and (await fake.stats())["creates"] == before

    async def test_bad_api_option_is_the_operators(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for options in ({"api": "stream"}, {"api": "draw"}):  # draw: no route for a model it does not know
            case = Case("image", "some-new-model", {"prompt": "p"}, options=options)
            with pytest.raises(ProviderError) as exc:
                await self.make(fake, case, http, monkeypatch).submit(self.request(case))
            assert exc.value.fault is Fault.operator and exc.value.code == ErrorCode.provider_unavailable

    async def test_unsigned_callback_only_asks_for_a_poll(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        async with _receiver() as (hook_url, received):
            case = self.success[0]
            adapter = self.make(fake, case, http, monkeypatch)
            first = await adapter.submit(_with_callback(self.request(case), hook_url))
            assert isinstance(first, Pending)
            sent = (await _control(fake, "/_control/requests"))[-1]
            assert sent["webHook"] == hook_url and sent["shutProgress"] is True
            headers, body = await asyncio.wait_for(received.get(), timeout=10)
        answer = json.loads(body)
        assert answer["status"] == "succeeded" and answer["results"]
        verdict = await adapter.verify_callback(headers, body, first.handle, None)
        assert isinstance(verdict, PollNow)  # never a Done from an unsigned body
        # the same claim with a forged result URL is still only a reason to poll
        forged = json.dumps({**answer, "results": [{"url": "http://127.0.0.1:1/evil.png"}]}).encode()
        assert isinstance(await adapter.verify_callback({}, forged, first.handle, None), PollNow)
        running = json.dumps({"id": first.handle["id"], "status": "running", "progress": 40}).encode()
        assert await adapter.verify_callback({}, running, first.handle, None) is None
        for bad in (json.dumps({**answer, "id": "someone-else"}).encode(), b"not json"):
            with pytest.raises(ProviderError):
                await adapter.verify_callback({}, bad, first.handle, None)
        # the poll it prompts gives the verified result
        result = first
        while isinstance(result, Pending):
            result = await adapter.poll(result.handle)
        assert isinstance(result, Done) and "evil" not in (result.outputs[0].url or "")

    async def test_streaming_reply_is_what_the_fake_sends_without_webhook(self, fake: Fake) -> None:
        """The form a worker must never wait on: the fake holds the connection and streams
        `data:` lines (only the final one with shutProgress)."""
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
            for shut, at_least in ((False, 2), (True, 1)):
                resp = await c.post(f"{fake.url}/v1/draw/nano-banana",
                                    json={"model": "nano-banana-fast", "prompt": "streamed", "shutProgress": shut})
                lines = [json.loads(x[6:]) for x in resp.text.splitlines() if x.startswith("data: ")]
                assert len(lines) >= at_least and lines[-1]["status"] == "succeeded", lines
                assert not shut or len(lines) == 1


# -- mapping, without HTTP ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "modality", "inp", "expected"),
    [
        ("nano-banana-pro", "image", {"size": "1920x1080"}, {"aspectRatio": "16:9"}),
        ("nano-banana-2", "image", {"size": "512x2048"}, {"aspectRatio": "1:4"}),
        ("gpt-image-2-vip", "image", {"size": "3840x2160"}, {"aspectRatio": "3840x2160"}),
        ("gpt-image-1.5", "image", {"aspect_ratio": "3:2"}, {"aspectRatio": "3:2"}),  # any size list: passed on
        ("flux-kontext-max", "image", {"aspect_ratio": "9:21", "provider_params": {"promptUpsampling": True}},
         {"aspectRatio": "9:21", "promptUpsampling": True}),
        ("sora-2", "video", {"resolution": "1024p", "image": IMAGE_URL, "provider_params": {"remixTargetId": "r1"}},
         {"size": "large", "url": IMAGE_URL, "duration": 10, "remixTargetId": "r1"}),
        ("veo3.1-pro", "video", {"aspect_ratio": "9:16"}, {"aspectRatio": "9:16"}),
        ("minimax-h3", "video", {"duration_seconds": 6, "resolution": "768p"}, {"duration": 6, "resolution": "768p"}),
    ],
)
def test_build_body_maps_normalized_input(model: str, modality: str, inp: dict[str, Any], expected: dict[str, Any]) -> None:
    body = build_body(model, modality, {"prompt": "p", **inp})
    assert body["prompt"] == "p" and body["model"] == model
    assert {k: body.get(k) for k in expected} == expected, body


def test_route_for_by_family_and_option() -> None:
    assert route_for("nano-banana-pro", {}) == "draw"
    assert route_for("nano-banana-pro", {"api": "generate"}) == "generate"
    assert route_for("minimax-h3", {}) == "generate"
    assert route_for("nano-banana-9", {"draw_path": "/v1/draw/nano-banana"}) == "draw"
    assert "images" in build_body("nano-banana-2", "image", {"prompt": "p", "input_images": [IMAGE_URL]}, api="generate")


# -- helpers -----------------------------------------------------------------------------
def _with_callback(request: ProviderRequest, url: str) -> ProviderRequest:
    return ProviderRequest(job_id=request.job_id, tenant=request.tenant, modality=request.modality,
                           provider_model=request.provider_model, input=request.input, callback_url=url)


class _receiver:
    """A loopback webhook receiver that records (headers, raw body)."""

    def __init__(self) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def hook(request: Request) -> Response:
            item = (dict(request.headers), await request.body())
            loop.call_soon_threadsafe(self.received.put_nowait, item)
            return Response(status_code=204)

        self._serve = serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))

    async def __aenter__(self) -> tuple[str, asyncio.Queue[tuple[dict[str, str], bytes]]]:
        url = await asyncio.to_thread(self._serve.__enter__)
        return f"{url}/hook", self.received

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._serve.__exit__, None, None, None)
