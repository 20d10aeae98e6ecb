"""Replicate's prediction object, as genroute shows a job to Replicate's clients.

One function renders it for the `/replicate` routes (api/replicate/) and for webhooks a
job asked for in Replicate's way (`webhook_format = "replicate"`, delivered by
workers/webhooks.py), so the two never drift apart. Shapes follow Replicate's predictions
API and the official Python client 1.x (its `Prediction` model accepts exactly these
statuses: an `aborted` Cancel-After is shown as `canceled`).

    job status   prediction status      job events            Replicate webhook event
    queued       starting               job.started           start
    running      processing             job.output            output
    succeeded    succeeded              job.progress          logs
    failed       failed                 job.succeeded/failed/
    canceled     canceled                 canceled            completed

`logs` is the job's progress messages, one a line, in order (from its event stream);
`metrics.predict_time` is the seconds from start to finish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from core.events import TERMINAL_EVENTS, Event, EventType
from core.models import Job

if TYPE_CHECKING:
    from core.runtime import Runtime

FORMAT = "replicate"  # Job.webhook_format of a prediction's webhook
STATUS = {"queued": "starting", "running": "processing", "succeeded": "succeeded", "failed": "failed", "canceled": "canceled"}
FILTER_EVENTS: dict[str, frozenset[str]] = {
    "start": frozenset({EventType.started.value}),
    "output": frozenset({EventType.output.value}),
    "logs": frozenset({EventType.progress.value}),
    "completed": TERMINAL_EVENTS,
}
ALL_FILTERS = ("start", "output", "logs", "completed")


def webhook_events(filters: Iterable[str] | None) -> list[str]:
    """Our event types for Replicate's `webhook_events_filter` (none given: all four)."""
    wanted = list(filters) if filters else list(ALL_FILTERS)
    return sorted({e for f in wanted for e in FILTER_EVENTS[f]})


def version_id(model_id: str) -> str:
    """A stable 64-hex "version" per catalog model, so `owner/name:version` strings and
    `version=` creates resolve (the catalog decides what actually runs)."""
    return hashlib.sha256(f"genroute-model:{model_id}".encode()).hexdigest()


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


def logs_of(events: Iterable[Event]) -> str:
    """Replicate's cumulative `logs`: each new progress message on its own line."""
    lines: list[str] = []
    for e in events:
        msg = e.data.get("message") if e.type in (EventType.progress.value, EventType.started.value) else None
        if msg and (not lines or lines[-1] != msg):
            lines.append(str(msg))
    return "".join(f"{line}\n" for line in lines)


def output_of(urls: list[str], n_requested: int | None) -> Any:
    """One file: its URL; several (or `num_outputs` asked for): a list, as Replicate's image models do."""
    if not urls:
        return None
    return urls[0] if len(urls) == 1 and not n_requested else list(urls)


def prediction(job: Job, *, base_url: str, model: str, output: Any = None, logs: str = "",
               status: str | None = None) -> dict[str, Any]:
    """The prediction object for `job`. `base_url` is where the /replicate routes live
    (urls.get/cancel/stream point there); `model` is the name the client used."""
    st = STATUS.get(status or job.status, "starting")
    done = st in ("succeeded", "failed", "canceled")
    metrics: dict[str, Any] = {}
    if done and job.finished_at is not None:
        started = job.started_at or job.finished_at  # canceled while queued: it never ran
        metrics["predict_time"] = 0.0 if job.cached else max(0.0, (job.finished_at - started).total_seconds())
        metrics["total_time"] = max(0.0, (job.finished_at - job.created_at).total_seconds())
    error = None
    if st == "failed":
        error = job.error_message or job.error_code or "failed"
    pid = job.id
    return {
        "id": pid,
        "model": model,
        "version": version_id(job.model),
        "input": job.input,
        "logs": logs,
        "output": output if st == "succeeded" else None,
        "data_removed": False,
        "error": error,
        "status": st,
        "source": "api",
        "created_at": _iso(job.created_at),
        "started_at": None if st == "starting" else _iso(job.started_at),
        "completed_at": _iso(job.finished_at) if done else None,
        "metrics": metrics,
        "urls": {
            "get": f"{base_url}/v1/predictions/{pid}",
            "cancel": f"{base_url}/v1/predictions/{pid}/cancel",
            "stream": f"{base_url}/v1/predictions/{pid}/stream",
        },
        **({"webhook": job.webhook_url} if job.webhook_format == FORMAT and job.webhook_url else {}),
    }


async def render(rt: Runtime, job: Job, base_url: str, *, status: str | None = None, upto_seq: int | None = None,
                 with_logs: bool = True) -> dict[str, Any]:
    """`prediction()` with what it needs read: output URLs (fresh, from the blob store), and
    the logs from the job's event stream up to `upto_seq` (a webhook shows the logs of its
    own moment). `status` overrides the job's (a webhook's event, or `starting` after a wait)."""
    model = rt.catalog.get(job.model)
    st = status or job.status
    urls: list[str] = []
    if st == "succeeded":
        for a in (await rt.ledger.assets([job.id]))[job.id]:
            urls.append(await rt.store.url(a.key, expires_in=rt.settings.url_ttl_seconds))
    logs = ""
    if with_logs and rt.ledger.events is not None:
        logs = logs_of(await rt.ledger.events.replay(job.id, 0, upto_seq))
    return prediction(job, base_url=base_url, model=model.replicate_name if model else f"genroute/{job.model}",
                      output=output_of(urls, job.input.get("n")), logs=logs, status=status)


async def webhook_body(rt: Runtime, job: Job, event: dict[str, Any]) -> dict[str, Any]:
    """The body of a Replicate-style webhook for one of the job's events: the prediction as
    it was at that event (its status, its logs so far), as Replicate posts it."""
    status = "succeeded" if event.get("type") == EventType.output.value else (event.get("data") or {}).get("status")
    return await render(rt, job, rt.settings.public_url.rstrip("/") + "/replicate", status=status,
                        upto_seq=int(event.get("seq") or 0) or None)
