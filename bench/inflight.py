"""How many long jobs one worker holds in flight at the provider's cadence.

    python bench/inflight.py --jobs 10000 --latency 900 --interval 10 --steady 60 \
        --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

Starts `genroute api` and ONE `genroute worker --queue video` over a fresh PostgreSQL
database and a private redis-server (free port), submits N local-video jobs whose provider
task lasts L seconds and reports progress every I seconds (so N/I polls/s are asked), waits
until every job runs, then measures a steady phase of D seconds:

- cadence ratio: steps the sampled jobs advanced (read through GET /v1/jobs/{id}) ÷ the
  steps their provider made in that time, i.e. polls/s achieved ÷ N/I asked;
- lateness: for each sample, how long the provider's next step had been available but not
  yet reported (p50/p99/max), from the job's started_at and the local provider's clock;
- worker CPU (share of one core) and peak RSS, from /proc;
- PostgreSQL commits/s and row updates/s (pg_stat_database, pg_stat_user_tables).

`--genroute PATH` runs another checkout's `genroute` (to compare commits side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def psql(dsn: str, sql: str) -> str:
    return subprocess.run(["psql", dsn, "-tAc", sql], check=True, capture_output=True, text=True).stdout.strip()


def pg_counters(dsn: str, db: str) -> tuple[int, int]:
    commits = int(psql(dsn, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"))
    updates = int(psql(dsn, "SELECT coalesce(sum(n_tup_upd), 0) FROM pg_stat_user_tables") or 0)
    return commits, updates


@dataclass
class Stack:
    url: str
    key: str
    env: dict[str, str]
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    root: Path
    db_dsn: str  # libpq form, for psql


@contextmanager
def stack(exe: str, database_url: str, *, video_deadline_s: int = 3600,
          worker_args: tuple[str, ...] = ("--queue", "video")) -> Iterator[Stack]:
    """`genroute api` and ONE `genroute worker` over a fresh PostgreSQL database (made and
    dropped here) and a private redis-server on a free port."""
    server = database_url.rsplit("/", 1)[0]
    admin_dsn = server.replace("+asyncpg", "") + "/postgres"
    db = f"inflight_{uuid.uuid4().hex[:8]}"
    psql(admin_dsn, f"CREATE DATABASE {db}")
    dsn = server + "/" + db
    root = Path(tempfile.mkdtemp(prefix="inflight-"))
    redis_port, api_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL)
    procs.append(redis)
    env = dict(os.environ, GENROUTE_DATA_DIR=str(root / "data"), GENROUTE_DATABASE_URL=dsn,
               GENROUTE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", GENROUTE_SECRET_KEY="bench",
               GENROUTE_PUBLIC_URL=f"http://127.0.0.1:{api_port}", GENROUTE_LOG_LEVEL="WARNING",
               GENROUTE_DEADLINE_VIDEO_SECONDS=str(video_deadline_s))
    try:
        time.sleep(0.5)
        subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
        key = subprocess.run([exe, "keys", "create", "--name", "bench"], env=env, check=True,
                             capture_output=True, text=True).stdout.split()[0]
        api = subprocess.Popen([exe, "api", "--host", "127.0.0.1", "--port", str(api_port), "--no-access-log"],
                               env=env, stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(api)
        worker = subprocess.Popen([exe, "worker", *worker_args], env=env,
                                  stdout=(root / "worker.log").open("wb"), stderr=subprocess.STDOUT)
        procs.append(worker)
        yield Stack(f"http://127.0.0.1:{api_port}", key, env, api, worker, root,
                    admin_dsn.rsplit("/", 1)[0] + "/" + db)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        try:
            psql(admin_dsn, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


def video_body(latency: float, steps: int, prompt: str = "inflight") -> dict:
    """A local-video job whose provider task lasts `latency` s, reporting `steps` progress steps."""
    return {"model": "local-video", "input": {"prompt": prompt, "duration_seconds": 1, "resolution": "360p",
                                              "fps": 1, "provider_params": {"latency_seconds": latency,
                                                                             "progress_steps": steps}}}


async def wait_ready(c: httpx.AsyncClient) -> None:
    for _ in range(100):
        try:
            if (await c.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the API did not become ready")


async def submit_jobs(c: httpx.AsyncClient, body: dict, n: int, concurrency: int) -> list[str]:
    """Submit `n` copies of `body` over `concurrency` connections; the job ids."""
    ids: list[str] = []
    remaining = n

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            key = uuid.uuid4().hex  # a dropped answer is retried without a second job
            for attempt in range(5):
                try:
                    r = await c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                    if r.status_code == 503 and attempt < 4:  # an overloaded machine: the API says when to retry
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                        continue
                    r.raise_for_status()
                    break
                except httpx.TransportError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.5)
            ids.append(r.json()["id"])

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ids


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--latency", type=float, default=900.0, help="provider task length L (s)")
    p.add_argument("--interval", type=float, default=10.0, help="progress every I seconds")
    p.add_argument("--steady", type=float, default=60.0, help="steady phase length (s)")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
                   help="a PostgreSQL server; the bench makes (and drops) its own database there")
    p.add_argument("--genroute", default=str(Path(sys.executable).parent / "genroute"))
    p.add_argument("--label", default="")
    args = p.parse_args()

    with stack(args.genroute, args.database_url, video_deadline_s=int(args.latency * 2 + 600)) as st:
        worker = st.worker
        steps = max(1, int(round(args.latency / args.interval)))
        body = video_body(args.latency, steps)
        headers = {"Authorization": f"Bearer {st.key}"}
        limits = httpx.Limits(max_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=st.url, headers=headers, timeout=120, limits=limits) as c:
            await wait_ready(c)
            t0 = time.monotonic()
            ids = await submit_jobs(c, body, args.jobs, args.concurrency)
            submit_s = time.monotonic() - t0
            sample = random.Random(1).sample(ids, min(args.samples, len(ids)))

            async def get(j: str) -> dict:
                # an overloaded API (an older commit) may drop a connection or answer 503/429
                for attempt in range(10):
                    try:
                        r = await c.get(f"/v1/jobs/{j}")
                    except httpx.TransportError:
                        if attempt == 9:
                            raise
                        await asyncio.sleep(0.5)
                        continue
                    if r.status_code in (429, 503) and attempt < 9:
                        await asyncio.sleep(min(5.0, float(r.headers.get("retry-after", "1"))))
                        continue
                    r.raise_for_status()
                    return r.json()
                raise AssertionError("unreachable")

            async def read(ids_: list[str]) -> list[dict]:
                out: list[dict] = []
                for i in range(0, len(ids_), 50):
                    out += await asyncio.gather(*(get(j) for j in ids_[i:i + 50]))
                return out

            # every job started (it has a started_at and runs at the provider)
            while True:
                jobs = await read(sample)
                if all(j["status"] == "running" and j["started_at"] for j in jobs):
                    break
                if time.monotonic() - t0 > 1800:
                    raise SystemExit("jobs did not start within 30 min")
                await asyncio.sleep(1.0)
            await asyncio.sleep(max(5.0, args.interval))  # let the first polls settle

            def step_of(j: dict) -> int:
                return int(round((j["progress"]["fraction"] or 0.0) * steps))

            def lateness(j: dict, now: float) -> float:
                started = datetime.fromisoformat(j["started_at"].replace("Z", "+00:00")).timestamp()
                next_step_at = started + (step_of(j) + 1) * args.latency / steps
                return max(0.0, now - next_step_at)

            pg0 = pg_counters(st.db_dsn, st.db_dsn.rsplit("/", 1)[1])
            cpu0, w0 = cpu_seconds(worker.pid), time.monotonic()
            def started(j: dict) -> float:
                return datetime.fromisoformat(j["started_at"].replace("Z", "+00:00")).timestamp()

            def provider_step(j: dict, t: float) -> int:  # what the local provider reports at t
                return min(steps - 1, int((t - started(j)) / (args.latency / steps)))

            t_first = time.time()
            first_jobs = await read(sample)
            first = {j["id"]: step_of(j) for j in first_jobs}
            owed0 = {j["id"]: provider_step(j, t_first) for j in first_jobs}
            late: list[float] = []
            peak_rss = 0.0
            end = time.monotonic() + args.steady
            while time.monotonic() < end:
                jobs = await read(sample)
                now = time.time()
                late += [lateness(j, now) for j in jobs if j["status"] == "running"]
                peak_rss = max(peak_rss, rss_mb(worker.pid))
                await asyncio.sleep(1.0)
            t_last = time.time()
            last_jobs = await read(sample)
            last = {j["id"]: step_of(j) for j in last_jobs}
            owed1 = {j["id"]: provider_step(j, t_last) for j in last_jobs}
            elapsed = time.monotonic() - w0
            cpu = (cpu_seconds(worker.pid) - cpu0) / elapsed
            pg1 = pg_counters(st.db_dsn, st.db_dsn.rsplit("/", 1)[1])
            advanced = sum(last[j] - first[j] for j in sample)
            expected = sum(owed1[j] - owed0[j] for j in sample)  # steps the provider made meanwhile
            result = {
                "label": args.label, "jobs": args.jobs, "latency_s": args.latency, "interval_s": args.interval,
                "polls_asked_per_s": round(args.jobs / args.interval, 1),
                "cadence_ratio": round(advanced / expected, 3) if expected else None,
                "polls_achieved_per_s": round(args.jobs / args.interval * advanced / expected, 1) if expected else None,
                "late_p50_s": round(pct(late, 50), 2), "late_p99_s": round(pct(late, 99), 2),
                "late_max_s": round(max(late), 2) if late else None,
                "samples_over_5s": round(sum(x > 5 for x in late) / max(1, len(late)), 3),
                "worker_cpu_core": round(cpu, 3), "worker_rss_mb_peak": round(peak_rss, 1),
                "pg_commits_per_s": round((pg1[0] - pg0[0]) / elapsed, 1),
                "pg_row_updates_per_s": round((pg1[1] - pg0[1]) / elapsed, 1),
                "submit_s": round(submit_s, 1), "steady_s": round(elapsed, 1),
            }
            print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
