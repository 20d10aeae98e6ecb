"""OpenRouter adapter against the fake OpenRouter API over real HTTP.

The contract runs for images (made by chat models) and for videos; the tests below it
cover what is OpenRouter's own: the catalog's `models` / `provider` routing reaching the
wire (and refused from a request, and checked when a catalog loads), the answering model
and OpenRouter's cost read back, keep-alive comment lines in streams, the 403 moderation
and 429 envelopes, and the provider-handed polling_url kept to the base URL's host and
fetched through the guarded fetcher.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from adapters.registry import build_adapter
from core import netguard
from core.errors import ErrorCode, Fault, ProviderError, ProviderErrorKind
from core.routing.catalog import CatalogError, Deployment, load_catalog
from core.types import Done, Failed, Pending, ProviderRequest
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes.openrouter import API_KEY, create_app
from tests.fakes.server import serve

KEY_ENV = "GENROUTE_TEST_OPENROUTER_KEY"
ROUTING = {"models": ["anthropic/claude-3.5-haiku"],
           "provider": {"order": ["openai", "azure"], "allow_fallbacks": True, "sort": "price", "data_collection": "deny",
                        "zdr": True, "ignore": ["together"], "max_price": {"prompt": 1, "completion": 4}}}


def png_uri(w: int, h: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with serve(create_app(api_key=API_KEY)) as url:
        yield Fake(f"{url}/api/v1", API_KEY)


async def last(fake: Fake, endpoint: str) -> dict[str, Any]:
    return dict((await fake.stats())["last"][endpoint])


def make(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, model: str = "openai/gpt-4o-mini",
         **options: Any) -> Any:
    monkeypatch.setenv(KEY_ENV, fake.api_key)
    dep = Deployment(name=f"or-{uuid.uuid4().hex[:6]}", adapter="openrouter", model=model, base_url=fake.url,
                     api_key_env=KEY_ENV, options={"poll_interval": 0.02, **options})
    return build_adapter(dep, http)


def request(modality: str, model: str, inp: dict[str, Any]) -> ProviderRequest:
    return ProviderRequest(job_id=f"job_{uuid.uuid4().hex}", tenant="t", modality=modality, provider_model=model, input=inp)


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


# -- the contract -------------------------------------------------------------------


class TestOpenRouterImages(AdapterContract):
    adapter = "openrouter"
    api_key_env = KEY_ENV
    supports_cancel = False  # images finish inside submit
    success = [
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "a red fox"}, "image/png", (1024, 1024)),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "a wide fox", "aspect_ratio": "16:9"}, "image/png", (1344, 768)),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "make it blue", "input_images": [png_uri(64, 64)],
                                                        "provider_params": {"image_config": {"aspect_ratio": "9:16"}}},
             "image/png", (768, 1344)),
        Case("image", "black-forest-labs/flux.2-pro", {"prompt": "a cabin"}, "image/png", (1024, 1024),
             options={"modalities": ["image"]}),
    ]
    failures = [
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "bad [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "bad [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "boom [fail]"}, code=ErrorCode.provider_unavailable),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "broke [402]"}, code=ErrorCode.provider_error),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "x", "aspect_ratio": "5:1"}, code=ErrorCode.invalid_input),
        # an image-only model asked for text too: the deployment's `modalities` is wrong
        Case("image", "black-forest-labs/flux.2-pro", {"prompt": "x"}, code=ErrorCode.provider_unavailable),
    ]
    unsupported = [
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "x", "n": 2}),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "x", "seed": 3}),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "x", "negative_prompt": "dogs"}),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "x", "size": "1024x1024"}),
        Case("image", "google/gemini-2.5-flash-image", {"prompt": "x", "output_format": "jpeg"}),
    ]

    async def test_image_usage_names_the_model_and_its_cost(self, fake: Fake, http: httpx.AsyncClient,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        result = await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert isinstance(result, Done)
        assert result.usage["model"] == "google/gemini-2.5-flash-image"
        assert result.usage["cost_credits"] == pytest.approx(0.039)
        sent = await last(fake, "chat")
        assert sent["modalities"] == ["image", "text"] and sent["model"] == "google/gemini-2.5-flash-image"


class TestOpenRouterVideos(AdapterContract):
    adapter = "openrouter"
    api_key_env = KEY_ENV
    supports_cancel = False  # OpenRouter documents no cancel for videos
    task_id_key = "video_id"
    success = [
        Case("video", "google/veo-3.1", {"prompt": "waves", "duration_seconds": 8, "resolution": "720p", "aspect_ratio": "16:9"},
             "video/mp4", duration=8),
        Case("video", "openai/sora-2", {"prompt": "a cat", "image": png_uri(64, 36), "provider_params": {"generate_audio": True}},
             "video/mp4"),
    ]
    failures = [
        Case("video", "google/veo-3.1", {"prompt": "bad [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("video", "google/veo-3.1", {"prompt": "bad [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("video", "google/veo-3.1", {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        Case("video", "google/veo-3.1", {"prompt": "poor [402]"}, code=ErrorCode.provider_error),
        Case("video", "google/veo-3.1", {"prompt": "x", "duration_seconds": 5}, code=ErrorCode.invalid_input),
        Case("video", "google/veo-3.1", {"prompt": "x", "resolution": "4k"}, code=ErrorCode.invalid_input),
    ]
    unsupported = [
        Case("video", "google/veo-3.1", {"prompt": "x", "fps": 24}),
        Case("video", "google/veo-3.1", {"prompt": "x", "negative_prompt": "rain"}),
        Case("video", "google/veo-3.1", {"prompt": "x", "duration_seconds": 4.5}),
    ]

    async def test_wire_fields_cost_and_authenticated_content(self, fake: Fake, http: httpx.AsyncClient,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", "google/veo-3.1", {"prompt": "dusk [poll500]", "duration_seconds": 6, "seed": 7,
                                                "image": "https://example.com/first.png"})
        result, seen = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done) and {p.message for p in seen} <= {"pending", "in_progress"}
        sent = await last(fake, "videos")
        assert sent == {"model": "google/veo-3.1", "prompt": "dusk [poll500]", "duration": 6, "seed": 7,
                        "frame_images": [{"type": "image_url", "image_url": {"url": "https://example.com/first.png"},
                                          "frame_type": "first_frame"}]}
        assert result.usage["cost_credits"] == pytest.approx(6 * 0.40) and result.usage["model"] == "google/veo-3.1"
        ref = result.outputs[0]
        assert ref.url and ref.url.endswith("/content?index=0") and ref.headers["Authorization"] == f"Bearer {API_KEY}"
        assert (await http.get(ref.url)).status_code == 401  # the content needs the key
        assert (await http.get(ref.url, headers=ref.headers)).headers["content-type"] == "video/mp4"

    async def test_polling_url_on_another_host_is_refused(self, fake: Fake, http: httpx.AsyncClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", "google/veo-3.1", {"prompt": "steer me [far-poll]"})
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert "another host" in exc.value.message and exc.value.code == ErrorCode.provider_error

    async def test_polls_go_through_the_guarded_fetcher(self, fake: Fake, http: httpx.AsyncClient,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        case = Case("video", "google/veo-3.1", {"prompt": "guarded"})
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        before = (await fake.stats())["polls"]
        previous = netguard.configure([])  # loopback no longer allowed: the fetcher must refuse it
        try:
            with pytest.raises(ProviderError) as exc:
                await adapter.poll(first.handle)
        finally:
            netguard.set_policy(previous)
        assert "polling failed" in exc.value.message
        assert (await fake.stats())["polls"] == before, "the poll reached the fake past the guard"
        assert isinstance(await adapter.poll(first.handle), Pending)

    async def test_every_video_status_maps(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """pending and in_progress poll on; completed, failed, cancelled and expired end it."""
        ends = {"waves": (Done, None), "boom [fail]": (Failed, ErrorCode.provider_error),
                "stop [cancelled]": (Failed, ErrorCode.canceled), "late [expired]": (Failed, ErrorCode.provider_error)}
        for prompt, (kind, code) in ends.items():
            case = Case("video", "google/veo-3.1", {"prompt": prompt, "duration_seconds": 8})
            result, seen = await drive(make(fake, http, monkeypatch, "google/veo-3.1"), self.request(case))
            assert {p.message for p in seen} == {"pending", "in_progress"}, (prompt, [p.message for p in seen])
            assert isinstance(result, kind) and getattr(result, "code", None) == code, (prompt, result)
        assert isinstance(result, Failed) and "expired" in result.message

    async def test_unknown_video_id_fails_cleanly(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = make(fake, http, monkeypatch, "google/veo-3.1")
        handle = {"kind": "video", "video_id": "vgen_nope", "polling_url": f"{fake.url}/videos/vgen_nope"}
        result = await adapter.poll(handle)
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error


# -- chat: routing, fallbacks, the answering model ----------------------------------


async def test_catalog_routing_reaches_the_wire(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch, **ROUTING)
    out = await adapter.chat({"model": "our-alias", "messages": [{"role": "user", "content": "hi"}]}, stream=False)
    sent = await last(fake, "chat")
    assert sent["model"] == "openai/gpt-4o-mini"
    assert sent["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]
    assert sent["provider"] == ROUTING["provider"] and sent["usage"] == {"include": True}
    assert out["model"] == "openai/gpt-4o-mini" and out["provider"] == "openai"
    assert out["usage"]["cost_credits"] == out["usage"]["cost"] > 0


@pytest.mark.parametrize("keyword,kind", [("[primary-down]", ProviderErrorKind.retryable),
                                          ("[primary-429]", ProviderErrorKind.rate_limited),
                                          ("[primary-flagged]", ProviderErrorKind.moderated)])
async def test_models_fallback_answers_with_the_second_model(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                                                             keyword: str, kind: ProviderErrorKind) -> None:
    adapter = make(fake, http, monkeypatch, models=["anthropic/claude-3.5-haiku"])
    out = await adapter.chat({"messages": [{"role": "user", "content": f"hello {keyword}"}]}, stream=False)
    assert out["model"] == "anthropic/claude-3.5-haiku"
    assert out["choices"][0]["message"]["content"].startswith("[anthropic/claude-3.5-haiku]")
    # without fallbacks the same prompt is the primary's own error
    with pytest.raises(ProviderError) as exc:
        await make(fake, http, monkeypatch).chat({"messages": [{"role": "user", "content": f"hello {keyword}"}]}, stream=False)
    assert exc.value.kind is kind


async def test_routing_that_leaves_no_provider_is_the_operators(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch, provider={"order": ["azure"], "allow_fallbacks": False})  # azure is down
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "hi"}]}, stream=False)
    assert exc.value.fault is Fault.operator and exc.value.resend_safe
    assert exc.value.code == ErrorCode.provider_unavailable and "provider routing" in exc.value.message
    # with fallbacks allowed, OpenRouter moves past the down provider
    out = await make(fake, http, monkeypatch, provider={"order": ["azure"]}).chat(
        {"messages": [{"role": "user", "content": "hi"}]}, stream=False)
    assert out["provider"] == "openai"


async def test_stream_skips_keepalive_comments_and_reports_the_model_and_cost(
        fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = await http.post(f"{fake.url}/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "openai/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
    assert ": OPENROUTER PROCESSING" in raw.text  # the fake sends them, as OpenRouter does
    adapter = make(fake, http, monkeypatch, models=["anthropic/claude-3.5-haiku"])
    chunks = [c async for c in await adapter.chat({"messages": [{"role": "user", "content": "one two [primary-down]"}]}, stream=True)]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text == "[anthropic/claude-3.5-haiku] You said: one two [primary-down]"
    assert {c["model"] for c in chunks} == {"anthropic/claude-3.5-haiku"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["cost_credits"] > 0


async def test_text_job_records_the_answering_model_and_hides_billing(fake: Fake, http: httpx.AsyncClient,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch, models=["meta-llama/llama-3.1-8b-instruct"])
    result = await adapter.submit(request("text", "openai/gpt-4o-mini", {
        "messages": [{"role": "user", "content": "hey [primary-down]"}], "provider_params": {"temperature": 0.2}}))
    assert isinstance(result, Done)
    assert result.usage["model"] == "meta-llama/llama-3.1-8b-instruct" and result.usage["cost_credits"] > 0
    stored = json.loads(result.outputs[0].data or b"")
    assert stored["model"] == "meta-llama/llama-3.1-8b-instruct"
    assert "provider" not in stored and "cost" not in stored["usage"] and stored["usage"]["total_tokens"] > 0
    assert (await last(fake, "chat"))["temperature"] == 0.2


async def test_errors_in_openrouters_envelope(fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make(fake, http, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "x [429]"}]}, stream=True)
    assert exc.value.kind is ProviderErrorKind.rate_limited and exc.value.retry_after is not None
    assert 1 <= exc.value.retry_after <= 10  # from X-RateLimit-Reset: no Retry-After is sent
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "x [moderated]"}]}, stream=False)
    assert exc.value.kind is ProviderErrorKind.moderated and exc.value.detail["reasons"] == ["sexual"]
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "x [402]"}]}, stream=False)
    assert exc.value.kind is ProviderErrorKind.quota
    with pytest.raises(ProviderError) as exc:
        await adapter.chat({"messages": [{"role": "user", "content": "x [fail]"}]}, stream=False)
    assert exc.value.kind is ProviderErrorKind.retryable and "Upstream error" in exc.value.message


# -- trust: routing is the catalog's ------------------------------------------------


@pytest.mark.parametrize("name", ["models", "provider", "route"])
async def test_a_request_naming_the_routing_is_refused_before_sending(
        fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    before = (await fake.stats())["creates"]
    adapter = make(fake, http, monkeypatch)
    with pytest.raises(ProviderError) as exc:
        await adapter.submit(request("text", "openai/gpt-4o-mini", {
            "messages": [{"role": "user", "content": "hi"}], "provider_params": {name: {"only": ["cheap"]}}}))
    assert exc.value.code == ErrorCode.invalid_input and exc.value.detail["loc"] == ["input", "provider_params", name]
    assert (await fake.stats())["creates"] == before


def test_routing_options_are_checked_when_the_catalog_loads(tmp_path: Path) -> None:
    def catalog(options: dict[str, Any]) -> Path:
        path = tmp_path / f"c{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump({"models": [{"id": "chat", "modality": "text", "deployments": [
            {"name": "or", "adapter": "openrouter", "model": "openai/gpt-4o-mini", "options": options}]}]}))
        return path

    assert load_catalog(catalog(ROUTING)).get("chat") is not None
    for options, words in [
        ({"provider": {"sort": "cheapest"}}, "options.provider.sort"),
        ({"provider": {"order": ["openai"], "fallbacks": True}}, "options.provider.fallbacks"),
        ({"provider": {"max_price": {"prompt": -1}}}, "options.provider.max_price.prompt"),
        ({"provider": {"data_collection": "maybe"}}, "options.provider.data_collection"),
        ({"models": []}, "options.models"),
        ({"models": ["a/b", "a/b"]}, "names a model twice"),
        ({"modalities": ["text"]}, "must include image"),
    ]:
        with pytest.raises(CatalogError) as exc:
            load_catalog(catalog(options))
        assert words in str(exc.value) and ".yaml:" in str(exc.value), (options, str(exc.value))
