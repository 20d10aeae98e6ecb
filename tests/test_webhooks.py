"""Webhooks end to end: real API + worker processes deliver to real HTTP receivers on
loopback; signatures are checked with the `standardwebhooks` package from PyPI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from cli.embedded import free_port
from core import netguard
from core.db import normalize_url
from core.migrate import alembic_config, upgrade
from core.settings import Settings
from tests.services import fresh_postgres
from tests.stack import Stack, make_stack, running

BACKOFF = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.0]  # 8 retries, ~4.8 s in all
ALL_EVENTS = ["job.queued", "job.started", "job.progress", "job.output", "job.succeeded", "job.failed", "job.canceled"]


class Receiver:
    """An HTTP server on loopback that records what it is sent. `mode`: ok | fail (500) |
    hold (the request is read and not answered while the mode lasts; counted in `held`)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mode = "ok"
        self.received: list[tuple[dict[str, str], bytes]] = []  # answered 2xx
        self.hits = 0
        self.held = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def app(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.hits += 1
        if self.mode == "hold":
            self.held += 1
            while self.mode == "hold":  # answered by no one (the sender was killed), then dropped
                await asyncio.sleep(0.05)
            return
        if scope["path"] == "/redirect":
            await send({"type": "http.response.start", "status": 302, "headers": [(b"location", self.url().encode())]})
        else:
            status = 200 if self.mode == "ok" else 500
            if status == 200:
                self.received.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
            await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def start(self) -> None:
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="off", interface="asgi3"))
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    def events(self, job_id: str) -> list[dict]:
        return [json.loads(b) for _, b in self.received if json.loads(b)["job_id"] == job_id]


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    st = await make_stack(
        tmp_path_factory.mktemp("webhooks"),
        redis_url=f"{redis_base}/0",
        webhook_allowlist='["127.0.0.1/32"]',
        webhook_backoff_seconds=json.dumps(BACKOFF),
        webhook_timeout_seconds="3",
        webhook_endpoint_cache_seconds="0.5",
    )
    async with running(st):
        yield st


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def _job(i: Any, url: str | None, events: list[str] | None = None, latency: float = 0.6, steps: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "local-image", "input": {"prompt": f"hook {i}", "size": "256x256",
                                                             "provider_params": {"latency_seconds": latency, "progress_steps": steps}}}
    if url is not None:
        body["webhook_url"] = url
    if events is not None:
        body["webhook_events"] = events
    return body


async def deliveries(c: httpx.AsyncClient, **params: Any) -> list[dict]:
    r = await c.get("/v1/webhooks/deliveries", params={"limit": 100, **params})
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def settle(c: httpx.AsyncClient, job_ids: list[str], timeout: float = 30) -> list[dict]:
    """Wait until every job ended and none of its deliveries is pending."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [(await c.get(f"/v1/jobs/{j}")).json() for j in job_ids]
        ds = [d for j in job_ids for d in await deliveries(c, job_id=j)]
        if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) and ds and all(d["status"] != "pending" for d in ds):
            return ds
        assert time.monotonic() < deadline, [(d["event_type"], d["status"], d["attempt_count"]) for d in ds]
        await asyncio.sleep(0.2)


def assert_in_order_and_complete(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert events[0]["type"] == "job.queued" and events[-1]["type"] == "job.succeeded", [e["type"] for e in events]


# ------------------------------------------------------------------------------------------
async def test_signed_deliveries_verify_with_standardwebhooks_across_a_rotation(stack: Stack, receiver: Receiver) -> None:
    async with stack.client() as c:
        secret = (await c.get("/v1/webhooks/secret")).json()["secret"]
        assert secret.startswith("whsec_") and (await c.get("/v1/webhooks/secret")).json()["secret"] == secret
        job_id = (await c.post("/v1/jobs", json=_job("signed", receiver.url(), ALL_EVENTS))).json()["id"]
        await settle(c, [job_id])
        events = receiver.events(job_id)
        assert_in_order_and_complete(events)
        for headers, body in receiver.received:
            assert Webhook(secret).verify(body, headers)["job_id"] == job_id  # raises if the signature is wrong
            assert headers["webhook-id"].startswith("whd_") and headers["content-type"] == "application/json"
            with pytest.raises(WebhookVerificationError):
                Webhook("whsec_" + "A" * 43 + "=").verify(body, headers)
            with pytest.raises(WebhookVerificationError):  # the body is what was signed
                Webhook(secret).verify(body.replace(b"job.", b"jab."), headers)

        # rotate: during the overlap both secrets sign every delivery
        rotated = (await c.post("/v1/webhooks/secret/rotate")).json()
        assert rotated["secret"] != secret and rotated["previous_secret"] == secret
        receiver.received.clear()
        job2 = (await c.post("/v1/jobs", json=_job("rotated", receiver.url()))).json()["id"]  # terminal events only
        await settle(c, [job2])
        assert [e["type"] for e in receiver.events(job2)] == ["job.succeeded"]
        headers, body = receiver.received[0]
        assert len(headers["webhook-signature"].split(" ")) == 2
        Webhook(rotated["secret"]).verify(body, headers)
        Webhook(secret).verify(body, headers)
        # another tenant has its own secret, which does not verify alice's deliveries
        async with stack.client("bob") as bob:
            bob_secret = (await bob.get("/v1/webhooks/secret")).json()["secret"]
        with pytest.raises(WebhookVerificationError):
            Webhook(bob_secret).verify(body, headers)


async def test_a_receiver_that_is_down_then_fails_then_recovers_gets_every_event_in_order(stack: Stack) -> None:
    receiver = Receiver()  # its port is closed: connection refused
    async with stack.client() as c:
        ids = [(await c.post("/v1/jobs", json=_job(f"outage {i}", receiver.url(), ALL_EVENTS))).json()["id"] for i in range(3)]
        await asyncio.sleep(1.2)
        receiver.mode = "fail"  # up, but answering 500
        await receiver.start()
        try:
            await asyncio.sleep(1.2)
            assert receiver.hits > 0 and receiver.received == []
            receiver.mode = "ok"
            ds = await settle(c, ids, timeout=40)
        finally:
            await receiver.stop()
    assert all(d["status"] == "delivered" for d in ds), [(d["event_type"], d["status"]) for d in ds]
    for job_id in ids:
        events = receiver.events(job_id)
        assert_in_order_and_complete(events)  # none lost, none twice, in seq order
        assert len(events) == len([d for d in ds if d["job_id"] == job_id])
    attempts = [a for d in ds for a in d["attempts"]]
    assert any(a["status_code"] is None and "Connect" in (a["error"] or "") for a in attempts), attempts[:3]
    assert any(a["status_code"] == 500 and a["error"] == "HTTP 500" for a in attempts)
    assert all(isinstance(a["latency_ms"], int) for a in attempts)
    retried = [d for d in ds if d["attempt_count"] > 1]
    assert retried and all(d["attempts"][-1]["status_code"] == 200 for d in ds)


async def test_a_failing_receiver_is_exhausted_listed_and_can_be_redelivered(stack: Stack, receiver: Receiver) -> None:
    receiver.mode = "fail"
    async with stack.client() as c:
        job_id = (await c.post("/v1/jobs", json=_job("doomed", receiver.url()))).json()["id"]
        (d,) = await settle(c, [job_id], timeout=40)
        assert d["status"] == "exhausted" and d["attempt_count"] == 1 + len(BACKOFF)
        assert [a["status_code"] for a in d["attempts"]] == [500] * (1 + len(BACKOFF))
        listed = await deliveries(c, status="exhausted")
        assert d["id"] in {x["id"] for x in listed}
        # the receiver is fixed: send it again
        receiver.mode = "ok"
        r = await c.post(f"/v1/webhooks/deliveries/{d['id']}/redeliver")
        assert r.status_code == 202 and r.json()["status"] == "pending"
        for _ in range(100):
            again = (await c.get(f"/v1/webhooks/deliveries/{d['id']}")).json()
            if again["status"] != "pending":
                break
            await asyncio.sleep(0.1)
        assert again["status"] == "delivered" and again["attempts"][-1]["status_code"] == 200
        assert [e["type"] for e in receiver.events(job_id)] == ["job.succeeded"]
        # redirects are not followed: a 302 is a failed attempt, and its target is never called
        receiver.received.clear()
        job2 = (await c.post("/v1/jobs", json=_job("redirected", receiver.url("/redirect")))).json()["id"]
        await asyncio.sleep(1.5)
        (d2,) = await deliveries(c, job_id=job2)
        assert d2["attempts"] and d2["attempts"][0]["status_code"] == 302 and "redirect" in d2["attempts"][0]["error"]
        assert receiver.received == []
        async with stack.client("bob") as bob:  # another tenant's deliveries do not exist
            assert (await bob.get(f"/v1/webhooks/deliveries/{d['id']}")).status_code == 404
            assert (await bob.post(f"/v1/webhooks/deliveries/{d['id']}/redeliver")).status_code == 404
            assert d["id"] not in {x["id"] for x in await deliveries(bob)}


async def test_tenant_endpoints_get_every_job_of_the_tenant(stack: Stack, receiver: Receiver) -> None:
    async with stack.client("bob") as bob:
        r = await bob.post("/v1/webhooks/endpoints", json={"url": receiver.url(), "events": ["job.started", "job.succeeded"]})
        assert r.status_code == 201, r.text
        endpoint = r.json()
        assert [e["id"] for e in (await bob.get("/v1/webhooks/endpoints")).json()["data"]] == [endpoint["id"]]
        await asyncio.sleep(0.6)  # webhook_endpoint_cache_seconds: every process sees it
        job_id = (await bob.post("/v1/jobs", json=_job("bob default", None))).json()["id"]
        ds = await settle(bob, [job_id])
        assert {d["endpoint_id"] for d in ds} == {endpoint["id"]}
        assert [e["type"] for e in receiver.events(job_id)] == ["job.started", "job.succeeded"]
        assert (await bob.delete(f"/v1/webhooks/endpoints/{endpoint['id']}")).status_code == 204
        assert (await bob.get("/v1/webhooks/endpoints")).json()["data"] == []
        async with stack.client("alice") as alice:  # alice's jobs never went to bob's endpoint
            assert (await alice.delete(f"/v1/webhooks/endpoints/{endpoint['id']}")).status_code == 404
        assert all(json.loads(b)["job_id"] == job_id for _, b in receiver.received)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2/hook",  # loopback, but not the allowlisted 127.0.0.1
        "http://10.0.0.1/hook",
        "http://10.255.1.2:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "http://192.168.1.1/",
        "file:///etc/passwd",
        "ftp://example.com/x",
        "gopher://127.0.0.1/",
        "http://user:pw@127.0.0.1/hook",
        "http:///nohost",
        "not a url",
    ],
)
async def test_unsafe_webhook_urls_are_refused_at_submit(stack: Stack, url: str) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json=_job("unsafe", url))
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_input" and err["details"][0]["loc"] == ["webhook_url"], err
        r = await c.post("/v1/webhooks/endpoints", json={"url": url})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["loc"] == ["url"]


async def test_webhook_fields_are_validated(stack: Stack) -> None:
    async with stack.client() as c:
        r = await c.post("/v1/jobs", json={**_job("x", None), "webhook_events": ["job.succeeded"]})
        assert r.status_code == 422 and "webhook_url" in r.text
        r = await c.post("/v1/jobs", json=_job("x", "http://127.0.0.1:9/h", ["job.nope"]))
        assert r.status_code == 422 and r.json()["error"]["details"][0]["loc"][0] == "webhook_events"
        r = await c.post("/v1/webhooks/endpoints", json={"url": "http://127.0.0.1:9/h", "events": []})
        assert r.status_code == 422
        r = await c.get("/v1/webhooks/deliveries", params={"status": "bogus"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


async def test_netguard_refuses_private_targets_unless_allowlisted() -> None:
    for url in ("http://127.0.0.1/h", "http://10.1.2.3/h", "http://169.254.169.254/", "http://localhost:8000/", "http://[::ffff:127.0.0.1]/"):
        with pytest.raises(netguard.UnsafeURL):
            await netguard.resolve(url, [])
    with pytest.raises(netguard.UnsafeURL):
        await netguard.resolve("file:///etc/passwd", netguard.networks(["0.0.0.0/0"]))
    target = await netguard.resolve("http://127.0.0.1:8123/h", netguard.networks(["127.0.0.1/32"]))
    assert target.address == "127.0.0.1" and target.port == 8123
    assert (await netguard.resolve("https://1.1.1.1/x", [])).port == 443


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
async def test_migration_0002_upgrades_downgrades_and_matches_the_models(db: str, tmp_path: Any) -> None:
    async def check(url: str) -> None:
        settings = Settings(data_dir=tmp_path, database_url=url)
        await asyncio.to_thread(upgrade, settings, "0001")
        await asyncio.to_thread(upgrade, settings)
        await asyncio.to_thread(command.downgrade, alembic_config(settings), "0001")
        await asyncio.to_thread(upgrade, settings)
        engine = create_async_engine(normalize_url(url))
        try:
            async with engine.connect() as conn:
                diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata))
        finally:
            await engine.dispose()
        assert diff == [], diff

    if db == "sqlite":
        await check(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    else:
        async with fresh_postgres() as url:
            await check(url)


def test_logs_have_no_tracebacks(stack: Stack) -> None:
    for name in ("api", "worker"):
        assert "Traceback" not in stack.log(name, tail=None), stack.log(name)


async def test_a_worker_killed_mid_delivery_is_delivered_by_another_after_the_lease(tmp_path: Any, redis_base: str) -> None:
    """SIGKILL while a delivery's POST is in flight: its ARQ task's in-progress key outlives the
    worker by the longest task timeout (about an hour), but the delivery's row holds only a
    lease (webhook_timeout_seconds + 30 s); once that lapses the reconciler queues it again
    under a fresh task id and another worker delivers it, once."""
    st = await make_stack(tmp_path, redis_url=f"{redis_base}/0", webhook_allowlist='["127.0.0.1/32"]',
                          webhook_backoff_seconds=json.dumps(BACKOFF), webhook_timeout_seconds="3")
    receiver = Receiver()
    receiver.mode = "hold"
    await receiver.start()
    st.start_api()
    try:
        st.start_worker(ready=True)
        async with st.client() as c:
            job_id = (await c.post("/v1/jobs", json=_job("killed mid-delivery", receiver.url(), ["job.succeeded"]))).json()["id"]
            deadline = time.monotonic() + 30
            while receiver.held < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert receiver.held == 1, "the delivery never reached the receiver"
            st.kill("worker")  # SIGKILL mid-POST
            killed = time.monotonic()
            receiver.mode = "ok"
            st.start_worker("worker2")
            ds = await settle(c, [job_id], timeout=60)
        took = time.monotonic() - killed
        assert [(d["status"], d["attempt_count"]) for d in ds] == [("delivered", 2)], ds
        assert [e["type"] for e in receiver.events(job_id)] == ["job.succeeded"]
        # the lease (3 s + 30 s) bounds it, not ARQ's hour
        assert took < 33 + 15, took
    finally:
        st.stop()
        await receiver.stop()
