"""Chat completions, plain and streamed: straight to a fake upstream, through genroute, and
through LiteLLM's proxy, measured one after the other in one run on this machine.

    .venv/bin/python bench/chat_vs_litellm.py                       # PostgreSQL (fresh db) if it answers
    .venv/bin/python bench/chat_vs_litellm.py --db sqlite --duration 10
    .venv/bin/python bench/chat_vs_litellm.py --targets direct,genroute   # skip LiteLLM

Targets (each gets the same requests and durations, and runs alone):
- direct:   bench/fast_upstream.py (raw asyncio, fixed small bodies, ~70k req/s here).
- genroute: one `genroute api` process; a catalog with one text model whose one deployment
            (adapter `openai`) points at the upstream, with max_concurrency and rpm set high
            enough never to bind, so routing, limits (Redis) and usage recording all run.
            PostgreSQL (fresh database, dropped after) or SQLite; Redis with a fresh prefix.
- litellm:  `litellm --config` (one uvicorn worker, no database; a master key, which
            it requires to start, checked per request) from its own
            virtualenv (--litellm-venv; created with `pip install 'litellm[proxy]'` if missing),
            one model pointing at the upstream via `api_base`.

Load: wrk (one thread) with a Lua script; per target and mode (plain, stream): a 2 s warm-up,
then 1 client for --duration s, then 50 clients for --duration s. wrk times each request to
its last byte (for streams: until `data: [DONE]`). Every answer is checked first (content of
a plain and of a streamed call); wrk's errors and non-2xx answers are counted and reported.
After genroute's run, the usage_records rows are counted against the requests it served.
CPU seconds of wrk, the upstream and the target are reported per 50-client run, to show
which one was saturated (2 cores: the load generator shares them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fast_upstream import TEXT  # noqa: E402

HOST = "127.0.0.1"
PROMPT = [{"role": "user", "content": "Say hello from the fast upstream."}]
MODEL_ALIAS = "bench-chat"
UPSTREAM_MODEL = "gpt-4o-mini"

WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"mean_us":%%.1f,'
    .. '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- processes ------------------------------------------------------------------------


@dataclass
class Procs:
    """Every process this script starts, each in its own process group, stopped in `stop`."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        else:  # the leader is gone: make sure nothing of its group survives
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p)


def cpu_seconds(pid: int) -> float:
    """CPU (user+system) of a process and its descendants, 0 if gone."""
    try:
        proc = psutil.Process(pid)
        total = 0.0
        for q in [proc, *proc.children(recursive=True)]:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# -- checks -----------------------------------------------------------------------------


def body_for(model: str, stream: bool) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": 16}
    if stream:
        b["stream"] = True
    return b


def spot_check(url: str, model: str, headers: dict[str, str]) -> None:
    """One plain and one streamed call: 200 and the upstream's text, else raise."""
    with httpx.Client(timeout=30, headers=headers) as c:
        r = c.post(url, json=body_for(model, False))
        if r.status_code != 200:
            raise RuntimeError(f"plain call to {url}: {r.status_code} {r.text[:500]}")
        got = r.json()["choices"][0]["message"]["content"]
        if got != TEXT:
            raise RuntimeError(f"plain call to {url}: content {got!r}, expected {TEXT!r}")
        r = c.post(url, json=body_for(model, True))
        if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
            raise RuntimeError(f"streamed call to {url}: {r.status_code} {r.headers.get('content-type')} {r.text[:500]}")
        lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        if not lines or lines[-1] != "[DONE]":
            raise RuntimeError(f"streamed call to {url}: no `data: [DONE]` at the end:\n{r.text[:1000]}")
        text = "".join((ch.get("delta") or {}).get("content") or "" for ln in lines[:-1] for ch in json.loads(ln).get("choices") or [])
        if text != TEXT:
            raise RuntimeError(f"streamed call to {url}: content {text!r}, expected {TEXT!r}")


# -- load --------------------------------------------------------------------------------


def wrk(url: str, script: Path, clients: int, seconds: float) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script), url],
                         capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    res = json.loads(line[len("BENCHJSON "):])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["errors"] = sum(res[k] for k in ("connect", "read", "write", "status", "timeout"))
    res["wrk_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return res


@dataclass
class Target:
    name: str
    url: str
    model: str
    headers: dict[str, str]
    pid: int | None  # the target process (None: direct)


def measure(t: Target, upstream_pid: int, tmp: Path, seconds: float, warmup: float) -> dict[str, dict[str, Any]]:
    auth = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in t.headers.items())
    spot_check(t.url, t.model, t.headers)
    out: dict[str, dict[str, Any]] = {}
    for mode in ("plain", "stream"):
        script = tmp / f"{t.name}-{mode}.lua"
        script.write_text(WRK_LUA % {"body": json.dumps(body_for(t.model, mode == "stream")), "auth": auth})
        wrk(t.url, script, 50, warmup)
        one = wrk(t.url, script, 1, seconds)
        cpu0 = (cpu_seconds(upstream_pid), cpu_seconds(t.pid) if t.pid else 0.0)
        fifty = wrk(t.url, script, 50, seconds)
        cpu1 = (cpu_seconds(upstream_pid), cpu_seconds(t.pid) if t.pid else 0.0)
        wall = fifty["duration_us"] / 1e6
        out[mode] = {
            "rps50": fifty["rps"], "rps1": one["rps"],
            "p50_1": one["p50_us"] / 1000, "p99_1": one["p99_us"] / 1000,
            "p50_50": fifty["p50_us"] / 1000, "p99_50": fifty["p99_us"] / 1000,
            "requests": one["requests"] + fifty["requests"], "errors": one["errors"] + fifty["errors"],
            "cpu50": {"wrk": fifty["wrk_cpu_s"] / wall, "upstream": (cpu1[0] - cpu0[0]) / wall,
                      "target": (cpu1[1] - cpu0[1]) / wall},
        }
        spot_check(t.url, t.model, t.headers)  # still answering right after the load
        print(f"  {t.name:9s} {mode:6s} rps@50 {fifty['rps']:8.1f}  p50@1 {one['p50_us']/1000:6.2f} ms  "
              f"errors {out[mode]['errors']}  cpu@50 wrk {out[mode]['cpu50']['wrk']:.0%} "
              f"upstream {out[mode]['cpu50']['upstream']:.0%} target {out[mode]['cpu50']['target']:.0%}", flush=True)
    return out


# -- genroute ------------------------------------------------------------------------------


async def _pg(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_answers(admin_url: str) -> bool:
    try:
        asyncio.run(_pg(admin_url, "SELECT 1"))
        return True
    except Exception:  # noqa: BLE001
        return False


def count_usage(db_url: str) -> dict[str, int]:
    sql = "SELECT status, stream, count(*) FROM usage_records GROUP BY status, stream"
    if db_url.startswith("sqlite"):
        import sqlite3

        path = db_url.split("///", 1)[1]
        with sqlite3.connect(path) as conn:
            rows = conn.execute(sql).fetchall()
    else:
        import asyncpg

        async def go() -> list[Any]:
            conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                return list(await conn.fetch(sql))
            finally:
                await conn.close()

        rows = asyncio.run(go())
    return {f"{r[0]}/{'stream' if r[1] else 'plain'}": int(r[2]) for r in rows}


def clean_redis(redis_url: str, prefix: str) -> int:
    import redis

    r = redis.Redis.from_url(redis_url)
    n = 0
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        n += r.delete(key)
    r.close()
    return n


def start_genroute(args: argparse.Namespace, procs: Procs, tmp: Path, upstream: str) -> tuple[Target, dict[str, Any]]:
    import yaml

    catalog = tmp / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{
        "id": MODEL_ALIAS, "modality": "text", "description": "benchmark: the fast fake upstream",
        "deployments": [{
            "name": "fast-upstream", "adapter": "openai", "model": UPSTREAM_MODEL, "base_url": f"{upstream}/v1",
            "api_key_env": "BENCH_UPSTREAM_KEY",
            "price": {"per_1k_input_tokens": 150, "per_1k_output_tokens": 600},
            "limits": {"max_concurrency": 1000, "rpm": 10_000_000, "tpm": 1_000_000_000},
        }],
    }]}))
    port = free_port()
    prefix = f"chatbench{secrets.token_hex(4)}"
    env = dict(os.environ)
    env.update(
        GENROUTE_DATA_DIR=str(tmp / "genroute"), GENROUTE_PUBLIC_URL=f"http://{HOST}:{port}",
        GENROUTE_SECRET_KEY="bench", GENROUTE_REDIS_URL=args.redis_url, GENROUTE_REDIS_PREFIX=prefix,
        GENROUTE_LOG_LEVEL="WARNING", GENROUTE_CATALOG=str(catalog), BENCH_UPSTREAM_KEY="sk-bench",
    )
    info: dict[str, Any] = {"redis_prefix": prefix}
    db = args.db
    if db == "postgres":
        admin = f"{args.pg_url.rstrip('/')}/postgres"
        if not pg_answers(admin):
            print(f"PostgreSQL does not answer at {args.pg_url}: using SQLite", flush=True)
            db = "sqlite"
    if db == "postgres":
        name = f"genroute_chatbench_{secrets.token_hex(4)}"
        asyncio.run(_pg(admin, f'CREATE DATABASE "{name}"'))
        info.update(pg_admin=admin, pg_db=name)
        env["GENROUTE_DATABASE_URL"] = f"{args.pg_url.rstrip('/')}/{name}"
        info["db_url"] = env["GENROUTE_DATABASE_URL"]
    else:
        info["db_url"] = f"sqlite+aiosqlite:///{tmp / 'genroute' / 'genroute.db'}"
    info["db"] = db
    exe = str(Path(sys.executable).parent / "genroute")
    subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run([exe, "keys", "create", "--name", "bench"], env=env, check=True, capture_output=True, text=True)
    key = out.stdout.split()[0]
    log = tmp / "genroute-api.log"
    p = procs.start([exe, "api", "--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log"], log, env)
    wait_http(f"http://{HOST}:{port}/readyz", p, log)
    info["log"] = log
    return Target("genroute", f"http://{HOST}:{port}/v1/chat/completions", MODEL_ALIAS,
                  {"Authorization": f"Bearer {key}"}, p.pid), info


def stop_genroute(args: argparse.Namespace, info: dict[str, Any]) -> None:
    try:
        clean_redis(args.redis_url, info["redis_prefix"])
    except Exception as exc:  # noqa: BLE001
        print(f"could not clean Redis prefix {info['redis_prefix']}: {exc}")
    if info.get("pg_db"):
        try:
            asyncio.run(_pg(info["pg_admin"], f'DROP DATABASE IF EXISTS "{info["pg_db"]}" WITH (FORCE)'))
        except Exception as exc:  # noqa: BLE001
            print(f"could not drop database {info['pg_db']}: {exc}")


# -- LiteLLM -------------------------------------------------------------------------------


def ensure_litellm(venv: Path) -> Path:
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"installing litellm[proxy] into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def start_litellm(args: argparse.Namespace, procs: Procs, tmp: Path, upstream: str) -> tuple[Target, str]:
    import yaml

    exe = ensure_litellm(Path(args.litellm_venv))
    version = subprocess.run([str(Path(args.litellm_venv) / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True).stdout.strip()
    master_key = f"sk-{secrets.token_hex(16)}"
    cfg = tmp / "litellm.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_list": [{"model_name": MODEL_ALIAS, "litellm_params": {
            "model": f"openai/{UPSTREAM_MODEL}", "api_base": f"{upstream}/v1", "api_key": "sk-bench"}}],
        "litellm_settings": {"drop_params": True},
        "general_settings": {"master_key": master_key},  # it refuses to start without one; no database
    }))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENROUTE_", "DATABASE_URL", "LITELLM_", "VIRTUAL_ENV"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
               PATH=f"{Path(args.litellm_venv) / 'bin'}:{env.get('PATH', '')}")
    log = tmp / "litellm.log"
    p = procs.start([str(exe), "--config", str(cfg), "--host", HOST, "--port", str(port), "--num_workers", "1"], log, env)
    wait_http(f"http://{HOST}:{port}/health/liveliness", p, log, timeout=180)
    return Target("litellm", f"http://{HOST}:{port}/v1/chat/completions", MODEL_ALIAS,
                  {"Authorization": f"Bearer {master_key}"}, p.pid), version


# -- report --------------------------------------------------------------------------------


def report(results: dict[str, dict[str, dict[str, Any]]], seconds: float) -> None:
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}; "
          f"wrk -t1, {seconds:g} s per measurement; latency in ms, to the last byte")
    for mode in ("plain", "stream"):
        print(f"\n{mode}:")
        print("| target | rps@50 | p50@1 | p99@1 | p50@50 | p99@50 | added p50@1 | errors | CPU@50 wrk / upstream / target |")
        print("|---|---|---|---|---|---|---|---|---|")
        direct = results.get("direct", {}).get(mode)
        for name, res in results.items():
            r = res[mode]
            added = r["p50_1"] - direct["p50_1"] if direct else float("nan")
            c = r["cpu50"]
            print(f"| {name} | {r['rps50']:.0f} | {r['p50_1']:.2f} | {r['p99_1']:.2f} | {r['p50_50']:.1f} | {r['p99_50']:.1f} "
                  f"| {added:+.2f} | {r['errors']} | {c['wrk']:.0%} / {c['upstream']:.0%} / {c['target']:.0%} |")
    if "genroute" in results and "litellm" in results and "direct" in results:
        print("\ngenroute vs LiteLLM (target: throughput ≥ 3×, added p50@1 ≤ ¼):")
        for mode in ("plain", "stream"):
            g, lt, d = results["genroute"][mode], results["litellm"][mode], results["direct"][mode]
            tput = g["rps50"] / lt["rps50"]
            ga, la = g["p50_1"] - d["p50_1"], lt["p50_1"] - d["p50_1"]
            lat = ga / la if la > 0 else float("nan")
            ok = tput >= 3 and lat <= 0.25
            print(f"  {mode:6s}: throughput {tput:.2f}× ({g['rps50']:.0f} vs {lt['rps50']:.0f} rps@50); "
                  f"added p50@1 {ga:.2f} vs {la:.2f} ms = {lat:.2f}×; target {'MET' if ok else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="direct,genroute,litellm")
    p.add_argument("--db", choices=["postgres", "sqlite"], default="postgres",
                   help="genroute's database (postgres falls back to sqlite if it does not answer)")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432", help="server; a fresh database is made and dropped")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--litellm-venv", default=str(ROOT / "bench" / ".litellm-venv"))
    p.add_argument("--duration", type=float, default=10, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--hold", type=float, default=0,
                   help="after genroute's measurements, keep it up this many seconds under 50 clients "
                        "(plain) and print its pid, e.g. to profile it with py-spy")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (apt-get install wrk)")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="genroute-chatbench-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    notes: list[str] = []
    try:
        up_port = free_port()
        up_log = tmp / "upstream.log"
        up = procs.start([sys.executable, str(ROOT / "bench" / "fast_upstream.py"), "--host", HOST, "--port", str(up_port)], up_log)
        upstream = f"http://{HOST}:{up_port}"
        wait_http(f"{upstream}/health", up, up_log)
        for name in targets:
            print(f"{name}:", flush=True)
            if name == "direct":
                results[name] = measure(Target("direct", f"{upstream}/v1/chat/completions", UPSTREAM_MODEL, {}, None),
                                        up.pid, tmp, args.duration, args.warmup)
            elif name == "genroute":
                info: dict[str, Any] = {}
                try:
                    t, info = start_genroute(args, procs, tmp, upstream)
                    before = count_usage(info["db_url"])
                    results[name] = measure(t, up.pid, tmp, args.duration, args.warmup)
                    if args.hold:
                        script = tmp / "genroute-plain.lua"
                        print(f"  holding genroute (pid {t.pid}) under 50 clients for {args.hold:g} s", flush=True)
                        wrk(t.url, script, 50, args.hold)
                    time.sleep(1.5)  # usage is written after the response
                    after = count_usage(info["db_url"])
                    sent = sum(r["requests"] for r in results[name].values())
                    ok = sum(v for k, v in after.items() if k.startswith("succeeded/")) - sum(
                        v for k, v in before.items() if k.startswith("succeeded/"))
                    note = (f"genroute ({info['db']}): usage_records {after}; succeeded rows {ok} "
                            f"for {sent} measured requests (+ warm-ups and spot checks)")
                    print("  " + note, flush=True)
                    notes.append(note)
                    if ok < sent:
                        raise RuntimeError(f"genroute recorded {ok} succeeded calls for {sent} measured requests")
                finally:
                    for proc in list(procs.procs):
                        if proc is not up:
                            procs.stop(proc)
                    if info:
                        stop_genroute(args, info)
            elif name == "litellm":
                try:
                    t, version = start_litellm(args, procs, tmp, upstream)
                    notes.append(f"litellm {version}")
                    print(f"  litellm {version}", flush=True)
                    results[name] = measure(t, up.pid, tmp, args.duration, args.warmup)
                except (RuntimeError, subprocess.CalledProcessError) as exc:
                    print(f"  LiteLLM could not be measured: {exc}", flush=True)
                    notes.append(f"LiteLLM not measured: {str(exc)[:2000]}")
                finally:
                    for proc in list(procs.procs):
                        if proc is not up:
                            procs.stop(proc)
            else:
                sys.exit(f"unknown target {name!r}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.duration)
    for n in notes:
        print(n)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
