"""Drive a running genroute with N concurrent clients and report throughput and latency.

    # against a running service
    python bench/pipeline.py --url http://127.0.0.1:8000 --key gr_... --jobs 2000 --concurrency 64

    # or let it start its own API + worker processes (temp dir, SQLite or --database-url)
    python bench/pipeline.py --spawn --jobs 2000 --concurrency 64

Each client loops: POST /v1/jobs (local-image, zero latency, 256x256 by default) until the
job budget is spent. Reported: jobs accepted per second (201s over the submit window),
jobs completed per second (first submit to last finish, from the server's timestamps),
and p50/p99 submit-to-succeeded latency (finished_at - created_at per job) of that burst,
which includes the backlog it builds. A second, closed-loop phase (--steady-clients
clients, each `POST` with `Prefer: wait=60`) measures the pipeline's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def drive(url: str, key: str, jobs: int, concurrency: int, body: dict, wait: bool = True) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ids: list[str] = []
    errors: dict[int, int] = {}
    remaining = jobs
    submit_lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                r = await c.post("/v1/jobs", json=body)
                submit_lat.append(time.perf_counter() - t)
                if r.status_code == 201:
                    ids.append(r.json()["id"])
                else:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        submit_window = time.perf_counter() - t0

        # wait for completion, reading jobs back in pages
        pending = set(ids) if wait else set()
        done: dict[str, dict] = {}
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            batch = list(pending)[:200]
            rs = await asyncio.gather(*(c.get(f"/v1/jobs/{i}") for i in batch))
            for r in rs:
                j = r.json()
                if j["status"] in ("succeeded", "failed", "canceled"):
                    done[j["id"]] = j
                    pending.discard(j["id"])
            if pending:
                await asyncio.sleep(0.2)

    def ts(s: str) -> float:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    ok = [j for j in done.values() if j["status"] == "succeeded"]
    lat = [ts(j["finished_at"]) - ts(j["created_at"]) for j in ok]
    first = min((ts(j["created_at"]) for j in done.values()), default=0)
    last = max((ts(j["finished_at"]) for j in done.values() if j["finished_at"]), default=0)
    return {
        "submitted": len(ids),
        "submit_errors": sum(errors.values()),  # by status: see errors_by_status
        "errors_by_status": str(errors) if errors else "-",
        "succeeded": len(ok),
        "not_succeeded": len(done) - len(ok) + len(pending),
        "accepted_per_s": len(ids) / submit_window,
        "completed_per_s": len(ok) / (last - first) if last > first else float("nan"),
        "submit_p50_ms": pct(submit_lat, 50) * 1000,
        "submit_p99_ms": pct(submit_lat, 99) * 1000,
        "e2e_p50_ms": pct(lat, 50) * 1000,
        "e2e_p99_ms": pct(lat, 99) * 1000,
    }


async def steady(url: str, key: str, jobs: int, clients: int, body: dict) -> dict[str, float]:
    """Closed loop: each client submits with `Prefer: wait=60` and measures until the job
    has succeeded, so latency is the pipeline's, not a backlog's."""
    headers = {"Authorization": f"Bearer {key}", "Prefer": "wait=60"}
    lat: list[float] = []
    bad = 0
    remaining = jobs
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=90) as c:

        async def client() -> None:
            nonlocal remaining, bad
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                r = await c.post("/v1/jobs", json=body)
                if r.status_code == 200 and r.json()["status"] == "succeeded":
                    lat.append(time.perf_counter() - t)
                else:
                    bad += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        window = time.perf_counter() - t0
    return {
        "steady_clients": clients,
        "steady_succeeded": len(lat),
        "steady_failed": bad,
        "steady_jobs_per_s": len(lat) / window,
        "steady_e2e_p50_ms": pct(lat, 50) * 1000,
        "steady_e2e_p99_ms": pct(lat, 99) * 1000,
    }


def spawn(args: argparse.Namespace) -> tuple[str, str, list[subprocess.Popen[bytes]], Path]:
    from cli.embedded import free_port

    root = Path(tempfile.mkdtemp(prefix="genroute-bench-"))
    port = free_port()
    env = dict(os.environ)
    env.update(
        GENROUTE_DATA_DIR=str(root / "data"),
        GENROUTE_PUBLIC_URL=f"http://127.0.0.1:{port}",
        GENROUTE_SECRET_KEY="bench",
        GENROUTE_REDIS_URL=args.redis_url,
        GENROUTE_REDIS_PREFIX=f"bench{port}",
        GENROUTE_LOG_LEVEL="WARNING",
        GENROUTE_WORKER_MAX_JOBS=str(args.worker_max_jobs),
    )
    if args.database_url:
        env["GENROUTE_DATABASE_URL"] = args.database_url
    exe = str(Path(sys.executable).parent / "genroute")
    subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run([exe, "keys", "create", "--name", "bench"], env=env, check=True, capture_output=True, text=True)
    key = out.stdout.split()[0]
    procs = [
        subprocess.Popen([exe, "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
                         env=env, stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    ]
    for i in range(args.workers):
        procs.append(subprocess.Popen([exe, "worker"], env=env, stdout=(root / f"worker{i}.log").open("wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return url, key, procs, root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=os.environ.get("GENROUTE_API_KEY"))
    p.add_argument("--spawn", action="store_true", help="start an API and worker processes for the run")
    p.add_argument("--workers", type=int, default=1, help="worker processes with --spawn")
    p.add_argument("--worker-max-jobs", type=int, default=50)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--database-url", default="", help="with --spawn; default SQLite in the temp dir")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--size", default="256x256")
    p.add_argument("--submit-only", action="store_true", help="measure the API alone: do not wait for jobs")
    p.add_argument("--steady-clients", type=int, default=4, help="clients of the closed-loop latency phase (0: skip)")
    p.add_argument("--steady-jobs", type=int, default=200)
    args = p.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    root = None
    if args.spawn:
        args.url, args.key, procs, root = spawn(args)
    if not args.key:
        sys.exit("--key (or GENROUTE_API_KEY) is required without --spawn")
    body = {"model": "local-image", "input": {"prompt": "bench", "size": args.size}}
    try:
        res = asyncio.run(drive(args.url, args.key, args.jobs, args.concurrency, body, not args.submit_only))
        if args.steady_clients and not args.submit_only:
            res.update(asyncio.run(steady(args.url, args.key, args.steady_jobs, args.steady_clients, body)))
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        if root:
            shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"jobs={args.jobs} concurrency={args.concurrency} size={args.size} db={'postgres' if args.database_url else 'sqlite'}")
    for k, v in res.items():
        print(f"  {k:16s} {v:10.1f}" if isinstance(v, float) else f"  {k:16s} {v:>10}")


if __name__ == "__main__":
    main()
