"""The BFL (FLUX) adapter against its fake over real HTTP: the shared contract, plus what
is BFL's own: polling_url on another host, Task not found, 402, the concurrent-task limit,
result expiry, and signed webhooks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.bfl import build_body
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, Pending, ProviderRequest
from storage import StorageError, store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.bfl import create_app
from tests.fakes.server import free_port, serve

KEY = "bfl-test-key"


def _data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DATA_URI = _data_uri()
IMAGE_URL = "https://example.com/reference.png"


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    """One app state on two ports: submit on one, polling_url (and delivery) on the other,
    as BFL's global host hands out another cluster's URL."""
    poll_port = free_port()
    app = create_app(api_key=KEY, polling_base=f"http://127.0.0.1:{poll_port}")
    with serve(app) as url, serve(app, port=poll_port) as poll_url:
        yield Fake(url, KEY, extra={"polling_url": poll_url})


async def _control(fake: Fake, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as c:
        if body is None and path.endswith(("reset",)):
            return (await c.post(f"{fake.url}{path}")).json()
        if body is None:
            return (await c.get(f"{fake.url}{path}")).json()
        resp = await c.post(f"{fake.url}{path}", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()


def _image(model: str, prompt: str, **extra: Any) -> Case:
    return Case("image", model, {"prompt": prompt, **extra})


class TestBFL(AdapterContract):
    adapter = "bfl"
    api_key_env = "GENROUTE_TEST_BFL_KEY"
    supports_cancel = False  # BFL has no cancel endpoint
    task_id_key = "id"
    success = [
        Case("image", "flux-pro-1.1", {"prompt": "a lighthouse at dusk", "size": "1024x768", "output_format": "jpeg", "seed": 7},
             content_type="image/jpeg", size=(1024, 768)),
        # an aspect ratio on a width/height model: ~1 MP on the 32 px grid
        Case("image", "flux-pro-1.1", {"prompt": "a red fox", "aspect_ratio": "16:9"}, content_type="image/png", size=(1376, 768)),
        Case("image", "flux-dev", {"prompt": "a teapot", "size": "512x512", "provider_params": {"steps": 28, "guidance": 3}},
             content_type="image/png", size=(512, 512)),
        Case("image", "flux-pro-1.1-ultra", {"prompt": "a canyon", "aspect_ratio": "21:9", "output_format": "jpeg",
                                             "provider_params": {"raw": True, "safety_tolerance": 6}}, content_type="image/jpeg"),
        # a size on an aspect-ratio model: mapped to 1:1
        Case("image", "flux-kontext-pro", {"prompt": "make it snow", "size": "1024x1024", "input_images": [DATA_URI]},
             content_type="image/png", size=(1024, 1024)),
        Case("image", "flux-2-pro", {"prompt": "the cat in the hat", "size": "1024x576", "input_images": [IMAGE_URL, DATA_URI]},
             content_type="image/png", size=(1024, 576)),
    ]
    failures = [
        Case("image", "flux-pro-1.1", {"prompt": "something [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("image", "flux-kontext-pro", {"prompt": "edit [moderated-output]", "input_images": [IMAGE_URL]},
             code=ErrorCode.moderated, stage="output"),
        Case("image", "flux-pro-1.1", {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        # provider_params are passed through: the provider's 422 becomes invalid_input
        Case("image", "flux-pro-1.1", {"prompt": "bad width", "provider_params": {"width": 1000}}, code=ErrorCode.invalid_input),
    ]
    slow = Case("image", "flux-pro-1.1", {"prompt": "a slow one [slow]", "size": "512x512"})
    unsupported = [
        _image("flux-pro-1.1", "two please", n=2),
        _image("flux-pro-1.1", "webp", output_format="webp"),
        _image("flux-pro-1.1", "not a multiple of 32", size="1000x768"),
        _image("flux-pro-1.1", "too big", size="2048x2048"),
        _image("flux-pro-1.1", "too thin", aspect_ratio="9:1"),
        _image("flux-pro-1.1", "negative", negative_prompt="blurry"),
        _image("flux-pro-1.1", "image prompt by URL", input_images=[IMAGE_URL]),
        _image("flux-pro-1.1", "two image prompts", input_images=[DATA_URI, DATA_URI]),
        _image("flux-pro-1.1", "raw is ultra-only", provider_params={"raw": True}),
        _image("flux-pro-1.1", "steps are dev-only", provider_params={"steps": 20}),
        _image("flux-pro-1.1", "tolerance", provider_params={"safety_tolerance": 7}),
        _image("flux-pro-1.1", "webhook is ours", provider_params={"webhook_url": "https://evil.example/x"}),
        _image("flux-pro-1.1-ultra", "far from any ratio", size="1000x100"),
        _image("flux-pro-1.1-ultra", "too wide", aspect_ratio="3:1"),
        _image("flux-kontext-pro", "five refs", input_images=[IMAGE_URL] * 5),
        _image("flux-2-pro", "nine refs", input_images=[IMAGE_URL] * 9),
        _image("flux-2-pro", "tolerance is 0..5", provider_params={"safety_tolerance": 6}),
        _image("flux-2-pro", "not a multiple of 16", size="1000x1000"),
        _image("flux-2-pro", "over 4 MP", size="4096x2048"),
    ]

    # -- BFL's own ------------------------------------------------------------------------
    async def test_polls_the_returned_polling_url_on_another_port(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        poll_netloc = httpx.URL(fake.extra["polling_url"]).netloc
        assert httpx.URL(first.handle["polling_url"]).netloc == poll_netloc != httpx.URL(fake.url).netloc
        # the submit host does not hold the task (another "cluster"): a hand-built URL fails
        wrong = dict(first.handle, polling_url=f"{fake.url}/v1/get_result?id={first.handle['id']}")
        assert isinstance(await adapter.poll(wrong), Failed)
        before = (await fake.stats())["polls_by_host"].get(poll_netloc.decode(), 0)
        result = first
        while isinstance(result, Pending):
            result = await adapter.poll(result.handle)
        assert isinstance(result, Done), result
        assert (await fake.stats())["polls_by_host"][poll_netloc.decode()] > before

    async def test_task_not_found_is_provider_error(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch)
        handle = {"id": "no-such-task", "polling_url": f"{fake.extra['polling_url']}/v1/get_result?id=no-such-task",
                  "model": "flux-pro-1.1", "output_format": "jpeg", "usage": {}}
        result = await adapter.poll(handle)
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error, result
        assert "no-such-task" in result.message and "expired" in result.message

    async def test_result_expires_after_ttl(self, fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/config", {"result_ttl": 0.3})
        try:
            case = self.success[0]
            adapter = self.make(fake, case, http, monkeypatch)
            result, _ = await drive(adapter, self.request(case))
            assert isinstance(result, Done)
            await asyncio.sleep(0.4)
            with pytest.raises(StorageError) as exc:
                await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                                   max_bytes=2**22, max_image_pixels=64_000_000)
            assert exc.value.code == ErrorCode.provider_error
            late = await adapter.poll(result.handle)  # the task itself is gone too
            assert isinstance(late, Failed) and late.code == ErrorCode.provider_error
        finally:
            await _control(fake, "/_control/config", {"result_ttl": 600.0})

    async def test_out_of_credits_is_quota(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/config", {"out_of_credits": True})
        try:
            adapter = self.make(fake, self.success[0], http, monkeypatch)
            with pytest.raises(ProviderError) as exc:
                await adapter.submit(self.request(self.success[0]))
        finally:
            await _control(fake, "/_control/config", {"out_of_credits": False})
        assert exc.value.kind == ProviderErrorKind.quota and exc.value.code == ErrorCode.provider_error
        assert not exc.value.retryable

    async def test_concurrent_task_limit_is_rate_limited(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/reset")
        try:
            adapter = self.make(fake, self.slow, http, monkeypatch)
            firsts = await asyncio.gather(*(adapter.submit(self.request(self.slow)) for _ in range(24)))
            assert all(isinstance(f, Pending) for f in firsts)
            with pytest.raises(ProviderError) as exc:
                await adapter.submit(self.request(self.slow))
            assert exc.value.code == ErrorCode.rate_limited and exc.value.resend_safe
            assert exc.value.retry_after is not None and exc.value.retry_after > 0
            stats = await fake.stats()
            assert stats["inflight"] == stats["peak_inflight"] == 24
        finally:
            await _control(fake, "/_control/reset")

    async def test_429_without_retry_after_waits_about_5_seconds(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "flux-pro-1.1", {"prompt": "busy [429]"})
        await _control(fake, "/_control/config", {"retry_after_header": False})
        try:
            with pytest.raises(ProviderError) as exc:
                await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        finally:
            await _control(fake, "/_control/config", {"retry_after_header": True})
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 5.0

    async def test_transient_500_on_poll_is_retried(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("image", "flux-pro-1.1", {"prompt": "flaky [poll500]"})
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        with pytest.raises(ProviderError) as exc:
            await adapter.poll(first.handle)
        assert exc.value.retryable and exc.value.code == ErrorCode.provider_unavailable
        result = first
        while isinstance(result, Pending):
            result = await adapter.poll(result.handle)
        assert isinstance(result, Done)

    async def test_error_keeps_the_providers_words(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.failures[2]  # [fail]
        result, seen = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error
        assert "internal error while sampling" in result.message and seen

    async def test_usage_carries_cost(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done)
        assert result.usage["cost_credits"] == 4.0 and result.usage["output_mp"] == 0.79

    async def test_wire_body(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """What reaches the provider: data: prefixes stripped, sizes mapped, x-key sent."""
        case = self.success[5]  # flux-2-pro with a URL and a data URI
        await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        sent = (await _control(fake, "/_control/requests"))[-1]
        assert sent["model"] == "flux-2-pro"
        body = sent["body"]
        assert body["input_image"] == IMAGE_URL and not body["input_image_2"].startswith("data:")
        assert (body["width"], body["height"], body["output_format"]) == (1024, 576, "png")

    async def test_webhook_is_verified_and_finishes_without_polling(self,
            fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        async with _receiver() as (hook_url, received):
            case = self.success[0]
            adapter = self.make(fake, case, http, monkeypatch)
            secret = "whsec-" + uuid.uuid4().hex
            request = _with_callback(self.request(case), hook_url, secret)
            first = await adapter.submit(request)
            assert isinstance(first, Pending)
            polls_before = (await fake.stats())["polls"]
            headers, body = await _wait(received)
        assert "x-bfl-signature" in {k.lower() for k in headers}
        result = await adapter.verify_callback(headers, body, first.handle, secret)
        assert isinstance(result, Done), result
        assert result.usage["cost_credits"] == 4.0
        stored = await store_output(bucket, http, result.outputs[0], key_base=f"t/{uuid.uuid4().hex}", index=0,
                                    max_bytes=2**22, max_image_pixels=64_000_000)
        assert (stored.content_type, stored.width, stored.height) == ("image/jpeg", 1024, 768)
        assert (await fake.stats())["polls"] == polls_before  # finished by the callback alone
        sent = (await _control(fake, "/_control/requests"))[-1]["body"]
        assert sent["webhook_url"] == hook_url and sent["webhook_secret"] == secret

    async def test_forged_or_unsigned_webhooks_are_refused(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        async with _receiver() as (hook_url, received):
            case = Case("image", "flux-pro-1.1", {"prompt": "flagged [moderated-output]"})
            adapter = self.make(fake, case, http, monkeypatch)
            secret = "s-" + uuid.uuid4().hex
            first = await adapter.submit(_with_callback(self.request(case), hook_url, secret))
            assert isinstance(first, Pending)
            headers, body = await _wait(received)
        handle = first.handle
        # the genuine one: output moderation, with its stage
        genuine = await adapter.verify_callback(headers, body, handle, secret)
        assert isinstance(genuine, Failed) and genuine.code == ErrorCode.moderated
        assert genuine.detail["stage"] == "output" and genuine.detail["reasons"]
        unsigned = {k: v for k, v in headers.items() if k.lower() != "x-bfl-signature"}
        tampered = body.replace(b"Content Moderated", b"Ready")
        forged = {**unsigned, "X-BFL-Signature": "sha256=" + "0" * 64}
        odd = {**unsigned, "X-BFL-Signature": "sha256=\u00e9t\u00e9"}  # non-ASCII must not crash the check
        for h, b, s in ((unsigned, body, secret), (headers, tampered, secret), (forged, body, secret), (odd, body, secret),
                        (headers, body, "another-secret"), (headers, body, None)):
            with pytest.raises(ProviderError) as exc:
                await adapter.verify_callback(h, b, handle, s)
            assert exc.value.kind == ProviderErrorKind.auth and exc.value.code == ErrorCode.provider_auth
        # correctly signed, but for another task: refused too
        other = dict(handle, id="someone-else")
        with pytest.raises(ProviderError) as exc:
            await adapter.verify_callback(headers, body, other, secret)
        assert exc.value.kind == ProviderErrorKind.auth
        # a signed intermediate event changes nothing
        pending = json.dumps({"id": handle["id"], "status": "Pending", "progress": 0.5}).encode()
        sig = "sha256=" + hmac.new(secret.encode(), pending, hashlib.sha256).hexdigest()
        assert await adapter.verify_callback({"X-BFL-Signature": sig}, pending, handle, secret) is None

    async def test_missing_key_is_refused_before_sending(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        before = (await fake.stats())["creates"]
        adapter = self.make(fake, self.success[0], http, monkeypatch, key="")
        with pytest.raises(ProviderError) as exc:
            await adapter.submit(self.request(self.success[0]))
        assert exc.value.code == ErrorCode.provider_auth
        assert (await fake.stats())["creates"] == before


# -- mapping, without HTTP ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "inp", "expected"),
    [
        ("flux-pro-1.1", {"size": "1440x256"}, {"width": 1440, "height": 256}),
        ("flux-pro-1.1", {"aspect_ratio": "21:9"}, {"width": 1440, "height": 608}),
        ("flux-pro-1.1", {"aspect_ratio": "1:1"}, {"width": 1024, "height": 1024}),
        ("flux-2-pro", {"aspect_ratio": "9:16"}, {"width": 768, "height": 1360}),
        ("flux-pro-1.1-ultra", {"size": "1920x1080"}, {"aspect_ratio": "16:9"}),
        ("flux-kontext-max", {"size": "800x1000"}, {"aspect_ratio": "4:5"}),
        ("flux-kontext-pro", {"aspect_ratio": "9:21"}, {"aspect_ratio": "9:21"}),
        ("flux-pro-1.1", {"input_images": [DATA_URI]}, {"image_prompt": DATA_URI.split(",", 1)[1]}),
        ("flux-2-flex", {"seed": 3, "output_format": "jpeg", "provider_params": {"steps": 50, "prompt_upsampling": True}},
         {"seed": 3, "output_format": "jpeg", "steps": 50, "prompt_upsampling": True}),
        # unknown model ids: permissive, the provider decides
        ("flux-9-hyper", {"size": "1000x1000", "input_images": [IMAGE_URL], "provider_params": {"raw": True}},
         {"width": 1000, "height": 1000, "input_image": IMAGE_URL, "raw": True}),
    ],
)
def test_build_body_maps_normalized_input(model: str, inp: dict[str, Any], expected: dict[str, Any]) -> None:
    body = build_body(model, {"prompt": "p", **inp})
    assert body["prompt"] == "p"
    assert {k: body[k] for k in expected} == expected, body
    assert body["output_format"] in ("png", "jpeg")


# -- helpers -----------------------------------------------------------------------------
def _with_callback(request: ProviderRequest, url: str, secret: str) -> ProviderRequest:
    return ProviderRequest(
        job_id=request.job_id, tenant=request.tenant, modality=request.modality,
        provider_model=request.provider_model, input=request.input,
        callback_url=url, callback_secret=secret,
    )


class _receiver:
    """A loopback webhook receiver that records (headers, raw body)."""

    def __init__(self) -> None:
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


async def _wait(received: asyncio.Queue[tuple[dict[str, str], bytes]]) -> tuple[dict[str, str], bytes]:
    return await asyncio.wait_for(received.get(), timeout=10)
