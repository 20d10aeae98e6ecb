"""`genroute submit`: create a job over the REST API and, with --wait, follow it to the end."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from core.settings import Settings

TERMINAL = {"succeeded", "failed", "canceled"}


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--input takes K=V, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _key(args: argparse.Namespace) -> str:
    if args.key:
        return str(args.key)
    dev = Settings().data_dir / "dev-key"
    if dev.exists():
        return dev.read_text().strip()
    raise SystemExit("no API key: pass --key, set GENROUTE_API_KEY, or run `genroute dev` here first")


def submit(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {_key(args)}"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    body = {"model": args.model, "input": parse_inputs(args.input)}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        r = client.post("/v1/jobs", json=body)
        if r.status_code >= 400:
            print(json.dumps(r.json(), indent=2), file=sys.stderr)
            return 1
        job = r.json()
        if not args.wait:
            print(json.dumps(job, indent=2))
            return 0
        job = _follow(client, job)
    if job["status"] == "succeeded":
        for out in job["outputs"]:
            print(out["url"])
        return 0
    print(json.dumps(job.get("error"), indent=2), file=sys.stderr)
    return 2


def _follow(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(f"{job['id']} {job['status']}", total=1.0)
        while job["status"] not in TERMINAL:
            time.sleep(0.3)
            job = client.get(f"/v1/jobs/{job['id']}").json()
            msg = job["progress"].get("message") or ""
            pos = f" #{job['queue_position']} in queue" if job.get("queue_position") is not None else ""
            bar.update(task, completed=job["progress"]["fraction"], description=f"{job['id']} {job['status']}{pos} {msg}")
        bar.update(task, completed=1.0 if job["status"] == "succeeded" else job["progress"]["fraction"],
                   description=f"{job['id']} {job['status']}")
    return job


