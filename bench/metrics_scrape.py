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

Each scrape is timed twice over: with httpx (what the earlier rows of BENCHMARKS.md used; the
Python client's own cost is ~1-1.5 ms of it here) and with a bare HTTP/1.1 request on a
raw socket (`raw_*`: near what a Prometheus server's Go client adds, so the API's share).
`full_gcs` counts the API's generation-2 collections during the scrapes
(python_gc_collections_total), `full_gcs_since_start` all of them (mostly while the jobs
were submitted), and `submit_ms_*` are that API's POST /v1/jobs round trips.

    python bench/metrics_scrape.py --jobs 10000 --compare ../base/.venv/bin/genroute

`--compare EXE` starts a second `genroute api` from another build (a checkout's genroute)
over the same database, Redis, worker and jobs, and alternates the scrapes between the two
APIs (which goes first flips each round), so both see the same machine, load and stack:
one JSON line per build.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inflight import free_port, pct, stack, submit_jobs, video_body, wait_ready  # noqa: E402


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
    p.add_argument("--label", default="", help="this build's name in the output")
    p.add_argument("--compare", metavar="EXE", help="another build's genroute: its API is scraped too, alternately")
    p.add_argument("--compare-label", default="")
    args = p.parse_args()

    with stack(args.genroute, args.database_url, video_deadline_s=int(args.latency * 2 + 600)) as st:
        apis = {args.label or "this build": (st.url, st.api)}
        if args.compare:  # another build's API over the same stack
            port = free_port()
            other = subprocess.Popen([args.compare, "api", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                                     env=st.env, stdout=(st.root / "api-compare.log").open("wb"), stderr=subprocess.STDOUT)
            apis[args.compare_label or args.compare] = (f"http://127.0.0.1:{port}", other)
        try:
            await scrape_all(st, apis, args)
        finally:
            for _url, proc in list(apis.values())[1:]:
                proc.kill()
                proc.wait()


async def scrape_all(st: Any, apis: dict[str, tuple[str, subprocess.Popen[bytes]]], args: argparse.Namespace) -> None:
    steps = max(1, int(round(args.latency / args.interval)))
    headers = {"Authorization": f"Bearer {st.key}"}
    limits = httpx.Limits(max_connections=args.concurrency)
    submits: list[list[float]] = [[] for _ in apis]  # each API's POST /v1/jobs round trips

    def timed(into: list[float]) -> dict[str, list[Any]]:
        async def start(request: httpx.Request) -> None:
            request.extensions["t0"] = time.perf_counter()

        async def end(response: httpx.Response) -> None:
            if response.request.method == "POST":
                into.append(time.perf_counter() - response.request.extensions["t0"])
        return {"request": [start], "response": [end]}

    async with contextlib.AsyncExitStack() as clients:
        cs = [await clients.enter_async_context(httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits,
                                                                  event_hooks=timed(submits[i])))
              for i, (url, _) in enumerate(apis.values())]
        for each in cs:
            await wait_ready(each)
        c = cs[0]
        t0 = time.monotonic()
        # the submits are shared among the APIs, so each holds what serving them left in its heap
        shares = [args.jobs // len(cs) + (1 if i < args.jobs % len(cs) else 0) for i in range(len(cs))]
        batches = await asyncio.gather(*(submit_jobs(each, video_body(args.latency, steps), n,
                                                     max(1, args.concurrency // len(cs))) for each, n in zip(cs, shares, strict=True)))
        ids = [i for b in batches for i in b]
        submit_s = time.monotonic() - t0
        while (held := in_flight((await c.get("/metrics")).text, "local-video")) < args.jobs:
            if time.monotonic() - t0 > 1800:
                raise SystemExit(f"only {held:.0f} of {args.jobs} jobs in flight after 30 min")
            await asyncio.sleep(1.0)
        started_s = time.monotonic() - t0
    for url, _ in apis.values():  # each API answers the same mix, so its HTTP histograms hold as many series
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
            await traffic(c, ids[0], args.traffic)

    phases = [measure(apis, args, "default priority")]
    if args.renice:  # the API's CPU ahead of the other processes of a shared machine, as on its own box
        for _, proc in apis.values():
            os.setpriority(os.PRIO_PROCESS, proc.pid, args.renice)
        phases.append(measure(apis, args, f"api at nice {args.renice}"))
    for phase in phases:
        for (label, row), lat in zip(phase.items(), submits, strict=True):
            print(json.dumps({"label": label, **row, "submit_s": round(submit_s, 1),
                              "submit_ms_p50": round(pct(lat, 50) * 1000, 1), "submit_ms_p99": round(pct(lat, 99) * 1000, 1),
                              "submit_ms_max": round(max(lat) * 1000, 1) if lat else float("nan"),
                              "all_in_flight_s": round(started_s, 1)}))


class Raw:
    """A bare HTTP/1.1 client on one keep-alive socket: a request line, a Content-Length body."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, path: str) -> bytes:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, body = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"GET {path}: {head[:60]!r}")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self.sock.recv(65536)
        return body

    def close(self) -> None:
        self.sock.close()


def full_gcs(text: str) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name == "python_gc_collections":
            return sum(s.value for s in fam.samples if s.labels.get("generation") == "2")
    return float("nan")


def measure(apis: dict[str, tuple[str, Any]], args: argparse.Namespace, phase: str) -> dict[str, dict[str, Any]]:
    """S rounds; in each, every API is scraped once with httpx, once raw, and GET /healthz
    the same two ways, one API after the other (the order flips each round)."""
    order = list(apis)
    kinds = ("scrape", "raw_scrape", "healthz", "raw_healthz")
    times: dict[str, dict[str, list[float]]] = {a: {k: [] for k in kinds} for a in order}
    clients = {a: (httpx.Client(base_url=url, timeout=30), Raw(url)) for a, (url, _) in apis.items()}
    try:
        before = {a: hx.get("/metrics").text for a, (hx, raw) in clients.items()}  # connections open first
        for _hx, raw in clients.values():
            raw.get("/metrics")
        gap = args.pause / (4 * len(order))
        for i in range(args.scrapes):
            for a in (order if i % 2 == 0 else order[::-1]):
                hx, raw = clients[a]
                for kind in kinds:
                    path = "/metrics" if kind.endswith("scrape") else "/healthz"
                    t = time.perf_counter()
                    if kind.startswith("raw"):
                        raw.get(path)
                    else:
                        hx.get(path).raise_for_status()
                    times[a][kind].append(time.perf_counter() - t)
                    time.sleep(gap)
        after = {a: hx.get("/metrics") for a, (hx, raw) in clients.items()}
    finally:
        for hx, raw in clients.values():
            hx.close()
            raw.close()
    out: dict[str, dict[str, Any]] = {}
    for a in order:
        r = after[a]
        text = r.text
        n, labels = series(text)
        t = times[a]
        ms = {f"{k}_ms_{p}": round(pct(t[k], q) * 1000, 2) for k in kinds for p, q in (("p50", 50), ("p99", 99))}
        out[a] = {
            "phase": phase, "jobs_in_flight": in_flight(text, "local-video"), "scrapes": args.scrapes, **ms,
            "scrape_ms_max": round(max(t["scrape"]) * 1000, 2), "raw_scrape_ms_max": round(max(t["raw_scrape"]) * 1000, 2),
            **server_side(before[a], text), "full_gcs": full_gcs(text) - full_gcs(before[a]),
            "full_gcs_since_start": full_gcs(text),
            "load_avg_1m": round(os.getloadavg()[0], 2), "series": n, "bytes": len(r.content),
            "distinct_label_values_max": max(labels.values()) if labels else 0, "distinct_label_values": labels,
        }
    return out


if __name__ == "__main__":
    asyncio.run(main())
