"""The one dispatch path: route → acquire → call → fall back → release.

Worker jobs (workers/run.py) and inline chat (api/chat.py) both call `dispatch`; only
what "call" means differs (a submit, a chat completion). The slot of the deployment that
answered stays held (`Placed.lease_id`): the caller releases it when the work ends (a
job's terminal transition, a chat call's last byte) through `release`.

    snapshot (core.limits.deployments) ─► plan (core.routing.router) ─► for each candidate:
        acquire slot ─ Denied ─► next
        adapter = rt.adapters.get(dep) ─ unknown adapter ─► next (recorded)
        start(candidate)  ─ False (the job moved on) ─► release, Stopped
        call(candidate, adapter) ─ ProviderError ─► release, health, fall back if allowed
    no candidate could take it ─► Unplaced(plan): the caller waits (queue) or answers 429/503
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from core import disclosure
from core.errors import ErrorCode, ProviderError
from core.jobs.queue import enqueue_woken
from core.limits.deployments import Denied
from core.limits.waits import Gate
from core.models import utcnow
from core.routing.catalog import Deployment, Model
from core.routing.router import Candidate, Plan, SkipReason, can_fall_back, plan, reachable

log = logging.getLogger("genroute.dispatch")

T = TypeVar("T")


@dataclass
class Placed(Generic[T]):
    """A candidate answered: `value` is what `call` returned; its slot is still held."""

    value: T
    candidate: Candidate
    attempts: list[dict[str, Any]]

    @property
    def deployment(self) -> Deployment:
        return self.candidate.deployment


@dataclass
class Refused:
    """Every candidate tried failed; `error` is the last one (it did not allow falling back,
    or no candidate was left)."""

    error: ProviderError
    attempts: list[dict[str, Any]]


@dataclass
class Stopped:
    """`start` said no (the job was canceled or taken meanwhile); nothing was called."""

    attempts: list[dict[str, Any]]


@dataclass
class Unplaced:
    """No candidate could take the work now (slots, rate windows, cooldowns) or ever."""

    plan: Plan
    now: float  # Redis clock (epoch seconds) of the snapshot
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def busy(self) -> list[str]:
        """Deployments whose concurrency was full: the ones to wait for in their queues."""
        return [s.deployment for s in self.plan.skipped if s.reason is SkipReason.busy]

    def retry_in(self, low: float = 0.2, high: float = 2.0) -> float:
        at = self.plan.retry_at
        return min(high, max(low, (at - self.now) if at else 1.0))


Outcome = Placed[T] | Refused | Stopped | Unplaced


def attempt_entry(dep: Deployment, model_id: str, error: tuple[str, str] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"deployment": dep.name, "model": model_id, "started_at": utcnow().isoformat()}
    if error is not None:
        entry.update(duration_ms=0, error={"code": error[0], "message": error[1][:500]})
    return entry


async def dispatch(
    rt: Any,
    model: Model,
    body: dict[str, Any],
    lease_id: str,
    call: Callable[[Candidate, Any, list[dict[str, Any]]], Awaitable[T]],
    *,
    start: Callable[[Candidate, list[dict[str, Any]]], Awaitable[bool]] | None = None,
    attempts: list[dict[str, Any]] | None = None,
    counts: Callable[[ProviderError], bool] = lambda exc: True,
    prefer: str | None = None,
) -> Outcome[T]:
    """Route `body` for `model` and call the first candidate that takes it. `rt` is the
    process's core.runtime.Runtime. `start` runs after the slot is taken and before the
    call (the worker records the job as running there). `counts(exc)`: whether a
    provider error counts against the deployment's health. `prefer`: a deployment whose
    slot was handed to this lease by a wait queue; it is tried first when it is a candidate.
    A non-provider exception from `call` releases the slot and propagates."""
    cat = rt.catalog
    snap = await rt.limiter.snapshot(reachable(model, cat), catalog_version=cat.version)
    p = plan(model, body, snap.states, now=snap.now, catalog=cat)
    candidates = list(p.candidates)
    if prefer is not None:
        candidates.sort(key=lambda c: c.deployment.name != prefer)
        if not any(c.deployment.name == prefer for c in candidates):
            # the handed slot is ours but the snapshot counted it as taken: try it anyway
            dep = cat.deployment(prefer)
            if dep is not None and any(d.name == prefer for d in reachable(model, cat)):
                held = next((c for c in _all_candidates(model, body, cat, snap.now) if c.deployment.name == prefer), None)
                if held is not None:
                    candidates.insert(0, held)
    tried = list(attempts or [])
    last: ProviderError | None = None
    for i, cand in enumerate(candidates):
        dep = cand.deployment
        if isinstance(await rt.limiter.acquire(dep, lease_id=lease_id, tokens=cand.estimated_tokens), Denied):
            continue  # taken since the snapshot
        try:
            adapter = rt.adapters.get(dep)
        except LookupError as exc:  # the catalog names an adapter this build does not have
            await rt.limiter.release(dep.name, lease_id)
            tried.append(attempt_entry(dep, cand.model.id, error=(ErrorCode.provider_unavailable.value, str(exc))))
            continue
        tried.append(attempt_entry(dep, cand.model.id))
        try:
            started = start is None or await start(cand, tried)
        except BaseException:
            await release(rt, dep, lease_id)
            raise
        if not started:
            await release(rt, dep, lease_id)
            return Stopped(tried)
        t0 = time.monotonic()
        try:
            value = await call(cand, adapter, tried)
        except ProviderError as exc:
            await release(rt, dep, lease_id)
            if counts(exc):
                await rt.limiter.record_error(dep, exc, catalog_version=cat.version)
            # attempts are shown to the tenant: the cleaned message (core/disclosure.py)
            tried[-1].update(duration_ms=_ms(t0), error={"code": exc.code.value,
                                                         "message": disclosure.of_provider_error(exc).message[:500]})
            last = exc
            if can_fall_back(exc) and i + 1 < len(candidates):
                continue
            return Refused(exc, tried)
        except BaseException:
            await release(rt, dep, lease_id)
            tried[-1]["duration_ms"] = _ms(t0)
            raise
        tried[-1]["duration_ms"] = _ms(t0)
        return Placed(value, cand, tried)
    if last is not None:
        return Refused(last, tried)
    return Unplaced(p, snap.now, tried)


def _all_candidates(model: Model, body: dict[str, Any], cat: Any, now: float) -> list[Candidate]:
    """Candidates as if no deployment were busy (for a slot already handed to us)."""
    from core.routing.router import DeploymentState

    states = {d.name: DeploymentState() for d in reachable(model, cat)}
    return list(plan(model, body, states, now=now, catalog=cat).candidates)


def deployment_gate(rt: Any, dep: Deployment) -> Gate:
    return Gate(f"d:{dep.name}", rt.limiter.key("slots", dep.name), dep.limits.max_concurrency or 0)


async def release(rt: Any, dep: Deployment | str, lease_id: str, *, success: bool = False,
                  started_at: float | None = None) -> None:
    """Free a deployment slot (idempotent) and hand it to the head of its wait queue; that
    job's run is enqueued at once. `started_at` (epoch s) feeds the deployment's ETA."""
    name = dep if isinstance(dep, str) else dep.name
    held = await rt.limiter.release(name, lease_id, success=success)
    d = rt.catalog.deployment(name) if isinstance(dep, str) else dep
    if d is None:
        return
    gate = deployment_gate(rt, d)
    if held and started_at is not None:
        await rt.waits.record_duration(gate.name, time.time() - started_at)
    await wake(rt, gate)


async def wake(rt: Any, gate: Gate) -> None:
    woken = await rt.waits.wake(gate)
    if woken is not None:
        await enqueue_woken(rt.redis, rt.settings, rt.waits, woken, gate.name)


def _ms(t0: float) -> int:
    return int((time.monotonic() - t0) * 1000)
