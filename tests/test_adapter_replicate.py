"""The Replicate adapter against the fake Replicate API (tests/fakes/replicate.py)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.replicate import ReplicateAdapter, last_log_line, output_urls, parse_progress, verify_signature
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.routing.catalog import Deployment
from core.types import Done, Failed, Pending, ProviderRequest
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.replicate import create_app
from tests.fakes.server import serve

KEY = "r8_fake_token"
ENV = "REPLICATE_API_TOKEN"
HEX = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
SCHNELL = "black-forest-labs/flux-schnell"
KONTEXT = "black-forest-labs/flux-kontext-pro"
KLING = "kwaivgi/kling-v2.1-master"


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(create_app(api_key=KEY)) as url:
        yield Fake(url, KEY)


def img(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "output_format": "png", "n": 1, **kw}


class TestReplicateContract(AdapterContract):
    adapter = "replicate"
    api_key_env = ENV
    success = [
        # list output (flux-schnell): two 16:9 buckets
        Case("image", SCHNELL, img("a red fox", aspect_ratio="16:9", n=2), "image/png", (1344, 768), outputs=2),
        # string output (kontext), jpeg spelled jpg on the wire, an input image
        Case("image", KONTEXT, img("make it night", aspect_ratio="1:1", output_format="jpeg",
                                   input_images=["https://example.com/cat.png"]), "image/jpeg", (1024, 1024)),
        # nested dict output: two URLs, a seed and a flag ignored; size -> width/height
        Case("image", "acme/dict-out", img("a chart", size="640x480", output_format="webp"), "image/webp", (640, 480), outputs=2),
        # a version id on /v1/predictions, with a transient 500 on the first poll
        Case("image", f"acme/versioned-model:{HEX}", img("a boat [poll500]", size="512x512"), "image/png", (512, 512)),
        # video: one mp4 URL string
        Case("video", "wan-video/wan-2.2-t2v-fast", {"prompt": "waves", "duration_seconds": 5.0, "aspect_ratio": "16:9",
                                                     "resolution": "720p"}, "video/mp4"),
        Case("video", KLING, {"prompt": "a cat runs", "duration_seconds": 10.0, "aspect_ratio": "9:16", "resolution": "720p"},
             "video/mp4"),
        # sync mode: Prefer: wait answers with the finished prediction
        Case("image", SCHNELL, img("a lighthouse"), "image/png", (1024, 1024), options={"sync_wait": 5}),
    ]
    failures = [
        Case("image", SCHNELL, img("a fox [fail]"), code=ErrorCode.provider_error),
        Case("image", SCHNELL, img("a fox [moderated]"), code=ErrorCode.moderated, stage="input"),
        Case("image", SCHNELL, img("a fox [moderated-output]"), code=ErrorCode.moderated, stage="output"),
        Case("image", SCHNELL, img("a fox [aborted]"), code=ErrorCode.timeout),
        Case("image", SCHNELL, img("a fox [data-removed]"), code=ErrorCode.provider_error),
        Case("image", SCHNELL, img("a fox [402]"), code=ErrorCode.provider_error),
        Case("image", "acme/missing-model", img("a fox"), code=ErrorCode.provider_unavailable),  # the deployment's mistake, not the user's
        # provider_params win over our mapping and are not checked by us: the model's 422
        Case("image", SCHNELL, img("a fox", provider_params={"num_outputs": 9}), code=ErrorCode.invalid_input),
        # moderated in sync mode: submit itself raises
        Case("image", SCHNELL, img("a fox [moderated-output]"), code=ErrorCode.moderated, stage="output",
             options={"sync_wait": 5}),
    ]
    slow = Case("image", SCHNELL, img("a slow fox [slow]"))
    unsupported = [
        Case("image", SCHNELL, img("x", size="1024x1024")),
        Case("image", SCHNELL, img("x", n=5)),
        Case("image", SCHNELL, img("x", aspect_ratio="7:3")),
        Case("image", SCHNELL, img("x", negative_prompt="blur")),
        Case("image", SCHNELL, img("x", input_images=["https://e.com/a.png"])),
        Case("image", KONTEXT, img("x", output_format="webp")),
        Case("image", KONTEXT, img("x", input_images=["https://e.com/a.png", "https://e.com/b.png"])),
        Case("image", "black-forest-labs/flux-1.1-pro", img("x", size="1000x1000")),
        Case("image", "acme/anything", img("x", input_images=["https://e.com/a.png", "https://e.com/b.png"])),
        Case("video", KLING, {"prompt": "x", "duration_seconds": 4.0, "aspect_ratio": "16:9", "resolution": "720p"}),
        Case("video", KLING, {"prompt": "x", "duration_seconds": 5.0, "aspect_ratio": "21:9", "resolution": "720p"}),
        Case("video", KLING, {"prompt": "x", "duration_seconds": 5.0, "aspect_ratio": "16:9", "resolution": "720p", "seed": 3}),
    ]


# -- helpers ---------------------------------------------------------------------------
def make(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, model: str = SCHNELL,
         **options: Any) -> ReplicateAdapter:
    monkeypatch.setenv(ENV, fake.api_key)
    dep = Deployment(name="replicate-test", adapter="replicate", model=model, base_url=fake.url,
                     api_key_env=ENV, options={"poll_interval": 0.02, **options})
    return ReplicateAdapter(dep, http)


def request(model: str, inp: dict[str, Any], modality: str = "image", callback_url: str | None = None) -> ProviderRequest:
    return ProviderRequest(job_id=f"job_{uuid.uuid4().hex}", tenant="t", modality=modality,
                           provider_model=model, input=inp, callback_url=callback_url)


async def control(fake: Fake, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as c:
        if body is None:
            return (await c.get(f"{fake.url}/_control/{path}")).json()
        return (await c.post(f"{fake.url}/_control/{path}", json=body)).json()


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


class Receiver:
    """A webhook endpoint on loopback that records raw headers and body."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_next = 0
        self.lock = threading.Lock()

        async def hook(request: Request) -> Response:
            body = await request.body()
            with self.lock:
                self.received.append((dict(request.headers), body))
                if self.fail_next > 0:
                    self.fail_next -= 1
                    return Response("busy", 500)
            return Response("ok")

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def wait_for(self, status: str, timeout: float = 5.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if any(f'"status": "{status}"'.encode() in b for _, b in self.received):
                    return list(self.received)
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {status} webhook within {timeout}s: {self.received}")


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    r = Receiver()
    with serve(r.app) as url:
        yield r, f"{url}/hook?job=abc"


# -- wire format -----------------------------------------------------------------------
def test_tqdm_progress_is_read_from_the_last_bar_line() -> None:
    logs = ("Using seed: 1\n 10%|█         | 1/10 [00:01<00:09]\n 76%|███████▌  | 7568/10000 [00:33<00:10, 229.00it/s]\n"
            "Downloading weights\n")
    assert parse_progress(logs) == 0.76
    assert last_log_line(logs) == "Downloading weights"
    assert parse_progress("no bars here\n50% done") is None and parse_progress(None) is None


def test_output_urls_from_every_shape() -> None:
    assert output_urls("https://r.delivery/a.png") == ["https://r.delivery/a.png"]
    assert output_urls(["https://r/a.webp", "https://r/b.webp"]) == ["https://r/a.webp", "https://r/b.webp"]
    nested = {"image": "https://r/a.png", "extra": {"masks": ["https://r/m.png"], "seed": 4, "note": "hello"}, "nsfw": False}
    assert output_urls(nested) == ["https://r/a.png", "https://r/m.png"]
    assert output_urls(["hello", " world"]) == [] and output_urls(None) == []


async def test_official_model_endpoint_and_input_mapping(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    inp = img("a fox", aspect_ratio="4:3", n=3, output_format="jpeg", seed=11, provider_params={"go_fast": False, "seed": 12})
    await adapter.submit(request(SCHNELL, inp))
    last = (await control(fake, "stats"))["last_create"]
    assert last["path"] == f"/v1/models/{SCHNELL}/predictions" and "version" not in last["body"]
    assert last["body"]["input"] == {"prompt": "a fox", "aspect_ratio": "4:3", "num_outputs": 3, "output_format": "jpg",
                                     "seed": 12, "go_fast": False}
    assert "webhook" not in last["body"] and last["prefer"] is None


@pytest.mark.parametrize("model", [f"acme/versioned-model:{HEX}", HEX])
async def test_version_goes_to_predictions_with_version(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    adapter = make(fake, http, monkeypatch, model)
    first = await adapter.submit(request(model, img("a fox")))
    last = (await control(fake, "stats"))["last_create"]
    assert last["path"] == "/v1/predictions" and last["body"]["version"] == HEX
    assert isinstance(first, Pending) and first.handle["get"].startswith(fake.url)


async def test_progress_and_message_come_from_logs(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    result, seen = await drive(adapter, request(SCHNELL, img("a fox [slow]")), max_polls=500)
    assert isinstance(result, Done)
    processing = [p for p in seen if p.progress is not None]
    assert processing[0].progress == 0.0 and processing[-1].progress and processing[-1].progress > 0.9
    assert processing[-1].message and "%|" in processing[-1].message  # the last log line
    assert result.usage["predict_time"] > 0 and "total_time" in result.usage


async def test_sync_wait_that_runs_out_returns_pending(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch, sync_wait=1)
    first = await adapter.submit(request(SCHNELL, img("a fox [slow]")))
    assert (await control(fake, "stats"))["last_create"]["prefer"] == "wait=1"
    assert isinstance(first, Pending) and first.progress is not None and 0 < first.progress < 1
    await adapter.cancel(first.handle)


async def test_throttle_without_retry_after_reads_the_detail(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await adapter.submit(request(SCHNELL, img("a fox [429body]")))
    assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 7 and exc.value.resend_safe


async def test_402_is_quota_and_not_resent(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await adapter.submit(request(SCHNELL, img("a fox [402]")))
    assert exc.value.kind == ProviderErrorKind.quota and not exc.value.resend_safe and not exc.value.retryable


async def test_422_keeps_the_providers_words(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await adapter.submit(request(SCHNELL, img("a fox", provider_params={"num_outputs": 9})))
    assert exc.value.code == ErrorCode.invalid_input and "num_outputs" in exc.value.message


async def test_transient_poll_500_is_retryable_then_recovers(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    first = await adapter.submit(request(SCHNELL, img("a fox [poll500]")))
    assert isinstance(first, Pending)
    with pytest.raises(ProviderError) as exc:
        await adapter.poll(first.handle)
    assert exc.value.retryable and exc.value.resend_safe
    assert isinstance(await adapter.poll(first.handle), Pending)


async def test_cancel_after_the_end_changes_nothing(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    result, _ = await drive(adapter, request(SCHNELL, img("a fox")))
    assert isinstance(result, Done)
    await adapter.cancel(result.handle)
    assert isinstance(await adapter.poll(result.handle), Done)


async def test_urls_on_another_host_are_not_sent_the_token(http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # a proxy in front of Replicate answers with api.replicate.com URLs: poll through the proxy
    with serve(create_app(api_key=KEY, public_base="https://api.replicate.invalid")) as url:
        adapter = make(Fake(url, KEY), http, monkeypatch)
        result, _ = await drive(adapter, request(SCHNELL, img("a fox")))
        assert isinstance(result, Done) and result.handle["get"] == f"{url}/v1/predictions/{result.handle['id']}"


async def test_unknown_prediction_is_provider_error(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    result = await adapter.poll({"id": "nope", "get": f"{fake.url}/v1/predictions/nope", "cancel": ""})
    assert isinstance(result, Failed) and result.code == ErrorCode.provider_error


async def test_data_ttl_removes_outputs_after_completion(http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(create_app(api_key=KEY, data_ttl=0.3)) as url:
        fake = Fake(url, KEY)
        adapter = make(fake, http, monkeypatch)
        result, _ = await drive(adapter, request(SCHNELL, img("a fox")))
        assert isinstance(result, Done)
        file_url = result.outputs[0].url
        assert file_url and (await http.get(file_url)).status_code == 200
        await asyncio.sleep(0.35)
        later = await adapter.poll(result.handle)
        assert isinstance(later, Failed) and later.code == ErrorCode.provider_error and "data_removed" in later.message
        assert (await http.get(file_url)).status_code == 404


# -- webhooks ----------------------------------------------------------------------------
async def _secret(fake: Fake) -> str:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{fake.url}/v1/webhooks/default/secret", headers={"Authorization": f"Bearer {fake.api_key}"})
        return str(r.json()["key"])


async def test_signed_webhook_finishes_the_job_without_polling(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                                  receiver: tuple[Receiver, str]) -> None:
    rec, hook_url = receiver
    adapter = make(fake, http, monkeypatch)
    lib = Webhook(await _secret(fake))
    fetches = (await control(fake, "stats"))["secret_fetches"]
    first = await adapter.submit(request(SCHNELL, img("a fox", n=2), callback_url=hook_url))
    assert isinstance(first, Pending)
    polls = (await control(fake, "stats"))["polls"]
    body = (await control(fake, "stats"))["last_create"]["body"]
    assert body["webhook"] == hook_url and body["webhook_events_filter"] == ["start", "completed"]

    deliveries = await rec.wait_for("succeeded")
    results = []
    for headers, raw in deliveries:
        lib.verify(raw, headers)  # the fake signs the way the standard library checks
        results.append(await adapter.verify_callback(headers, raw, first.handle, None))
    assert results[0] is None  # the start event changes nothing
    done = results[-1]
    assert isinstance(done, Done) and len(done.outputs) == 2 and done.usage["predict_time"] > 0
    assert (await http.get(str(done.outputs[0].url))).status_code == 200
    stats = await control(fake, "stats")
    assert stats["polls"] == polls, "the webhook alone finished the job"
    assert stats["secret_fetches"] == fetches + 1, "the account secret is fetched once and cached"


async def test_webhook_retries_keep_the_same_id(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                receiver: tuple[Receiver, str]) -> None:
    rec, hook_url = receiver
    adapter = make(fake, http, monkeypatch, webhook_events_filter=["completed"])
    rec.fail_next = 1
    first = await adapter.submit(request(SCHNELL, img("a fox"), callback_url=hook_url))
    assert isinstance(first, Pending)
    deliveries = await rec.wait_for("succeeded")
    await asyncio.sleep(0.2)  # the retry after the 500
    deliveries = list(rec.received)
    assert len(deliveries) == 2 and deliveries[0][0]["webhook-id"] == deliveries[1][0]["webhook-id"]
    for headers, raw in deliveries:
        assert isinstance(await adapter.verify_callback(headers, raw, first.handle, None), Done)


async def test_forged_stale_and_foreign_webhooks_are_refused(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                              receiver: tuple[Receiver, str]) -> None:
    rec, hook_url = receiver
    adapter = make(fake, http, monkeypatch)
    first = await adapter.submit(request(SCHNELL, img("a fox"), callback_url=hook_url))
    assert isinstance(first, Pending)
    headers, raw = (await rec.wait_for("succeeded"))[-1]
    assert isinstance(await adapter.verify_callback(headers, raw, first.handle, None), Done)

    forged_body = raw.replace(b'"succeeded"', b'"failed"')
    forged_sig = {**headers, "webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
    missing = {k: v for k, v in headers.items() if k != "webhook-signature"}
    for h, b in ((headers, forged_body), (forged_sig, raw), (missing, raw)):
        with pytest.raises(ProviderError) as exc:
            await adapter.verify_callback(h, b, first.handle, None)
        assert exc.value.code == ErrorCode.provider_auth
    with pytest.raises(ProviderError) as exc:  # signed, but for another job's prediction
        await adapter.verify_callback(headers, raw, {**first.handle, "id": "someone-else"}, None)
    assert exc.value.code == ErrorCode.provider_auth
    with pytest.raises(ProviderError):  # a replay after the 5 minute window
        verify_signature(await _secret(fake), headers, raw, now=time.time() + 400)


async def test_stale_timestamp_refused_and_two_signatures_accepted(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                                   receiver: tuple[Receiver, str]) -> None:
    rec, hook_url = receiver
    adapter = make(fake, http, monkeypatch, webhook_events_filter=["completed"])
    lib = Webhook(await _secret(fake))
    try:
        await control(fake, "config", {"webhook_stale": True})
        first = await adapter.submit(request(SCHNELL, img("a stale fox"), callback_url=hook_url))
        headers, raw = (await rec.wait_for("succeeded"))[-1]
        with pytest.raises(ProviderError) as exc:
            await adapter.verify_callback(headers, raw, first.handle, None)  # type: ignore[union-attr]
        assert exc.value.code == ErrorCode.provider_auth
        with pytest.raises(WebhookVerificationError):
            lib.verify(raw, headers)

        await control(fake, "config", {"webhook_stale": False, "webhook_extra_signature": True})
        rec.received.clear()
        second = await adapter.submit(request(SCHNELL, img("a rotated fox"), callback_url=hook_url))
        headers, raw = (await rec.wait_for("succeeded"))[-1]
        assert len(headers["webhook-signature"].split()) == 2
        lib.verify(raw, headers)
        assert isinstance(await adapter.verify_callback(headers, raw, second.handle, None), Done)  # type: ignore[union-attr]
    finally:
        await control(fake, "config", {"webhook_stale": False, "webhook_extra_signature": False})


async def test_configured_webhook_secret_is_used_without_fetching(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                                  receiver: tuple[Receiver, str]) -> None:
    rec, hook_url = receiver
    adapter = make(fake, http, monkeypatch, webhook_secret=await _secret(fake), webhook_events_filter=["completed"])
    before = (await control(fake, "stats"))["secret_fetches"]
    first = await adapter.submit(request(SCHNELL, img("a fox"), callback_url=hook_url))
    headers, raw = (await rec.wait_for("succeeded"))[-1]
    assert isinstance(await adapter.verify_callback(headers, raw, first.handle, None), Done)  # type: ignore[union-attr]
    assert (await control(fake, "stats"))["secret_fetches"] == before
    wrong = make(fake, http, monkeypatch, webhook_secret="whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB")
    with pytest.raises(ProviderError) as exc:
        await wrong.verify_callback(headers, raw, first.handle, None)  # type: ignore[union-attr]
    assert exc.value.code == ErrorCode.provider_auth
