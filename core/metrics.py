"""Prometheus metrics: every metric genroute exports is defined here, and the few hooks
that record them are the only code that touches prometheus_client.

    HTTP boundary      api/observe.py (middleware)       genroute_http_*
    job ledger         core/jobs/ledger.py (create, terminal)   genroute_jobs_*, genroute_job_*_seconds
    outputs            storage/ingest.py (storing())     genroute_job_storing_seconds
    provider calls     adapters/registry.py              genroute_provider_*
    limits, budgets    core/limits/deployments.py, quotas.py, billing.py   genroute_limiter_denied_total, genroute_refusals_total
    authentication     api/deps.py                       genroute_auth_failures_total
    webhooks           workers/webhooks.py               genroute_webhook_*
    chat               api/chat.py                       genroute_chat_*
    poll lateness      workers/poll.py                   genroute_poll_lateness_seconds
    job runs           workers/run.py                    genroute_job_runs_total
    Redis state        StateProbe, read at scrape time   genroute_jobs_in_flight, _waiting, genroute_queue_depth

Label values are bounded: route templates (never a raw path), catalog model and
deployment names, statuses and error codes from fixed sets. Never a job id, key or prompt.

Gauges of shared state (jobs in flight and waiting per deployment, ARQ queue depth) are
not kept by any process: `StateProbe.refresh` reads them from Redis in one script call
just before a scrape is rendered, so every process reports the whole stack's figure
(aggregate them with max, not sum).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST  # the API's /metrics sends it
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger("genroute.metrics")

# Seconds, from a fast HTTP answer to an hour-long video job.
FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SLOW = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

HTTP_REQUESTS = Counter("genroute_http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_SECONDS = Histogram("genroute_http_request_duration_seconds", "Time to answer an HTTP request (to its last byte)",
                         ["method", "route"], buckets=FAST)

JOBS_SUBMITTED = Counter("genroute_jobs_submitted", "Jobs accepted", ["model", "modality"])
JOBS_FINISHED = Counter("genroute_jobs_finished", "Jobs that reached a terminal status",
                        ["model", "deployment", "status", "error_code"])
JOB_QUEUED = Histogram("genroute_job_queued_seconds", "Time from submit to the first start at a deployment",
                       ["model"], buckets=SLOW)
JOB_PROVIDER = Histogram("genroute_job_provider_seconds",
                         "Time from the start at a deployment to the end, less the time storing outputs",
                         ["deployment"], buckets=SLOW)
JOB_STORING = Histogram("genroute_job_storing_seconds", "Time spent storing a finished job's outputs",
                        ["modality"], buckets=FAST)

POLL_LATENESS = Histogram("genroute_poll_lateness_seconds", "How long after its due time a provider poll ran",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))

PROVIDER_CALLS = Counter("genroute_provider_calls", "Calls to a provider adapter", ["deployment", "call", "outcome"])
PROVIDER_SECONDS = Histogram("genroute_provider_call_duration_seconds", "Latency of a provider adapter call",
                             ["deployment", "call"], buckets=FAST)

JOB_RUNS = Counter("genroute_job_runs", "Worker runs of a job (run_job), by what they did: started it at a "
                   "deployment, left it waiting (a wait queue, a timer), or ended it", ["outcome"])
LIMITER_DENIED = Counter("genroute_limiter_denied", "Deployment slots or rate-window places refused",
                         ["deployment", "reason"])
REFUSALS = Counter("genroute_refusals", "Requests refused for a key's limits or a tenant's budget", ["reason"])
AUTH_FAILURES = Counter("genroute_auth_failures", "Requests with an unknown, revoked or expired key", ["outcome"])

WEBHOOK_DELIVERIES = Counter("genroute_webhook_deliveries", "Webhook delivery attempts", ["outcome"])
WEBHOOK_SECONDS = Histogram("genroute_webhook_delivery_duration_seconds", "Latency of a webhook delivery attempt",
                            buckets=FAST)

CHAT_REQUESTS = Counter("genroute_chat_requests", "Chat completions", ["model", "deployment", "status"])
CHAT_TOKENS = Counter("genroute_chat_tokens", "Chat tokens counted", ["model", "deployment", "kind"])
CHAT_SECONDS = Histogram("genroute_chat_duration_seconds", "Time from a chat request to its last byte",
                         ["model"], buckets=FAST)
CHAT_COST = Counter("genroute_chat_cost_micro_usd", "Cost settled for chat calls, micro-USD", ["model", "deployment"])


# --- hooks ----------------------------------------------------------------------------------

def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_SECONDS.labels(method, route).observe(seconds)


def job_submitted(job: Any) -> None:
    JOBS_SUBMITTED.labels(job.model, job.modality).inc()


# Seconds spent storing outputs in the current task (storage.store_output adds to it), so
# the terminal transition in the same task can tell provider time from storing time.
_storing: ContextVar[list[float] | None] = ContextVar("genroute_storing", default=None)


@contextmanager
def storing() -> Iterator[None]:
    """Time one output's storing (storage/ingest.py wraps store_output in it)."""
    acc = _storing.get()
    if acc is None:
        acc = [0.0]
        _storing.set(acc)
    t0 = time.monotonic()
    try:
        yield
    finally:
        acc[0] += time.monotonic() - t0


def job_finished(job: Any) -> None:
    """The terminal transition's hook (core/jobs/ledger.py Ledger.transition): counts and times."""
    try:
        acc = _storing.get()
        stored = acc[0] if acc is not None else 0.0
        if acc is not None:
            acc[0] = 0.0
        JOBS_FINISHED.labels(job.model, job.deployment or "", str(job.status), job.error_code or "").inc()
        started: datetime | None = job.started_at
        if started is not None:
            JOB_QUEUED.labels(job.model).observe(max(0.0, (started - job.created_at).total_seconds()))
            if job.deployment and job.finished_at is not None:
                JOB_PROVIDER.labels(job.deployment).observe(max(0.0, (job.finished_at - started).total_seconds() - stored))
        if stored > 0:
            JOB_STORING.labels(job.modality).observe(stored)
    except Exception:  # metrics never break a transition
        log.warning("could not record metrics of job %s", getattr(job, "id", "?"), exc_info=True)


def observe_poll_lateness(seconds: float) -> None:
    """How late a poll ran after it was due (the poller, as it claims each entry)."""
    POLL_LATENESS.observe(max(0.0, seconds))


def provider_call(deployment: str, call: str, outcome: str, seconds: float) -> None:
    PROVIDER_CALLS.labels(deployment, call, outcome).inc()
    PROVIDER_SECONDS.labels(deployment, call).observe(seconds)


def job_run(outcome: str) -> None:
    """outcome: started | waiting | ended (failed or stopped)."""
    JOB_RUNS.labels(outcome).inc()


def limiter_denied(deployment: str, reason: str) -> None:
    LIMITER_DENIED.labels(deployment, reason).inc()


def refused(reason: str) -> None:
    """reason: budget_exceeded, key_rpm or key_concurrency."""
    REFUSALS.labels(reason).inc()


def auth_failure(outcome: str) -> None:
    """outcome: looked_up (a query found no active key), cached (the negative cache answered,
    no query), limited (429: the address is past auth_failure_limit)."""
    AUTH_FAILURES.labels(outcome).inc()


def webhook_delivery(outcome: str, seconds: float) -> None:
    """outcome: delivered, failed (a retry follows), exhausted, refused (unsafe URL)."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()
    WEBHOOK_SECONDS.observe(seconds)


def chat_finished(model: str, deployment: str, status: str, prompt: int, completion: int, cost: int | None,
                  seconds: float) -> None:
    CHAT_REQUESTS.labels(model, deployment, status).inc()
    CHAT_SECONDS.labels(model).observe(seconds)
    if prompt:
        CHAT_TOKENS.labels(model, deployment, "prompt").inc(prompt)
    if completion:
        CHAT_TOKENS.labels(model, deployment, "completion").inc(completion)
    if cost:
        CHAT_COST.labels(model, deployment).inc(cost)


# --- shared state, read from Redis at scrape time ---------------------------------------------

# KEYS: per deployment (slots, wait), then per queue (queue)   ARGV: deployments count
# -> {per deployment: in_flight, waiting; per queue: ready, deferred}
# O(log n) per key: ZCOUNT on the sorted sets, never a scan, so 10,000 jobs in flight cost
# what 10 do. A wait queue may be a sorted set or a list.
_STATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local out = {}
local function size(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'zset' then return redis.call('ZCARD', key) end
  if kind == 'list' then return redis.call('LLEN', key) end
  return 0
end
for i = 0, n - 1 do
  table.insert(out, redis.call('ZCOUNT', KEYS[i*2+1], '(' .. now, '+inf'))
  table.insert(out, size(KEYS[i*2+2]))
end
for i = n * 2 + 1, #KEYS do
  local ready = redis.call('ZCOUNT', KEYS[i], '-inf', now)
  table.insert(out, ready)
  table.insert(out, redis.call('ZCARD', KEYS[i]) - ready)
end
return out
"""


class StateProbe(Collector):
    """The Redis-held gauges. `refresh()` (async, one round trip) before each scrape; the
    registry then reads the figures it left. Built per process from its Runtime."""

    def __init__(self, redis: Any, limiter_prefix: str, queues: Sequence[str], deployments: Any) -> None:
        self.redis = redis
        self.limiter_prefix = limiter_prefix
        self.queues = list(queues)
        self.deployments = deployments  # () -> names: the catalog may be reloaded
        self._script = redis.register_script(_STATE)
        self._values: tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]] | None = None

    def slots_key(self, deployment: str) -> str:
        return f"{self.limiter_prefix}:slots:{deployment}"

    def wait_key(self, deployment: str) -> str:
        """The deployment's wait queue of jobs waiting for a slot (core/limits/waits.py)."""
        return f"{self.limiter_prefix}:wq:d:{deployment}"

    async def refresh(self) -> None:
        names = sorted(set(self.deployments()))
        keys = [k for d in names for k in (self.slots_key(d), self.wait_key(d))] + self.queues
        try:
            r = [int(v) for v in await self._script(keys=keys, args=[len(names)])]
        except Exception as exc:  # Redis away: the scrape still answers, without these gauges
            log.warning("metrics: cannot read jobs and queues from Redis: %s", exc)
            self._values = None
            return
        deps = {d: (r[2 * i], r[2 * i + 1]) for i, d in enumerate(names)}
        base = 2 * len(names)
        queues = {q: (r[base + 2 * i], r[base + 2 * i + 1]) for i, q in enumerate(self.queues)}
        self._values = (deps, queues)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._values is None:
            return []
        deps, queues = self._values
        in_flight = GaugeMetricFamily("genroute_jobs_in_flight", "Jobs and chat calls holding a slot at a deployment",
                                      labels=["deployment"])
        waiting = GaugeMetricFamily("genroute_jobs_waiting", "Jobs waiting for a slot at a deployment",
                                    labels=["deployment"])
        for d, (n, w) in deps.items():
            in_flight.add_metric([d], n)
            waiting.add_metric([d], w)
        depth = GaugeMetricFamily("genroute_queue_depth",
                                  "Tasks on an ARQ queue: ready (due now) or deferred (polls and retries due later)",
                                  labels=["queue", "state"])
        for q, (ready, deferred) in queues.items():
            name = q.rsplit(":", 1)[-1]
            depth.add_metric([name, "ready"], ready)
            depth.add_metric([name, "deferred"], deferred)
        return [in_flight, waiting, depth]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # nothing to check at registration: the figures exist only after refresh()


def probe_for(rt: Any) -> StateProbe:
    """A StateProbe over a Runtime's Redis, limiter and catalog."""
    return StateProbe(
        rt.redis,
        rt.limiter.prefix,
        rt.settings.queues,
        lambda: [d.name for m in rt.catalog.models for d in m.deployments],
    )


class Exposition:
    """What one process serves at /metrics: the shared registry plus its own StateProbe."""

    def __init__(self, probe: StateProbe | None, registry: CollectorRegistry = REGISTRY) -> None:
        self.probe = probe
        self.registry = registry
        self._lock = asyncio.Lock()  # one refresh at a time: the probe's figures are per process

    async def render(self) -> bytes:
        async with self._lock:
            if self.probe is None:
                return generate_latest(self.registry)
            await self.probe.refresh()
            self.registry.register(self.probe)
            try:
                return generate_latest(self.registry)
            finally:
                self.registry.unregister(self.probe)


async def serve_metrics(
    port: int, exposition: Exposition, *, host: str = "0.0.0.0", healthy: Callable[[], bool] | None = None
) -> asyncio.Server:
    """A minimal HTTP server for `GET /metrics` in this event loop (the worker's
    `--metrics-port`): in-loop, so the Redis gauges are read with the process's own pool.
    `GET /healthz` answers 200 while `healthy()` (503 otherwise); an event loop that hangs
    answers nothing, which a container healthcheck counts as a failure too."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if parts[0] == b"GET" and path == b"/healthz":
                ok = healthy is None or healthy()
                body, status, ctype = (b"ok\n", b"200 OK", b"text/plain") if ok else (b"unhealthy\n", b"503 Service Unavailable", b"text/plain")
            elif parts[0] != b"GET" or path not in (b"/metrics", b"/"):
                body, status, ctype = b"not found: GET /metrics or /healthz\n", b"404 Not Found", b"text/plain"
            else:
                body, status, ctype = await exposition.render(), b"200 OK", CONTENT_TYPE_LATEST.encode()
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
