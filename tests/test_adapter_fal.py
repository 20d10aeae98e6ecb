"""fal adapter against the fake fal queue API (tests/fakes/fal.py), over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.fal import FalAdapter, build_input, find_outputs, run_failure
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, Pending, ProviderRequest
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes import fal as fake_fal
from tests.fakes.server import serve

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLUX = "fal-ai/flux/dev"
ULTRA = "fal-ai/flux-pro/v1.1-ultra"
VEO = "fal-ai/veo3"
KLING = "fal-ai/kling-video/v2.1/master/text-to-video"
KOKORO = "fal-ai/kokoro/american-english"


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(fake_fal.create_app()) as url:
        yield Fake(url, fake_fal.API_KEY, {"options": {"jwks_url": f"{url}/.well-known/jwks.json"}})


def img(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "output_format": "png", "n": 1, **kw}


def vid(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "duration_seconds": 4.0, "aspect_ratio": "16:9", "resolution": "720p", **kw}


class TestFalContract(AdapterContract):
    adapter = "fal"
    api_key_env = "GENROUTE_TEST_FAL_KEY"
    success = [
        Case("image", FLUX, img("a red fox", size="640x480"), content_type="image/png", size=(640, 480)),
        Case("image", FLUX, img("two foxes", aspect_ratio="16:9", output_format="jpeg", n=2), content_type="image/jpeg", size=(1024, 576), outputs=2),
        Case("image", ULTRA, img("wide fox", aspect_ratio="21:9"), content_type="image/png", size=(1568, 672)),
        Case("image", "acme/custom-image", img("any fox", aspect_ratio="3:2"), content_type="image/png", size=(1024, 683)),
        Case("video", VEO, vid("a fox running", duration_seconds=8.0, resolution="1080p"), content_type="video/mp4"),
        Case("video", KLING, vid("a fox jumping"), content_type="video/mp4"),  # schema defaults: not sent
        Case("audio", KOKORO, {"text": "hello fox", "voice": "af_heart", "format": "wav"}, content_type="audio/wav"),
    ]
    failures = [
        Case("image", FLUX, img("a fox [moderated]"), code=ErrorCode.moderated, stage="input"),
        Case("image", FLUX, img("a fox [moderated-submit]"), code=ErrorCode.moderated, stage="input"),
        Case("image", FLUX, img("a fox [moderated-output]"), code=ErrorCode.moderated, stage="output"),
        Case("image", FLUX, img("a fox [fail]"), code=ErrorCode.invalid_input),
        Case("image", FLUX, img("a fox [fail500]"), code=ErrorCode.provider_error),
        Case("video", VEO, vid("a fox [fail]", duration_seconds=8.0), code=ErrorCode.invalid_input),
    ]
    slow = Case("image", FLUX, img("a slow fox [slow]"), content_type="image/png")
    unsupported = [
        Case("image", FLUX, img("fox", output_format="webp")),
        Case("image", FLUX, img("fox", n=5)),
        Case("image", FLUX, img("fox", negative_prompt="cats")),
        Case("image", FLUX, img("fox", input_images=["https://example.com/a.png"])),
        Case("image", FLUX, img("fox", aspect_ratio="2:1")),
        Case("image", ULTRA, img("fox", size="1024x1024")),
        Case("image", ULTRA, img("fox", aspect_ratio="5:4")),
        Case("video", VEO, vid("fox", duration_seconds=5.0)),
        Case("video", VEO, vid("fox", resolution="1440p")),
        Case("video", VEO, vid("fox", aspect_ratio="1:1")),
        Case("video", VEO, vid("fox", image="https://example.com/first.png")),  # text-to-video only
        Case("video", KLING, vid("fox", fps=30)),
        Case("video", KLING, vid("fox", seed=7)),
        Case("audio", FLUX, {"text": "wrong modality"}),
        Case("audio", KOKORO, {"text": "hello", "format": "mp3"}),
    ]


# -- helpers ----------------------------------------------------------------------------------


def make_adapter(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, model: str = FLUX, **options: Any) -> FalAdapter:
    case = Case("image", model, {}, options=options)
    adapter = TestFalContract().make(fake, case, http, monkeypatch)
    assert isinstance(adapter, FalAdapter)
    return adapter


def request(model: str, inp: dict[str, Any], modality: str = "image", callback_url: str | None = None) -> ProviderRequest:
    return ProviderRequest(job_id=f"job_{uuid.uuid4().hex}", tenant="t", modality=modality,
                           provider_model=model, input=inp, callback_url=callback_url)


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


class Receiver:
    """A webhook endpoint that answers 500 to the first `fail_first` deliveries."""

    def __init__(self, fail_first: int = 1) -> None:
        self.fail_first = fail_first
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> JSONResponse:
        self.seen.append((dict(request.headers), await request.body()))
        return JSONResponse({"ok": len(self.seen) > self.fail_first}, status_code=500 if len(self.seen) <= self.fail_first else 200)

    async def delivered(self, count: int, timeout: float = 5.0) -> tuple[dict[str, str], bytes]:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"only {len(self.seen)} webhook deliveries"
            await asyncio.sleep(0.02)
        return self.seen[-1]


async def webhook_for(adapter: FalAdapter, prompt: str, fail_first: int = 1) -> tuple[Pending, dict[str, str], bytes]:
    receiver = Receiver(fail_first)
    with serve(receiver.app) as hook_url:
        first = await adapter.submit(request(FLUX, img(prompt), callback_url=f"{hook_url}/hook?job=abc"))
        assert isinstance(first, Pending)
        headers, body = await receiver.delivered(fail_first + 1)
    return first, headers, body


def resign(headers: dict[str, str], body: bytes, *, key: Ed25519PrivateKey | None = None, ts: int | None = None) -> dict[str, str]:
    out = dict(headers)
    stamp = str(ts if ts is not None else int(time.time()))
    out["x-fal-webhook-timestamp"] = stamp
    out["x-fal-webhook-signature"] = fake_fal.sign(
        key or fake_fal.signing_key(), out["x-fal-webhook-request-id"], out["x-fal-webhook-user-id"], stamp, body
    )
    return out


# -- queue behaviour ----------------------------------------------------------------------------


async def test_queue_position_surfaces_and_decreases(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    result, seen = await drive(adapter, request(FLUX, img("queued fox [slow]")))
    assert isinstance(result, Done)
    positions = [p.queue_position for p in seen if p.queue_position is not None]
    assert len(positions) >= 3 and positions == sorted(positions, reverse=True) and positions[-1] == 0, positions
    assert any("position" in (p.message or "") for p in seen)
    # once running, the runner's log lines are the message
    assert any("%|" in (p.message or "") for p in seen if p.queue_position is None)


async def test_returned_subpathless_urls_are_used(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    first = await adapter.submit(request(FLUX, img("url fox")))
    assert isinstance(first, Pending)
    h = first.handle
    assert h["status_url"] == f"{fake.url}/fal-ai/flux/requests/{h['request_id']}/status"
    assert "/dev/" not in h["response_url"] and "/dev/" not in h["cancel_url"]
    # a hand-built URL with the subpath is not an address fal knows
    built = await http.get(f"{fake.url}/{FLUX}/requests/{h['request_id']}/status", headers={"Authorization": f"Key {fake.api_key}"})
    assert built.status_code == 404
    result = first
    while isinstance(result, Pending):
        result = await adapter.poll(result.handle)
    assert isinstance(result, Done) and result.usage.get("inference_time") and result.usage["request_id"] == h["request_id"]


async def test_submit_sends_the_mapped_input(fake: Fake) -> None:
    body = build_input(FLUX, "image", img("fox", aspect_ratio="9:16", seed=5, input_images=[], provider_params={"num_inference_steps": 12}))
    assert body == {"prompt": "fox", "image_size": "portrait_16_9", "output_format": "png", "seed": 5, "num_inference_steps": 12}
    body = build_input(VEO + "/image-to-video", "video", vid("fox", duration_seconds=8.0, image="data:image/png;base64,AAAA", negative_prompt="rain"))
    assert body["duration"] == "8s" and body["image_url"].startswith("data:") and body["negative_prompt"] == "rain"
    body = build_input(KLING, "video", vid("fox", duration_seconds=10.0, aspect_ratio="9:16"))
    assert body == {"prompt": "fox", "duration": "10", "aspect_ratio": "9:16"}


async def test_concurrency_beyond_the_limit_waits_in_queue(http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(fake_fal.create_app(concurrency=1, queue_polls=0, progress_polls=3)) as url:
        adapter = make_adapter(Fake(url, fake_fal.API_KEY), http, monkeypatch)
        a = await adapter.submit(request(FLUX, img("first fox")))
        b = await adapter.submit(request(FLUX, img("second fox")))
        assert isinstance(a, Pending) and isinstance(b, Pending)
        pa = await adapter.poll(a.handle)  # takes the only runner
        pb = await adapter.poll(b.handle)
        assert isinstance(pa, Pending) and pa.queue_position is None
        assert isinstance(pb, Pending) and pb.queue_position == 0 and pb.progress == 0.0
        ra, _ = await drive_from(adapter, pa)
        rb, _ = await drive_from(adapter, pb)
        assert isinstance(ra, Done) and isinstance(rb, Done)
        stats = await Fake(url, "").stats()
        assert stats["peak_inflight"] == 2 and stats["creates"] == 2


async def drive_from(adapter: FalAdapter, result: Any) -> tuple[Any, int]:
    polls = 0
    while isinstance(result, Pending):
        polls += 1
        assert polls < 50
        result = await adapter.poll(result.handle)
    return result, polls


async def test_cancel_after_completion_changes_nothing(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    first = await adapter.submit(request(FLUX, img("done fox")))
    assert isinstance(first, Pending)
    done, _ = await drive_from(adapter, first)
    assert isinstance(done, Done)
    await adapter.cancel(first.handle)  # 400 ALREADY_COMPLETED is not an error
    assert isinstance(await adapter.poll(first.handle), Done)


async def test_poll_500_is_retryable(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    first = await adapter.submit(request(FLUX, img("flaky fox [poll500]")))
    assert isinstance(first, Pending)
    with pytest.raises(ProviderError) as exc:
        await adapter.poll(first.handle)
    assert exc.value.retryable
    result, _ = await drive_from(adapter, first)
    assert isinstance(result, Done)


async def test_object_lifecycle_preference_shortens_retention(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch, object_expiration_seconds=1)
    result, _ = await drive(adapter, request(FLUX, img("short-lived fox")))
    assert isinstance(result, Done) and result.outputs[0].url
    assert (await http.get(result.outputs[0].url)).status_code == 200
    await asyncio.sleep(1.1)
    assert (await http.get(result.outputs[0].url)).status_code == 404


async def test_outputs_from_every_result_shape() -> None:
    refs = find_outputs({
        "video": {"url": "https://v3.fal.media/a.mp4", "content_type": "video/mp4"},
        "thumbnail": {"url": "https://v3.fal.media/a.jpg", "content_type": "image/jpeg"},
        "audio_file": {"url": "https://v3.fal.media/a.wav"},
        "images": [{"url": "data:image/png;base64,iVBORw0KGgo=", "content_type": "image/png"}],
        "source": {"url": "https://example.com/not-a-file"},
        "seed": 1,
    })
    assert [(r.role, r.url or r.data) for r in refs] == [
        ("output", b"\x89PNG\r\n\x1a\n"),
        ("output", "https://v3.fal.media/a.mp4"),
        ("output", "https://v3.fal.media/a.wav"),
        ("thumbnail", "https://v3.fal.media/a.jpg"),
    ]


# -- webhooks -----------------------------------------------------------------------------------


async def test_signed_webhook_verifies_and_finishes(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    first, headers, body = await webhook_for(adapter, "hooked fox", fail_first=1)
    assert json.loads(body)["status"] == "OK"
    result = await adapter.verify_callback(headers, body, first.handle, None)
    assert isinstance(result, Done) and result.outputs and result.outputs[0].url
    assert (await fake.stats())["webhook_attempts"] >= 2  # retried after our 500


async def test_error_webhook_maps_to_failure(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    first, headers, body = await webhook_for(adapter, "hooked fox [fail]", fail_first=0)
    result = await adapter.verify_callback(headers, body, first.handle, None)
    assert isinstance(result, Failed) and result.code == ErrorCode.invalid_input, result
    first, headers, body = await webhook_for(adapter, "hooked fox [moderated]", fail_first=0)
    result = await adapter.verify_callback(headers, body, first.handle, None)
    assert isinstance(result, Failed) and result.code == ErrorCode.moderated and result.detail["stage"] == "input"


async def test_bad_webhooks_are_refused(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    first, headers, body = await webhook_for(adapter, "target fox", fail_first=0)
    handle = first.handle
    forged = body.replace(b'"OK"', b'"ERROR"')
    stranger = Ed25519PrivateKey.generate()
    cases = {
        "tampered body": (headers, forged),
        "stale timestamp": (resign(headers, body, ts=int(time.time()) - 600), body),
        "future timestamp": (resign(headers, body, ts=int(time.time()) + 600), body),
        "unknown key": (resign(headers, body, key=stranger), body),
        "no signature": ({k: v for k, v in headers.items() if k != "x-fal-webhook-signature"}, body),
        "not hex": ({**headers, "x-fal-webhook-signature": "zz"}, body),
    }
    for name, (h, b) in cases.items():
        with pytest.raises(ProviderError) as exc:
            await adapter.verify_callback(h, b, handle, None)
        assert exc.value.kind == ProviderErrorKind.auth, name
    # a genuine webhook for another request, replayed at this job
    with pytest.raises(ProviderError) as exc:
        await adapter.verify_callback(headers, body, {**handle, "request_id": "someone-else"}, None)
    assert exc.value.kind == ProviderErrorKind.auth
    # and the genuine one still passes (header names in any case)
    ok = await adapter.verify_callback({k.title(): v for k, v in headers.items()}, body, handle, None)
    assert isinstance(ok, Done)


async def test_jwks_is_fetched_once_and_cached(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    FalAdapter._jwks_cache.clear()
    adapter = make_adapter(fake, http, monkeypatch)
    first, headers, body = await webhook_for(adapter, "cached fox", fail_first=0)
    before = (await fake.stats())["jwks_fetches"]
    for _ in range(3):
        assert isinstance(await adapter.verify_callback(headers, body, first.handle, None), Done)
    other = make_adapter(fake, http, monkeypatch)  # a new adapter instance shares the cache
    assert isinstance(await other.verify_callback(headers, body, first.handle, None), Done)
    with pytest.raises(ProviderError):  # an unknown signer inside the refresh window: no refetch
        await adapter.verify_callback(resign(headers, body, key=Ed25519PrivateKey.generate()), body, first.handle, None)
    assert (await fake.stats())["jwks_fetches"] - before == 1


async def test_jwks_expires_after_its_ttl(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    FalAdapter._jwks_cache.clear()
    adapter = make_adapter(fake, http, monkeypatch, jwks_ttl=0.05)
    first, headers, body = await webhook_for(adapter, "ttl fox", fail_first=0)
    before = (await fake.stats())["jwks_fetches"]
    assert isinstance(await adapter.verify_callback(headers, body, first.handle, None), Done)
    await asyncio.sleep(0.1)
    assert isinstance(await adapter.verify_callback(headers, body, first.handle, None), Done)
    assert (await fake.stats())["jwks_fetches"] - before == 2
    FalAdapter._jwks_cache.clear()


async def test_result_5xx_is_retried_only_when_it_is_the_gateway() -> None:
    req = httpx.Request("GET", "https://queue.fal.run/fal-ai/flux/requests/x")
    stored = httpx.Response(500, json={"detail": "CUDA out of memory"}, request=req)
    failed = run_failure(500, stored.json(), stored)
    assert isinstance(failed, Failed) and failed.code == ErrorCode.provider_error
    for gateway in (httpx.Response(502, text="Bad gateway", request=req),
                    httpx.Response(500, json={"detail": "x"}, headers={"X-Fal-Retryable": "true"}, request=req)):
        with pytest.raises(ProviderError) as exc:
            run_failure(gateway.status_code, None, gateway)
        assert exc.value.retryable
    throttled = httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "3"}, request=req)
    with pytest.raises(ProviderError) as exc:
        run_failure(429, throttled.json(), throttled)
    assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 3


async def test_the_key_goes_only_to_fal(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter(fake, http, monkeypatch)
    assert "Authorization" in adapter._headers(f"{fake.url}/fal-ai/flux/requests/x/status")
    assert "Authorization" in adapter._headers("https://queue.fal.run/fal-ai/flux/requests/x/status")
    assert "Authorization" not in adapter._headers("https://queue.fal.run.evil.example/x")
    assert "Authorization" not in adapter._headers("http://queue.fal.run/x")  # never in clear text
