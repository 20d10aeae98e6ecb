"""Jobs waiting for a busy deployment: woken by releases, not by timers.

    python bench/waiting.py --jobs 1000 --slots 2 --latency 1

Starts `genroute api` and one `genroute worker --queue media --metrics-port P` (SQLite, a
private redis-server) with one local deployment limited to S concurrent jobs, submits N jobs
of L-second tasks at once, samples waiting jobs while they drain and reports:

- runs that start nothing, per second, after the submit phase: the worker's
  genroute_job_runs_total{outcome="waiting"} over the drain (the target: <= 5/s; a job
  that re-ran on a timer to look again would make this ~N/interval);
- wake-up lag: with S slots, the i-th job to start took the slot the (i-S)-th finish freed,
  so started_at(i) - finished_at(i-S), p50/p99 (target p99 <= 1 s);
- FIFO: how many jobs started before one submitted earlier (target 0). The wait queue is
  ordered by submit time, but a run that reaches it late (ARQ starts runs concurrently; on
  a loaded machine one can lag) misses the releases that came before it;
- queue positions: at each sample, a waiting job's queue_position against the number of
  queued jobs submitted before it in the same listing; share exact, and the worst miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from priorities import free_port, pct, stop, ts, wait_ready  # noqa: E402


def waiting_runs(text: str) -> float:
    """Runs that started nothing: they left the job waiting."""
    m = re.search(r'^genroute_job_runs_total\{outcome="waiting"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--latency", type=float, default=1.0, help="provider task length (s)")
    p.add_argument("--concurrency", type=int, default=32, help="parallel submitting clients")
    p.add_argument("--genroute", default=str(Path(sys.executable).parent / "genroute"))
    p.add_argument("--label", default="")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="waiting-"))
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{
        "id": "busy", "modality": "image",
        "deployments": [{"name": "local-busy", "adapter": "local", "model": "image",
                         "limits": {"max_concurrency": args.slots}}]}]}))
    redis_port, api_port, metrics_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = [subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(root)], stdout=subprocess.DEVNULL)]
    env = dict(os.environ, GENROUTE_DATA_DIR=str(root / "data"), GENROUTE_CATALOG=str(catalog),
               GENROUTE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", GENROUTE_SECRET_KEY="bench",
               GENROUTE_PUBLIC_URL=f"http://127.0.0.1:{api_port}", GENROUTE_LOG_LEVEL="WARNING",
               GENROUTE_DEADLINE_IMAGE_SECONDS=str(int(args.jobs * args.latency / args.slots * 2 + 600)))
    exe = args.genroute
    try:
        time.sleep(0.5)
        subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
        key = subprocess.run([exe, "keys", "create", "--name", "bench"], env=env, check=True,
                             capture_output=True, text=True).stdout.split()[0]
        procs.append(subprocess.Popen([exe, "api", "--port", str(api_port), "--no-access-log"], env=env,
                                      stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([exe, "worker", "--queue", "media", "--metrics-port", str(metrics_port)], env=env,
                                      stdout=(root / "worker.log").open("wb"), stderr=subprocess.STDOUT))
        body = {"model": "busy", "input": {"prompt": "wait", "size": "64x64",
                                           "provider_params": {"latency_seconds": args.latency}}}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {key}"},
                                     timeout=60, limits=httpx.Limits(max_connections=args.concurrency)) as c:
            await wait_ready(c)

            async def call(method: str, url: str, **kw: object) -> httpx.Response:
                for attempt in range(5):
                    try:
                        r = await c.request(method, url, **kw)
                        r.raise_for_status()
                        return r
                    except httpx.TransportError:
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.5)
                raise AssertionError("unreachable")

            ids: list[str] = []
            todo = list(range(args.jobs))

            async def client() -> None:
                while todo:
                    i = todo.pop(0)
                    r = await call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": f"wait-{i}"})
                    ids.append(r.json()["id"])

            t0 = time.monotonic()
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            submit_s = time.monotonic() - t0
            metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            waiting0, w0 = waiting_runs((await c.get(metrics)).text), time.monotonic()

            async def read(batch: list[str]) -> dict[str, dict]:
                out: dict[str, dict] = {}
                for i in range(0, len(batch), 50):
                    rs = await asyncio.gather(*(call("GET", f"/v1/jobs/{j}") for j in batch[i:i + 50]))
                    out |= {r.json()["id"]: r.json() for r in rs}
                return out

            exact = samples = 0
            worst = 0
            rnd = random.Random(1)
            deadline = time.monotonic() + args.jobs * args.latency / args.slots * 3 + 120
            while True:
                queued = []  # every queued job, oldest first, from one listing
                cursor = None
                while True:
                    params = {"status": "queued", "limit": 100} | ({"cursor": cursor} if cursor else {})
                    page = (await call("GET", "/v1/jobs", params=params)).json()
                    queued += page["data"]
                    cursor = page.get("next_cursor")
                    if not cursor:
                        break
                if not queued:
                    break
                queued.sort(key=lambda j: j["created_at"])
                for idx in rnd.sample(range(len(queued)), min(10, len(queued))):
                    one = (await call("GET", f"/v1/jobs/{queued[idx]['id']}")).json()
                    pos = one.get("queue_position")
                    if pos is None:
                        continue
                    samples += 1
                    miss = abs(int(pos) - idx)
                    if os.environ.get("BENCH_DEBUG") and miss > 2:
                        head = subprocess.run(["redis-cli", "-p", str(redis_port), "zrange", "genroute:wq:d:local-busy", "0", "12"],
                                              capture_output=True, text=True).stdout.split()
                        states = {j: (await call("GET", f"/v1/jobs/{j}")).json()["status"] for j in head}
                        print("miss", idx, pos, one["id"], states, file=sys.stderr)
                    exact += miss == 0
                    worst = max(worst, miss)
                if time.monotonic() > deadline:
                    raise SystemExit("the jobs did not drain in time")
                await asyncio.sleep(1.0)
            drain_s = time.monotonic() - w0
            waiting1 = waiting_runs((await c.get(metrics)).text)
            for _ in range(120):
                jobs = await read(ids)
                if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs.values()):
                    break
                await asyncio.sleep(0.5)

        ok = [j for j in jobs.values() if j["status"] == "succeeded"]
        by_start = sorted(ok, key=lambda j: ts(j["started_at"]))
        finishes = sorted(ts(j["finished_at"]) for j in ok)
        lags = [ts(j["started_at"]) - finishes[i - args.slots] for i, j in enumerate(by_start) if i >= args.slots]
        created = [ts(j["created_at"]) for j in by_start]
        overtaken = sum(1 for i in range(1, len(created)) if created[i] < max(created[:i]))
        print(json.dumps({
            "label": args.label, "jobs": args.jobs, "slots": args.slots, "latency_s": args.latency,
            "succeeded": len(ok), "submit_s": round(submit_s, 1), "drain_s": round(drain_s, 1),
            "idle_runs_per_s": round((waiting1 - waiting0) / drain_s, 2), "waiting_runs_during_submit": waiting0,
            "wake_lag_p50_s": round(pct(lags, 50), 3), "wake_lag_p99_s": round(pct(lags, 99), 3),
            "fifo_overtaken": overtaken,
            "queue_position_samples": samples, "queue_position_exact": round(exact / max(1, samples), 3),
            "queue_position_worst_miss": worst,
        }))
    finally:
        stop(procs, root)


if __name__ == "__main__":
    asyncio.run(main())
