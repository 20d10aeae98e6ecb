"""Google Veo (Gemini API) adapter against its fake: the shared contract plus Veo's own
points (cross-origin download redirect without leaking the key, RetryInfo, fps, image
inline bytes, a wrong key answered as 400 API_KEY_INVALID)."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters.google_veo import GoogleVeoAdapter, build_parameters
from core.errors import ErrorCode, ProviderError
from core.types import Done, Failed, Pending
from storage import store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.google_veo import API_KEY, VeoState, create_app, create_cdn_app
from tests.fakes.server import serve

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "veo-3.1-fast-generate-preview"


def video(prompt: str, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "duration_seconds": 4, "aspect_ratio": "16:9", "resolution": "720p", **extra}


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def veo_state() -> VeoState:
    return VeoState()


@pytest.fixture(scope="module")
def fake(veo_state: VeoState) -> Iterator[Fake]:
    with serve(create_cdn_app(veo_state)) as cdn, serve(create_app(state=veo_state, cdn_url=cdn)) as url:
        yield Fake(url=url, api_key=API_KEY, extra={"cdn": cdn})


class TestGoogleVeo(AdapterContract):
    adapter = "google_veo"
    api_key_env = "GENROUTE_TEST_VEO_KEY"
    success = [
        Case("video", MODEL, video("a red fox in snow"), content_type="video/mp4"),
        Case("video", "veo-3.1-generate-preview",
             video("a lighthouse at dusk", duration_seconds=8, resolution="1080p", aspect_ratio="9:16", fps=24,
                   negative_prompt="rain"), content_type="video/mp4"),
        Case("video", "veo-2.0-generate-001", video("a paper boat", duration_seconds=5), content_type="video/mp4"),
    ]
    failures = [
        Case("video", MODEL, video("a crowd [moderated]"), code=ErrorCode.moderated, stage="input"),
        Case("video", MODEL, video("a crowd [moderated-output]"), code=ErrorCode.moderated, stage="output"),
        Case("video", MODEL, video("a crowd [blocked400]"), code=ErrorCode.moderated, stage="input"),
        Case("video", MODEL, video("a crowd [fail]"), code=ErrorCode.provider_error),
        # a model the provider does not have: the deployment's mistake (the operator's), not the user's
        Case("video", "veo-9-unknown", video("x"), code=ErrorCode.provider_unavailable),
        # pass-through params the fake (like Veo) refuses: the provider's message, invalid_input
        Case("video", MODEL, video("x", provider_params={"aspectRatio": "1:1"}), code=ErrorCode.invalid_input),
    ]
    slow = None  # Veo reports no progress, so there is no progress/cancel test
    supports_cancel = False  # the Gemini API has no cancel for Veo operations
    unsupported = [
        Case("video", MODEL, video("x", fps=30)),
        Case("video", MODEL, video("x", duration_seconds=5)),
        Case("video", MODEL, video("x", duration_seconds=4.5)),
        Case("video", MODEL, video("x", aspect_ratio="1:1")),
        Case("video", MODEL, video("x", resolution="480p")),
        Case("video", "veo-3.1-generate-preview", video("x", resolution="1080p", duration_seconds=6)),
        Case("video", "veo-3.0-generate-001", video("x", resolution="1080p", aspect_ratio="9:16", duration_seconds=8)),
        Case("video", "veo-2.0-generate-001", video("x", duration_seconds=4)),
        Case("video", "veo-2.0-generate-001", video("x", duration_seconds=8, resolution="1080p")),
        Case("video", MODEL, video("x", seed=42)),
    ]

    # -- Veo specifics ----------------------------------------------------------------
    async def test_redirect_is_followed_and_key_stays_home(self, fake: Fake, http: httpx.AsyncClient, bucket: Any,
                                                           monkeypatch: pytest.MonkeyPatch, veo_state: VeoState) -> None:
        case = Case("video", MODEL, video("a kite", duration_seconds=6))
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done)
        ref = result.outputs[0]
        assert ref.headers == {"x-goog-api-key": API_KEY} and ref.url and ref.url.startswith(fake.url)
        before = dict(veo_state.stats)
        stored = await store_output(bucket, http, ref, key_base=f"t/{uuid.uuid4().hex}", index=0,
                                    max_bytes=2**20, max_image_pixels=64_000_000)
        assert stored.content_type == "video/mp4" and stored.duration_seconds == 6.0
        assert veo_state.stats["downloads"] == before["downloads"] + 1  # went through the key-checked URL
        assert veo_state.stats["cdn_gets"] == before["cdn_gets"] + 1  # and was redirected to the other port
        assert veo_state.stats["cdn_saw_key"] == 0, "the API key leaked to the storage host"
        assert result.usage == {"videos": 1, "video_seconds": 6}

    async def test_download_needs_the_key(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", MODEL, video("a kite"))
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done) and result.outputs[0].url
        assert (await http.get(result.outputs[0].url)).status_code in (401, 403)

    async def test_retry_info_becomes_retry_after(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", MODEL, video("busy [429]"))
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 30 and exc.value.resend_safe

    async def test_fps_other_than_24_refused_before_sending(self, fake: Fake, http: httpx.AsyncClient,
                                                            monkeypatch: pytest.MonkeyPatch, veo_state: VeoState) -> None:
        before = veo_state.stats["creates"]
        case = Case("video", "veo-unknown-model", video("x", fps=25))  # even for a model we do not know
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.code == ErrorCode.invalid_input and exc.value.detail["allowed"] == [24]
        assert veo_state.stats["creates"] == before
        assert "fps" not in build_parameters(MODEL, video("x", fps=24))  # 24 is Veo's own: accepted, not sent

    async def test_image_to_video_sends_inline_bytes(self, fake: Fake, http: httpx.AsyncClient,
                                                     monkeypatch: pytest.MonkeyPatch, veo_state: VeoState) -> None:
        png = png_bytes()
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
        case = Case("video", MODEL, video("the fox runs", image=data_uri))
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done)
        image = veo_state.bodies[-1]["instances"][0]["image"]
        assert image["mimeType"] == "image/png" and base64.b64decode(image["bytesBase64Encoded"]) == png

    async def test_image_url_is_downloaded_and_sniffed(self, fake: Fake, http: httpx.AsyncClient,
                                                       monkeypatch: pytest.MonkeyPatch, veo_state: VeoState) -> None:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (0, 90, 200)).save(buf, "JPEG")
        jpeg = buf.getvalue()

        async def image_host(scope: Any, receive: Any, send: Any) -> None:  # a bare ASGI image server
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
            await send({"type": "http.response.body", "body": jpeg})

        with serve(image_host) as host:
            case = Case("video", MODEL, video("the sea", image=f"{host}/frame.jpg"))
            first = await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert isinstance(first, Pending)
        image = veo_state.bodies[-1]["instances"][0]["image"]
        assert image["mimeType"] == "image/jpeg" and base64.b64decode(image["bytesBase64Encoded"]) == jpeg

    async def test_wrong_key_400_api_key_invalid_is_auth(self, fake: Fake, http: httpx.AsyncClient) -> None:
        r = await http.post(f"{fake.url}/v1beta/models/{MODEL}:predictLongRunning",
                            headers={"x-goog-api-key": "nope"}, json={"instances": [{"prompt": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        missing = await http.post(f"{fake.url}/v1beta/models/{MODEL}:predictLongRunning?", json={"instances": [{"prompt": "x"}]})
        assert missing.status_code == 403
        by_query = await http.post(f"{fake.url}/v1beta/models/{MODEL}:predictLongRunning",
                                   params={"key": API_KEY}, json={"instances": [{"prompt": "x"}]})
        assert by_query.status_code == 200 and by_query.json()["name"].startswith(f"models/{MODEL}/operations/")

    async def test_pending_has_message_and_handle_is_portable(self, fake: Fake, http: httpx.AsyncClient,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", MODEL, video("slow clouds [slow]"))
        first = await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert isinstance(first, Pending) and first.progress is None and first.message
        assert set(first.handle) == {"operation", "model", "duration_seconds", "polls"}  # JSON-able, no key
        assert API_KEY not in str(first.handle)
        # a different adapter instance (another worker process) carries on from the handle alone
        other = self.make(fake, case, http, monkeypatch)
        result, seen = await drive_from(other, first)
        assert isinstance(result, Done) and len(seen) >= 10
        assert isinstance(other, GoogleVeoAdapter) and other.poll_interval(10) == 0.02

    async def test_poll500_is_retried_then_succeeds(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", MODEL, video("a bridge [poll500]"))
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        with pytest.raises(ProviderError) as exc:
            await adapter.poll(first.handle)
        assert exc.value.retryable and exc.value.code == ErrorCode.provider_unavailable
        result, _ = await drive_from(adapter, first)
        assert isinstance(result, Done)

    async def test_expired_file_is_provider_error(self, fake: Fake, http: httpx.AsyncClient, bucket: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        from storage import StorageError

        case = Case("video", MODEL, video("old [expired]"))
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done)
        with pytest.raises(StorageError) as exc:
            await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                               max_bytes=2**20, max_image_pixels=64_000_000)
        assert exc.value.code == ErrorCode.provider_error

    async def test_operation_error_codes(self) -> None:
        from adapters.google_veo import _finished

        handle = {"operation": "models/m/operations/x"}
        for code, expected in ((3, ErrorCode.invalid_input), (7, ErrorCode.provider_auth), (16, ErrorCode.provider_auth),
                               (8, ErrorCode.rate_limited), (13, ErrorCode.provider_error),
                               (14, ErrorCode.provider_unavailable), (99, ErrorCode.provider_error)):
            r = _finished({"done": True, "error": {"code": code, "message": "m"}}, handle, {})
            assert isinstance(r, Failed) and r.code == expected, (code, r)

    async def test_unknown_operation_is_provider_error(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch)
        result = await adapter.poll({"operation": f"models/{MODEL}/operations/gone", "model": MODEL, "polls": 3})
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error


async def drive_from(adapter: Any, first: Pending) -> tuple[Any, list[Pending]]:
    """Poll an already-submitted handle to the end, retrying transient poll errors."""
    result: Any = first
    seen: list[Pending] = []
    while isinstance(result, Pending):
        seen.append(result)
        assert len(seen) < 200
        try:
            result = await adapter.poll(result.handle)
        except ProviderError as exc:
            if not exc.retryable:
                raise
    return result, seen
