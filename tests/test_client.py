"""The typed Python client (genroute.client) against a real stack (API and worker processes,
Redis): typed results, errors with stable codes, idempotent submit, paging, downloads,
usage, and waiting across a dropped connection (a TCP proxy cuts it) and an API restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.embedded import free_port
from genroute.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    EventPublic,
    InvalidRequestError,
    JobFailedError,
    JobPublic,
    NotFoundError,
    UsageReport,
)
from tests.stack import Stack, make_stack, running


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    st = await make_stack(tmp_path_factory.mktemp("client"), redis_url=f"{redis_base}/0", ws_recheck_seconds="1")
    async with running(st):
        yield st


def image(prompt: str, latency: float = 0.0, steps: int = 2, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "size": "256x256", "provider_params": {"latency_seconds": latency, "progress_steps": steps}, **extra}


class Proxy:
    """A TCP proxy on loopback whose connections can all be cut at once (a dropped network)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.conns: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.conns |= {writer, up_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.conns -= {writer, up_w}

    def drop(self) -> int:
        n = len(self.conns)
        for w in list(self.conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        return n

    async def stop(self) -> None:
        self.drop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_submit_wait_download_typed(stack: Stack, tmp_path: Path) -> None:
    with Client(stack.api_url, stack.keys["alice"]) as gr:
        job = gr.submit("local-image", image("typed", latency=0.5), metadata={"run": "t1"})
        assert isinstance(job, JobPublic) and job.status == "queued" and job.idempotency_key
        seen: list[Any] = []
        done = gr.wait(job.id, timeout=30, on_update=seen.append)
        assert done.status == "succeeded" and done.outputs and done.metadata == {"run": "t1"}
        assert any(isinstance(x, EventPublic) and x.type == "job.succeeded" for x in seen)
        paths = gr.download(done, tmp_path)
        assert len(paths) == 1 and paths[0].name == f"{done.id}-0.png"
        assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == done.outputs[0].sha256
        one = gr.download(done.id, tmp_path / "single.png", index=0)
        assert one == [tmp_path / "single.png"] and one[0].read_bytes() == paths[0].read_bytes()
        usage = gr.usage(group_by="model")
        assert isinstance(usage, UsageReport) and usage.total.requests >= 1


def test_the_idempotency_key_makes_a_resent_submit_one_job(stack: Stack) -> None:
    with Client(stack.api_url, stack.keys["alice"]) as gr:
        a = gr.submit("local-image", image("once"), idempotency_key="client-once-1")
        b = gr.submit("local-image", image("once"), idempotency_key="client-once-1")
        assert a.id == b.id
        c = gr.submit("local-image", image("once"))  # a fresh key each call: a new job
        assert c.id != a.id and c.idempotency_key and c.idempotency_key.startswith("gr-")


def test_errors_carry_the_stable_code(stack: Stack) -> None:
    with Client(stack.api_url, stack.keys["alice"]) as gr:
        with pytest.raises(NotFoundError) as e:
            gr.get("job_nope")
        assert e.value.code == "not_found" and e.value.status_code == 404
        with pytest.raises(NotFoundError) as e:
            gr.submit("no-such-model", {"prompt": "x"})
        assert e.value.code == "model_not_found"
        with pytest.raises(InvalidRequestError) as e:
            gr.submit("local-image", {"prompt": "x", "size": "3x3"})
        assert e.value.code == "invalid_input" and e.value.details
        with pytest.raises(JobFailedError) as f:
            gr.run("local-image", image("boom", provider_params=None) | {"provider_params": {"fail": "moderated"}}, timeout=30)
        assert f.value.code == "moderated"
    with Client(stack.api_url, "gr_wrong") as bad, pytest.raises(AuthenticationError) as e:
        bad.list()
    assert e.value.code == "unauthorized"


def test_list_pages_and_cancel(stack: Stack) -> None:
    with Client(stack.api_url, stack.keys["bob"]) as gr:
        ids = {gr.submit("local-image", image(f"p{i}")).id for i in range(5)}
        page = gr.list(limit=2)
        assert len(page.data) == 2 and page.next_cursor
        walked = [j.id for j in gr.iter_jobs(page_size=2)]
        assert ids <= set(walked) and len(walked) == len(set(walked)) and walked == sorted(walked, reverse=True)
        long = gr.submit("local-image", image("long", latency=30, steps=30))
        canceled = gr.cancel(long.id)
        assert canceled.status == "canceled" and gr.wait(long.id, timeout=5).status == "canceled"


async def test_wait_resumes_after_the_connection_drops_without_missing_an_event(stack: Stack) -> None:
    proxy = Proxy(int(stack.api_url.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        async with AsyncClient(f"http://127.0.0.1:{proxy.port}", stack.keys["alice"]) as gr:
            job = await gr.submit("local-image", image("dropped", latency=3.0, steps=6))
            events: list[EventPublic] = []

            async def follow() -> None:
                async for ev in gr.events(job.id, last_event_id="0"):  # from its first event
                    events.append(ev)

            task = asyncio.create_task(follow())
            deadline = time.monotonic() + 20
            while len(events) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            before = proxy.accepted
            assert proxy.drop() >= 2  # the stream's connection, both sides
            await asyncio.wait_for(task, 30)
            assert proxy.accepted > before  # it reconnected
            positions = [(e.seq, e.sub) for e in events]
            assert positions == sorted(set(positions)), positions  # no duplicate across the drop
            seqs = [e.seq for e in events if not e.sub]  # durable events: dense, no gap
            assert seqs == list(range(1, len(seqs) + 1)), seqs
            assert events[0].type == "job.queued" and events[-1].type == "job.succeeded"
            # wait() across a drop too
            job2 = await gr.submit("local-image", image("dropped again", latency=2.0, steps=4))
            waiter = asyncio.create_task(gr.wait(job2.id, timeout=30))
            await asyncio.sleep(0.8)
            proxy.drop()
            assert (await waiter).status == "succeeded"
    finally:
        await proxy.stop()


def test_wait_rides_out_an_api_restart(stack: Stack) -> None:
    with Client(stack.api_url, stack.keys["alice"]) as gr:
        job = gr.submit("local-image", image("restart", latency=4.0, steps=4))
        result: dict[str, Any] = {}

        def wait() -> None:
            try:
                result["job"] = gr.wait(job.id, timeout=60)
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(1.0)
        stack.kill("api")  # SIGKILL: connections die, nothing answers on the port
        time.sleep(2.0)
        stack.start_api()  # the same port: the client's retries find it again
        t.join(60)
        assert "error" not in result, result
        assert result["job"].status == "succeeded" and result["job"].outputs


class NoStream(httpx.HTTPTransport):
    """A real transport that answers the event stream as a proxy that strips SSE would."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            self.refused += 1
            return httpx.Response(406, text="no event streams here", request=request)
        return super().handle_request(request)


def test_wait_polls_where_no_event_stream_is_offered(stack: Stack) -> None:
    transport = NoStream()
    with httpx.Client(transport=transport) as http, Client(stack.api_url, stack.keys["alice"], http=http) as gr:
        job = gr.submit("local-image", image("polled", latency=1.0, steps=2))
        seen: list[Any] = []
        done = gr.wait(job.id, timeout=30, on_update=seen.append)
    assert done.status == "succeeded" and transport.refused == 1  # tried once, then polled
    assert seen and all(isinstance(x, JobPublic) for x in seen)


class LosesAnswers(httpx.HTTPTransport):
    """A real transport where the first POST /v1/jobs reaches the API but its answer is lost
    (the connection breaks on the way back), and the second is answered 503 by a proxy:
    only the third answer gets through."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith("/v1/jobs"):
            return super().handle_request(request)
        self.sent.append(request.headers.get("idempotency-key"))
        if len(self.sent) == 1:
            super().handle_request(request).close()  # the job was made; its answer never arrives
            raise httpx.ReadError("connection reset by peer", request=request)
        if len(self.sent) == 2:
            return httpx.Response(503, headers={"Retry-After": "0"}, text="upstream busy", request=request)
        return super().handle_request(request)


def test_a_submit_whose_answer_was_lost_is_retried_with_the_same_key_and_makes_one_job(stack: Stack) -> None:
    transport = LosesAnswers()
    marker = f"lost-answer-{time.monotonic_ns()}"
    with httpx.Client(transport=transport) as http, Client(stack.api_url, stack.keys["alice"], http=http) as gr:
        job = gr.submit("local-image", image("lost answer"), metadata={"run": marker})
        assert len(transport.sent) == 3 and transport.sent[0] and len(set(transport.sent)) == 1, transport.sent
        assert job.idempotency_key == transport.sent[0]
        mine = [j for j in gr.iter_jobs(page_size=50) if j.metadata == {"run": marker}]
    assert [j.id for j in mine] == [job.id]  # three sends, one job


def test_wait_reads_the_row_again_when_it_lags_the_terminal_event(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's last events are published just before its row commits: wait() heard the end,
    but its first read of the row can still say running. It reads again until the row shows
    the end (so run() never raises JobFailedError for a job that succeeded)."""
    with Client(stack.api_url, stack.keys["alice"]) as c:
        job = c.run("local-image", image("a lagging commit"))
        assert job.status == "succeeded"
        real_get = c.get
        reads: list[str] = []

        def lagging(job_id: str) -> Any:
            reads.append(job_id)
            got = real_get(job_id)
            return got.model_copy(update={"status": "running"}) if len(reads) < 3 else got

        monkeypatch.setattr(c, "get", lagging)
        assert c.wait(job.id, timeout=30).status == "succeeded"
        assert len(reads) == 3
