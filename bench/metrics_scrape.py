"""How long `GET /metrics` on the API takes with many jobs in flight.

    python bench/metrics_scrape.py --jobs 10000 --scrapes 200

Starts `genroute api` and ONE `genroute worker --queue video` over a fresh PostgreSQL
database and a private redis-server (bench/inflight.py's stack), submits N local-video
jobs whose provider task lasts L seconds with progress every I seconds, waits until the
API's own gauge `genroute_jobs_in_flight{deployment="local-video"}` shows all N holding a
slot, sends a few rounds of requests over many routes (2xx, 3xx and 4xx answers, so the
HTTP histograms hold what a working API holds), then scrapes the API's /metrics S times, one after another over one keep-alive
connection (a pause of `--pause` s between scrapes, as a scraper would), while the worker
keeps polling the N tasks. Prints one JSON line: scrape time p50/p99/max (the client's
round trip, so an upper bound on the server's time) next to GET /healthz's on the same
connection (the floor: what any answer of that process costs on this machine), the number of series and bytes, and
the largest number of distinct values any one label has; and from the API's own
genroute_metrics_scrape_duration_seconds histogram, its mean time to render a scrape and
the share it rendered within 5 ms (without the network, the client and the wait for a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inflight import pct, stack, submit_jobs, video_body, wait_ready  # noqa: E402


async def traffic(c: httpx.AsyncClient, job_id: str, rounds: int) -> None:
    """What an API that has served a while shows: answers on many routes with several
    statuses (2xx, 3xx, 4xx), so the HTTP histograms carry a realistic number of series."""
    reads = ["/v1/jobs?limit=5", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/outputs/0", "/v1/models", "/v1/usage",
             "/v1/usage?group_by=day", "/v1/webhooks/endpoints", "/v1/webhooks/deliveries", "/v1/batches/batch_x",
             f"/v1/videos/{job_id}", "/replicate/v1/predictions", f"/replicate/v1/predictions/{job_id}",
             "/v1/jobs/job_unknown", "/v1/no-such-route", "/healthz", "/readyz", "/v1/usage?group_by=nope"]
    for _ in range(rounds):
        for path in reads:
            await c.get(path)
        await c.get("/v1/jobs", headers={"Authorization": "Bearer gr_not_a_key"})  # 401
        await c.post("/v1/jobs", json={"model": "local-image", "input": {"size": "7x7"}})  # 422
        await c.post("/v1/jobs", json={"model": "no-such-model", "input": {}})  # 404
        await c.post("/v1/chat/completions", json={"model": "local-text", "messages": [{"role": "user", "content": "hi"}]})
        await c.post("/v1/jobs", json={"model": "local-image", "input": {"prompt": "warm", "size": "256x256"}})


def server_side(before: str, after: str) -> dict[str, float]:
    """The API's own timing of the scrapes between two expositions, from its
    genroute_metrics_scrape_duration_seconds histogram: the mean, and the share within 5 ms."""
    def read(text: str) -> dict[str, float]:
        out = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "genroute_metrics_scrape_duration_seconds":
                for s in fam.samples:
                    key = s.name.rsplit("_", 1)[-1] + (s.labels.get("le", "") if s.name.endswith("_bucket") else "")
                    out[key] = s.value
        return out
    a, b = read(before), read(after)
    if not b:
        return {}  # an older genroute without the histogram
    count = b["count"] - a.get("count", 0)
    return {"server_ms_mean": round((b["sum"] - a.get("sum", 0)) / count * 1000, 2) if count else float("nan"),
            "server_within_5ms": round((b["bucket0.005"] - a.get("bucket0.005", 0)) / count, 3) if count else float("nan")}


def in_flight(text: str, deployment: str) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name == "genroute_jobs_in_flight":
            return sum(s.value for s in fam.samples if s.labels.get("deployment") == deployment)
    return 0.0


def series(text: str) -> tuple[int, dict[str, int]]:
    """How many samples, and per label name how many distinct values."""
    n = 0
    values: dict[str, set[str]] = defaultdict(set)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            n += 1
            for k, v in s.labels.items():
                if k != "le":
                    values[k].add(v)
    return n, {k: len(v) for k, v in sorted(values.items())}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10000)
    p.add_argument("--latency", type=float, default=3600.0, help="provider task length L (s)")
    p.add_argument("--interval", type=float, default=10.0, help="progress every I seconds")
    p.add_argument("--scrapes", type=int, default=200)
    p.add_argument("--pause", type=float, default=0.05, help="seconds between scrapes")
    p.add_argument("--traffic", type=int, default=3, help="rounds of requests over many routes before scraping")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
                   help="a PostgreSQL server; the bench makes (and drops) its own database there")
    p.add_argument("--genroute", default=str(Path(sys.executable).parent / "genroute"))
    p.add_argument("--renice", type=int, default=0,
                   help="then renice the API to this (e.g. -10, as root) and scrape again: a shared machine's "
                        "other processes out of the API's way")
    p.add_argument("--label", default="")
    args = p.parse_args()

    with stack(args.genroute, args.database_url, video_deadline_s=int(args.latency * 2 + 600)) as st:
        steps = max(1, int(round(args.latency / args.interval)))
        headers = {"Authorization": f"Bearer {st.key}"}
        limits = httpx.Limits(max_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=st.url, headers=headers, timeout=120, limits=limits) as c:
            await wait_ready(c)
            t0 = time.monotonic()
            ids = await submit_jobs(c, video_body(args.latency, steps), args.jobs, args.concurrency)
            submit_s = time.monotonic() - t0
            while (held := in_flight((await c.get("/metrics")).text, "local-video")) < args.jobs:
                if time.monotonic() - t0 > 1800:
                    raise SystemExit(f"only {held:.0f} of {args.jobs} jobs in flight after 30 min")
                await asyncio.sleep(1.0)
            started_s = time.monotonic() - t0
            await traffic(c, ids[0], args.traffic)

        phases = [measure(st.url, args, "default priority")]
        if args.renice:  # the API's CPU ahead of the other processes of a shared machine, as on its own box
            os.setpriority(os.PRIO_PROCESS, st.api.pid, args.renice)
            phases.append(measure(st.url, args, f"api at nice {args.renice}"))
        for phase in phases:
            print(json.dumps({"label": args.label, **phase, "submit_s": round(submit_s, 1),
                              "all_in_flight_s": round(started_s, 1)}))


def measure(url: str, args: argparse.Namespace, phase: str) -> dict:
    """S scrapes over one connection (and as many GET /healthz between them)."""
    times: list[float] = []
    floor: list[float] = []  # GET /healthz the same way: what any answer of this process costs here
    with httpx.Client(base_url=url, timeout=30) as scraper:
        before = scraper.get("/metrics").text  # the connection is open before the clock runs
        for _ in range(args.scrapes):
            t = time.perf_counter()
            r = scraper.get("/metrics")
            times.append(time.perf_counter() - t)
            r.raise_for_status()
            time.sleep(args.pause / 2)
            t = time.perf_counter()
            scraper.get("/healthz").raise_for_status()
            floor.append(time.perf_counter() - t)
            time.sleep(args.pause / 2)
    text = r.text
    n, labels = series(text)
    return {
        "phase": phase, "jobs_in_flight": in_flight(text, "local-video"), "scrapes": args.scrapes,
        "scrape_ms_p50": round(pct(times, 50) * 1000, 2), "scrape_ms_p99": round(pct(times, 99) * 1000, 2),
        "scrape_ms_max": round(max(times) * 1000, 2), **server_side(before, text),
        "healthz_ms_p50": round(pct(floor, 50) * 1000, 2), "healthz_ms_p99": round(pct(floor, 99) * 1000, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2), "series": n, "bytes": len(r.content),
        "distinct_label_values_max": max(labels.values()) if labels else 0, "distinct_label_values": labels,
    }

if __name__ == "__main__":
    asyncio.run(main())
