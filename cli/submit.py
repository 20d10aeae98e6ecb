"""`genroute submit`: create a job through the typed client (genroute.client) and, with
--wait, follow it to the end with a progress bar: the client follows the job's event stream
(resuming after a drop, riding out an API restart) and falls back to polling."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.schemas import EventPublic, JobPublic
from core.settings import Settings
from genroute.client import APIConnectionError, APIError, Client


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
    body = parse_inputs(args.input)
    try:
        with Client(args.url, _key(args)) as client:
            job = client.submit(args.model, body, idempotency_key=args.idempotency_key or None)
            if not args.wait:
                print(job.model_dump_json(indent=2))
                return 0
            job = _follow(client, job)
    except APIError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message, "details": exc.details}}, indent=2),
              file=sys.stderr)
        return 1
    except APIConnectionError as exc:
        print(f"cannot reach {args.url}: {exc}; is genroute running there? Point --url or GENROUTE_URL at it", file=sys.stderr)
        return 1
    cost = job.cost
    if cost is not None and cost.settled is not None:  # stderr: stdout stays the output URLs, one a line
        print(f"cost: {cost.settled / 1_000_000:.6f} USD ({cost.status}; held {cost.held} micro-USD)", file=sys.stderr)
    if args.json:  # the finished job, whatever its end
        print(job.model_dump_json(indent=2))
        return 0 if job.status == "succeeded" else 2
    if job.status == "succeeded":
        for out in job.outputs:
            print(out.url)
        return 0
    print(json.dumps(job.error.model_dump() if job.error else None, indent=2), file=sys.stderr)
    return 2


BAR = 30  # the bar's width in cells, whatever the message beside it


def describe(text: str, width: int) -> str:
    """The bar's description, cut to what fits beside a full bar in `width` columns (a long
    provider message would squeeze the bar to nothing)."""
    text = " ".join(text.split())  # one line: a message's newlines and tabs would break it
    room = max(10, width - BAR - 15)  # the bar, " 100% 0:00:00" and the gaps between columns
    return text if len(text) <= room else text[: room - 1] + "…"


def progress_bar(console: Any) -> Any:
    """The --wait display: description, bar, percentage, time elapsed. The description is
    plain text (markup=False): a provider's message such as "[/INST] done" is not rich markup."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=BAR),
                    TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console, transient=False)


@contextmanager
def logs_above(bar: Any) -> Iterator[None]:
    """While the bar is shown, log lines (a warning, or httpx's at GENROUTE_LOG_LEVEL=DEBUG)
    are printed above it, not into it: the root logger's stream handlers write to the
    bar's stand-in for stderr (rich's proxy prints each line above the live display)."""
    handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    saved = [h.stream for h in handlers]
    for h in handlers:
        if h.stream is bar.console.file:  # rich's Console.file sees through its own proxy
            h.setStream(sys.stderr)
    try:
        yield
    finally:
        for h, stream in zip(handlers, saved, strict=True):
            h.setStream(stream)


def _follow(client: Client, job: JobPublic) -> JobPublic:
    """Show a progress bar until the job ends (client.wait reports each state and event)."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"{job.id} ({job.model})", markup=False, highlight=False)  # once: the bar has no room for it
    with progress_bar(console) as bar, logs_above(bar):
        width = bar.console.width
        task = bar.add_task(describe(job.status, width), total=1.0)
        state: dict[str, Any] = {"status": job.status, "fraction": job.progress.fraction}

        def show(item: JobPublic | EventPublic) -> None:
            if isinstance(item, JobPublic):
                state.update(status=item.status, fraction=item.progress.fraction)
                message, position = item.progress.message, item.queue_position
            else:
                data = item.data
                state["status"] = data.get("status", state["status"])
                state["fraction"] = data.get("progress", state["fraction"])
                message, position = data.get("message"), data.get("queue_position")
            pos = f" #{position} in queue" if position is not None else ""
            text = f"{state['status']}{pos} {message or ''}"
            bar.update(task, completed=state["fraction"], description=describe(text, width))

        job = client.wait(job.id, on_update=show)
        bar.update(task, completed=1.0 if job.status == "succeeded" else job.progress.fraction,
                   description=describe(job.status, width))
    return job
