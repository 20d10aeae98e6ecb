"""The router: which deployments to try for a request, in what order, and what a failure
does to a deployment's health. Pure decision logic — no I/O; the state it decides over is
read from Redis by core/limits/deployments.py in one round trip.

    snapshot (limits.py) ──► plan(model, input, states) ──► Plan
                                                             ├─ candidates: try in order
                                                             │    acquire slot → submit → release
                                                             └─ status when there are none:
                                                                  wait        only limits stand in the way: stay queued
                                                                  cooldown    only open breakers: stay queued until retry_at
                                                                  unavailable nothing could ever take it (no key,
                                                                              unhealthy, unsupported, all tried)

A deployment is a candidate when it is not excluded (already tried for this job), has its
key, is not marked unhealthy, accepts every requested parameter, is not cooling down and
is under its concurrency, rpm and tpm limits. The model's candidates come first, ordered
by its strategy; then each fallback model's (depth first, in catalog order).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from core.billing.pricing import estimate_cost, token_estimate
from core.errors import Fault, ProviderError, ProviderErrorKind
from core.routing.catalog import Catalog, Deployment, Model, capability_problems


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What Redis knows about one deployment right now. Times are epoch seconds on the
    Redis server's clock (the snapshot's `now` is on the same clock)."""

    in_flight: int = 0
    requests_in_window: int = 0
    tokens_in_window: int = 0
    window_frees_at: float | None = None  # when the oldest request leaves the rate window
    slot_frees_at: float | None = None  # earliest lease expiry: a slot frees by then at the latest
    cooldown_until: float | None = None
    unhealthy: bool = False
    failures: int = 0  # consecutive counted failures so far


IDLE = DeploymentState()


class SkipReason(StrEnum):
    excluded = "excluded"  # already tried for this job
    no_key = "no_key"
    unhealthy = "unhealthy"  # provider_auth seen under this catalog version
    unsupported = "unsupported"  # cannot honour a requested parameter
    cooldown = "cooldown"
    busy = "busy"  # at max_concurrency
    rate_limited = "rate_limited"  # at rpm or tpm


WAIT_REASONS = frozenset({SkipReason.busy, SkipReason.rate_limited})


@dataclass(frozen=True, slots=True)
class Candidate:
    model: Model  # the requested model, or the fallback model this deployment serves
    deployment: Deployment
    estimated_cost: int | None  # micro-USD for this input; None when the deployment has no price
    estimated_tokens: int  # what acquire() reserves against tpm (0 for media)
    fallback: bool  # True when it serves a fallback model


@dataclass(frozen=True, slots=True)
class Skipped:
    model_id: str
    deployment: str
    reason: SkipReason
    detail: str = ""
    until: float | None = None  # when it may become usable again (cooldown end, slot/window free)


PlanStatus = Literal["ready", "wait", "cooldown", "unavailable"]


@dataclass(frozen=True, slots=True)
class Plan:
    model_id: str
    candidates: tuple[Candidate, ...]
    skipped: tuple[Skipped, ...] = field(default=())

    @property
    def status(self) -> PlanStatus:
        if self.candidates:
            return "ready"
        reasons = {s.reason for s in self.skipped}
        if reasons & WAIT_REASONS:
            return "wait"
        if SkipReason.cooldown in reasons:
            return "cooldown"
        return "unavailable"

    @property
    def blocked_by_limits(self) -> bool:
        """No candidate, and only concurrency/rate limits (maybe with breakers) stand in
        the way: the job stays queued, it does not fail."""
        return self.status == "wait"

    @property
    def retry_at(self) -> float | None:
        """The earliest moment a waiting deployment may free up (None: unknown or never).
        For a cooldown or a rate window it is exact; for a busy deployment it is the first
        lease expiry, an upper bound (a release frees the slot sooner), so a waiting job
        should look again after min(retry_at - now, a second or two)."""
        times = [s.until for s in self.skipped if s.until is not None and s.reason in (*WAIT_REASONS, SkipReason.cooldown)]
        return min(times) if times else None

    def message(self) -> str:
        """One line for the job's progress message or error."""
        if self.candidates:
            return f"routing {self.model_id!r} to {self.candidates[0].deployment.name}"
        parts = [f"{s.deployment} ({s.reason}{': ' + s.detail if s.detail else ''})" for s in self.skipped]
        head = {
            "wait": "waiting for a free slot of",
            "cooldown": "every deployment is cooling down for",
            "unavailable": "no usable deployment for",
        }[self.status]
        return f"{head} model {self.model_id!r}: " + "; ".join(parts)


# --- planning -----------------------------------------------------------------------------


def chain(model: Model, catalog: Catalog | None) -> list[Model]:
    """The model, then its fallback models depth first (each once; the catalog refuses cycles)."""
    out: list[Model] = []
    seen: set[str] = set()

    def walk(m: Model) -> None:
        if m.id in seen:
            return
        seen.add(m.id)
        out.append(m)
        for fid in m.fallback_models if catalog is not None else ():
            fm = catalog.get(fid) if catalog is not None else None
            if fm is not None:
                walk(fm)

    walk(model)
    return out


def reachable(model: Model, catalog: Catalog | None = None) -> list[Deployment]:
    """Every deployment a plan for `model` may look at: what to snapshot before planning."""
    seen: dict[str, Deployment] = {}
    for m in chain(model, catalog):
        for d in m.deployments:
            seen.setdefault(d.name, d)
    return list(seen.values())


def plan(
    model: Model,
    request: Mapping[str, Any],
    states: Mapping[str, DeploymentState],
    *,
    now: float,
    catalog: Catalog | None = None,
    rng: random.Random | None = None,
    exclude: Collection[str] = (),
) -> Plan:
    """Order the deployments to try for `request` (the normalized input).

    `states` maps deployment names to their snapshot (absent: idle and healthy); `now` is
    on the snapshot's clock; `catalog` resolves fallback models (None: no fallbacks);
    `exclude` names deployments already tried for this job; `rng` drives `weighted`.
    """
    rng = rng or random.Random()
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    placed: set[str] = set()
    tokens = estimate_tokens(model.modality, request)  # fallbacks share the modality
    for m in chain(model, catalog):
        ready: list[tuple[int, Candidate]] = []
        for index, dep in enumerate(m.deployments):
            if dep.name in placed:  # listed under two models: its first place wins
                continue
            skip = _skip(m, dep, request, states.get(dep.name, IDLE), now=now, tokens=tokens, exclude=exclude)
            if skip is not None:
                skipped.append(skip)
                continue
            placed.add(dep.name)
            cost = estimate_cost(dep.price, m.modality, request) if dep.price is not None else None
            ready.append((index, Candidate(m, dep, cost, tokens, fallback=m is not model)))
        candidates.extend(_order(m.strategy, ready, states, rng))
    return Plan(model.id, tuple(candidates), tuple(skipped))


def _skip(
    model: Model,
    dep: Deployment,
    request: Mapping[str, Any],
    st: DeploymentState,
    *,
    now: float,
    tokens: int,
    exclude: Collection[str],
) -> Skipped | None:
    def out(reason: SkipReason, detail: str = "", until: float | None = None) -> Skipped:
        return Skipped(model.id, dep.name, reason, detail, until)

    if dep.name in exclude:
        return out(SkipReason.excluded, "already tried for this job")
    if dep.api_key_env and not dep.api_key():
        return out(SkipReason.no_key, f"set {dep.api_key_env}")
    if st.unhealthy:
        return out(SkipReason.unhealthy, "the provider refused its key; fix it and reload the catalog")
    problems = capability_problems(model.capabilities_of(dep), dict(request))
    if problems:
        return out(SkipReason.unsupported, "; ".join(str(p["msg"]) for p in problems))
    if st.cooldown_until is not None and st.cooldown_until > now:
        return out(SkipReason.cooldown, f"for {st.cooldown_until - now:.1f} s", st.cooldown_until)
    lim = dep.limits
    if lim.max_concurrency is not None and st.in_flight >= lim.max_concurrency:
        return out(SkipReason.busy, f"{st.in_flight}/{lim.max_concurrency} in flight", st.slot_frees_at)
    if lim.rpm is not None and st.requests_in_window >= lim.rpm:
        return out(SkipReason.rate_limited, f"{st.requests_in_window}/{lim.rpm} requests this minute", st.window_frees_at)
    # a request larger than the whole tpm budget still goes through an empty window, or it never could
    if lim.tpm is not None and st.tokens_in_window > 0 and st.tokens_in_window + tokens > lim.tpm:
        return out(SkipReason.rate_limited, f"{st.tokens_in_window}+{tokens}/{lim.tpm} tokens this minute", st.window_frees_at)
    return None


def _order(
    strategy: str,
    ready: list[tuple[int, Candidate]],
    states: Mapping[str, DeploymentState],
    rng: random.Random,
) -> list[Candidate]:
    def prio(item: tuple[int, Candidate]) -> tuple[int, int]:
        return (item[1].deployment.priority, item[0])

    if strategy == "least_busy":
        ready.sort(key=lambda it: (states.get(it[1].deployment.name, IDLE).in_flight, *prio(it)))
    elif strategy == "lowest_cost":
        ready.sort(key=lambda it: (it[1].estimated_cost is None, it[1].estimated_cost or 0, *prio(it)))
    elif strategy == "weighted":
        # tiers by priority; inside a tier, a weighted shuffle (Efraimidis-Spirakis: key u^(1/w),
        # largest first), so the first pick follows the weights and the rest remain as fallbacks
        def key(it: tuple[int, Candidate]) -> tuple[int, float, int]:
            w = it[1].deployment.weight
            k = rng.random() ** (1.0 / w) if w > 0 else -1.0  # weight 0: only after the others
            return (it[1].deployment.priority, -k, it[0])

        ready.sort(key=key)
    else:  # priority
        ready.sort(key=prio)
    return [c for _, c in ready]


# --- estimates (money: core/billing/pricing.py) ------------------------------------------------------


def estimate_tokens(modality: str, request: Mapping[str, Any]) -> int:
    """Input plus the most output a text request may produce (reserved against tpm); 0 for media."""
    return sum(token_estimate(modality, request))


# --- retries and health ---------------------------------------------------------------------


def backoff(
    attempt: int,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    *,
    base: float = 1.0,
    cap: float = 60.0,
    max_retry_after: float = 300.0,
) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry).

    Full jitter (uniform in [0, min(cap, base * 2**(attempt-1))]) spreads retries of many
    jobs apart. A provider's retry_after is a floor — never retry earlier — plus up to 10 %
    of spread so every waiting job does not return in the same millisecond; it is honoured
    up to `max_retry_after` (a provider asking for an hour gets the cap, not an hour).
    """
    rng = rng or random.Random()
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None and retry_after > 0:
        floor = min(retry_after, max_retry_after)
        delay = max(delay, floor + rng.uniform(0, 0.1 * floor))
    return delay


@dataclass(frozen=True, slots=True)
class HealthEffect:
    """What one provider error does to its deployment's health."""

    counts: bool = False  # adds to the consecutive failures that open the breaker
    unhealthy: bool = False  # out until the catalog reloads (bad key)
    cool_for: float | None = None  # cool down at least this long now (the provider's retry_after)


NO_EFFECT = HealthEffect()

# Only the provider's trouble opens the breaker, and of that only what says the deployment
# is struggling now (5xx, timeouts, throttling). A task that ran and `failed` may well be
# the input's fault: it never counts.
_COUNTED = frozenset({ProviderErrorKind.retryable, ProviderErrorKind.rate_limited})


def health_effect(err: BaseException) -> HealthEffect:
    """What `err` does to its deployment, read from whose fault it is (decided once, where
    the adapter translated it): the provider's counts, the operator's (bad key, no
    credits, a wrong model or URL) marks this one deployment out until the catalog
    reloads, the user's and ours do nothing."""
    if not isinstance(err, ProviderError):
        return NO_EFFECT  # our own bug or a cancel: not the provider's health
    if err.fault is Fault.operator:
        return HealthEffect(unhealthy=True)
    if err.fault is Fault.provider and err.kind in _COUNTED:
        cool = err.retry_after if err.kind == ProviderErrorKind.rate_limited and err.retry_after else None
        return HealthEffect(counts=True, cool_for=cool)
    return NO_EFFECT


def can_fall_back(err: BaseException) -> bool:
    """May the same request go to the next candidate? Only when the deployment is at fault
    and the create provably did not start a task there (else the user could pay twice).
    An operator's mistake (refused key, no credits, a model the provider does not have)
    means the provider turned the request away; a user's mistake would fail anywhere."""
    if not isinstance(err, ProviderError):
        return False
    if err.fault is Fault.operator:
        return err.resend_safe or err.kind in (ProviderErrorKind.auth, ProviderErrorKind.quota)
    if err.fault is not Fault.provider:
        return False
    return err.retryable and err.resend_safe
