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
    /metrics itself    Exposition.render                 genroute_metrics_scrape_duration_seconds
    poll lateness      workers/poll.py                   genroute_poll_lateness_seconds
    job runs           workers/run.py                    genroute_job_runs_total
    Redis state        StateProbe, read at scrape time   genroute_jobs_in_flight, _waiting, genroute_queue_depth

Label values are bounded: route templates (never a raw path), catalog model and
deployment names, statuses and error codes from fixed sets. Never a job id, key or prompt.

Gauges of shared state (jobs in flight and waiting per deployment, ARQ queue depth) are
not kept by any process: `StateProbe.refresh` reads them from Redis in one script call,
every `GENROUTE_METRICS_REFRESH_SECONDS` (1 s) in the background, so every process reports
the whole stack's figure (aggregate them with max, not sum), at most that old.

A scrape never waits on Redis or SQL: it renders what is in memory (`render`, the text
format of prometheus_client's generate_latest, with each series' name and labels formatted
once and kept). With 10,000 jobs in flight it takes about as long as with none
(bench/metrics_scrape.py, BENCHMARKS.md). The `_created` series prometheus_client adds
beside every counter and histogram are left out: half the series, and nothing reads them
in this format.
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
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client import metrics as pc_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics import exposition as om
from prometheus_client.process_collector import PROCESS_COLLECTOR
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger("genroute.metrics")
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

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
SCRAPE_SECONDS = Histogram("genroute_metrics_scrape_duration_seconds",
                           "Time this process took to render /metrics (from the request to its bytes)",
                           buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1))
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
    """The Redis-held gauges. `refresh()` (async, one round trip) leaves the figures that
    `collect()` reports; Exposition calls it every `refresh_seconds`. Built per process from
    its Runtime."""

    def __init__(self, redis: Any, limiter_prefix: str, queues: Sequence[str], deployments: Any) -> None:
        self.redis = redis
        self.limiter_prefix = limiter_prefix
        self.queues = list(queues)
        self.deployments = deployments  # () -> names: the catalog may be reloaded
        self._script = redis.register_script(_STATE)
        self._values: tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]] | None = None
        self._failing = False

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
        except Exception as exc:  # Redis away: scrapes still answer, without these gauges
            if not self._failing:  # once per outage, not once a second
                log.warning("metrics: cannot read jobs and queues from Redis: %s", exc)
            self._failing = True
            self._values = None
            return
        self._failing = False
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


# --- rendering --------------------------------------------------------------------------------

_TYPES = {"counter": "counter", "info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
          "unknown": "untyped"}
_SUFFIX = {"counter": "_total", "info": "_info"}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


class Renderer:
    """prometheus_client's text format (generate_latest's bytes, tests/test_observe.py checks
    it), faster: a series' `name{labels} ` is formatted once and kept, so a scrape formats
    only the values, and Counters and Histograms are read from their children directly
    (collect() would build a Sample per value). Label values are bounded, so the caches are
    too (and capped anyway)."""

    MAX_SERIES = 50_000

    def __init__(self) -> None:
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._values: dict[float, str] = {}  # counts and bucket bounds repeat from scrape to scrape
        self._series: dict[tuple[str, tuple[str, ...], bool], list[str]] = {}

    def _value(self, v: float) -> str:
        text = self._values.get(v)
        if text is None:
            if len(self._values) >= self.MAX_SERIES:
                self._values.clear()
            text = self._values[v] = floatToGoString(v)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
        return text

    def _head(self, name: str, labels: dict[str, str]) -> str:
        key = (name, tuple(labels.items()))
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= self.MAX_SERIES:
                self._heads.clear()
            head = self._heads[key] = self._format_head(name, labels)
        return head

    @staticmethod
    def _format_head(name: str, labels: dict[str, str]) -> str:
        # as generate_latest's sample_line, with its default escaping (underscores)
        esc = om.UNDERSCORES
        labelstr = ",".join(f'{om.escape_label_name(k, esc)}="{om._escape(v, om.ALLOWUTF8, lambda _c, _i: True)}"'  # noqa: SLF001
                            for k, v in sorted(labels.items()))
        return f"{om.escape_metric_name(name, esc)}{{{labelstr}}} " if labelstr else f"{om.escape_metric_name(name, esc)} "

    def render(self, collectors: Iterable[Collector]) -> bytes:
        out: list[str] = []
        for collector in collectors:
            for c in self._members(collector):
                if not self._own(c, out):
                    for metric in c.collect():
                        self._family(metric, out)
        return "".join(out).encode("utf-8")

    @staticmethod
    def _members(collector: Collector) -> list[Any]:
        """A registry's collectors in its order (what its collect() walks), else the collector."""
        if type(collector) is CollectorRegistry and not getattr(collector, "_target_info", None):
            try:
                with collector._lock:  # noqa: SLF001
                    return list(collector._collector_to_names)  # noqa: SLF001
            except AttributeError:  # another prometheus_client: its own collect()
                pass
        return [collector]

    def _family(self, metric: Any, out: list[str]) -> None:
        """One family from collect(), as generate_latest writes it."""
        append = out.append
        esc = om.UNDERSCORES
        mtype = metric.type
        mname = metric.name + _SUFFIX.get(mtype, "")
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {om.escape_metric_name(mname, esc)} {doc}\n")
        append(f"# TYPE {om.escape_metric_name(mname, esc)} {_TYPES.get(mtype, mtype)}\n")
        om_names = {metric.name + suffix: suffix for suffix in _OM_SUFFIXES}
        om_lines: dict[str, list[str]] = {}
        for sm in metric.samples:
            line = self._head(sm.name, sm.labels) + self._value(sm.value)
            if sm.timestamp is not None:
                line += f" {int(float(sm.timestamp) * 1000):d}"
            suffix = om_names.get(sm.name)
            if suffix is None:
                append(line + "\n")
            else:  # OpenMetrics-only samples: a gauge after the family, as generate_latest does
                om_lines.setdefault(suffix, []).append(line + "\n")
        for suffix, lines in sorted(om_lines.items()):
            append(f"# HELP {om.escape_metric_name(metric.name + suffix, esc)} {doc}\n")
            append(f"# TYPE {om.escape_metric_name(metric.name + suffix, esc)} gauge\n")
            out.extend(lines)

    def _own(self, metric: Any, out: list[str]) -> bool:
        """A prometheus_client Counter or Histogram, read from its children's values without
        building a Sample (and a labels dict) per value, which is most of collect()'s cost.
        False when it is not one (or this prometheus_client's insides differ): collect() then."""
        kind = type(metric)
        if kind not in (Counter, Histogram) or pc_metrics._use_created:  # noqa: SLF001
            return False
        try:
            if metric._is_parent():  # noqa: SLF001
                with metric._lock:  # noqa: SLF001
                    children = list(metric._metrics.items())  # noqa: SLF001
            else:
                children = [((), metric)]
            name, names = metric._name, metric._labelnames  # noqa: SLF001
            doc = metric._documentation.replace("\\", r"\\").replace("\n", r"\n")  # noqa: SLF001
            lines: list[str] = []
            value = self._value
            if kind is Counter:
                for values, child in children:
                    lines.append(self._heads_of(name, names, values, None)[0] + value(child._value.get()) + "\n")  # noqa: SLF001
                mname = om.escape_metric_name(name + "_total", om.UNDERSCORES)
                head = f"# HELP {mname} {doc}\n# TYPE {mname} counter\n"
            else:
                for values, child in children:
                    bounds = child._upper_bounds  # noqa: SLF001
                    heads = self._heads_of(name, names, values, bounds)
                    acc = 0.0
                    for h, bucket in zip(heads, child._buckets, strict=False):  # noqa: SLF001
                        acc += bucket.get()
                        lines.append(h + value(acc) + "\n")
                    lines.append(heads[len(bounds)] + value(acc) + "\n")
                    if bounds[0] >= 0:
                        lines.append(heads[len(bounds) + 1] + value(child._sum.get()) + "\n")  # noqa: SLF001
                mname = om.escape_metric_name(name, om.UNDERSCORES)
                head = f"# HELP {mname} {doc}\n# TYPE {mname} histogram\n"
        except AttributeError:
            return False
        out.append(head)
        out.extend(lines)
        return True

    def _heads_of(self, name: str, names: Sequence[str], values: tuple[str, ...],
                  bounds: Sequence[float] | None) -> list[str]:
        """A child's series heads: a counter's `_total`, or a histogram's buckets, `_count`, `_sum`."""
        key = (name, tuple(values), bounds is None)
        heads = self._series.get(key)
        if heads is None:
            if len(self._series) >= self.MAX_SERIES:
                self._series.clear()
            labels = dict(zip(names, values, strict=False))
            if bounds is None:
                heads = [self._format_head(name + "_total", labels)]
            else:
                heads = [self._format_head(name + "_bucket", {**labels, "le": floatToGoString(b)}) for b in bounds]  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
                heads += [self._format_head(name + "_count", labels), self._format_head(name + "_sum", labels)]
            self._series[key] = heads
        return heads


class Snapshot(Collector):
    """Another collector's families as of its last `take()`: the process collector reads
    /proc (stat, limits, every fd) on each collect, which a scrape should not wait for."""

    def __init__(self, source: Collector | None) -> None:
        self.source = source
        self._families: list[Any] = []

    def take(self) -> None:
        if self.source is None:
            return
        try:
            self._families = list(self.source.collect())
        except Exception:
            log.warning("metrics: cannot read %s", type(self.source).__name__, exc_info=True)

    def collect(self) -> Iterable[Any]:
        return self._families

    def describe(self) -> Iterable[Any]:
        return []


class Exposition:
    """What one process serves at /metrics: the shared registry plus its own StateProbe,
    which `start()` refreshes every `refresh_seconds` in the background (until `close()`).
    Not started (a probe alone, in tests): each render refreshes it first."""

    def __init__(self, probe: StateProbe | None, registry: CollectorRegistry = REGISTRY,
                 refresh_seconds: float = 1.0) -> None:
        self.probe = probe
        self.registry = registry
        self.refresh_seconds = refresh_seconds
        self._renderer = Renderer()
        self._task: asyncio.Task[None] | None = None
        self._process = PROCESS if registry is REGISTRY else None

    async def start(self) -> None:
        """Refresh the probe (and the process figures) every refresh_seconds from now on."""
        if self._task is not None:
            return
        await self._refresh()  # the first scrape has the gauges too
        self._task = asyncio.create_task(self._refreshing(), name="metrics-refresh")

    async def _refresh(self) -> None:
        if self._process is not None:
            self._process.take()
        if self.probe is not None:
            await self.probe.refresh()

    async def _refreshing(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self._refresh()
            except Exception:  # never let the loop die: the gauges would freeze
                log.warning("metrics: refresh failed", exc_info=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def render(self) -> bytes:
        t0 = time.perf_counter()
        if self._task is None:  # not started: read everything now
            await self._refresh()
        extra = [c for c in (self._process, self.probe) if c is not None]
        body = self._renderer.render([self.registry, *extra])
        SCRAPE_SECONDS.observe(time.perf_counter() - t0)  # seen by the next scrape
        return body


# The process figures (CPU, memory, fds) come from a Snapshot that each started Exposition
# refreshes, not from the default registry, which would read /proc on every scrape.
PROCESS = Snapshot(PROCESS_COLLECTOR)
try:
    REGISTRY.unregister(PROCESS_COLLECTOR)
except KeyError:  # someone removed it already
    PROCESS.source = None


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
