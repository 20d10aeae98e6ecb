"""The Fireworks adapter against its fake over real HTTP: the shared contract, plus what is
Fireworks' own: the synchronous text_to_image route (raw bytes by Accept, or base64 JSON,
CONTENT_FILTERED), FLUX Kontext on BFL's statuses through a POSTed get_result, and the
sample fetched from another host without the Fireworks key."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from adapters.fireworks import kontext_body, text_to_image_body, workflow_path
from core.errors import ErrorCode, ProviderError, ProviderErrorKind
from core.types import Done, Failed, Pending
from storage import store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes import fireworks
from tests.fakes.server import serve

KEY = "fw-test-key"
SCHNELL = "flux-1-schnell-fp8"
DEV = "accounts/fireworks/models/flux-1-dev-fp8"
KONTEXT = "flux-kontext-pro"
IMAGE_URL = "https://example.com/reference.png"


def _data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 30, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DATA_URI = _data_uri()


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    state = fireworks.FireworksState(api_key=KEY)
    with serve(fireworks.create_delivery_app(state)) as delivery, serve(fireworks.create_app(state=state, delivery_url=delivery)) as url:
        yield Fake(url + "/inference/v1", KEY, extra={"delivery": delivery})


async def _control(fake: Fake, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as c:
        url = f"{fake.url}{path}"
        if body is None:
            return (await (c.post(url) if path.endswith("reset") else c.get(url))).json()
        resp = await c.post(url, json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()


def _image(model: str, prompt: str, **extra: Any) -> Case:
    return Case("image", model, {"prompt": prompt, **extra})


class TestFireworks(AdapterContract):
    adapter = "fireworks"
    api_key_env = "GENROUTE_TEST_FIREWORKS_KEY"
    supports_cancel = False  # no cancel on either workflow: canceled on our side
    task_id_key = "id"
    slow = Case("image", KONTEXT, {"prompt": "a slow one [slow]"})  # Kontext reports progress
    success = [
        # first: Kontext, whose sample is a URL on another host (the expiry test needs one)
        Case("image", KONTEXT, {"prompt": "make it snow", "input_images": [DATA_URI], "aspect_ratio": "16:9"},
             content_type="image/png", size=(1376, 768)),
        Case("image", KONTEXT, {"prompt": "a jpeg", "input_images": [IMAGE_URL], "size": "1024x1024", "output_format": "jpeg",
                                "provider_params": {"safety_tolerance": 2}}, content_type="image/jpeg", size=(1024, 1024)),
        Case("image", "flux-kontext-max", {"prompt": "text only", "aspect_ratio": "21:9"}, content_type="image/png"),
        # the sync route: raw bytes by Accept
        Case("image", SCHNELL, {"prompt": "a lighthouse", "size": "1024x768", "output_format": "jpeg", "seed": 5},
             content_type="image/jpeg", size=(1184, 896)),
        Case("image", SCHNELL, {"prompt": "a fox", "aspect_ratio": "1:1", "provider_params": {"num_inference_steps": 4}},
             content_type="image/png", size=(1024, 1024)),
        Case("image", DEV, {"prompt": "a teapot", "aspect_ratio": "9:16", "provider_params": {"guidance_scale": 3.5}},
             content_type="image/png", size=(768, 1376)),
        # the sync route as JSON (base64[] with finishReason)
        Case("image", SCHNELL, {"prompt": "as json", "aspect_ratio": "3:2"}, content_type="image/png",
             options={"accept": "json"}),
    ]
    failures = [
        Case("image", SCHNELL, {"prompt": "a thing [moderated-output]"}, code=ErrorCode.moderated, stage="output"),
        Case("image", SCHNELL, {"prompt": "a thing [moderated]"}, code=ErrorCode.moderated, stage="output",
             options={"accept": "json"}),
        Case("image", KONTEXT, {"prompt": "a thing [moderated]"}, code=ErrorCode.moderated, stage="input"),
        Case("image", KONTEXT, {"prompt": "edit [moderated-output]", "input_images": [IMAGE_URL]},
             code=ErrorCode.moderated, stage="output"),
        Case("image", KONTEXT, {"prompt": "boom [fail]"}, code=ErrorCode.provider_error),
        # passed through, refused by Fireworks: its 400 is the tenant's invalid_input
        Case("image", SCHNELL, {"prompt": "too many steps", "provider_params": {"num_inference_steps": 40}},
             code=ErrorCode.invalid_input),
    ]
    unsupported = [
        _image(SCHNELL, "two", n=2),
        _image(SCHNELL, "webp", output_format="webp"),
        _image(SCHNELL, "negative", negative_prompt="blur"),
        _image(SCHNELL, "an edit", input_images=[IMAGE_URL]),
        _image(SCHNELL, "odd ratio", aspect_ratio="7:3"),
        _image(SCHNELL, "odd size", size="1000x100"),
        _image(SCHNELL, "kontext knob", provider_params={"safety_tolerance": 1}),
        _image(KONTEXT, "sync knob", provider_params={"num_inference_steps": 4}),
        _image(KONTEXT, "two refs", input_images=[IMAGE_URL, IMAGE_URL]),
        _image(KONTEXT, "too wide", aspect_ratio="3:1"),
        _image(KONTEXT, "tolerance", provider_params={"safety_tolerance": 7}),
        _image(KONTEXT, "edit tolerance", input_images=[IMAGE_URL], provider_params={"safety_tolerance": 3}),
        _image(KONTEXT, "webhook is ours", provider_params={"webhook_url": "https://evil.example/x"}),
    ]

    # -- Fireworks' own -------------------------------------------------------------------
    async def test_sync_route_is_done_at_submit_with_bytes_by_accept(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[3]
        before = await fake.stats()
        result = await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert isinstance(result, Done) and result.outputs[0].data and result.outputs[0].content_type == "image/jpeg"
        assert result.usage["seed"] == "5"
        sent = (await _control(fake, "/_control/requests"))[-1]
        assert sent["endpoint"] == "text_to_image" and sent["accept"] == "image/jpeg"
        assert sent["body"] == {"prompt": "a lighthouse", "aspect_ratio": "4:3", "seed": 5}
        assert (await fake.stats())["polls"] == before["polls"]

    async def test_kontext_polls_get_result_and_fetches_the_sample_without_the_key(self,
            fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        adapter = self.make(fake, case, http, monkeypatch)
        result, seen = await drive(adapter, self.request(case))
        assert isinstance(result, Done) and seen and seen[0].handle["path"] == "accounts/fireworks/models/flux-kontext-pro"
        ref = result.outputs[0]
        assert ref.url and ref.url.startswith(fake.extra["delivery"]) and not ref.headers
        before = await fake.stats()
        stored = await store_output(bucket, http, ref, key_base=f"t/{uuid.uuid4().hex}", index=0,
                                    max_bytes=2**22, max_image_pixels=64_000_000)
        assert (stored.width, stored.height) == (1376, 768)
        after = await fake.stats()
        assert after["sample_gets"] == before["sample_gets"] + 1 and after["sample_saw_key"] == before["sample_saw_key"]
        sent = [r for r in await _control(fake, "/_control/requests") if r["endpoint"] == "kontext"][-1]["body"]
        assert sent["input_image"].startswith("data:image/png;base64,") and sent["aspect_ratio"] == "16:9"

    async def test_the_sample_host_refuses_the_key(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """The fake is strict: sending the key to the delivery host fails (so the test above can)."""
        case = self.success[2]
        result, _ = await drive(self.make(fake, case, http, monkeypatch), self.request(case))
        assert isinstance(result, Done) and result.outputs[0].url
        resp = await http.get(result.outputs[0].url, headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status_code == 400
        assert (await http.get(result.outputs[0].url)).status_code == 200

    async def test_get_result_for_an_unknown_id_is_task_not_found(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch)
        handle = {"kind": "kontext", "id": "nope", "path": workflow_path(KONTEXT), "model": KONTEXT,
                  "output_format": "png", "usage": {}}
        result = await adapter.poll(handle)
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error
        assert "fireworks has no task 'nope'" in result.message and "expired" in result.message

    async def test_result_expires_after_ttl(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        await _control(fake, "/_control/config", {"result_ttl": 0.2})
        try:
            case = self.success[2]
            adapter = self.make(fake, case, http, monkeypatch)
            result, _ = await drive(adapter, self.request(case))
            assert isinstance(result, Done)
            import asyncio

            await asyncio.sleep(0.3)
            assert (await http.get(result.outputs[0].url or "")).status_code == 403
            late = await adapter.poll(result.handle)
            assert isinstance(late, Failed) and late.code == ErrorCode.provider_error
        finally:
            await _control(fake, "/_control/config", {"result_ttl": 600.0})

    async def test_429_without_retry_after_waits_5_seconds(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = _image(SCHNELL, "busy [429]")
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == 5.0 and exc.value.resend_safe

    async def test_kontext_400_keeps_the_error_message(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """A Kontext refusal ({"error_message"}) reaches the tenant in Fireworks' words."""
        case = _image(KONTEXT, "bad image", input_images=["data:image/png;base64,@@@"])
        with pytest.raises(ProviderError) as exc:
            await self.make(fake, case, http, monkeypatch).submit(self.request(case))
        assert exc.value.kind == ProviderErrorKind.invalid and exc.value.code == ErrorCode.invalid_input
        assert "neither a URL nor valid base64" in str(exc.value)

    async def test_transient_500_on_poll_is_retried(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = _image(KONTEXT, "flaky [poll500]")
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        with pytest.raises(ProviderError) as exc:
            await adapter.poll(first.handle)
        assert exc.value.retryable
        result = first
        while isinstance(result, Pending):
            result = await adapter.poll(result.handle)
        assert isinstance(result, Done)

    async def test_cancel_sends_nothing(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = _image(KONTEXT, "slow [slow]")
        adapter = self.make(fake, case, http, monkeypatch)
        first = await adapter.submit(self.request(case))
        assert isinstance(first, Pending)
        before = await fake.stats()
        await adapter.cancel(first.handle)
        assert await fake.stats() == before


# -- mapping, without HTTP ---------------------------------------------------------------
@pytest.mark.parametrize(("inp", "expected"), [
    ({"size": "1920x1080"}, "16:9"), ({"size": "1024x1024"}, "1:1"), ({"size": "800x1000"}, "4:5"),
    ({"aspect_ratio": "21:9"}, "21:9"), ({}, None),
])
def test_text_to_image_ratio(inp: dict[str, Any], expected: str | None) -> None:
    body, fmt = text_to_image_body(SCHNELL, {"prompt": "p", **inp})
    assert body.get("aspect_ratio") == expected and fmt == "png"


def test_kontext_takes_any_ratio_in_range() -> None:
    assert kontext_body(KONTEXT, {"prompt": "p", "aspect_ratio": "7:5"})["aspect_ratio"] == "7:5"
    assert workflow_path(DEV) == DEV and workflow_path(KONTEXT) == "accounts/fireworks/models/flux-kontext-pro"


def test_bfl_statuses_have_one_home() -> None:
    """Kontext's get_result is BFL's task API: its statuses are mapped in adapters/bfl.py only,
    so a status BFL adds (or renames) is handled for both hosts in one place."""
    import ast
    from pathlib import Path

    import adapters.bfl
    import adapters.fireworks

    assert adapters.fireworks.task_result is adapters.bfl.task_result
    statuses = {"Request Moderated", "Content Moderated", "Task not found"}  # BFL's own words
    for path in Path(adapters.bfl.__file__).parent.glob("*.py"):
        if path.name == "bfl.py":
            continue
        found = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and n.value in statuses}
        assert not found, (path.name, found)
