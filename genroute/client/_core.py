"""What the sync and async clients share: request bodies, retry decisions, the SSE parser,
output file names. No I/O here, so both clients behave the same by construction."""

from __future__ import annotations

import json
import mimetypes
import os
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.schemas import AssetPublic, EventPublic, JobPublic

RETRY_STATUSES = frozenset({429, 502, 503, 504})
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# A job's last events are published just before its row commits: a read right after one
# can still show it running, so the row is read again, this often, for up to this long.
COMMIT_RETRY_SECONDS, COMMIT_WAIT_SECONDS = 0.1, 10.0
USER_AGENT = "genroute-python/0.1"


@dataclass(frozen=True, slots=True)
class Config:
    base_url: str
    api_key: str
    timeout: float = 30.0
    max_retries: int = 6  # with the backoff below: rides out about 15 s of an API that does not answer
    backoff: float = 0.25  # first retry delay; doubles, with jitter, up to max_backoff
    max_backoff: float = 4.0
    poll_interval: float = 0.5  # wait()'s polling, when the event stream is unavailable

    @classmethod
    def make(cls, base_url: str | None, api_key: str | None, **kw: Any) -> Config:
        url = base_url or os.environ.get("GENROUTE_URL") or "http://127.0.0.1:8000"
        key = api_key or os.environ.get("GENROUTE_API_KEY")
        if not key:
            raise ValueError("no API key: pass api_key= or set GENROUTE_API_KEY")
        return cls(url.rstrip("/"), key, **kw)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT}

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number `attempt` (1-based): Retry-After when the server gave one."""
        if retry_after is not None:
            return min(retry_after, 30.0)
        base = float(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not crypto


def new_idempotency_key() -> str:
    return f"gr-{uuid.uuid4().hex}"


def job_body(model: str, input: dict[str, Any], *, metadata: dict[str, Any] | None, webhook_url: str | None,
             webhook_events: list[str] | None, cache: bool | None, priority: str | None,
             start_within_seconds: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": input}
    for k, v in (("metadata", metadata), ("webhook_url", webhook_url), ("webhook_events", webhook_events),
                 ("cache", cache), ("priority", priority), ("start_within_seconds", start_within_seconds)):
        if v is not None:
            body[k] = v
    return body


def submit_headers(idempotency_key: str, cancel_after: str | float | None, wait: int | None) -> dict[str, str]:
    h = {"Idempotency-Key": idempotency_key}
    if cancel_after is not None:
        h["Cancel-After"] = f"{cancel_after:g}s" if isinstance(cancel_after, int | float) else str(cancel_after)
    if wait is not None:
        h["Prefer"] = f"wait={int(wait)}"
    return h


def retryable(method: str, path: str, headers: dict[str, str] | None) -> bool:
    """GETs and cancels are safe to resend; a POST only with an Idempotency-Key."""
    return method == "GET" or path.endswith("/cancel") or bool(headers and "Idempotency-Key" in headers)


@dataclass
class SSEParser:
    """Server-sent events, fed line by line (the text/event-stream format)."""

    event: str = "message"
    data: list[str] = field(default_factory=list)
    id: str | None = None

    def feed(self, line: str) -> tuple[str, str, str | None] | None:
        """A complete (event, data, id) at a blank line, else None."""
        if line == "":
            if not self.data:
                self.event = "message"
                return None
            out = (self.event, "\n".join(self.data), self.id)
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None  # a comment (the server's pings)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


@dataclass
class Follow:
    """What wait()/events() know of a job while following it: its last state and last event id."""

    job: JobPublic | None = None
    last_event_id: str | None = None
    terminal_seen: bool = False

    def message(self, event: str, data: str) -> JobPublic | EventPublic | None:
        """One SSE message -> the job state (`job.state`) or an event; None for anything else.
        Raises StreamError for the stream's own error message (slow consumer: reconnect)."""
        if event == "error":
            raise StreamError(data)
        try:
            payload = json.loads(data)
        except ValueError:
            return None
        if event == "job.state":
            self.job = JobPublic.model_validate(payload["job"])
            if self.job.status in TERMINAL:
                self.terminal_seen = True
            return self.job
        if "seq" in payload:
            ev = EventPublic.model_validate(payload)
            self.last_event_id = ev.id
            if ev.terminal:
                self.terminal_seen = True
            return ev
        return None


class StreamError(Exception):
    """The event stream said it is giving up on us (e.g. slow consumer): reconnect."""


def sse_headers(last_event_id: str | None) -> dict[str, str]:
    h = {"Accept": "text/event-stream"}
    if last_event_id:
        h["Last-Event-ID"] = last_event_id
    return h


def stream_unavailable(resp: httpx.Response) -> bool:
    """The server has no event stream here (an old server, a proxy that strips it): poll instead."""
    return resp.status_code in (404, 405, 406, 501) or not resp.headers.get("content-type", "").startswith("text/event-stream")


def output_targets(job: JobPublic, dest: Path, index: int | None) -> list[tuple[AssetPublic, Path]]:
    """Where each output goes: into `dest` when it is a directory (or ends with a slash), as
    `{job id}-{index}{ext}`; to `dest` itself when one output is asked for."""
    outs = [a for a in job.outputs if index is None or a.index == index]
    if index is not None and not outs:
        raise ValueError(f"job {job.id} has no output {index}")
    as_dir = dest.is_dir() or str(dest).endswith(os.sep) or len(outs) > 1
    targets = []
    for a in outs:
        ext = mimetypes.guess_extension(a.content_type.split(";")[0]) or ".bin"
        targets.append((a, dest / f"{job.id}-{a.index}{ext}" if as_dir else dest))
    return targets


def lines(chunks: Iterable[str]) -> Iterator[str]:
    for chunk in chunks:
        yield chunk.rstrip("\r")
