"""Metrics and structured logs, read from real processes after a known workload:
`genroute api` and `genroute worker --metrics-port`, real Redis, the local provider."""

from __future__ import annotations

import json
import time
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
    stack = await make_stack(tmp_path, redis_url=redis_url)
    port = free_port()
    async with running(stack, ("worker", "--metrics-port", str(port))):
        async with stack.client() as c:
            ok = [(await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": f"p{i}", "size": "256x256"}})).json()
                  for i in range(3)]
            bad = (await c.post("/v1/jobs", json={"model": "local-image", "input": {
                "prompt": "x", "size": "256x256", "provider_params": {"fail": "provider_error", "latency_seconds": 0.2}}})).json()
            refused = await c.post("/v1/jobs", json={"model": "no-such-model", "input": {}})
            assert refused.status_code in (404, 422), refused.text
            for j in [*ok, bad]:
                await stack.wait_job(c, j["id"])
            got = await c.get(f"/v1/jobs/{ok[0]['id']}")
            assert got.headers["x-request-id"].startswith("req_")
        api = samples(httpx.get(f"{stack.api_url}/metrics", timeout=10).text)
        # the worker's counters may land a moment after the job's terminal event
        deadline = time.monotonic() + 20
        while True:
            worker = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
            if value(worker, "genroute_jobs_finished_total") >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200

    # API: requests by route template (never a job id) and status, with a latency histogram
    assert value(api, "genroute_http_requests_total", method="POST", route="/v1/jobs", status="201") == 4
    assert value(api, "genroute_http_requests_total", method="POST", route="/v1/jobs", status=str(refused.status_code)) == 1
    assert value(api, "genroute_http_requests_total", method="GET", route="/v1/jobs/{job_id}") >= 5
    assert not any(ok[0]["id"] in str(k) for k in api)
    b = buckets(api, "genroute_http_request_duration_seconds", method="POST", route="/v1/jobs")
    assert b[-1] == (float("inf"), 5) and [v for _, v in b] == sorted(v for _, v in b)
    assert value(api, "genroute_jobs_submitted_total", model="local-image", modality="image") == 4
    # gauges read from Redis at scrape time: nothing left in flight, the queues exist
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


async def test_json_logs_carry_ids_and_no_secrets(tmp_path: Path, redis_url: str) -> None:
    stack = await make_stack(tmp_path, redis_url=redis_url, log_format="json", log_level="INFO")
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
            r = await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "logs", "size": "256x256"}})
            assert r.headers["x-request-id"] == rid
            job = await stack.wait_job(c, r.json()["id"])
            assert job["status"] == "succeeded"
            # an insane request id is replaced, not echoed
            bad = await c.get("/healthz", headers={"X-Request-Id": "x" * 500})
            assert bad.headers["x-request-id"].startswith("req_")
    finally:
        stack.stop()
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
    everything = "\n".join(texts.values())
    for secret in (stack.keys["alice"], stack.keys["bob"], stack.env["GENROUTE_SECRET_KEY"]):
        assert secret not in everything
    assert "sig=" not in everything.replace("sig=[redacted]", "")
