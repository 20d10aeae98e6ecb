"""What issue 6 (per-key gate + billing hold) costs on the submit hot path: POST /v1/jobs
before and after, measured side by side in one run, interleaved.

    .venv/bin/python bench/submit_billing.py                              # ~4-5 min
    .venv/bin/python bench/submit_billing.py --rounds 5 --duration 15
    .venv/bin/python bench/submit_billing.py --targets before,nobudget    # a subset

Targets (each: its own fresh PostgreSQL database, created and dropped here, its own Redis
prefix, its own key from `keys create`; no worker runs, so jobs pile up queued):
- before:    the commit before issue 6 (--before-rev, default edbc798), unpacked with
             `git archive REV | tar -x` into a temp dir (the repo's state is not touched) and
             run with the same venv python, cwd and PYTHONPATH = that dir, so its modules are
             the ones imported (checked: no /v1/usage in its OpenAPI, no `cost` in its 201,
             its own migrations: schema 0004, no tenants table).
- nobudget:  the working tree; the key's tenant has no budget.
- budget:    the working tree; tenants.budget = --budget (large: never binds).
- rpm:       as budget, and the key has rpm = --rpm (the Lua sliding window runs, never binds).
- unpriced:  the working tree, but local-image with no price in the catalog, so the hold is
             0 and skips the `UPDATE tenants` (only the billing_entries INSERT remains): it
             isolates the UPDATE's cost. Note that local-image *is* priced in the default
             catalog, so `nobudget` runs the UPDATE too (its WHERE is `budget IS NULL OR ...`).

Load: wrk -t1 -c{--clients} with bench/post.lua (a local-image 256x256 job) plus a Lua
`response`/`done` that counts 201s and reports p50/p99. Rounds: each round runs every
target once, in an order rotated per round; per target and round the API is started, one
POST is checked (201 and the right code's answer), --warmup s of load, then --duration s
measured, then it is stopped. One API process at a time: each holds up to 30 pooled
PostgreSQL connections and the server allows 100 (shared with others).

Verified after the rounds, per database: jobs rows = 201s counted (checks + warm-ups +
measured) + requests still in flight when wrk stopped (0..clients per wrk run); every job is
queued and on the ARQ queue; for the working tree: one `hold` entry per job, the sum of the
holds = jobs x the per-job estimate = tenants.held for a tenant with a budget (one without
keeps 0 there: core/billing/ledger.py); rpm: the rate ZSET exists (only) for it.
ARQ's job keys (`arq:job:run:<id>`, outside the prefix) are deleted by id, then the prefix.

Reported per target: requests/s (median of rounds, and each round), p50, p99 (median of
rounds), ratio to `before` (of the medians, and the range of per-round paired ratios), API
CPU (% of one core, and CPU ms per request), CPU of this database's PostgreSQL backends
(% of one core, from their process titles), PostgreSQL connections opened per second
(pg_stat_database.sessions: the pool's overflow connections are opened and closed), machine
busy %, and the mean number of this
database's backends waiting on a lock (pg_stat_activity sampled every 100 ms): row-lock
waits on the tenant row show up there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.chat_vs_litellm import HOST, Procs, _pg, clean_redis, cpu_seconds, free_port, pg_answers, wait_http  # noqa: E402

POST_LUA = ROOT / "bench" / "post.lua"
ARQ_JOB_PREFIX = "arq:job:"  # arq.constants.job_key_prefix: not under our Redis prefix

# appended to bench/post.lua: count 201s (and keep the first few other answers), report as JSON
WRK_DONE = r"""
threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) n201 = 0; nother = 0; others = "" end
function response(status, headers, body)
  if status == 201 then
    n201 = n201 + 1
  else
    nother = nother + 1
    if nother <= 3 then
      local b = string.gsub(string.sub(body or "", 1, 200), '[%c"\\]', ' ')
      others = others .. status .. ": " .. b .. " | "
    end
  end
end
function done(summary, latency, requests)
  local a, b, o = 0, 0, ""
  for _, t in ipairs(threads) do a = a + t:get("n201"); b = b + t:get("nother"); o = o .. t:get("others") end
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"n201":%d,"nother":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout, a, b))
  io.write("BENCHOTHERS " .. o .. "\n")
end
"""


@dataclass
class Target:
    id: str
    label: str
    tree: Path
    new_code: bool
    budget: int | None = None
    rpm: int | None = None
    unpriced: bool = False
    # filled by setup
    env: dict[str, str] = field(default_factory=dict)
    db: str = ""
    db_url: str = ""
    prefix: str = ""
    key: str = ""
    key_id: str = ""
    hold: int | None = None  # per-job hold seen in the check's answer (new code)
    counted_201: int = 0  # checks + warm-ups + measured
    wrk_runs: int = 0
    other_answers: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=lambda: {"non2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0})
    rounds: list[dict[str, Any]] = field(default_factory=list)
    verify: dict[str, Any] = field(default_factory=dict)


def post_body() -> dict[str, Any]:
    m = re.search(r"wrk\.body\s*=\s*'(.*)'", POST_LUA.read_text())
    if not m:
        raise RuntimeError(f"no wrk.body = '...' in {POST_LUA}")
    return json.loads(m.group(1))


def run_cli(t: Target, *argv: str) -> str:
    cmd = [sys.executable, "-m", "cli.main", *argv]
    out = subprocess.run(cmd, env=t.env, cwd=t.tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{t.id}: {' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


async def _fetch(url: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def fetch(url: str, sql: str, *args: Any) -> list[Any]:
    return asyncio.run(_fetch(url, sql, *args))


def unpriced_catalog(tmp: Path) -> Path:
    import yaml

    data = yaml.safe_load((ROOT / "core" / "catalog.yaml").read_text())
    for m in data["models"]:
        if m["id"] == "local-image":
            for d in m["deployments"]:
                d.pop("price", None)
    path = tmp / "catalog-unpriced.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def setup_target(t: Target, args: argparse.Namespace, tmp: Path) -> None:
    """Fresh database (migrated by the target's own code), fresh prefix, a key."""
    tag = secrets.token_hex(4)
    t.db = f"genroute_submitbench_{t.id}_{tag}"
    t.prefix = f"submitbench{t.id}{tag}"
    asyncio.run(_pg(args.admin_url, f'CREATE DATABASE "{t.db}"'))
    t.db_url = f"{args.pg_url.rstrip('/')}/{t.db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENROUTE_", "PYTHONPATH"))}
    env.update(
        PYTHONPATH=str(t.tree), GENROUTE_DATABASE_URL=t.db_url, GENROUTE_REDIS_URL=args.redis_url,
        GENROUTE_REDIS_PREFIX=t.prefix, GENROUTE_DATA_DIR=str(tmp / t.id), GENROUTE_SECRET_KEY="bench",
        GENROUTE_LOG_LEVEL="WARNING",
    )
    if t.unpriced:
        env["GENROUTE_CATALOG"] = str(unpriced_catalog(tmp))
    t.env = env
    run_cli(t, "migrate")
    argv = ["keys", "create", "--name", "bench"]
    if t.rpm:
        argv += ["--rpm", str(t.rpm)]
    out = run_cli(t, *argv)
    t.key = out.split()[0]
    m = re.search(r"# (?:admin )?key (\S+?),", out)
    t.key_id = m.group(1) if m else ""
    if t.budget is not None:
        fetch(t.db_url, "UPDATE tenants SET budget = $1 WHERE id = 'bench'", t.budget)
    # the schema is the one this code's migrations made
    version = fetch(t.db_url, "SELECT version_num FROM alembic_version")[0][0]
    has_tenants = fetch(t.db_url, "SELECT to_regclass('tenants') IS NOT NULL")[0][0]
    if t.new_code != has_tenants:
        raise RuntimeError(f"{t.id}: schema {version}, tenants table {'present' if has_tenants else 'absent'}: wrong code?")
    t.verify["schema"] = version
    if t.budget is not None:
        got = fetch(t.db_url, "SELECT budget FROM tenants WHERE id = 'bench'")
        if not got or got[0][0] != t.budget:
            raise RuntimeError(f"{t.id}: tenants.budget is {got}, expected {t.budget}")


def start_api(t: Target, procs: Procs, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(t.env, GENROUTE_PUBLIC_URL=f"http://{HOST}:{port}")
    log = tmp / f"{t.id}-api.log"
    argv = [sys.executable, "-m", "cli.main", "api", "--host", HOST, "--port", str(port),
            "--log-level", "warning", "--no-access-log"]
    p = subprocess.Popen(argv, env=env, cwd=t.tree, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    procs.procs.append(p)
    base = f"http://{HOST}:{port}"
    wait_http(f"{base}/readyz", p, log)
    return p, base


def check(t: Target, base: str, body: dict[str, Any]) -> None:
    """The right code answers, and one POST gets 201 with a queued job."""
    paths = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    if ("/v1/usage" in paths) != t.new_code:
        raise RuntimeError(f"{t.id}: /v1/usage {'present' if '/v1/usage' in paths else 'absent'} in its OpenAPI: wrong code running")
    r = httpx.post(f"{base}/v1/jobs", json=body, headers={"Authorization": f"Bearer {t.key}"}, timeout=30)
    if r.status_code != 201:
        raise RuntimeError(f"{t.id}: check POST answered {r.status_code}: {r.text[:1000]}")
    t.counted_201 += 1
    job = r.json()
    if job.get("status") != "queued" or not str(job.get("id", "")).startswith("job"):
        raise RuntimeError(f"{t.id}: check POST answered {job}")
    cost = job.get("cost")
    if t.new_code:
        if not cost or cost.get("status") != "held":
            raise RuntimeError(f"{t.id}: no held cost in the 201: {job}")
        if t.hold is not None and cost["held"] != t.hold:
            raise RuntimeError(f"{t.id}: held {cost['held']}, earlier {t.hold}")
        t.hold = cost["held"]
    elif "cost" in job:
        raise RuntimeError(f"{t.id}: the old code answered with a cost: {job}")


def wrk(t: Target, base: str, script: Path, clients: int, seconds: float) -> dict[str, Any]:
    env = dict(os.environ, GENROUTE_API_KEY=t.key)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script),
                          f"{base}/v1/jobs"], env=env, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = out.stdout.splitlines()
    line = next((ln for ln in lines if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    res = json.loads(line[len("BENCHJSON "):])
    others = next((ln[len("BENCHOTHERS "):] for ln in lines if ln.startswith("BENCHOTHERS ")), "").strip()
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["wrk_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    t.counted_201 += res["n201"]
    t.wrk_runs += 1
    t.errors["non2xx"] += res["nother"]
    for k in ("connect", "read", "write", "timeout"):
        t.errors[k] += res[k]
    if others and len(t.other_answers) < 5:
        t.other_answers.append(others)
    return res


class LockSampler:
    """Samples pg_stat_activity for one database every `every` s on its own thread."""

    def __init__(self, admin_url: str, db: str, every: float = 0.1) -> None:
        self.admin_url, self.db, self.every = admin_url, db, every
        self.samples: list[tuple[int, int]] = []  # (waiting on a lock, active)
        self.waits: Counter[str] = Counter()  # lock wait event and statement -> samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.error: str | None = None

    async def _run(self) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.admin_url, timeout=5)
        except Exception as exc:  # noqa: BLE001
            self.error = str(exc)
            return
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    "SELECT wait_event_type = 'Lock', state = 'active', wait_event, left(regexp_replace(query, '\\s+', ' ', 'g'), 50) "
                    "FROM pg_stat_activity WHERE datname = $1", self.db)
                self.samples.append((sum(1 for r in rows if r[0]), sum(1 for r in rows if r[1])))
                for r in rows:
                    if r[0]:
                        self.waits[f"{r[2]}: {r[3]}"] += 1
                await asyncio.sleep(self.every)
        finally:
            await conn.close()

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def mean(self, i: int) -> float:
        return statistics.fmean(s[i] for s in self.samples) if self.samples else float("nan")


def pg_backends_cpu(db: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend connected to `db` (found by its process title)."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith("postgres:") and f" {db} " in title:
                c = proc.cpu_times()
                out[proc.pid] = c.user + c.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def busy_seconds() -> tuple[float, float]:
    c = psutil.cpu_times()
    total = sum(c)
    idle = c.idle + getattr(c, "iowait", 0.0)
    return total - idle, total


def one_slot(t: Target, args: argparse.Namespace, procs: Procs, tmp: Path, body: dict[str, Any], rnd: int) -> dict[str, Any]:
    p, base = start_api(t, procs, tmp)
    try:
        check(t, base, body)
        script = tmp / f"{t.id}.lua"
        script.write_text(POST_LUA.read_text() + WRK_DONE)
        if args.warmup > 0:
            wrk(t, base, script, args.clients, args.warmup)
        sessions0 = fetch(args.admin_url, "SELECT sessions FROM pg_stat_database WHERE datname = $1", t.db)[0][0]
        cpu0, (b0, tot0), pg0 = cpu_seconds(p.pid), busy_seconds(), pg_backends_cpu(t.db)
        with LockSampler(args.admin_url, t.db) as sampler:
            res = wrk(t, base, script, args.clients, args.duration)
        cpu1, (b1, tot1), pg1 = cpu_seconds(p.pid), busy_seconds(), pg_backends_cpu(t.db)
        sessions1 = fetch(args.admin_url, "SELECT sessions FROM pg_stat_database WHERE datname = $1", t.db)[0][0]
        wall = res["duration_us"] / 1e6
        out = {
            "round": rnd, "rps": res["rps"], "p50": res["p50_us"] / 1000, "p99": res["p99_us"] / 1000,
            "requests": res["requests"], "n201": res["n201"], "non2xx": res["nother"],
            "errors": sum(res[k] for k in ("connect", "read", "write", "timeout")),
            "api_cpu": (cpu1 - cpu0) / wall, "api_cpu_ms_per_req": (cpu1 - cpu0) * 1000 / max(res["requests"], 1),
            "machine_busy": (b1 - b0) / (tot1 - tot0) if tot1 > tot0 else float("nan"),
            "wrk_cpu": res["wrk_cpu_s"] / wall,
            # backends that exited during the run are missed, ones that started are counted whole
            "pg_cpu": sum(c - pg0.get(pid, 0.0) for pid, c in pg1.items()) / wall,
            "lock_waiters": sampler.mean(0), "active": sampler.mean(1), "sampler_error": sampler.error,
            "lock_waits": dict(sampler.waits.most_common(3)),
            # PostgreSQL connections opened during the run (the pool's overflow opens and closes them)
            "new_connections": int(sessions1 - sessions0),
        }
        t.rounds.append(out)
        print(f"  round {rnd + 1} {t.label:22s} {out['rps']:7.1f} rps  p50 {out['p50']:6.1f} ms  p99 {out['p99']:6.1f} ms  "
              f"201s {out['n201']}/{out['requests']}  api cpu {out['api_cpu']:.0%}  pg cpu {out['pg_cpu']:.0%}  machine {out['machine_busy']:.0%}  "
              f"lock waiters {out['lock_waiters']:.1f} / active {out['active']:.1f}  new PG connections {out['new_connections']}", flush=True)
        return out
    finally:
        procs.stop(p)


def verify(t: Target, args: argparse.Namespace) -> list[str]:
    """Jobs rows against the 201s counted, the queue, and (new code) the ledger. Returns problems."""
    import redis

    problems: list[str] = []
    v = t.verify
    rows = fetch(t.db_url, "SELECT status, count(*) FROM jobs GROUP BY status")
    by_status = {r[0]: int(r[1]) for r in rows}
    n = sum(by_status.values())
    v.update(jobs=n, by_status=by_status, counted_201=t.counted_201, in_flight_at_stop=n - t.counted_201,
             max_in_flight=args.clients * t.wrk_runs)
    if not 0 <= n - t.counted_201 <= args.clients * t.wrk_runs:
        problems.append(f"{t.id}: {n} jobs rows for {t.counted_201} 201s counted (wrk runs: {t.wrk_runs}, "
                        f"clients {args.clients}: 0..{args.clients * t.wrk_runs} may have been in flight at a stop)")
    if set(by_status) - {"queued"}:
        problems.append(f"{t.id}: jobs not all queued: {by_status}")
    r = redis.Redis.from_url(args.redis_url)
    try:
        queued = int(r.zcard(f"{t.prefix}:queue:media"))
        v["arq_queue"] = queued
        if queued != n:
            problems.append(f"{t.id}: {queued} entries on the ARQ queue for {n} jobs")
        rate = f"{t.prefix}:key:{t.key_id}:rate"
        v["rate_zset"] = int(r.zcard(rate)) if t.key_id else None
        if t.new_code and t.key_id and (v["rate_zset"] > 0) != bool(t.rpm):
            problems.append(f"{t.id}: rate window ZSET has {v['rate_zset']} entries (rpm {t.rpm})")
    finally:
        r.close()
    if t.new_code:
        holds = fetch(t.db_url, "SELECT count(*), coalesce(sum(amount), 0), count(DISTINCT amount) FROM billing_entries WHERE kind = 'hold'")[0]
        other = fetch(t.db_url, "SELECT count(*) FROM billing_entries WHERE kind <> 'hold'")[0][0]
        ten = fetch(t.db_url, "SELECT budget, spent, held FROM tenants WHERE id = 'bench'")[0]
        jobs_held = fetch(t.db_url, "SELECT coalesce(sum(cost_held), 0), count(*) FILTER (WHERE cost_held IS NULL) FROM jobs")[0]
        v.update(hold_entries=int(holds[0]), hold_sum=int(holds[1]), tenant_budget=ten[0], tenant_held=int(ten[2]),
                 tenant_spent=int(ten[1]), per_job_hold=t.hold)
        expect_hold = 0 if t.unpriced else None
        if holds[0] != n or other != 0:
            problems.append(f"{t.id}: {holds[0]} hold entries (+{other} others) for {n} jobs")
        # a tenant without a budget keeps no sums on its row (core/billing/ledger.py): its entries are the sums
        row_held = int(ten[2]) if ten[0] is not None else int(holds[1])
        if ten[0] is None and int(ten[2]) != 0:
            problems.append(f"{t.id}: a tenant without a budget has tenants.held {ten[2]} (expected 0)")
        if int(holds[1]) != row_held or int(jobs_held[0]) != row_held or jobs_held[1]:
            problems.append(f"{t.id}: holds sum {holds[1]}, jobs' cost_held sum {jobs_held[0]} ({jobs_held[1]} NULL), tenants.held {ten[2]}")
        if t.hold is None or row_held != n * t.hold or holds[2] > 1 or (expect_hold is not None and t.hold != expect_hold):
            problems.append(f"{t.id}: held {row_held} is not {n} jobs x {t.hold}")
        if ten[0] != t.budget:
            problems.append(f"{t.id}: tenants.budget {ten[0]}, expected {t.budget}")
    return problems


def cleanup(t: Target, args: argparse.Namespace) -> None:
    import redis

    if not t.db:
        return
    try:
        ids = [r[0] for r in fetch(t.db_url, "SELECT id FROM jobs")]
        r = redis.Redis.from_url(args.redis_url)
        deleted = 0
        for i in range(0, len(ids), 1000):
            pipe = r.pipeline(transaction=False)
            for job_id in ids[i:i + 1000]:
                pipe.unlink(f"{ARQ_JOB_PREFIX}run:{job_id}")
            deleted += sum(pipe.execute())
        r.close()
        t.verify["arq_job_keys_deleted"] = deleted
    except Exception as exc:  # noqa: BLE001
        print(f"could not delete ARQ job keys of {t.id}: {exc}")
    try:
        clean_redis(args.redis_url, t.prefix + ":")
    except Exception as exc:  # noqa: BLE001
        print(f"could not clean Redis prefix {t.prefix}: {exc}")
    try:
        asyncio.run(_pg(args.admin_url, f'DROP DATABASE IF EXISTS "{t.db}" WITH (FORCE)'))
    except Exception as exc:  # noqa: BLE001
        print(f"could not drop database {t.db}: {exc}")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(targets: list[Target], args: argparse.Namespace, command: str) -> None:
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}; wrk -t1 -c{args.clients}, "
          f"{args.rounds} rounds x {args.duration:g} s per target (after {args.warmup:g} s warm-up), interleaved; "
          f"body: {json.dumps(post_body())}")
    print(f"command: {command}")
    base = next((t for t in targets if t.id == "before"), None)
    base_rps = med([r["rps"] for r in base.rounds]) if base else None
    print()
    print("| target | rps (median) | rps per round | p50 ms | p99 ms | vs before (medians) | vs before (per round) "
          "| API CPU | API CPU ms/req | PG backends CPU | machine busy | lock waiters / active backends | new PG conns/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        rps = [r["rps"] for r in sorted(t.rounds, key=lambda r: r["round"])]
        m = med(rps)
        ratio = f"{m / base_rps:.3f}" if base_rps else "-"
        if base and t is not base:
            paired = [r["rps"] / b["rps"] for r, b in zip(sorted(t.rounds, key=lambda r: r["round"]),
                                                          sorted(base.rounds, key=lambda r: r["round"]), strict=False)]
            per = f"{min(paired):.2f}-{max(paired):.2f}"
        else:
            per = "-"
        print(f"| {t.label} | {m:.0f} | {' / '.join(f'{x:.0f}' for x in rps)} | {med([r['p50'] for r in t.rounds]):.1f} "
              f"| {med([r['p99'] for r in t.rounds]):.1f} | {ratio} | {per} | {med([r['api_cpu'] for r in t.rounds]):.0%} "
              f"| {med([r['api_cpu_ms_per_req'] for r in t.rounds]):.2f} "
              f"| {med([r['pg_cpu'] for r in t.rounds]):.0%} | {med([r['machine_busy'] for r in t.rounds]):.0%} "
              f"| {med([r['lock_waiters'] for r in t.rounds]):.1f} / {med([r['active'] for r in t.rounds]):.1f} "
              f"| {med([r['new_connections'] / args.duration for r in t.rounds]):.1f} |")
    print("\nchecks:")
    for t in targets:
        v = t.verify
        line = (f"  {t.label}: schema {v.get('schema')}; jobs rows {v.get('jobs')} = {v.get('counted_201')} 201s counted "
                f"+ {v.get('in_flight_at_stop')} in flight at wrk stops (allowed 0..{v.get('max_in_flight')}); "
                f"ARQ queue {v.get('arq_queue')}, ARQ job keys deleted {v.get('arq_job_keys_deleted')}")
        if t.new_code:
            line += (f"; hold entries {v.get('hold_entries')}, per-job hold {v.get('per_job_hold')}, tenants.held "
                     f"{v.get('tenant_held')} (budget {v.get('tenant_budget')}); rate ZSET entries {v.get('rate_zset')}")
        waits: Counter[str] = Counter()
        for r in t.rounds:
            waits.update(r["lock_waits"])
        if waits:
            line += f"; lock waits sampled: {dict(waits.most_common(2))}"
        errs = {k: n for k, n in t.errors.items() if n}
        line += f"; non-2xx/socket errors: {errs or 'none'}"
        print(line)
        for o in t.other_answers:
            print(f"    other answers: {o}")


TARGETS = {
    "before": "before",
    "nobudget": "after, no budget",
    "budget": "after, budget",
    "rpm": "after, budget + rpm",
    "unpriced": "after, unpriced (hold 0)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of: {', '.join(TARGETS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10, help="measured seconds per target and round")
    p.add_argument("--warmup", type=float, default=2, help="seconds of load before each measurement")
    p.add_argument("--clients", type=int, default=32, help="wrk connections")
    p.add_argument("--before-rev", default="edbc798", help="the commit to measure as `before`")
    p.add_argument("--budget", type=int, default=10**15, help="micro-USD budget of the budgeted tenants")
    p.add_argument("--rpm", type=int, default=10_000_000, help="rpm of the `rpm` target's key")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432", help="server; fresh databases are made and dropped")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    command = shlex.join([os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(Path.cwd())) else sys.executable,
                          os.path.relpath(__file__, Path.cwd()) if __file__.startswith(str(Path.cwd())) else __file__, *sys.argv[1:]])
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (apt-get install wrk)")
    args.admin_url = f"{args.pg_url.rstrip('/')}/postgres"
    if not pg_answers(args.admin_url):
        sys.exit(f"PostgreSQL does not answer at {args.pg_url}")
    ids = [x.strip() for x in args.targets.split(",") if x.strip()]
    unknown = [x for x in ids if x not in TARGETS]
    if unknown:
        sys.exit(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    tmp = Path(tempfile.mkdtemp(prefix="genroute-submitbench-"))
    procs = Procs()
    targets: list[Target] = []
    problems: list[str] = []
    t_start = time.monotonic()
    try:
        before_tree = tmp / "before"
        if "before" in ids:
            before_tree.mkdir()
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.before_rev], capture_output=True, text=True, check=True).stdout.strip()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
            imported = subprocess.run([sys.executable, "-c", "import api.app, core.migrate; print(api.app.__file__, core.migrate.MIGRATIONS)"],
                                      cwd=before_tree, env=dict(os.environ, PYTHONPATH=str(before_tree)),
                                      capture_output=True, text=True, check=True).stdout.split()
            if not all(x.startswith(str(before_tree)) for x in imported):
                sys.exit(f"the old tree's modules are not the ones imported: {imported}")
            print(f"before: {rev[:12]} unpacked in {before_tree}; imports {imported[0]}", flush=True)
        for tid in ids:
            t = Target(tid, TARGETS[tid], before_tree if tid == "before" else ROOT, tid != "before",
                       budget=args.budget if tid in ("budget", "rpm") else None,
                       rpm=args.rpm if tid == "rpm" else None, unpriced=tid == "unpriced")
            targets.append(t)
            setup_target(t, args, tmp)
            print(f"{t.label}: database {t.db}, prefix {t.prefix}, schema {t.verify['schema']}"
                  + (f", budget {t.budget}" if t.budget is not None else "") + (f", key rpm {t.rpm}" if t.rpm else ""), flush=True)
        body = post_body()
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for t in order:
                one_slot(t, args, procs, tmp, body, rnd)
        time.sleep(1)  # anything still finishing after the last stop
        for t in targets:
            problems += verify(t, args)
    finally:
        procs.stop_all()
        for t in targets:
            cleanup(t, args)
            v = t.verify
            if "jobs" in v and v.get("arq_job_keys_deleted") != v["jobs"]:
                problems.append(f"{t.id}: {v.get('arq_job_keys_deleted')} ARQ job keys (arq:job:run:<id>) for {v['jobs']} jobs")
        shutil.rmtree(tmp, ignore_errors=True)
    report(targets, args, command)
    print(f"\nwall time {time.monotonic() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "targets": [
            {"id": t.id, "label": t.label, "rounds": t.rounds, "verify": t.verify, "errors": t.errors,
             "other_answers": t.other_answers} for t in targets]}, indent=2, default=str))
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
