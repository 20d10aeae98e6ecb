"""One contract, run against every adapter over real HTTP to its fake provider.

A provider's test module subclasses `AdapterContract`, provides the fixture `fake`
(module-scoped: the running fake and its settings) and the class attributes below, and
inherits every test. Adapters are driven directly (submit, then poll until the end, as the
worker does) with a real httpx client, and outputs are stored in a real S3 bucket, where
image sizes and MP4 durations are read back from the stored file.

What every adapter must show: success with stored media; failures (input and output
moderation with their stage among them) as job error codes; a bad key as provider_auth;
a 429 carrying a wait; a 5xx on a create retryable but never resent nor fallen back; a 5xx
on a poll retried with exactly one task created upstream; an unknown task id as
provider_error; refused parameters never sent; progress rising; cancel (or, where the
provider has none, `supports_cancel = False`: `cancel()` sends nothing, and the job is
canceled on our side); an expired result URL never stored.

Fakes are scripted by keywords in the prompt (or `text` for speech), the same for all:

    [moderated]         the provider refuses the input (input moderation)
    [moderated-output]  the provider flags the output after running (output moderation)
    [fail]              the provider runs the task and it fails
    [429]               the create answers 429 with a retry-after
    [500]               the create answers 500
    [poll500]           the first poll answers a transient 500
    [slow]              pending for many polls, progress rising (for cancel and progress tests)
    [expired]           the result URL has already expired when fetched (403/404)
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pytest

from adapters.base import Adapter
from adapters.registry import build_adapter
from core.errors import ErrorCode, Fault, ProviderError
from core.routing.catalog import Deployment
from core.routing.router import can_fall_back
from core.types import Done, Failed, Pending, PollResult, ProviderRequest
from storage import S3BlobStore, StorageError, store_output


@dataclass
class Fake:
    """What a fake provider's fixture yields."""

    url: str  # base URL the deployment points at
    api_key: str  # the key the fake accepts
    extra: dict[str, Any] = field(default_factory=dict)

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as c:
            return (await c.get(f"{self.url}/_control/stats")).json()


@dataclass
class Case:
    """One scenario: a normalized job input for a model, and what must come out."""

    modality: str
    model: str  # the provider model id (Deployment.model)
    input: dict[str, Any]
    content_type: str | None = None  # of the first stored output
    size: tuple[int, int] | None = None  # width, height of the first output, if an image
    duration: float | None = None  # seconds of the first output, if a video (read from the stored file)
    outputs: int = 1
    code: ErrorCode | None = None  # for failure cases: the job error code
    stage: str | None = None  # for moderation: "input" or "output"
    options: dict[str, Any] = field(default_factory=dict)  # extra deployment options


async def drive(adapter: Adapter, request: ProviderRequest, *, max_polls: int = 200,
                retried: list[ProviderError] | None = None) -> tuple[PollResult, list[Pending]]:
    """Submit, then poll until the result is final, as the worker would (fast cadence).
    Retryable poll errors are re-polled, as the worker re-schedules them (and kept in `retried`)."""
    result: PollResult = await adapter.submit(request)
    seen: list[Pending] = []
    polls = 0
    while isinstance(result, Pending):
        seen.append(result)
        polls += 1
        assert polls <= max_polls, "still pending after too many polls"
        await asyncio.sleep(min(result.poll_after, 0.02))
        try:
            result = await adapter.poll(result.handle)
        except ProviderError as exc:
            if exc.retryable:  # the worker re-schedules the poll
                if retried is not None:
                    retried.append(exc)
                continue
            raise
    return result, seen


class AdapterContract:
    adapter: ClassVar[str]  # registry name
    api_key_env: ClassVar[str]  # env var the deployment reads its key from
    success: ClassVar[list[Case]]
    failures: ClassVar[list[Case]]
    slow: ClassVar[Case | None] = None  # a case whose prompt has [slow]; None: no cancel/progress test
    supports_cancel: ClassVar[bool] = True
    unsupported: ClassVar[list[Case]] = []  # inputs the adapter must refuse before sending
    # the handle key naming the provider's task id (None: every task finishes inside submit)
    task_id_key: ClassVar[str | None] = None

    # -- plumbing ----------------------------------------------------------------------
    @pytest.fixture
    async def http(self) -> Any:
        async with httpx.AsyncClient(timeout=30) as c:
            yield c

    @pytest.fixture
    async def bucket(self, seaweed: Any) -> Any:
        store = S3BlobStore(
            f"c-{uuid.uuid4().hex[:12]}",
            endpoint_url=seaweed.endpoint_url,
            access_key_id=seaweed.access_key,
            secret_access_key=seaweed.secret_key,
            create_bucket=True,
        )
        await store.start()
        yield store
        await store.close()

    def make(self, fake: Fake, case: Case, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, key: str | None = None) -> Adapter:
        monkeypatch.setenv(self.api_key_env, key if key is not None else fake.api_key)
        dep = Deployment(
            name=f"{self.adapter}-test",
            adapter=self.adapter,
            model=case.model,
            base_url=fake.url,
            api_key_env=self.api_key_env,
            options={"poll_interval": 0.02, **fake.extra.get("options", {}), **case.options},
        )
        return build_adapter(dep, http)

    async def _first_pending(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
                             keyword: str = "") -> tuple[Adapter, Pending, int]:
        """Submit the first success case (with `keyword` in its prompt) that leaves a task to
        poll: its adapter, its Pending, and the fake's count of creates before it was sent."""
        for case in self.success:
            asked = Case(case.modality, case.model, _with_keyword(case.input, keyword) if keyword else case.input,
                         options=case.options)
            adapter = self.make(fake, asked, http, monkeypatch)
            before = (await fake.stats()).get("creates", 0)
            first = await adapter.submit(self.request(asked))
            if isinstance(first, Pending):
                return adapter, first, before
        pytest.skip("every task finishes inside submit: there is no task to poll")

    @staticmethod
    def request(case: Case) -> ProviderRequest:
        return ProviderRequest(
            job_id=f"job_{uuid.uuid4().hex}",
            tenant="t",
            modality=case.modality,
            provider_model=case.model,
            input=case.input,
        )

    # -- the contract ------------------------------------------------------------------
    async def test_success_stores_outputs(self, fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        for case in self.success:
            adapter = self.make(fake, case, http, monkeypatch)
            result, _ = await drive(adapter, self.request(case))
            assert isinstance(result, Done), (case, result)
            assert len([o for o in result.outputs if o.role == "output"]) == case.outputs, result.outputs
            stored = [
                await store_output(bucket, http, ref, key_base=f"t/{uuid.uuid4().hex}", index=i,
                                   max_bytes=200 * 2**20, max_image_pixels=64_000_000)
                for i, ref in enumerate(result.outputs)
            ]
            first = stored[0]
            assert first.bytes > 0
            if case.content_type:
                assert first.content_type == case.content_type, (case.model, first)
            if case.size:
                assert (first.width, first.height) == case.size, (case.model, first)
            if first.content_type == "video/mp4":  # a playable video (the probe reads MP4 durations)
                assert first.duration_seconds is not None and first.duration_seconds > 0, (case.model, first)
            if case.duration is not None:
                assert first.duration_seconds == pytest.approx(case.duration, abs=0.1), (case.model, first)

    async def test_failures_map_to_error_codes(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for case in self.failures:
            adapter = self.make(fake, case, http, monkeypatch)
            try:
                result, _ = await drive(adapter, self.request(case))
            except ProviderError as exc:
                code, detail = exc.code, exc.detail
            else:
                assert isinstance(result, Failed), (case, result)
                code, detail = result.code, result.detail
            assert code == case.code, (case.input, code, detail)
            if case.stage:
                assert isinstance(detail, dict) and detail.get("stage") == case.stage, detail

    async def test_bad_key_is_provider_auth(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        adapter = self.make(fake, self.success[0], http, monkeypatch, key="wrong-key")
        with pytest.raises(ProviderError) as exc:
            await drive(adapter, self.request(self.success[0]))
        assert exc.value.code == ErrorCode.provider_auth and not exc.value.retryable

    async def test_rate_limit_carries_retry_after_and_is_resend_safe(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        limited = Case(case.modality, case.model, _with_keyword(case.input, "[429]"))
        adapter = self.make(fake, limited, http, monkeypatch)
        with pytest.raises(ProviderError) as exc:
            await adapter.submit(self.request(limited))
        assert exc.value.code == ErrorCode.rate_limited and exc.value.resend_safe
        assert exc.value.retry_after is not None and exc.value.retry_after > 0

    async def test_transient_5xx_is_retryable_but_not_resent(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """A 5xx on a create is the provider's trouble, but it may follow an accepted task (a
        gateway's 502/504): no provider dedupes creates, so it is not marked safe to resend."""
        case = self.success[0]
        broken = Case(case.modality, case.model, _with_keyword(case.input, "[500]"))
        adapter = self.make(fake, broken, http, monkeypatch)
        with pytest.raises(ProviderError) as exc:
            await adapter.submit(self.request(broken))
        assert exc.value.retryable and not exc.value.resend_safe and exc.value.fault is Fault.provider
        assert not can_fall_back(exc.value), "a second create elsewhere could run (and bill) the task twice"

    async def test_transient_5xx_on_a_poll_is_retried_without_a_second_task(self, fake: Fake, http: httpx.AsyncClient,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        """The first poll answers 500: the poll is retried (the worker re-schedules it), the job
        finishes, and the provider saw exactly one create."""
        adapter, first, before = await self._first_pending(fake, http, monkeypatch, "[poll500]")
        retried: list[ProviderError] = []
        result: PollResult = first
        for _ in range(200):
            if not isinstance(result, Pending):
                break
            await asyncio.sleep(min(result.poll_after, 0.02))
            try:
                result = await adapter.poll(result.handle)
            except ProviderError as exc:
                assert exc.retryable and exc.fault is Fault.provider, exc
                retried.append(exc)
        assert isinstance(result, Done), result
        assert retried, "the fake's first poll answers 500: the adapter must have seen it"
        assert (await fake.stats()).get("creates", 0) - before == 1, "a poll error must never create a second task"

    async def test_unknown_task_fails_cleanly(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """A task the provider does not know (expired, deleted, another account's) ends the job
        as provider_error, after any grace the adapter gives a task it has just created."""
        if self.task_id_key is None:
            pytest.skip("every task finishes inside submit: there is no task to lose")
        adapter, first, _ = await self._first_pending(fake, http, monkeypatch)
        task_id = str(first.handle[self.task_id_key])
        ghost = f"no-such-task-{uuid.uuid4().hex[:8]}"
        handle = {k: v.replace(task_id, ghost) if isinstance(v, str) else v for k, v in first.handle.items()}
        result: PollResult | None = None
        for _ in range(50):  # past any short grace for a task the provider has not registered yet
            try:
                result = await adapter.poll(handle)
            except ProviderError as exc:
                assert not exc.retryable and exc.code == ErrorCode.provider_error, exc
                return
            if not isinstance(result, Pending):
                break
            handle = result.handle
            await asyncio.sleep(0.01)
        assert isinstance(result, Failed) and result.code == ErrorCode.provider_error, result

    async def test_unsupported_parameters_are_refused_before_sending(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        for case in self.unsupported:
            before = (await fake.stats()).get("creates", 0)
            adapter = self.make(fake, case, http, monkeypatch)
            with pytest.raises(ProviderError) as exc:
                await adapter.submit(self.request(case))
            assert exc.value.code == ErrorCode.invalid_input, exc.value
            assert exc.value.detail and exc.value.detail.get("loc"), exc.value.detail
            assert (await fake.stats()).get("creates", 0) == before, "refused input reached the provider"

    async def test_progress_rises(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        if self.slow is None:
            pytest.skip("this provider reports no progress")
        adapter = self.make(fake, self.slow, http, monkeypatch)
        result, seen = await drive(adapter, self.request(self.slow), max_polls=500)
        assert isinstance(result, Done)
        progress = [p.progress for p in seen if p.progress is not None]
        assert progress and progress == sorted(progress) and progress[-1] > progress[0], progress

    async def test_cancel(self, fake: Fake, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
        if self.slow is None or not self.supports_cancel:
            pytest.skip("this provider has no cancel")
        adapter = self.make(fake, self.slow, http, monkeypatch)
        first = await adapter.submit(self.request(self.slow))
        assert isinstance(first, Pending)
        await adapter.cancel(first.handle)
        result = await adapter.poll(first.handle)
        assert isinstance(result, Failed) and result.code == ErrorCode.canceled, result

    async def test_cancel_without_a_provider_cancel_sends_nothing(self, fake: Fake, http: httpx.AsyncClient,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """Where the provider has no cancel, `cancel()` returns quietly and the provider hears
        nothing: the job is canceled on our side (the worker's poller drops it)."""
        if self.supports_cancel:
            pytest.skip("this provider has a cancel: test_cancel")
        adapter, first, _ = await self._first_pending(fake, http, monkeypatch)
        before = await fake.stats()
        sent: list[str] = []

        async def record(request: httpx.Request) -> None:
            sent.append(f"{request.method} {request.url}")

        http.event_hooks["request"].append(record)
        try:
            await adapter.cancel(first.handle)
        finally:
            http.event_hooks["request"].remove(record)
        assert not sent, f"a local cancel sent {sent}"
        assert await fake.stats() == before, "a local cancel reached the provider"

    async def test_expired_result_url_is_never_stored_as_output(self,
            fake: Fake, http: httpx.AsyncClient, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        case = self.success[0]
        expired = Case(case.modality, case.model, _with_keyword(case.input, "[expired]"))
        adapter = self.make(fake, expired, http, monkeypatch)
        try:
            result, _ = await drive(adapter, self.request(expired))
        except ProviderError as exc:
            assert exc.code == ErrorCode.provider_error, exc
            return
        assert isinstance(result, Done | Failed)
        if isinstance(result, Failed):
            assert result.code == ErrorCode.provider_error
            return
        urls = [o for o in result.outputs if o.url]
        if not urls:
            return  # the adapter read the bytes in time
        with pytest.raises(StorageError) as exc:
            for i, ref in enumerate(result.outputs):
                await store_output(bucket, http, ref, key_base=f"t/{uuid.uuid4().hex}", index=i,
                                   max_bytes=2**20, max_image_pixels=64_000_000)
        assert exc.value.code == ErrorCode.provider_error and "expired" in str(exc.value).lower()


def _with_keyword(inp: dict[str, Any], keyword: str) -> dict[str, Any]:
    out = dict(inp)
    field_name = "prompt" if "prompt" in out else "text"
    out[field_name] = f"{out.get(field_name, '')} {keyword}".strip()
    return out
