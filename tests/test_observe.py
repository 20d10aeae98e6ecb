"""Metrics and structured logs, read from real processes after a known workload:
`genroute api` and `genroute worker --metrics-port`, real Redis, the local provider."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded import free_port
from tests.stack import make_stack, running


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(ss: dict, name: str, **labels: str) -> float:
    """The sum of `name` over every sample whose labels include `labels`."""
    return sum(v for (n, ls), v in ss.items() if n == name and set(labels.items()) <= set(ls))


def buckets(ss: dict, name: str, **labels: str) -> list[tuple[float, float]]:
    rows = [(float(dict(ls)["le"]), v) for (n, ls), v in ss.items()
            if n == f"{name}_bucket" and set(labels.items()) <= set(ls)]
    return sorted(rows)


async def test_metrics_count_what_happened(tmp_path: Path, redis_url: str) -> None:
    from tests.test_webhooks import Receiver

    receiver = Receiver()
    await receiver.start()
    stack = await make_stack(tmp_path, redis_url=redis_url, webhook_allowlist='["127.0.0.1/32"]')
    port = free_port()
    async with running(stack, ("worker", "--metrics-port", str(port))):
        async with stack.client() as c:
            ok = [(await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": f"p{i}", "size": "256x256"},
                                                  **({"webhook_url": receiver.url()} if i == 0 else {})})).json()
                  for i in range(3)]
            chat = await c.post("/v1/chat/completions", json={"model": "local-text", "messages": [
                {"role": "user", "content": "count these four words"}]})
            assert chat.status_code == 200, chat.text
            usage = chat.json()["usage"]
            bad = (await c.post("/v1/jobs", json={"model": "local-image", "input": {
                "prompt": "x", "size": "256x256", "provider_params": {"fail": "provider_error", "latency_seconds": 0.2}}})).json()
            refused = await c.post("/v1/jobs", json={"model": "no-such-model", "input": {}})
            assert refused.status_code in (404, 422), refused.text
            for j in [*ok, bad]:
                await stack.wait_job(c, j["id"])
            got = await c.get(f"/v1/jobs/{ok[0]['id']}")
            assert got.headers["x-request-id"].startswith("req_")
        # the Redis-held gauges are refreshed each GENROUTE_METRICS_REFRESH_SECONDS (1 s)
        deadline = time.monotonic() + 20
        while True:
            api = samples(httpx.get(f"{stack.api_url}/metrics", timeout=10).text)
            if value(api, "genroute_jobs_in_flight", deployment="local-image") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # the worker's counters may land a moment after the job's terminal event
        deadline = time.monotonic() + 20
        while True:
            worker = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            if value(worker, "genroute_jobs_finished_total") >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        # the receiver answers from this event loop: wait without blocking it
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=10) as h:
            while value(worker, "genroute_webhook_deliveries_total", outcome="delivered") < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                worker = samples((await h.get(f"http://127.0.0.1:{port}/metrics")).text)
        again = samples(httpx.get(f"{stack.api_url}/metrics", timeout=10).text)  # shows the scrapes before it
    await receiver.stop()

    # API: requests by route template (never a job id) and status, with a latency histogram
    assert value(api, "genroute_http_requests_total", method="POST", route="/v1/jobs", status="201") == 4
    assert value(api, "genroute_http_requests_total", method="POST", route="/v1/jobs", status=str(refused.status_code)) == 1
    assert value(api, "genroute_http_requests_total", method="GET", route="/v1/jobs/{job_id}") >= 5
    assert not any(ok[0]["id"] in str(k) for k in api)
    b = buckets(api, "genroute_http_request_duration_seconds", method="POST", route="/v1/jobs")
    assert b[-1] == (float("inf"), 5) and [v for _, v in b] == sorted(v for _, v in b)
    assert value(api, "genroute_jobs_submitted_total", model="local-image", modality="image") == 4
    # gauges read from Redis: nothing left in flight, the queues exist
    assert value(api, "genroute_jobs_in_flight", deployment="local-image") == 0
    assert any(n == "genroute_queue_depth" and dict(ls)["queue"] == "media" for n, ls in api)

    # worker: finished by status and error code; the time histograms saw each started job
    assert value(worker, "genroute_jobs_finished_total", model="local-image", status="succeeded", error_code="") == 3
    assert value(worker, "genroute_jobs_finished_total", model="local-image", status="failed", error_code="provider_error") == 1
    assert value(worker, "genroute_job_queued_seconds_count", model="local-image") == 4
    assert value(worker, "genroute_job_storing_seconds_count", modality="image") == 3
    q = buckets(worker, "genroute_job_queued_seconds", model="local-image")
    assert q[-1] == (float("inf"), 4) and [v for _, v in q] == sorted(v for _, v in q)
    assert value(worker, "genroute_provider_calls_total", deployment="local-image", call="submit") == 4
    assert value(worker, "genroute_provider_calls_total", deployment="local-image", call="poll", outcome="failed") == 1
    assert value(worker, "genroute_provider_call_duration_seconds_count", deployment="local-image", call="submit") == 4
    # time at the provider for each job that started there; polls of the one that took 0.2 s
    assert value(worker, "genroute_job_provider_seconds_count", deployment="local-image") == 4
    assert value(worker, "genroute_poll_lateness_seconds_count") >= 1
    # one webhook, delivered once; every attempt timed (a first one may fail while this
    # test's blocking loops hold up the receiver's event loop)
    assert value(worker, "genroute_webhook_deliveries_total", outcome="delivered") == 1
    attempts = value(worker, "genroute_webhook_deliveries_total")
    assert value(worker, "genroute_webhook_delivery_duration_seconds_count") == attempts >= 1
    # the chat call, its tokens as the answer counted them, by model and deployment
    assert value(api, "genroute_chat_requests_total", model="local-text", deployment="local-text") == 1
    assert value(api, "genroute_chat_tokens_total", model="local-text", kind="prompt") == usage["prompt_tokens"]
    assert value(api, "genroute_chat_tokens_total", model="local-text", kind="completion") == usage["completion_tokens"]
    assert value(api, "genroute_chat_duration_seconds_count", model="local-text") == 1
    # a scrape times itself
    assert value(again, "genroute_metrics_scrape_duration_seconds_count") >= 1


async def test_json_logs_carry_ids_and_no_secrets(tmp_path: Path, redis_url: str) -> None:
    from tests.test_webhooks import Receiver

    receiver = Receiver()
    await receiver.start()
    stack = await make_stack(tmp_path, redis_url=redis_url, log_format="json", log_level="INFO",
                             webhook_allowlist='["127.0.0.1/32"]')
    port = int(stack.api_url.rsplit(":", 1)[1])
    stack._spawn("api", "api", "--host", "127.0.0.1", "--port", str(port))  # with its access log
    stack.start_worker()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{stack.api_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, stack.log("api")
            time.sleep(0.1)
        rid = "trace-7f3a9c"
        headers = {"Authorization": f"Bearer {stack.keys['alice']}", "X-Request-Id": rid}
        async with httpx.AsyncClient(base_url=stack.api_url, headers=headers, timeout=90) as c:
            r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "logs", "size": "256x256"},
                                               "webhook_url": receiver.url()})
            assert r.headers["x-request-id"] == rid
            job = await stack.wait_job(c, r.json()["id"])
            assert job["status"] == "succeeded"
            deadline = time.monotonic() + 30
            while not receiver.received and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # an insane request id is replaced, not echoed
            bad = await c.get("/healthz", headers={"X-Request-Id": "x" * 500})
            assert bad.headers["x-request-id"].startswith("req_")
    finally:
        stack.stop()
        await receiver.stop()
    texts = {name: (tmp_path / f"{name}.log").read_text() for name in ("api", "worker")}
    lines = [(name, line) for name, text in texts.items() for line in text.splitlines() if line.strip()]
    assert lines
    parsed = []
    for name, line in lines:
        obj = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "message"} <= set(obj), line
        parsed.append((name, obj))
    mine = [o for n, o in parsed if n == "api" and o.get("job_id") == job["id"]]
    assert mine, texts["api"][-2000:]
    assert all(o["request_id"] == rid and o["tenant"] == "alice" for o in mine)
    assert any("POST /v1/jobs" in o["message"] for o in mine)
    # the worker's lines of the job carry the ids too (bound per task from the job's row), its
    # end among them; the webhook receiver was sent the request id
    theirs = [o for n, o in parsed if n == "worker" and o.get("job_id") == job["id"]]
    assert any(o["message"] == f"job {job['id']} succeeded" for o in theirs), texts["worker"][-3000:]
    assert all(o["request_id"] == rid and o["tenant"] == "alice" for o in theirs), theirs
    assert [h.get("x-request-id") for h, _ in receiver.received] == [rid]
    assert "\x1b" not in "".join(texts.values()) and "color_message" not in texts["api"]  # no terminal colours
    everything = "\n".join(texts.values())
    for secret in (stack.keys["alice"], stack.keys["bob"], stack.env["GENROUTE_SECRET_KEY"]):
        assert secret not in everything
    assert "sig=" not in everything.replace("sig=[redacted]", "")


def label_values(ss: dict) -> dict[str, set[str]]:
    """Per label name (histogram `le` aside), every value it takes."""
    out: dict[str, set[str]] = {}
    for _, ls in ss:
        for k, v in ls:
            if k != "le":
                out.setdefault(k, set()).add(v)
    return out


async def test_metric_labels_are_bounded_and_carry_no_ids_or_prompts(tmp_path: Path, redis_url: str) -> None:
    """Two rounds of the same workload, each with its own distinctive prompts, job ids, unknown
    paths, model names and keys: no id, prompt or path of either round is anywhere in /metrics
    (API or worker), and the second round adds no label value the first had not made."""
    stack = await make_stack(tmp_path, redis_url=redis_url)
    port = free_port()
    worker_url = f"http://127.0.0.1:{port}/metrics"
    never: list[str] = []  # strings of the workload that must not reach the exposition

    async def workload(c: httpx.AsyncClient, rounds_done: int) -> None:
        tag = uuid.uuid4().hex[:12]
        prompts = [f"quokka-{tag}-{i} on a unicycle" for i in range(3)]
        never.extend([tag, *prompts])
        jobs = [(await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": p, "size": "256x256"}})).json()
                for p in prompts]
        slow = (await c.post("/v1/jobs", json={"model": "local-video", "input": {
            "prompt": f"heron-{tag}", "duration_seconds": 1, "fps": 1, "resolution": "360p",
            "provider_params": {"latency_seconds": 30}}})).json()
        never.extend([j["id"] for j in [*jobs, slow]] + [f"heron-{tag}"])
        for j in jobs:
            assert (await stack.wait_job(c, j["id"]))["status"] == "succeeded"
            assert (await c.get(f"/v1/jobs/{j['id']}/outputs/0")).status_code == 307
        deadline = time.monotonic() + 30
        while (await c.get(f"/v1/jobs/{slow['id']}")).json()["status"] != "running":  # canceled at the provider
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await c.post(f"/v1/jobs/{slow['id']}/cancel")).status_code == 200
        chat = await c.post("/v1/chat/completions", json={"model": "local-text", "messages": [
            {"role": "user", "content": f"tell me about wombat-{tag}"}]})
        assert chat.status_code == 200, chat.text
        never.append(f"wombat-{tag}")
        # answers that name things a client made up: paths, ids, models, keys
        for path in (f"/v1/jobs/job_{tag}", f"/v1/nothing-{tag}", f"/replicate/v1/predictions/{tag}",
                     f"/v1/files/x/{tag}.png?exp=1&sig=00", f"/v1/jobs/{jobs[0]['id']}/outputs/{tag}"):
            assert (await c.get(path)).status_code in (400, 403, 404, 410, 422), path
        assert (await c.post("/v1/jobs", json={"model": f"model-{tag}", "input": {"prompt": "x"}})).status_code == 404
        bad_key = f"gr_{tag}{'0' * 20}"
        assert (await c.get("/v1/jobs", headers={"Authorization": f"Bearer {bad_key}"})).status_code == 401
        never.append(bad_key)
        # a job's end is counted by the process that ended it (the cancel: the API's): wait for all four
        deadline = time.monotonic() + 20
        while sum(value(samples(httpx.get(url, timeout=10).text), "genroute_jobs_finished_total")
                  for url in (worker_url, f"{stack.api_url}/metrics")) < 4 * (rounds_done + 1):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)

    async with running(stack, ("worker", "--metrics-port", str(port))):
        async with stack.client() as c:
            await workload(c, 0)
            first = {name: httpx.get(url, timeout=10).text for name, url in
                     (("api", f"{stack.api_url}/metrics"), ("worker", worker_url))}
            await workload(c, 1)
            second = {name: httpx.get(url, timeout=10).text for name, url in
                      (("api", f"{stack.api_url}/metrics"), ("worker", worker_url))}

    never += list(stack.keys.values())
    for name, text in second.items():
        for s in never:
            assert s not in text, (name, s)
        before, after = label_values(samples(first[name])), label_values(samples(text))
        grown = {k: sorted(after[k] - before.get(k, set())) for k in after if after[k] - before.get(k, set())}
        assert not grown, (name, grown)  # a second round of new ids and prompts made no new label value
        assert all(len(v) <= 40 for v in after.values()), (name, {k: len(v) for k, v in after.items()})
    # the workload was seen (the test reads real figures, not an empty page)
    api = samples(second["api"])
    assert value(api, "genroute_http_requests_total", method="GET", route="/v1/jobs/{job_id}") >= 8
    assert value(api, "genroute_chat_requests_total", model="local-text") == 2


def test_renderer_writes_what_generate_latest_writes() -> None:
    """core.metrics.Renderer caches each series' formatted name and labels; its bytes are
    prometheus_client's own, escapes, OpenMetrics-only samples and timestamps included."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    from core.metrics import Renderer

    reg = CollectorRegistry()
    c = Counter("t_requests", "Requests \\ with a\nnewline", ["route", "status"], registry=reg)
    h = Histogram("t_seconds", "Latency", ["route"], buckets=(0.005, 0.5, 2.5e6), registry=reg)
    g = Gauge("t_open", "Open things", registry=reg)
    plain, plain_h = Counter("t_plain", "No labels", registry=reg), Histogram("t_plain_seconds", "No labels", registry=reg)
    Counter("t_unused", "Labels, no series yet", ["x"], registry=reg)

    class Fixed:
        def collect(self):
            fam = GaugeMetricFamily("t_fixed", "With a timestamp", labels=["k"])
            fam.add_metric(['quote " backslash \\ newline \n'], 1.5e9, timestamp=1700000000.25)
            return [fam]

    reg.register(Fixed())  # type: ignore[arg-type]
    r = Renderer()
    for i in range(3):  # the second and third renders come from the cache
        c.labels("/v1/jobs/{job_id}", "200").inc(i + 0.5)
        c.labels('we"ird\\', "404").inc()
        h.labels("/v1/jobs").observe(i * 0.3)
        h.labels("unmatched").observe(1e7)
        g.set(-i - 0.25)
        plain.inc(1e21)
        plain_h.observe(0.1)
        assert r.render([reg]) == generate_latest(reg)
    assert r.render([]) == b""


async def test_the_worker_healthcheck_notices_a_hung_worker(tmp_path: Path, redis_url: str) -> None:
    """docker-compose.yml's worker healthcheck (`genroute worker --healthcheck --metrics-port`):
    0 while the worker serves, 1 with one line once it hangs (here: SIGSTOP, a process that
    answers nothing), 0 again when it comes back."""
    import os
    import signal
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "genroute")
    stack = await make_stack(tmp_path, redis_url=redis_url)
    port = free_port()
    env = {**os.environ, **stack.env}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, "worker", "--healthcheck", "--metrics-port", str(port)], env=env,
                              capture_output=True, text=True, timeout=30)

    async with running(stack, ("worker", "--metrics-port", str(port))):
        deadline = time.monotonic() + 30
        while (ok := check()).returncode != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert ok.returncode == 0, ok.stderr
        worker = stack.procs["worker"]
        worker.send_signal(signal.SIGSTOP)
        try:
            hung = check()
        finally:
            worker.send_signal(signal.SIGCONT)
        lines = [x for x in hung.stderr.splitlines() if x.strip()]
        assert hung.returncode == 1 and len(lines) == 1 and "unhealthy" in lines[0], hung.stderr
        deadline = time.monotonic() + 30
        while (back := check()).returncode != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert back.returncode == 0, back.stderr


async def test_refusals_are_counted_by_reason(tmp_path: Path, redis_url: str) -> None:
    """A key over its rpm, a key over its concurrency (with no queueing) and a tenant over
    its budget: each refusal is counted once under its reason on the API's /metrics."""
    admin = "gr_admin_" + uuid.uuid4().hex
    stack = await make_stack(tmp_path, redis_url=redis_url, admin_key=admin)
    async with running(stack), httpx.AsyncClient(base_url=stack.api_url, timeout=30,
                                                 headers={"Authorization": f"Bearer {admin}"}) as a:
        assert (await a.post("/v1/admin/tenants", json={"id": "poor", "budget": 1})).status_code == 201
        keys = {}
        for name, body in {"rpm": {"tenant": "alice", "rpm": 1},
                           "busy": {"tenant": "alice", "max_concurrency": 1, "queue_when_busy": False},
                           "poor": {"tenant": "poor"}}.items():
            r = await a.post("/v1/admin/keys", json={"name": name, **body})
            assert r.status_code == 201, r.text
            keys[name] = r.json()["key"]
        slow = {"model": "local-image", "input": {"prompt": "x", "size": "256x256",
                                                  "provider_params": {"latency_seconds": 5}}}
        codes = {}
        for name in ("rpm", "busy", "poor"):
            h = {"Authorization": f"Bearer {keys[name]}"}
            first = await a.post("/v1/jobs", json=slow, headers=h)
            second = await a.post("/v1/jobs", json=slow, headers=h)
            codes[name] = (first.status_code, second.status_code)
        assert codes == {"rpm": (201, 429), "busy": (201, 429), "poor": (402, 402)}, codes
        deadline = time.monotonic() + 20
        while True:
            api = samples(httpx.get(f"{stack.api_url}/metrics", timeout=10).text)
            if value(api, "genroute_refusals_total") >= 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert value(api, "genroute_refusals_total", reason="key_rpm") == 1
    assert value(api, "genroute_refusals_total", reason="key_concurrency") == 1
    assert value(api, "genroute_refusals_total", reason="budget_exceeded") == 2
