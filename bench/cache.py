"""Result cache hits: how long an identical seeded request takes to come back `succeeded`.

    python bench/cache.py --prompts 20 --hits 10

Starts `genroute api` and one `genroute worker` (SQLite unless --database-url, a private
redis-server on a free port, the default catalog). For each of N prompts it runs one
seeded `cache: true` job to the end (Prefer: wait), then sends the identical request
H times, one after another on a warm connection, as a client in a loop would. Every hit
is checked (201, `cached: true`, the first job's sha256s, held 0 and settled 0) and timed
from the request's send to its parsed answer. For comparison it times N ordinary submits
(no cache, no wait: the API's own submit path). Prints one JSON line: hit latency p50 /
p95 / max in ms, and the ordinary submit's p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from priorities import free_port, pct, stop, wait_ready  # noqa: E402


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=20, help="distinct seeded requests (one miss each)")
    p.add_argument("--hits", type=int, default=10, help="identical requests sent after each miss")
    p.add_argument("--database-url", default="", help="default: SQLite in a temp dir")
    p.add_argument("--genroute", default=str(Path(sys.executable).parent / "genroute"))
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    redis_port, api_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(root)], stdout=subprocess.DEVNULL))
    env = dict(os.environ, GENROUTE_DATA_DIR=str(root / "data"),
               GENROUTE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", GENROUTE_SECRET_KEY="bench",
               GENROUTE_PUBLIC_URL=f"http://127.0.0.1:{api_port}", GENROUTE_LOG_LEVEL="WARNING")
    if args.database_url:
        env["GENROUTE_DATABASE_URL"] = args.database_url
    exe = args.genroute
    try:
        time.sleep(0.5)
        subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
        key = subprocess.run([exe, "keys", "create", "--name", f"bench-{os.getpid()}"], env=env, check=True,
                             capture_output=True, text=True).stdout.split()[0]
        procs.append(subprocess.Popen([exe, "api", "--port", str(api_port), "--no-access-log"], env=env,
                                      stdout=(root / "api.log").open("wb"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([exe, "worker"], env=env,
                                      stdout=(root / "worker.log").open("wb"), stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{api_port}"
        run = os.getpid()

        def body(i: int, cache: bool = True) -> dict:
            return {"model": "local-image", "cache": cache,
                    "input": {"prompt": f"cache bench {run} {i}", "size": "256x256", "seed": 1000 + i}}

        hits: list[float] = []
        plain: list[float] = []
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            await wait_ready(c)
            for i in range(args.prompts):
                first = (await c.post("/v1/jobs", json=body(i), headers={"Prefer": "wait=60"})).json()
                if first["status"] != "succeeded" or first["cached"]:
                    raise SystemExit(f"the first run of prompt {i} did not succeed uncached: {first}")
                shas = [o["sha256"] for o in first["outputs"]]
                for _ in range(args.hits):
                    t0 = time.perf_counter()
                    r = await c.post("/v1/jobs", json=body(i))
                    job = r.json()
                    hits.append((time.perf_counter() - t0) * 1000)
                    cost = job["cost"]
                    if (r.status_code, job["status"], job["cached"], job["cached_from"]) != (201, "succeeded", True, first["id"]) \
                            or [o["sha256"] for o in job["outputs"]] != shas or (cost["held"], cost["settled"]) != (0, 0):
                        raise SystemExit(f"not a cache hit: {r.status_code} {job}")
            for i in range(args.prompts):
                t0 = time.perf_counter()
                r = await c.post("/v1/jobs", json=body(10_000 + i, cache=False))
                plain.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
        print(json.dumps({
            "prompts": args.prompts, "hits": len(hits), "db": "postgresql" if args.database_url else "sqlite",
            "hit_ms_p50": round(pct(hits, 50), 1), "hit_ms_p95": round(pct(hits, 95), 1),
            "hit_ms_max": round(max(hits), 1), "plain_submit_ms_p50": round(pct(plain, 50), 1),
        }))
    finally:
        stop(procs, root)


if __name__ == "__main__":
    asyncio.run(main())
