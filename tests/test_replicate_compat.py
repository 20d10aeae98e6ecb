"""The official `replicate` Python client (PyPI, 1.x) against a real genroute stack (API and
worker processes, Redis, the local provider, and the Replicate fake as an upstream), pointed
at genroute only through its documented `base_url`: run, create/wait, get, cancel, list
with cursor pages, a webhook with an event filter verified with `standardwebhooks`, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import replicate
import yaml
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput
from replicate.pagination import paginate
from standardwebhooks import Webhook

from core.routing.catalog import DEFAULT_CATALOG
from tests.fakes import replicate as replicate_fake
from tests.fakes.server import serve
from tests.stack import Stack, make_stack, running
from tests.test_webhooks import Receiver

FAKE_KEY = "r8_compat"


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with serve(replicate_fake.create_app(api_key=FAKE_KEY, processing_polls=2, slow_polls=600)) as url:
        yield url


def _catalog(path: Path, fake_url: str) -> Path:
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    for m in data["models"]:
        if m["id"] == "local-image":
            m["aliases"] = ["acme/local-image"]
    data["models"].append({
        "id": "flux-schnell-r", "modality": "image", "aliases": ["black-forest-labs/flux-schnell"],
        "deployments": [{"name": "replicate-flux-schnell", "adapter": "replicate", "model": "black-forest-labs/flux-schnell",
                         "base_url": fake_url, "api_key_env": "COMPAT_REPLICATE_KEY", "options": {"poll_interval": 0.05}}],
    })
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(fake: str, tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("replicate-compat")
    st = await make_stack(root, redis_url=f"{redis_base}/0", catalog=_catalog(root / "catalog.yaml", fake),
                          env={"COMPAT_REPLICATE_KEY": FAKE_KEY}, webhook_allowlist='["127.0.0.1/32"]',
                          replicate_page_size="3", webhook_backoff_seconds="[0.2, 0.5, 1]")
    async with running(st):
        yield st


def client(stack: Stack, tenant: str = "alice") -> replicate.Client:
    return replicate.Client(api_token=stack.keys[tenant], base_url=f"{stack.api_url}/replicate")


def local(prompt: str, latency: float = 0.0, steps: int = 2, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "width": 256, "height": 256, "latency_seconds": latency, "progress_steps": steps, **extra}


def outputs_of(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{stack.api_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {stack.keys['alice']}"})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_run_returns_outputs_the_clients_file_output_reads(stack: Stack) -> None:
    c = client(stack)
    out = c.run("acme/local-image", input=local("a red kite", seed=7))
    url = str(out[0] if isinstance(out, list) else out)
    data = FileOutput(url, c).read()  # the client's own reader (it takes https/data URLs itself)
    latest = c.predictions.list().results[0]
    assert latest.status == "succeeded" and latest.model == "acme/local-image"
    assert hashlib.sha256(data).hexdigest() == outputs_of(stack, latest.id)[0]["sha256"]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_falls_back_to_polling_when_the_wait_runs_out(stack: Stack) -> None:
    c = client(stack)
    started = time.monotonic()
    out = c.run("acme/local-image", input=local("slow kite", latency=2.5, steps=3, seed=1), wait=1)
    took = time.monotonic() - started
    assert out and took >= 2.0, took  # the create answered `starting` after 1 s, then the client polled
    assert FileOutput(str(out), c).read()[:4] == b"\x89PNG"


def test_create_wait_get_with_logs_metrics_and_urls(stack: Stack) -> None:
    c = client(stack)
    p = c.predictions.create(model="acme/local-image", input=local("a tower", latency=1.0, steps=3, seed=3))
    assert p.status in ("starting", "processing") and p.urls is not None
    assert p.urls["get"].endswith(f"/replicate/v1/predictions/{p.id}") and p.urls["cancel"].endswith("/cancel")
    p.wait()
    assert p.status == "succeeded", (p.status, p.error)
    assert p.metrics is not None and 0.5 < p.metrics["predict_time"] < 30
    assert p.completed_at and p.started_at and p.error is None
    assert "step" in (p.logs or ""), p.logs  # the progress messages, one a line
    again = c.predictions.get(p.id)
    assert again.id == p.id and again.status == "succeeded" and again.output == p.output
    assert p.version == c.models.get("acme/local-image").latest_version.id


def test_create_by_version_string_and_by_genroute_name(stack: Stack) -> None:
    c = client(stack)
    p = c.predictions.create(version="acme/local-image:" + "ab" * 32, input=local("by version", seed=4), wait=30)
    assert p.status == "succeeded"
    # (the client drops `wait` when create() is given model=, so this one polls)
    q = c.predictions.create(model="genroute/local-audio", input={"text": "hello", "duration": 1})
    q.wait()
    assert q.status == "succeeded" and str(q.output).startswith("http")
    assert FileOutput(str(q.output), c).read()[:4] == b"RIFF"


def test_cancel_a_running_prediction(stack: Stack) -> None:
    c = client(stack)
    p = c.predictions.create(model="acme/local-image", input=local("never", latency=30, steps=30, seed=5))
    deadline = time.monotonic() + 20
    while c.predictions.get(p.id).status == "starting" and time.monotonic() < deadline:
        time.sleep(0.1)
    canceled = c.predictions.cancel(p.id)
    assert canceled.status == "canceled" and canceled.output is None
    p.reload()
    assert p.status == "canceled"
    assert c.predictions.cancel(p.id).status == "canceled"  # a finished prediction comes back unchanged


def test_list_walks_every_page_with_the_cursor(stack: Stack) -> None:
    c = client(stack, "bob")  # bob's predictions only
    made = [c.predictions.create(model="acme/local-image", input=local(f"page {i}", seed=i)).id for i in range(7)]
    pages = list(paginate(c.predictions.list))
    seen = [p.id for pg in pages for p in pg.results]
    assert all(len(pg.results) <= 3 for pg in pages) and len(pages) >= 3
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen))  # newest first, none twice
    assert set(made) <= set(seen)
    alice_ids = {p.id for p in client(stack).predictions.list().results}
    assert not alice_ids & set(seen)  # never another tenant's


def test_errors_come_back_as_replicate_errors_with_our_code(stack: Stack) -> None:
    c = client(stack)
    with pytest.raises(ReplicateError) as e:
        c.predictions.create(model="nobody/nothing", input={"prompt": "x"})
    assert e.value.status == 404 and "nobody/nothing" in (e.value.detail or "")
    with pytest.raises(ReplicateError) as e:
        c.predictions.create(model="acme/local-image", input={"prompt": "x", "num_outputs": 99})
    assert e.value.status == 422
    with pytest.raises(ReplicateError) as e:
        c.predictions.get("job_doesnotexist")
    assert e.value.status == 404
    with pytest.raises(ReplicateError) as e:
        replicate.Client(api_token="wrong", base_url=f"{stack.api_url}/replicate").predictions.list()
    assert e.value.status == 401


def test_model_served_by_the_replicate_fake(stack: Stack, fake: str) -> None:
    before = httpx.get(f"{fake}/_control/stats").json()["creates"]
    c = client(stack)
    out = c.run("black-forest-labs/flux-schnell", input={"prompt": "a cabin", "num_outputs": 1, "output_format": "webp", "seed": 9})
    assert isinstance(out, list) and len(out) == 1
    data = FileOutput(str(out[0]), c).read()  # stored by genroute, not the fake's URL
    assert data[:4] == b"RIFF" and str(out[0]).startswith(stack.api_url)
    assert httpx.get(f"{fake}/_control/stats").json()["creates"] == before + 1


async def test_webhook_with_an_event_filter_is_signed_and_replicate_shaped(stack: Stack) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        c = client(stack)
        secret = (await asyncio.to_thread(c.webhooks.default.secret)).key
        assert secret.startswith("whsec_")
        p = await asyncio.to_thread(
            c.predictions.create, model="acme/local-image", input=local("hooked", latency=0.8, steps=4, seed=11),
            webhook=receiver.url("/replicate-hook?customId=42"), webhook_events_filter=["start", "completed"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            bodies = [json.loads(b) for _, b in receiver.received]
            if any(b.get("status") == "succeeded" for b in bodies):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # nothing else may follow
        wh = Webhook(secret)
        bodies = []
        for headers, raw in receiver.received:
            wh.verify(raw, {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
            bodies.append(json.loads(raw))
        assert [b["status"] for b in bodies] == ["processing", "succeeded"], bodies  # start, completed; no logs/output
        assert all(b["id"] == p.id for b in bodies)
        done = bodies[-1]
        assert done["output"] and done["metrics"]["predict_time"] > 0 and done["urls"]["get"].endswith(p.id)
        assert "step" in done["logs"]
        assert done["webhook"].endswith("?customId=42")
    finally:
        await receiver.stop()


def _fake_stats(fake: str) -> dict[str, int]:
    return httpx.get(f"{fake}/_control/stats").json()


def test_create_wait_get_and_a_failure_on_the_replicate_fake(stack: Stack, fake: str) -> None:
    c = client(stack)
    before = _fake_stats(fake)["creates"]
    p = c.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "a mill", "num_outputs": 1, "seed": 2})
    p.wait()
    assert p.status == "succeeded" and p.error is None and p.metrics and p.metrics["predict_time"] >= 0, p
    got = c.predictions.get(p.id)
    assert got.status == "succeeded" and got.model == "black-forest-labs/flux-schnell"
    # the same stored files (each read signs a fresh URL, whose expiry may differ by a second)
    assert [urlsplit(str(o)).path for o in got.output] == [urlsplit(str(o)).path for o in p.output]
    assert FileOutput(str(p.output[0]), c).read()[:4] == b"RIFF"  # webp, stored by genroute
    with pytest.raises(ModelError) as e:
        c.run("black-forest-labs/flux-schnell", input={"prompt": "[fail] a mill", "num_outputs": 1})
    failed = e.value.prediction
    assert failed.status == "failed" and isinstance(failed.error, str) and failed.error, failed
    assert c.predictions.get(failed.id).status == "failed"
    assert _fake_stats(fake)["creates"] == before + 2


def test_cancel_on_the_replicate_fake_reaches_the_provider(stack: Stack, fake: str) -> None:
    c = client(stack)
    cancels = _fake_stats(fake)["cancels"]
    p = c.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "[slow] a barn", "num_outputs": 1})
    deadline = time.monotonic() + 20
    while c.predictions.get(p.id).status != "processing" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.predictions.get(p.id).status == "processing"
    assert c.predictions.cancel(p.id).status == "canceled"
    deadline = time.monotonic() + 15
    while _fake_stats(fake)["cancels"] <= cancels and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _fake_stats(fake)["cancels"] == cancels + 1  # the fake's prediction was told to stop
    p.reload()
    assert p.status == "canceled" and p.output is None


async def test_webhook_with_an_event_filter_on_the_replicate_fake(stack: Stack) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        c = client(stack)
        secret = (await asyncio.to_thread(c.webhooks.default.secret)).key
        p = await asyncio.to_thread(
            c.predictions.create, model="black-forest-labs/flux-schnell", input={"prompt": "a pier", "num_outputs": 1},
            webhook=receiver.url("/fake-hook"), webhook_events_filter=["completed"])
        deadline = time.monotonic() + 30
        while not receiver.received and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # nothing else may follow
        assert len(receiver.received) == 1, [json.loads(b)["status"] for _, b in receiver.received]
        headers, raw = receiver.received[0]
        Webhook(secret).verify(raw, {k: headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")})
        body = json.loads(raw)
        assert body["id"] == p.id and body["status"] == "succeeded" and body["output"], body
        assert body["model"] == "black-forest-labs/flux-schnell" and str(body["output"][0]).startswith(stack.api_url)
    finally:
        await receiver.stop()


def test_stream_follows_urls_stream_to_the_end(stack: Stack) -> None:
    """`replicate.stream` creates with stream=true and reads `urls.stream` (SSE): output
    events carry the stored file's URL, then `done`."""
    from replicate.stream import ServerSentEvent

    c = client(stack)
    events = list(c.stream("acme/local-image", input=local("a streamed kite", latency=0.6, steps=3, seed=21)))
    kinds = [e.event for e in events]
    assert ServerSentEvent.EventType.OUTPUT in kinds, events
    assert kinds[-1] == ServerSentEvent.EventType.DONE and ServerSentEvent.EventType.ERROR not in kinds, events
    urls = [e.data for e in events if e.event == ServerSentEvent.EventType.OUTPUT]
    latest = c.predictions.list().results[0]
    assert latest.status == "succeeded" and str(urls[-1]) in str(latest.output), (urls, latest.output)
    assert FileOutput(str(urls[-1]), c).read()[:4] == b"\x89PNG"


def test_stream_of_a_prediction_whose_event_history_is_gone(stack: Stack) -> None:
    """A job's event history in Redis lasts a day and goes with a Redis that lost its data:
    the SSE stream then follows the live events from nothing replayed and still ends with
    `done` (it used to start from the int 0 where a (seq, sub) position belongs, and broke
    on the first live event)."""
    import redis as redis_sync

    c = client(stack)
    p = c.predictions.create(model="acme/local-image", input=local("a kite with no history", latency=6, steps=2, seed=23))
    r = redis_sync.Redis.from_url(stack.env["GENROUTE_REDIS_URL"])
    try:
        r.delete(f"{stack.env['GENROUTE_REDIS_PREFIX']}:events:{p.id}")
    finally:
        r.close()
    kinds: list[str] = []
    url = f"{stack.api_url}/replicate/v1/predictions/{p.id}/stream"
    with httpx.Client(timeout=30) as h, h.stream("GET", url, headers={"Authorization": f"Bearer {stack.keys['alice']}"}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: ").strip())
                if kinds[-1] == "done":
                    break
    assert kinds and kinds[-1] == "done" and "output" in kinds and "error" not in kinds, kinds


async def test_the_stream_says_done_only_once_the_finish_has_committed() -> None:
    """A job's terminal events reach Redis just before its row commits (published while the
    row is locked): the stream holds `output` and `done` until the commit shows, so an
    output's URL exists and a client reading the prediction after `done` finds it finished
    (seen on a loaded machine: an empty output URL, then `processing` after `done`)."""
    from types import SimpleNamespace

    from api.replicate.routes import _sse
    from core.events import Event

    reads: list[str] = []
    commit_after = 3  # the row reads "running" twice more, then the commit shows

    class Ledger:
        async def get(self, job_id: str) -> Any:
            reads.append(job_id)
            return SimpleNamespace(status="running" if len(reads) < commit_after else "succeeded")

        async def assets(self, ids: list[str]) -> dict[str, list[Any]]:
            committed = len(reads) >= commit_after
            return {ids[0]: [SimpleNamespace(index=0, key="t/a.png")] if committed else []}

    class Store:
        async def url(self, key: str, expires_in: int) -> str:
            return f"http://files/{key}"

    rt: Any = SimpleNamespace(ledger=Ledger(), store=Store(), settings=SimpleNamespace(url_ttl_seconds=60))
    output = Event("job_x:5", 5, "job_x", "job.output", "2026-12-04T00:00:00Z", {"index": 0})
    lines = [line async for line in _sse(rt, output)]
    assert lines == ["event: output\nid: job_x:5\ndata: http://files/t/a.png\n\n"], lines
    assert len(reads) == commit_after
    done = Event("job_x:6", 6, "job_x", "job.succeeded", "2026-12-04T00:00:00Z", {})
    assert [line async for line in _sse(rt, done)] == ["event: done\ndata: {}\n\n"]
