"""Priorities under a flood: N low jobs, then H high ones, on a deployment with S slots.

    python bench/priorities.py --low 500 --high 10 --slots 2 --latency 1

Starts `genroute api` and one `genroute worker --queue media` (SQLite, a private
redis-server on a free port) with a catalog whose one model has a single local deployment
limited to S concurrent jobs. Submits the low jobs, then the high ones, and waits until
every high job has finished. Reports, from each job's created_at / started_at:

- violations: (high, low) pairs where the low job was submitted before the high one, had
  not started when the high one was submitted, and still started before it. A slot freed
  while the high job's run is on its way to the wait queue goes to the low job at the
  head, so a few are expected (about one per slot per high job); `violations_after_one_task`
  counts only the lows that started more than one task length after the high one was
  submitted (the promise: none);
- the high jobs' start delays (started_at - created_at): p50 / max, in seconds, against the
  provider task length (a high job should wait about one task, not the low backlog);
- how many low jobs had started when the last high one started.

`--genroute PATH` runs another checkout's `genroute` (to compare commits side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml
from inflight import wait_ready  # one readiness wait for the benches (cache and waiting import it from here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))] if v else float("nan")


def stop(procs: list[subprocess.Popen], root: Path) -> None:
    """Kill what a bench started, then remove its directory (BENCH_KEEP=1 keeps it)."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(root, ignore_errors=True)
    else:
        print("kept", root, file=sys.stderr)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--low", type=int, default=500)
    p.add_argument("--high", type=int, default=10)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--latency", type=float, default=1.0, help="provider task length (s)")
    p.add_argument("--concurrency", type=int, default=32, help="parallel submitting clients")
    p.add_argument("--genroute", default=str(Path(sys.executable).parent / "genroute"))
    p.add_argument("--label", default="")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="priorities-"))
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{
        "id": "flood", "modality": "image",
        "deployments": [{"name": "local-flood", "adapter": "local", "model": "image",
                         "limits": {"max_concurrency": args.slots}}]}]}))
    redis_port, api_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL))
    env = dict(os.environ, GENROUTE_DATA_DIR=str(root / "data"), GENROUTE_CATALOG=str(catalog),
               GENROUTE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", GENROUTE_SECRET_KEY="bench",
               GENROUTE_PUBLIC_URL=f"http://127.0.0.1:{api_port}", GENROUTE_LOG_LEVEL="WARNING")
    exe = args.genroute
    try:
        time.sleep(0.5)
        subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
        key = subprocess.run([exe, "keys", "create", "--name", "bench"], env=env, check=True,
                             capture_output=True, text=True).stdout.split()[0]
        procs.append(subprocess.Popen([exe, "api", "--port", str(api_port), "--no-access-log"], env=env,
                                      stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([exe, "worker", "--queue", "media"], env=env,
                                      stdout=(root / "worker.log").open("wb"), stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{api_port}"

        def body(priority: str, i: int) -> dict:
            return {"model": "flood", "priority": priority,
                    "input": {"prompt": f"{priority} {i}", "size": "64x64",
                              "provider_params": {"latency_seconds": args.latency}}}

        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=args.concurrency)) as c:
            await wait_ready(c)

            async def call(method: str, path: str, **kw: object) -> httpx.Response:
                for attempt in range(5):  # a dropped connection is retried (submits are idempotent by key)
                    try:
                        r = await c.request(method, path, **kw)
                        r.raise_for_status()
                        return r
                    except httpx.TransportError:
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.5)
                raise AssertionError("unreachable")

            async def submit(priority: str, n: int) -> list[tuple[float, str]]:
                out: list[tuple[float, str]] = []
                todo = list(range(n))

                async def client() -> None:
                    while todo:
                        i = todo.pop(0)
                        at = time.time()
                        r = await call("POST", "/v1/jobs", json=body(priority, i),
                                       headers={"Idempotency-Key": f"{priority}-{i}"})
                        out.append((at, r.json()["id"]))

                await asyncio.gather(*(client() for _ in range(min(args.concurrency, n))))
                return out

            t0 = time.monotonic()
            lows = await submit("low", args.low)
            low_submit_s = time.monotonic() - t0
            highs = await submit("high", args.high)
            high_sent = {j: at for at, j in highs}

            async def read(ids: list[str]) -> dict[str, dict]:
                out: dict[str, dict] = {}
                for i in range(0, len(ids), 50):
                    rs = await asyncio.gather(*(call("GET", f"/v1/jobs/{j}") for j in ids[i:i + 50]))
                    out |= {r.json()["id"]: r.json() for r in rs}
                return out

            deadline = time.monotonic() + 120 + args.low * args.latency / args.slots
            while True:
                hs = await read(list(high_sent))
                if all(h["status"] in ("succeeded", "failed", "canceled") for h in hs.values()):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("the high jobs did not finish in time (the low backlog's length + 2 min)")
                await asyncio.sleep(0.5)
            ls = await read([j for _, j in lows])

        low_sent = {j: at for at, j in lows}
        failed = [h["id"] for h in hs.values() if h["status"] != "succeeded"]
        violations = late_violations = 0
        for h in hs.values():
            h_start = ts(h["started_at"])
            for lid, low in ls.items():
                l_start = ts(low["started_at"])
                if l_start is None or low_sent[lid] > high_sent[h["id"]]:
                    continue
                if l_start > high_sent[h["id"]] and l_start < h_start:
                    violations += 1
                    late_violations += l_start > high_sent[h["id"]] + args.latency
        delays = [ts(h["started_at"]) - ts(h["created_at"]) for h in hs.values()]
        last_high = max(ts(h["started_at"]) for h in hs.values())
        lows_started = sum(1 for low in ls.values() if low["started_at"] and ts(low["started_at"]) <= last_high)
        print(json.dumps({
            "label": args.label, "low": args.low, "high": args.high, "slots": args.slots, "latency_s": args.latency,
            "violations": violations, "violations_after_one_task": late_violations, "high_failed": len(failed),
            "high_start_delay_p50_s": round(pct(delays, 50), 2), "high_start_delay_max_s": round(max(delays), 2),
            "lows_started_when_last_high_started": lows_started,
            "low_submit_s": round(low_submit_s, 1),
        }))
    finally:
        stop(procs, root)


if __name__ == "__main__":
    asyncio.run(main())
