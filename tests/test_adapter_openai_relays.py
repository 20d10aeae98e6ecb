"""The `openai` adapter's video path against OpenAI-style `/v1/videos` relays (CometAPI,
DMXAPI, poloapi; tests/fakes/openai_relay.py), each with the deployment options its
docs/adapters/openai.md row names. The contract runs once per relay and model family; the
tests below show what each option is for: without it, the relay refuses or the job breaks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.registry import build_adapter
from core.errors import ErrorCode, ProviderError
from core.routing.catalog import load_catalog
from core.types import Done, Failed, Pending, ProviderRequest
from storage import store_output
from tests.contract import AdapterContract, Case, Fake, drive
from tests.fakes import kling as kling_fake
from tests.fakes.openai_relay import API_KEY, create_app
from tests.fakes.server import serve

KEY_ENV = "GENROUTE_TEST_RELAY_KEY"
COMET_SORA = {"video_multipart": True}
COMET_VEO = {"video_multipart": True, "video_size": "ratio"}
DMX_SORA = {"video_multipart": True, "video_thumbnail": False}
POLO_VEO = {"video_statuses": {"processing": "in_progress"}, "video_content": "json", "video_size": "none", "auth_scheme": ""}


def relay(flavor: str) -> Iterator[Fake]:
    with serve(create_app(flavor=flavor, api_key=API_KEY)) as url:
        yield Fake(f"{url}/v1", API_KEY)


@pytest.fixture(scope="module")
def comet() -> Iterator[Fake]:
    yield from relay("cometapi")


@pytest.fixture(scope="module")
def dmx() -> Iterator[Fake]:
    yield from relay("dmxapi")


@pytest.fixture(scope="module")
def polo() -> Iterator[Fake]:
    yield from relay("poloapi")


def video(model: str, prompt: str, code: ErrorCode | None = None, stage: str | None = None,
          options: dict[str, Any] | None = None, **extra: Any) -> Case:
    return Case("video", model, {"prompt": prompt, **extra}, code=code, stage=stage, options=options or {})


def failing(model: str, options: dict[str, Any]) -> list[Case]:
    return [
        video(model, "bad [moderated]", ErrorCode.moderated, "input", options),
        video(model, "bad [moderated-output]", ErrorCode.moderated, "output", options),
        video(model, "boom [fail]", ErrorCode.provider_error, options=options),
    ]


class RelayContract(AdapterContract):
    adapter = "openai"
    api_key_env = KEY_ENV
    supports_cancel = False  # the Videos API cannot stop a render (nor can the relays)
    task_id_key = "video_id"


class TestCometAPISora(RelayContract):
    @pytest.fixture
    def fake(self, comet: Fake) -> Fake:
        return Fake(comet.url, comet.api_key, extra={"options": COMET_SORA})  # every case, rebuilt ones too

    success = [Case("video", "sora-2", {"prompt": "a cat surfing", "duration_seconds": 8, "aspect_ratio": "16:9"},
                    content_type="video/mp4", duration=8, options=COMET_SORA)]
    failures = failing("sora-2", COMET_SORA)
    slow = video("sora-2", "a slow one [slow]", options=COMET_SORA)
    unsupported = [video("sora-2", "five seconds", duration_seconds=5, options=COMET_SORA)]


class TestCometAPIVeo(RelayContract):
    @pytest.fixture
    def fake(self, comet: Fake) -> Fake:
        return Fake(comet.url, comet.api_key, extra={"options": COMET_VEO})  # every case, rebuilt ones too

    success = [Case("video", "veo3-fast", {"prompt": "waves at dusk", "aspect_ratio": "9:16"}, content_type="video/mp4",
                    options=COMET_VEO)]
    failures = failing("veo3-fast", COMET_VEO)
    slow = video("veo3-fast", "a slow one [slow]", options=COMET_VEO)


class TestDMXAPISora(RelayContract):
    @pytest.fixture
    def fake(self, dmx: Fake) -> Fake:
        return Fake(dmx.url, dmx.api_key, extra={"options": DMX_SORA})  # every case, rebuilt ones too

    success = [Case("video", "sora-2", {"prompt": "a paper boat", "duration_seconds": 4, "aspect_ratio": "9:16"},
                    content_type="video/mp4", duration=4, options=DMX_SORA)]
    failures = failing("sora-2", DMX_SORA)
    slow = video("sora-2", "a slow one [slow]", options=DMX_SORA)
    unsupported = [video("sora-2", "1080p on sora-2", resolution="1024p", options=DMX_SORA)]


class TestPoloAPIVeo(RelayContract):
    @pytest.fixture
    def fake(self, polo: Fake) -> Fake:
        return Fake(polo.url, polo.api_key, extra={"options": POLO_VEO})  # every case, rebuilt ones too

    success = [
        Case("video", "veo3.1-fast", {"prompt": "a lighthouse", "duration_seconds": 8}, content_type="video/mp4", duration=8,
             options=POLO_VEO),
        # the link only at /content, which answers JSON
        Case("video", "veo3.1", {"prompt": "the link is at content [no-url-in-poll]"}, content_type="video/mp4", options=POLO_VEO),
    ]
    failures = failing("veo3.1", POLO_VEO)
    slow = video("veo3.1", "a slow one [slow]", options=POLO_VEO)


# -- what each option is for --------------------------------------------------------------


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


def make(fake: Fake, case: Case, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> Any:
    return RelayContract().make(fake, case, http, monkeypatch)


async def stats(fake: Fake) -> dict[str, Any]:
    return await fake.stats()


async def test_comet_veo_takes_an_orientation_size_answers_another_model_and_a_video_url(
    comet: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = video("veo3-fast", "waves", options=COMET_VEO, aspect_ratio="16:9")
    before = await stats(comet)
    result, seen = await drive(make(comet, case, http, monkeypatch), AdapterContract.request(case))
    sent = (await stats(comet))["last"]
    assert sent == {"model": "veo3-fast", "prompt": "waves", "size": "16x9", "_files": []}, sent  # no seconds: Veo's own
    assert seen[0].handle["video_id"].startswith("task_") and seen[0].handle["model"] == "veo3-fast"
    assert isinstance(result, Done), result
    assert result.usage["model"] == "veo_3_1-fast"  # the relay's backend id, not the one we sent
    assert [o.role for o in result.outputs] == ["output"] and "/cdn/" in str(result.outputs[0].url)
    assert result.outputs[0].headers == {}  # the relay key never goes to its CDN
    after = await stats(comet)
    assert after["content_gets"] == before["content_gets"], "video_url was there: /content is not needed"


async def test_an_explicit_size_is_sent_untouched(comet: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    case = video("veo3-fast", "portrait", options=COMET_VEO, provider_params={"size": "9x16"})
    first = await make(comet, case, http, monkeypatch).submit(AdapterContract.request(case))
    assert isinstance(first, Pending) and (await stats(comet))["last"]["size"] == "9x16"


async def test_without_the_options_the_relay_refuses(comet: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # JSON: CometAPI takes multipart only
    case = video("veo3-fast", "json body", options={"video_size": "ratio"})
    with pytest.raises(ProviderError) as exc:
        await make(comet, case, http, monkeypatch).submit(AdapterContract.request(case))
    assert exc.value.code == ErrorCode.invalid_input and "multipart" in exc.value.message
    # Sora's WxH: CometAPI's Veo takes an orientation hint
    case = video("veo3-fast", "pixels", options={"video_multipart": True})
    with pytest.raises(ProviderError) as exc:
        await make(comet, case, http, monkeypatch).submit(AdapterContract.request(case))
    assert exc.value.code == ErrorCode.invalid_input and "16x9" in exc.value.message


async def test_relay_429_without_retry_after_waits_the_default(comet: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    for options, wait in ((COMET_SORA, 5.0), ({**COMET_SORA, "rate_limit_wait": 12}, 12.0)):
        case = video("sora-2", "busy [429]", options=options)
        with pytest.raises(ProviderError) as exc:
            await make(comet, case, http, monkeypatch).submit(AdapterContract.request(case))
        assert exc.value.code == ErrorCode.rate_limited and exc.value.retry_after == wait and exc.value.resend_safe


async def test_polo_processing_needs_the_status_option(polo: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    case = video("veo3.1", "processing", options={k: v for k, v in POLO_VEO.items() if k != "video_statuses"})
    result, _ = await drive(make(polo, case, http, monkeypatch), AdapterContract.request(case))
    assert isinstance(result, Failed) and "processing" in result.message, result


async def test_polo_content_json_gives_the_link_and_the_bare_key_is_sent(
    polo: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = video("veo3.1", "link at content [no-url-in-poll]", options=POLO_VEO)
    adapter = make(polo, case, http, monkeypatch)
    assert adapter.auth_headers()["Authorization"] == API_KEY
    before = await stats(polo)
    result, seen = await drive(adapter, AdapterContract.request(case))
    assert ":" in seen[0].handle["video_id"]  # poloapi's ids: veo3.1:1764899481-jTkhPerTVj
    assert {p.message for p in seen} >= {"queued", "in_progress"}
    assert isinstance(result, Done) and "/cdn/" in str(result.outputs[0].url) and result.outputs[0].headers == {}
    assert (await stats(polo))["content_gets"] == before["content_gets"] + 1
    # without video_content: json, the JSON page would be "the video"; with it, it never is
    case = video("veo3.1", "link in the poll", options=POLO_VEO)
    result, _ = await drive(make(polo, case, http, monkeypatch), AdapterContract.request(case))
    assert isinstance(result, Done) and "/cdn/" in str(result.outputs[0].url)
    assert (await stats(polo))["content_gets"] == before["content_gets"] + 1, "video_url in the poll: /content is skipped"


async def test_dmx_has_no_thumbnail_variant(dmx: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, seaweed: Any) -> None:
    from storage import S3BlobStore, StorageError

    store = S3BlobStore(f"r-{uuid.uuid4().hex[:12]}", endpoint_url=seaweed.endpoint_url, access_key_id=seaweed.access_key,
                        secret_access_key=seaweed.secret_key, create_bucket=True)
    await store.start()
    try:
        with_thumb = video("sora-2", "thumb", options={"video_multipart": True})
        result, _ = await drive(make(dmx, with_thumb, http, monkeypatch), AdapterContract.request(with_thumb))
        assert isinstance(result, Done) and [o.role for o in result.outputs] == ["output", "thumbnail"]
        with pytest.raises(StorageError):  # the job would fail on the thumbnail
            await store_output(store, http, result.outputs[1], key_base=f"t/{uuid.uuid4().hex}", index=1,
                               max_bytes=2**24, max_image_pixels=10**8)
        without = video("sora-2", "no thumb", options=DMX_SORA)
        result, _ = await drive(make(dmx, without, http, monkeypatch), AdapterContract.request(without))
        assert isinstance(result, Done) and [o.role for o in result.outputs] == ["output"]
        assert result.outputs[0].headers["Authorization"] == f"Bearer {API_KEY}"  # /content bytes need the key
    finally:
        await store.close()


async def test_an_unknown_video_size_option_is_the_operators_mistake(comet: Fake, http: httpx.AsyncClient,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    case = video("veo3-fast", "typo", options={"video_size": "orientation"})
    with pytest.raises(ProviderError) as exc:
        await make(comet, case, http, monkeypatch).submit(AdapterContract.request(case))
    assert exc.value.code == ErrorCode.provider_unavailable and "video_size" in exc.value.message


# -- the shipped catalogs' video deployments work against the fakes ------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kling_relay() -> Iterator[Fake]:
    with serve(kling_fake.create_app(api_key=API_KEY)) as url:
        yield Fake(url, API_KEY)


SHIPPED = [  # catalog, model id, which fake, input
    ("cometapi", "sora-2-cometapi", "comet", {"prompt": "a cat surfing", "duration_seconds": 8, "aspect_ratio": "9:16"}),
    ("cometapi", "veo3-fast-cometapi", "comet", {"prompt": "waves at dusk", "aspect_ratio": "9:16"}),
    ("cometapi", "kling-v2-1-master-cometapi", "kling", {"prompt": "a paper boat", "duration_seconds": 10, "resolution": "1080p"}),
    ("dmxapi", "sora-2-dmxapi", "dmx", {"prompt": "a paper boat", "duration_seconds": 4}),
    ("dmxapi", "kling-v2-5-turbo-dmxapi", "kling", {"prompt": "a fox", "aspect_ratio": "1:1"}),
    ("poloapi", "veo3.1-fast-poloapi", "polo", {"prompt": "a lighthouse", "provider_params": {"size": "1280x720"}}),
]


@pytest.mark.parametrize("catalog,model_id,which,inp", SHIPPED, ids=[s[1] for s in SHIPPED])
async def test_shipped_catalog_video_deployments_run_against_the_fakes(
    catalog: str, model_id: str, which: str, inp: dict[str, Any], request: pytest.FixtureRequest,
    http: httpx.AsyncClient, bucket_store: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catalog's own adapter and options, only the host swapped for the fake's: the
    input passes the model's capabilities, the job finishes and its video is stored."""
    fake: Fake = request.getfixturevalue({"comet": "comet", "dmx": "dmx", "polo": "polo", "kling": "kling_relay"}[which])
    cat = load_catalog(ROOT / "catalogs" / f"{catalog}.yaml")
    model = cat.get(model_id)
    assert model is not None
    normalized = cat.validate_input(model, inp)
    dep = model.deployments[0]
    base = fake.url  # kling's fake: the host root, as the catalog's; the relay fakes: .../v1, as theirs
    monkeypatch.setenv(str(dep.api_key_env), API_KEY)
    test_dep = dep.model_copy(update={"base_url": base, "options": {**dep.options, "poll_interval": 0.02}})
    adapter = build_adapter(test_dep, http)
    req = ProviderRequest(job_id=f"job_{uuid.uuid4().hex}", tenant="t", modality="video", provider_model=dep.model, input=normalized)
    result, _ = await drive(adapter, req)
    assert isinstance(result, Done), result
    stored = [await store_output(bucket_store, http, ref, key_base=f"t/{uuid.uuid4().hex}", index=i,
                                 max_bytes=2**24, max_image_pixels=10**8) for i, ref in enumerate(result.outputs)]
    assert stored[0].content_type == "video/mp4"


@pytest.fixture
async def bucket_store(seaweed: Any) -> Any:
    from storage import S3BlobStore

    store = S3BlobStore(f"s-{uuid.uuid4().hex[:12]}", endpoint_url=seaweed.endpoint_url, access_key_id=seaweed.access_key,
                        secret_access_key=seaweed.secret_key, create_bucket=True)
    await store.start()
    yield store
    await store.close()
