"""The Kling adapter against its fake over real HTTP (Kling's task format as CometAPI and
DMXAPI relay it): the shared contract, plus what is Kling's own: `code: 0` as the only
success (a non-zero code on HTTP 200 is an error), Kling's error codes, the two task
kinds and their poll paths, bare base64 images, durations from the reply, the relay's
envelope, and a cancel that is local."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from adapters.kling import build_body
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.types import Done, Failed, Pending
from storage import store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.kling import API_KEY, create_app
from tests.fakes.server import serve


def png(w: int, h: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (30, 90, 200)).save(out, fmt)
    return out.getvalue()


def data_uri(w: int, h: int, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(png(w, h, fmt)).decode()


FRAME = data_uri(640, 360)
SMALL = data_uri(200, 200)  # under Kling's 300 px minimum: refused by Kling, not by us


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(create_app(api_key=API_KEY)) as url:
        yield Fake(url, API_KEY)


async def control(fake: Fake, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as c:
        resp = await (c.post(f"{fake.url}{path}", json=body) if body is not None else c.get(f"{fake.url}{path}"))
        assert resp.status_code == 200, resp.text
        return resp.json()


def video(model: str, prompt: str, code: ErrorCode | None = None, stage: str | None = None, **extra: Any) -> Case:
    return Case("video", model, {"prompt": prompt, **extra}, code=code, stage=stage)


class TestKling(AdapterContract):
    adapter = "kling"
    api_key_env = "GENROUTE_TEST_KLING_KEY"
    supports_cancel = False  # Kling has no cancel endpoint: cancel is local (see the test below)
    task_id_key = "task_id"
    success = [
        Case("video", "kling-v2-1-master", {"prompt": "a paper boat on a river", "duration_seconds": 5, "aspect_ratio": "16:9"},
             content_type="video/mp4", duration=5),
        Case("video", "kling-v1-6", {"prompt": "a fox in snow", "duration_seconds": 10, "aspect_ratio": "9:16",
                                     "resolution": "1080p", "negative_prompt": "blurry",
                                     "provider_params": {"cfg_scale": 0.7}}, content_type="video/mp4"),
        Case("video", "kling-v2-5-turbo", {"prompt": "the photo comes alive", "image": FRAME}, content_type="video/mp4"),
        Case("video", "kling-v1-6", {"prompt": "from this frame to that one", "image": FRAME,
                                     "provider_params": {"image_tail": FRAME}}, content_type="video/mp4"),
    ]
    failures = [
        video("kling-v2-1-master", "something [moderated]", code=ErrorCode.moderated, stage="input"),
        video("kling-v2-1-master", "something [moderated-output]", code=ErrorCode.moderated, stage="output"),
        video("kling-v2-1-master", "boom [fail]", code=ErrorCode.provider_error),
        # the resource pack is empty: Kling's 429 1102 is the account's, never a rate limit
        video("kling-v2-1-master", "broke [quota]", code=ErrorCode.provider_error),
        # a relay that sends Kling's codes with HTTP 200: still an error, still moderation
        video("kling-v2-1-master", "odd relay [http200] [moderated]", code=ErrorCode.moderated, stage="input"),
        # Kling's own refusals (1201) are the user's: cfg_scale on kling-v2.x, an image under 300 px
        video("kling-v2-1-master", "cfg on v2", provider_params={"cfg_scale": 0.5}, code=ErrorCode.invalid_input),
        video("kling-v2-1", "tiny frame", image=SMALL, code=ErrorCode.invalid_input),
        # CometAPI's 500 `invalid_request`: a malformed request, not an outage
        video("kling-v2-1-master", "bad body [relay500]", code=ErrorCode.invalid_input),
    ]
    unsupported = [
        video("kling-v2-1-master", "four seconds", duration_seconds=4),
        video("kling-v2-1-master", "5.5 seconds", duration_seconds=5.5),
        video("kling-v2-1-master", "seeded", seed=7),
        video("kling-v2-1-master", "fps", fps=30),
        video("kling-v2-1-master", "4k", resolution="4k"),
        video("kling-v2-1-master", "4:3", aspect_ratio="4:3"),
        video("kling-v2-1", "the image decides the shape", image=FRAME, aspect_ratio="16:9"),
        video("kling-v2-1", "webp frame", image=data_uri(640, 360, "WEBP")),
        video("kling-v2-1-master", "x" * 2501),
        video("kling-v2-1-master", "long negative", negative_prompt="n" * 2501),
        video("kling-v2-1-master", "cfg out of range", provider_params={"cfg_scale": 2}),
        video("kling-v2-1-master", "a tail without a head", provider_params={"image_tail": FRAME}),
        # mode and duration change the price: set by resolution and duration_seconds only
        video("kling-v2-1-master", "mode by hand", provider_params={"mode": "pro"}),
        video("kling-v2-1-master", "our callback", provider_params={"callback_url": "https://evil.example/x"}),
    ]

    # -- Kling's own ------------------------------------------------------------------------
    async def test_wire_bodies_paths_and_durations(self, fake: Fake, http: httpx.AsyncClient, bucket: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[1]
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending) and first.message == "submitted" and first.handle["kind"] == "text2video"
        sent = (await fake.stats())["last"]
        assert sent == {"kind": "text2video", "body": {
            "model_name": "kling-v1-6", "prompt": "a fox in snow", "negative_prompt": "blurry", "duration": "10",
            "mode": "pro", "aspect_ratio": "9:16", "cfg_scale": 0.7}}
        result: Any = first
        statuses = []
        while isinstance(result, Pending):
            statuses.append(result.message)
            result = await adapter.poll(result.handle)
        assert isinstance(result, Done), result
        assert statuses[0] == "submitted" and "processing" in statuses, statuses
        assert result.usage["video_seconds"] == 10 and result.usage["videos"] == 1  # "10.041" -> the nominal 10 s
        stored = await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                                    max_bytes=2**24, max_image_pixels=64_000_000)
        assert stored.content_type == "video/mp4" and stored.duration_seconds == pytest.approx(10.041, abs=0.01)
        assert (await fake.stats())["cdn_saw_key"] == 0, "the relay key went to the CDN"

    async def test_image_to_video_sends_bare_base64_and_polls_its_own_path(self, fake: Fake, http: httpx.AsyncClient,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[2]
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending) and first.handle["kind"] == "image2video"
        body = (await fake.stats())["last"]["body"]
        assert body["image"] == FRAME.split(",", 1)[1] and "aspect_ratio" not in body
        # the task lives under image2video: the text2video path does not know it
        wrong = dict(first.handle, kind="text2video")
        gone = await adapter.poll(wrong)
        assert isinstance(gone, Failed) and gone.code == ErrorCode.provider_error and "not known" in gone.message

    async def test_image_url_is_passed_for_kling_to_fetch(self, fake: Fake, http: httpx.AsyncClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        frame = png(480, 480, "JPEG")

        async def get(request: Request) -> Response:
            return Response(frame, media_type="image/jpeg")

        with serve(Starlette(routes=[Route("/frame.jpg", get)])) as files:
            case = video("kling-v2-1", "from a URL", image=f"{files}/frame.jpg")
            result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done), result
        assert (await fake.stats())["last"]["body"]["image"] == f"{files}/frame.jpg"

    async def test_rate_and_concurrency_limits_wait_without_retry_after(self, fake: Fake, http: httpx.AsyncClient,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        case = video("kling-v2-1-master", "busy [http200] [429]")
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.kind is ProviderErrorKind.rate_limited and exc.value.retry_after == 5 and exc.value.resend_safe
        await control(fake, "/_control/config", {"max_concurrency": 0})
        try:
            case = video("kling-v2-1-master", "too many at once")
            with pytest.raises(ProviderError) as exc:
                await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        finally:
            await control(fake, "/_control/config", {"max_concurrency": None})
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 10, exc.value
        assert exc.value.detail["code"] == 1303

    async def test_empty_resource_pack_is_quota_not_rate_limited(self, fake: Fake, http: httpx.AsyncClient,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        case = video("kling-v2-1-master", "broke [quota]")
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.kind is ProviderErrorKind.quota and not exc.value.retryable and exc.value.fault is Fault.operator

    async def test_unknown_model_is_the_operators_mistake(self, fake: Fake, http: httpx.AsyncClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        case = video("kling-v9-imaginary", "which model")
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.fault is Fault.operator and exc.value.code == ErrorCode.provider_unavailable, exc.value
        assert "misconfigured" in exc.value.message

    async def test_unknown_task_fails_cleanly(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch)
        result = await adapter.poll({"task_id": "000000000000000001", "kind": "text2video", "model": "kling-v2-1-master"})
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error and "000000000000000001" in result.message

    async def test_cancel_is_local_and_sends_nothing(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = video("kling-v2-1-master", "a long one [slow]")
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        before = await fake.stats()
        await adapter.cancel(first.handle)
        after = await fake.stats()
        assert (after["creates"], after["polls"]) == (before["creates"], before["polls"])

    async def test_an_answer_that_is_not_klings_is_not_success(self, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """A wrong path can answer a relay's HTML page with 200: that is no task id, and the
        create may have reached something that bills, so it is not resent."""
        async def page(request: Request) -> Response:
            return HTMLResponse("<html><body>CometAPI console</body></html>")

        with serve(Starlette(routes=[Route("/{path:path}", page, methods=["GET", "POST"])])) as url:
            adapter = self.make(Fake(url, API_KEY), self.success[0], http, monkeypatch)
            with pytest.raises(ProviderError) as exc:
                await adapter.submit(self.request(self.success[0]))
        assert exc.value.code == ErrorCode.provider_error and not exc.value.resend_safe and "base_url" in exc.value.message

    async def test_path_prefix_option_for_a_host_serving_klings_paths_at_its_root(self, http: httpx.AsyncClient,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        with serve(create_app(api_key=API_KEY, path_prefix="")) as url:
            case = Case("video", "kling-v2-1-master", {"prompt": "at the root"}, options={"path_prefix": ""})
            result, _ = await drive(self.make(Fake(url, API_KEY), case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done), result
        assert result.usage["video_seconds"] == 5  # Kling's default length when none is asked


def test_build_body_defaults_leave_klings_own() -> None:
    """Only what the request set is sent: Kling's defaults (5 s, std, 16:9) stay Kling's."""
    kind, body = build_body("kling-v2-1-master", {"prompt": "p"})
    assert (kind, body) == ("text2video", {"model_name": "kling-v2-1-master", "prompt": "p"})
