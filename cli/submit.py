"""`genroute submit`: create a job over the REST API and, with --wait, follow it to the end:
live over the job's websocket (/v1/jobs/{id}/events, resuming with last_event_id after a
drop), falling back to polling GET /v1/jobs/{id} when the websocket is not available."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, WebSocketException

from core.settings import Settings

TERMINAL = {"succeeded", "failed", "canceled"}
Show = Callable[[str, float, "str | None", "int | None"], None]


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


def unreachable(url: str, exc: Exception) -> str:
    """The one line for a server that does not answer."""
    return (f"error: no genroute API answers at {url} ({type(exc).__name__}); start one (`genroute dev`) "
            "or point --url / GENROUTE_URL at it")


def submit(args: argparse.Namespace) -> int:
    try:
        return _submit(args)
    except httpx.TransportError as exc:  # refused, timed out, DNS: one line, not a traceback
        print(unreachable(args.url, exc), file=sys.stderr)
        return 1


def _answer(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return {"error": {"code": "not_genroute", "message": f"HTTP {r.status_code}: {r.text[:200]}"}}


def _submit(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {_key(args)}"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    body = {"model": args.model, "input": parse_inputs(args.input)}
    with httpx.Client(base_url=args.url, headers=headers, timeout=30) as client:
        r = client.post("/v1/jobs", json=body)
        if r.status_code >= 400:
            print(json.dumps(_answer(r), indent=2), file=sys.stderr)
            return 1
        job = r.json()
        if not args.wait:
            print(json.dumps(job, indent=2))
            return 0
        job = _follow(client, job, headers["Authorization"].removeprefix("Bearer "))
    if getattr(args, "json", False):  # the finished job, whole, on stdout
        print(json.dumps(job, indent=2))
        return 0 if job["status"] == "succeeded" else 2
    cost = job.get("cost") or {}
    if cost.get("settled") is not None:  # stderr: stdout stays the output URLs, one a line
        print(f"cost: {cost['settled'] / 1_000_000:.6f} USD ({cost['status']}; held {cost['held']} micro-USD)", file=sys.stderr)
    if job["status"] == "succeeded":
        for out in job["outputs"]:
            print(out["url"])
        return 0
    print(json.dumps(job.get("error"), indent=2), file=sys.stderr)
    return 2


def _follow(client: httpx.Client, job: dict[str, Any], key: str) -> dict[str, Any]:
    """Show a progress bar until the job ends: over the job's websocket, else by polling."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    console = Console(stderr=True)
    # the description column has a fixed width and cuts long messages with an ellipsis,
    # so a long progress message never squeezes the bar
    width = max(24, min(60, console.width - 40))
    with Progress(TextColumn("{task.description}", table_column=Column(width=width, no_wrap=True, overflow="ellipsis")),
                  BarColumn(bar_width=30), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=False) as bar, _logs_above(bar):
        task = bar.add_task(f"{job['id']} {job['status']}", total=1.0)

        def show(status: str, fraction: float, message: str | None, position: int | None) -> None:
            pos = f" #{position} in queue" if position is not None else ""
            text = f"{status}{pos} {message or ''}".rstrip()
            bar.update(task, completed=fraction, description=_fit(text, width))

        try:
            final = asyncio.run(follow_websocket(str(client.base_url), key, job["id"], show))
        except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
            bar.console.print(f"[dim]live progress unavailable ({type(exc).__name__}); polling[/dim]")
            final = None
        if final is None or final["status"] not in TERMINAL:
            job = follow_polling(client, job, show)
        else:
            job = client.get(f"/v1/jobs/{job['id']}").json()  # the outputs, with fresh URLs
        bar.update(task, completed=1.0 if job["status"] == "succeeded" else job["progress"]["fraction"],
                   description=f"{job['id']} {job['status']}")
    return job


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@contextmanager
def _logs_above(bar: Any) -> Iterator[None]:
    """While the bar is drawn, log lines are printed above it (through its console)
    instead of being written into the middle of it."""
    import logging

    class Above(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            bar.console.print(self.format(record), markup=False, highlight=False)

    root = logging.getLogger()
    saved = root.handlers[:]
    above = Above()
    if saved:
        above.setFormatter(saved[0].formatter)
        for f in saved[0].filters:
            above.addFilter(f)
    root.handlers = [above]
    try:
        yield
    finally:
        root.handlers = saved


async def follow_websocket(base_url: str, key: str, job_id: str, show: Show, *, retries: int = 3) -> dict[str, Any] | None:
    """Follow /v1/jobs/{id}/events; reconnects with last_event_id. Returns the job's last
    known state (status terminal when it ended), or None when it could not connect."""
    from websockets.asyncio.client import connect

    url = base_url.rstrip("/").replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events"
    state: dict[str, Any] | None = None
    last: str | None = None
    for _ in range(retries + 1):
        target = f"{url}?last_event_id={last}" if last else url
        try:
            async with connect(target, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=10,
                               max_size=2**24) as ws:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("type") == "job.state":
                        j = msg["job"]
                        state = {"status": j["status"], "progress": dict(j["progress"])}
                        show(j["status"], j["progress"]["fraction"], j["progress"].get("message"), j.get("queue_position"))
                    elif "seq" in msg and state is not None:
                        last = msg["id"]
                        data = msg.get("data") or {}
                        state["status"] = data.get("status", state["status"])
                        state["progress"]["fraction"] = data.get("progress", state["progress"]["fraction"])
                        show(state["status"], state["progress"]["fraction"], data.get("message"), data.get("queue_position"))
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code in (4400, 4401, 4404):
                raise ValueError(f"server refused the stream: {exc.rcvd.code} {exc.rcvd.reason}") from exc
            # dropped mid-job (or 4408, too slow): reconnect and resume after the last event
        if state is not None and state["status"] in TERMINAL:
            return state
    return state


def follow_polling(client: httpx.Client, job: dict[str, Any], show: Show) -> dict[str, Any]:
    while job["status"] not in TERMINAL:
        time.sleep(0.3)
        job = client.get(f"/v1/jobs/{job['id']}").json()
        show(job["status"], job["progress"]["fraction"], job["progress"].get("message"), job.get("queue_position"))
    return job
