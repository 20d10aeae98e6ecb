"""Outage drills with real processes: what a hostile operator does to a running genroute.

    python bench/drills.py worker-kill      --jobs 300 --kills 10
    python bench/drills.py redis-restart    --jobs 200
    python bench/drills.py postgres-restart --seconds 15
    python bench/drills.py receiver-outage  --jobs 100 --down 60
    python bench/drills.py all

Each drill starts `genroute api` and `genroute worker` processes (tests/stack.py: the same
stack the test suite uses, configured only through GENROUTE_* env) against the local
provider, whose every create is appended to a submit log, and prints one line of counts:

- worker-kill: two workers, `kill -9` of one of them every few seconds (restarted at once)
  while N jobs of 1-6 s provider tasks run. lost = accepted jobs not ended by the timeout;
  internal = jobs ended `internal`; duplicated = jobs whose create reached the provider
  more than once (the local provider's tasks are idempotent by job id, so a resend is
  allowed there; every other adapter proves it safe first, workers/run.py).
- redis-restart: a private redis-server, `kill -9` under load and back empty 3.5 s later.
  Also: whether both workers are still alive.
- postgres-restart: a private PostgreSQL cluster stopped for S seconds under a steady
  stream of submits and reads. Answers by status while it is down (the target: only 503,
  never 500), and whether every job accepted before and after ends succeeded.
- receiver-outage: N jobs whose webhooks go to a receiver that is down for D seconds.
  delivered / expected, out-of-order jobs, duplicates.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.stack import PrivateRedis, Stack, make_stack  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}


def job_body(i: int, latency: float, steps: int = 3, **extra: Any) -> dict[str, Any]:
    return {"model": "local-image", **extra,
            "input": {"prompt": f"drill {i}", "size": "256x256",
                      "provider_params": {"latency_seconds": latency, "progress_steps": steps}}}


async def submit_all(c: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int = 16) -> list[str]:
    sem = asyncio.Semaphore(concurrency)

    async def one(b: dict[str, Any]) -> str:
        async with sem:
            r = await c.post("/v1/jobs", json=b)
            r.raise_for_status()
            return str(r.json()["id"])

    return list(await asyncio.gather(*(one(b) for b in bodies)))


async def settle(c: httpx.AsyncClient, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every job's last state once all ended, or at the timeout."""
    deadline = time.monotonic() + timeout
    last: dict[str, dict[str, Any]] = {}
    while True:
        todo = [i for i in ids if last.get(i, {}).get("status") not in TERMINAL]
        for k in range(0, len(todo), 50):
            rs = await asyncio.gather(*(c.get(f"/v1/jobs/{i}") for i in todo[k:k + 50]), return_exceptions=True)
            for i, r in zip(todo[k:k + 50], rs, strict=True):
                if isinstance(r, httpx.Response) and r.status_code == 200:
                    last[i] = r.json()
        if all(last.get(i, {}).get("status") in TERMINAL for i in ids) or time.monotonic() > deadline:
            return last
        await asyncio.sleep(0.5)


def outcome(ids: list[str], jobs: dict[str, dict[str, Any]], st: Stack) -> dict[str, Any]:
    statuses = collections.Counter(jobs.get(i, {}).get("status", "unknown") for i in ids)
    codes = collections.Counter((jobs[i].get("error") or {}).get("code") for i in ids if i in jobs
                                and jobs[i]["status"] == "failed")
    creates = collections.Counter(st.submits())
    return {
        "accepted": len(ids),
        "succeeded": statuses["succeeded"],
        "lost": sum(1 for i in ids if jobs.get(i, {}).get("status") not in TERMINAL),
        "failed": dict(codes),
        "internal": codes.get("internal", 0),
        "duplicated": sum(1 for i in ids if creates[i] > 1),
        "never_created": sum(1 for i in ids if creates[i] == 0 and jobs.get(i, {}).get("status") == "succeeded"),
    }


async def worker_kill(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from tests.services import fresh_postgres

    async with fresh_postgres() as db:
        st = await make_stack(root, redis_url=args.redis, database_url=db, worker_max_jobs="20")
        try:
            st.start_api()
            names = ["w1", "w2"]
            for n in names:
                st.start_worker(n)
            rnd = random.Random(7)
            async with st.client() as c:
                ids = await submit_all(c, [job_body(i, rnd.uniform(1, 6)) for i in range(args.jobs)])
                for k in range(args.kills):
                    await asyncio.sleep(args.kill_every)
                    victim = names[k % 2]
                    st.kill(victim)
                    st.start_worker(victim)
                jobs = await settle(c, ids, args.timeout)
            alive = all(st.procs[n].poll() is None for n in names)
            return {"drill": "worker-kill", "kills": args.kills, **outcome(ids, jobs, st), "workers_alive": alive}
        finally:
            st.stop()


async def redis_restart(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from tests.services import fresh_postgres

    redis = PrivateRedis(root / "redis")
    redis.start()
    async with fresh_postgres() as db:
        st = await make_stack(root / "stack", redis_url=redis.url, database_url=db, worker_max_jobs="20")
        try:
            st.start_api()
            st.start_worker("w1", ready=True)
            st.start_worker("w2", ready=True)
            rnd = random.Random(11)
            async with st.client() as c:
                ids = await submit_all(c, [job_body(i, rnd.uniform(1, 6)) for i in range(args.jobs)])
                await asyncio.sleep(2.0)
                redis.kill()
                await asyncio.sleep(3.5)
                redis.start()  # empty: queues, poll schedules, leases gone
                jobs = await settle(c, ids, args.timeout)
            alive = all(st.procs[n].poll() is None for n in ("w1", "w2"))
            return {"drill": "redis-restart", **outcome(ids, jobs, st), "workers_alive": alive}
        finally:
            st.stop()
            redis.kill()


async def postgres_restart(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from tests.pg_cluster import private_postgres

    with private_postgres(root / "pg") as pg:
        st = await make_stack(root / "stack", redis_url=args.redis, key_cache_seconds="0",
                              database_url=pg.url.replace("postgresql://", "postgresql+asyncpg://"))
        try:
            st.start_api()
            st.start_worker()
            answers: collections.Counter[str] = collections.Counter()
            ids: list[str] = []
            stop = asyncio.Event()
            async with st.client() as c:

                async def traffic() -> None:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        r = await c.post("/v1/jobs", json=job_body(i, 0.5, 1))
                        if r.status_code == 201:
                            ids.append(r.json()["id"])
                        if down.is_set():
                            answers[f"post {r.status_code}"] += 1
                            g = await c.get("/v1/jobs", params={"limit": 5})
                            answers[f"get {g.status_code}"] += 1
                        await asyncio.sleep(0.05)

                down = asyncio.Event()
                task = asyncio.create_task(traffic())
                await asyncio.sleep(3)
                await asyncio.to_thread(pg.stop)
                down.set()
                await asyncio.sleep(args.seconds)
                down.clear()
                await asyncio.to_thread(pg.start)
                await asyncio.sleep(5)
                stop.set()
                await task
                jobs = await settle(c, ids, args.timeout)
            bad = sum(n for k, n in answers.items() if k.endswith(" 500"))
            return {"drill": "postgres-restart", "down_s": args.seconds, "answers_while_down": dict(answers),
                    "500s": bad, **outcome(ids, jobs, st), "worker_alive": st.procs["worker"].poll() is None}
        finally:
            st.stop()


async def receiver_outage(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from tests.test_webhooks import ALL_EVENTS, Receiver

    receiver = Receiver()  # not started: connection refused
    st = await make_stack(root, redis_url=args.redis, webhook_allowlist='["127.0.0.1/32"]',
                          webhook_backoff_seconds=json.dumps([1, 2, 4, 8, 15, 30, 30, 30, 30, 30]),
                          webhook_timeout_seconds="5")
    try:
        st.start_api()
        st.start_worker()
        async with st.client() as c:
            ids = await submit_all(c, [job_body(i, 1.0, 2, webhook_url=receiver.url(), webhook_events=ALL_EVENTS)
                                       for i in range(args.jobs)])
            await asyncio.sleep(args.down)
            await receiver.start()
            jobs = await settle(c, ids, args.timeout)
            expected = 0
            deadline = time.monotonic() + args.timeout
            while True:  # every delivery row ended (delivered or exhausted)
                pending, expected = 0, 0
                for i in ids:
                    r = await c.get("/v1/webhooks/deliveries", params={"job_id": i, "limit": 100})
                    ds = r.json()["data"]
                    expected += len(ds)
                    pending += sum(1 for d in ds if d["status"] == "pending")
                if pending == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
        await receiver.stop()
        got = [json.loads(b) for _, b in receiver.received]
        seen = collections.Counter((e["job_id"], e["seq"]) for e in got)
        out_of_order = 0
        for i in ids:
            seqs = [e["seq"] for e in got if e["job_id"] == i]
            if seqs != sorted(seqs):
                out_of_order += 1
        return {"drill": "receiver-outage", "down_s": args.down, **outcome(ids, jobs, st),
                "deliveries_expected": expected, "delivered": len(seen),
                "duplicates": sum(n - 1 for n in seen.values()), "jobs_out_of_order": out_of_order}
    finally:
        st.stop()


DRILLS = {"worker-kill": worker_kill, "redis-restart": redis_restart, "postgres-restart": postgres_restart,
          "receiver-outage": receiver_outage}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("drill", choices=[*DRILLS, "all"])
    p.add_argument("--jobs", type=int, default=0, help="jobs per drill (default: 300 / 200 / - / 100)")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--kill-every", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=15.0, help="PostgreSQL down for this long")
    p.add_argument("--down", type=float, default=60.0, help="webhook receiver down for this long")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = p.parse_args()
    defaults = {"worker-kill": 300, "redis-restart": 200, "postgres-restart": 0, "receiver-outage": 100}
    for name in DRILLS if args.drill == "all" else [args.drill]:
        a = argparse.Namespace(**{**vars(args), "jobs": args.jobs or defaults[name]})
        t0 = time.monotonic()
        result = await DRILLS[name](a, Path(tempfile.mkdtemp(prefix=f"drill-{name}-")))
        print(json.dumps({**result, "took_s": round(time.monotonic() - t0, 1)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
