"""The routing core: catalog extensions, the pure router (core/routing/router.py) and the Redis
layer (core/limits/deployments.py) against a real Redis, including several processes at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from core.errors import ProviderError
from core.errors import ProviderErrorKind as K
from core.limits.deployments import Denied, Lease, Limiter
from core.routing.catalog import Catalog, CatalogError, Deployment, Model, load_catalog
from core.routing.router import (
    DeploymentState,
    SkipReason,
    backoff,
    can_fall_back,
    health_effect,
    plan,
    reachable,
)

NOW = 1_000_000.0


# --- data factories -------------------------------------------------------------------------


def dep(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "adapter": "local", "model": name, **kw}


def model(mid: str, deps: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"id": mid, "modality": kw.pop("modality", "image"), "deployments": deps, **kw}


def catalog(*models: dict[str, Any]) -> Catalog:
    return Catalog.model_validate({"models": list(models)})


def one(*deps: dict[str, Any], **kw: Any) -> tuple[Catalog, Model]:
    cat = catalog(model("m", list(deps), **kw))
    return cat, cat.models[0]


def names(p: Any) -> list[str]:
    return [c.deployment.name for c in p.candidates]


IMG = {"prompt": "a cat", "n": 1, "output_format": "png"}


# --- catalog ----------------------------------------------------------------------------------


def test_catalog_defaults_keep_old_files_valid() -> None:
    cat = load_catalog()
    d = cat.models[0].deployments[0]
    assert (d.weight, d.priority, d.capabilities) == (1, 0, None)
    assert catalog(model("a", [dep("d")])).models[0].deployments[0].price is None  # unpriced unless stated
    assert d.limits.max_concurrency is None and d.limits.rpm is None and d.limits.tpm is None
    assert cat.models[0].strategy == "priority" and cat.models[0].fallback_models == []
    assert len(cat.version) == 16 and catalog(model("a", [dep("d")])).version == ""


def test_catalog_schema_additions_load(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"models": [
        model("veo", [dep("veo-a", priority=0, weight=3, price={"per_second": 500_000},
                          limits={"max_concurrency": 3, "rpm": 60},
                          capabilities={"resolutions": ["720p", "1080p"]})],
              modality="video", strategy="weighted", fallback_models=["wan"]),
        model("wan", [dep("wan-a", limits={"tpm": 1000})], modality="video"),
    ]}))
    cat = load_catalog(f)
    veo = cat.get("veo")
    assert veo is not None and veo.strategy == "weighted" and veo.fallback_models == ["wan"]
    d = veo.deployments[0]
    assert d.limits.max_concurrency == 3 and d.price is not None and d.price.per_second == 500_000
    assert veo.capabilities_of(d).resolutions == ["720p", "1080p"]


@pytest.mark.parametrize(
    "models,needle",
    [
        ([model("a", [dep("d")], fallback_models=["zzz"])], "models[0].fallback_models[0]: unknown model 'zzz'"),
        ([model("a", [dep("d")], fallback_models=["a"])], "models[0].fallback_models[0]: model 'a' names itself"),
        ([model("a", [dep("d")], fallback_models=["b"]), model("b", [dep("e")], fallback_models=["c"]),
          model("c", [dep("f")], fallback_models=["a"])], "fallback cycle a -> b -> c -> a"),
        ([model("a", [dep("d")], fallback_models=["v"]), model("v", [dep("e")], modality="video")],
         "'v' is a video model but 'a' is image"),
        ([model("a", [dep("d", weight=1)]), model("b", [dep("d", weight=2)])],
         "models[1].deployments[0]: deployment name 'd' is already used by models[0].deployments[0]"),
        ([model("a", [dep("d", strategy="fastest")])], "models.0.deployments.0.strategy"),
        ([model("a", [dep("d")], strategy="fastest")], "models.0.strategy"),
        ([model("a", [dep("d", limits={"max_concurrency": 0})])], "models.0.deployments.0.limits.max_concurrency"),
        ([model("a", [dep("d", price={"per_image": -1})])], "models.0.deployments.0.price.per_image"),
    ],
)
def test_catalog_routing_errors_name_file_path_and_fix(tmp_path: Path, models: list[Any], needle: str) -> None:
    f = tmp_path / "cat.yaml"
    f.write_text(yaml.safe_dump({"models": models}))
    with pytest.raises(CatalogError) as exc:
        load_catalog(f)
    assert str(f) in str(exc.value) and needle in str(exc.value), str(exc.value)


def test_same_deployment_listed_twice_identically_is_allowed() -> None:
    cat = catalog(model("a", [dep("d")], fallback_models=["b"]), model("b", [dep("d")]))
    assert [d.name for d in reachable(cat.models[0], cat)] == ["d"]
    assert names(plan(cat.models[0], IMG, {}, now=NOW, catalog=cat)) == ["d"]


# --- strategies ---------------------------------------------------------------------------------


def test_priority_sends_all_traffic_to_a_healthy_primary() -> None:
    _, m = one(dep("backup", priority=1), dep("primary", priority=0), dep("third", priority=1))
    picks = Counter(names(plan(m, IMG, {}, now=NOW))[0] for _ in range(200))
    assert picks == {"primary": 200}
    assert names(plan(m, IMG, {}, now=NOW)) == ["primary", "backup", "third"]  # then catalog order


def test_weighted_split_follows_the_weights() -> None:
    _, m = one(dep("a", weight=7), dep("b", weight=2), dep("c", weight=1), strategy="weighted")
    rng = random.Random(1234)
    picks = Counter(names(plan(m, IMG, {}, now=NOW, rng=rng))[0] for _ in range(1000))
    for name, share in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert abs(picks[name] / 1000 - share) < 0.03, picks
    # every plan still lists all of them: the rest are the fallbacks
    assert sorted(names(plan(m, IMG, {}, now=NOW, rng=rng))) == ["a", "b", "c"]


def test_weighted_draws_among_the_best_priority_and_weight_zero_comes_last() -> None:
    _, m = one(dep("spare", weight=100, priority=1), dep("a", weight=1), dep("b", weight=1),
               dep("never", weight=0), strategy="weighted")
    rng = random.Random(7)
    for _ in range(200):
        order = names(plan(m, IMG, {}, now=NOW, rng=rng))
        assert set(order[:3]) == {"a", "b", "never"} and order[2] == "never" and order[3] == "spare"
    # the best tier unavailable: the draw moves to the next one
    st = {"a": DeploymentState(unhealthy=True), "b": DeploymentState(unhealthy=True), "never": DeploymentState(unhealthy=True)}
    assert names(plan(m, IMG, st, now=NOW, rng=rng)) == ["spare"]


def test_least_busy_prefers_the_idle_deployment() -> None:
    _, m = one(dep("a"), dep("b"), dep("c", priority=-1), dep("d"), strategy="least_busy")
    st = {"a": DeploymentState(in_flight=4), "b": DeploymentState(in_flight=0),
          "c": DeploymentState(in_flight=2), "d": DeploymentState(in_flight=0)}
    assert names(plan(m, IMG, st, now=NOW)) == ["b", "d", "c", "a"]
    # ties broken by priority before catalog order
    st["c"] = DeploymentState(in_flight=0)
    assert names(plan(m, IMG, st, now=NOW)) == ["c", "b", "d", "a"]


def test_lowest_cost_uses_this_requests_estimate() -> None:
    _, m = one(
        dep("per-image", price={"per_image": 40_000}),
        dep("per-request", price={"per_request": 100_000}),
        dep("unpriced"),
        dep("per-image-low-prio", price={"per_image": 40_000}, priority=-1),
        strategy="lowest_cost",
    )
    # one image: 40k beats 100k; equal prices go by priority; unknown price last
    assert names(plan(m, {**IMG, "n": 1}, {}, now=NOW)) == ["per-image-low-prio", "per-image", "per-request", "unpriced"]
    # four images: 160k each, so the flat per-request price wins
    p = plan(m, {**IMG, "n": 4}, {}, now=NOW)
    assert names(p)[0] == "per-request" and [c.estimated_cost for c in p.candidates] == [100_000, 160_000, 160_000, None]


# --- skipping ------------------------------------------------------------------------------------


def test_cooldown_unhealthy_and_missing_key_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTER_TEST_KEY", raising=False)
    _, m = one(dep("cool"), dep("sick"), dep("keyless", api_key_env="ROUTER_TEST_KEY"), dep("ok"), dep("was-cool"))
    st = {"cool": DeploymentState(cooldown_until=NOW + 5), "sick": DeploymentState(unhealthy=True),
          "was-cool": DeploymentState(cooldown_until=NOW - 1)}
    p = plan(m, IMG, st, now=NOW)
    assert names(p) == ["ok", "was-cool"]
    assert {s.deployment: s.reason for s in p.skipped} == {
        "cool": SkipReason.cooldown, "sick": SkipReason.unhealthy, "keyless": SkipReason.no_key}
    monkeypatch.setenv("ROUTER_TEST_KEY", "k")
    assert "keyless" in names(plan(m, IMG, st, now=NOW))


def test_limits_are_a_wait_not_a_failure() -> None:
    _, m = one(dep("a", limits={"max_concurrency": 2}), dep("b", limits={"rpm": 10}),
               dep("c", limits={"tpm": 1000}), modality="text")
    chat = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}  # 200 tokens
    st = {"a": DeploymentState(in_flight=2, slot_frees_at=NOW + 30),
          "b": DeploymentState(requests_in_window=10, window_frees_at=NOW + 12),
          "c": DeploymentState(tokens_in_window=900, window_frees_at=NOW + 20)}
    p = plan(m, chat, st, now=NOW)
    assert p.candidates == () and p.status == "wait" and p.blocked_by_limits
    assert {s.reason for s in p.skipped} == {SkipReason.busy, SkipReason.rate_limited}
    assert p.retry_at == NOW + 12 and "waiting for a free slot" in p.message()
    # one under its limits: routed there, and it reserves the request's tokens
    st["c"] = DeploymentState(tokens_in_window=700)
    p = plan(m, chat, st, now=NOW)
    assert names(p) == ["c"] and p.candidates[0].estimated_tokens == 200
    # a request bigger than the whole tpm still passes an empty window
    big = {"messages": [{"role": "user", "content": "x" * 8000}]}
    assert names(plan(m, big, {"a": st["a"], "b": st["b"]}, now=NOW)) == ["c"]


def test_blocked_by_limits_versus_no_usable_deployment() -> None:
    _, m = one(dep("a", limits={"max_concurrency": 1}), dep("b"))
    busy = DeploymentState(in_flight=1)
    # limits plus a dead deployment: still a wait (the slot will free)
    assert plan(m, IMG, {"a": busy, "b": DeploymentState(unhealthy=True)}, now=NOW).status == "wait"
    # breakers only: cooldown, with the moment the first one closes
    p = plan(m, IMG, {"a": DeploymentState(cooldown_until=NOW + 9), "b": DeploymentState(cooldown_until=NOW + 4)}, now=NOW)
    assert p.status == "cooldown" and p.retry_at == NOW + 4 and not p.blocked_by_limits
    # nothing could ever take it
    dead = DeploymentState(unhealthy=True)
    p = plan(m, IMG, {"a": dead, "b": dead}, now=NOW)
    assert p.status == "unavailable" and p.retry_at is None and "no usable deployment for model 'm'" in p.message()
    # every deployment already tried for this job
    p = plan(m, IMG, {}, now=NOW, exclude={"a", "b"})
    assert p.status == "unavailable" and {s.reason for s in p.skipped} == {SkipReason.excluded}


def test_capability_aware_fallback_never_drops_a_parameter() -> None:
    cat = catalog(
        model("veo", [dep("veo-main"), dep("veo-720", capabilities={"resolutions": ["720p"]}, priority=1)],
              modality="video", capabilities={"resolutions": ["720p", "1080p"]}, fallback_models=["cheap"]),
        model("cheap", [dep("cheap-a")], modality="video", capabilities={"resolutions": ["480p", "720p"]}),
    )
    veo = cat.get("veo")
    assert veo is not None
    hd = {"prompt": "a wave", "resolution": "1080p", "duration_seconds": 4, "aspect_ratio": "16:9"}
    sd = {**hd, "resolution": "720p"}
    assert names(plan(veo, sd, {}, now=NOW, catalog=cat)) == ["veo-main", "veo-720", "cheap-a"]
    p = plan(veo, hd, {}, now=NOW, catalog=cat)
    assert names(p) == ["veo-main"]
    skipped = {s.deployment: s for s in p.skipped}
    assert skipped["veo-720"].reason == SkipReason.unsupported and "'1080p'" in skipped["veo-720"].detail
    assert skipped["cheap-a"].reason == SkipReason.unsupported
    # the only capable deployment cooling down: wait for it, do not downgrade to 720p
    p = plan(veo, hd, {"veo-main": DeploymentState(cooldown_until=NOW + 3)}, now=NOW, catalog=cat)
    assert p.candidates == () and p.status == "cooldown"


def test_fallback_models_follow_the_models_own_deployments() -> None:
    cat = catalog(
        model("a", [dep("a1"), dep("a2")], fallback_models=["b", "c"]),
        model("b", [dep("b1", weight=1), dep("b2", weight=0)], strategy="weighted", fallback_models=["c"]),
        model("c", [dep("c1")]),
    )
    a = cat.get("a")
    assert a is not None
    assert [d.name for d in reachable(a, cat)] == ["a1", "a2", "b1", "b2", "c1"]
    p = plan(a, IMG, {}, now=NOW, catalog=cat)
    assert names(p) == ["a1", "a2", "b1", "b2", "c1"]
    assert [c.fallback for c in p.candidates] == [False, False, True, True, True]
    assert p.candidates[2].model.id == "b"
    # primary's deployments all down: the fallback model's come first
    st = {"a1": DeploymentState(unhealthy=True), "a2": DeploymentState(cooldown_until=NOW + 1)}
    assert names(plan(a, IMG, st, now=NOW, catalog=cat)) == ["b1", "b2", "c1"]
    # without the catalog there are no fallbacks to resolve
    assert names(plan(a, IMG, {}, now=NOW)) == ["a1", "a2"]


# --- retry policy and health rules ----------------------------------------------------------------


def test_backoff_full_jitter_capped_and_honouring_retry_after() -> None:
    rng = random.Random(3)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)):
        xs = [backoff(attempt, rng=rng) for _ in range(500)]
        assert all(0 <= x <= ceiling for x in xs) and max(xs) > ceiling * 0.9 and min(xs) < ceiling * 0.1
    xs = [backoff(1, 12.0, rng) for _ in range(200)]
    assert all(12.0 <= x <= 13.2 for x in xs)  # never before Retry-After, at most 10 % later
    assert all(300 <= backoff(1, 3600.0, rng) <= 330 for _ in range(50))  # capped
    assert backoff(1, 0.5, rng, base=10) <= 10.0


@pytest.mark.parametrize(
    "kind,counts,unhealthy,fall_back",
    [
        (K.retryable, True, False, True),
        (K.rate_limited, True, False, True),
        (K.quota, False, True, True),  # out of credits: the operator's account, this deployment is out
        (K.auth, False, True, True),
        (K.invalid, False, False, False),
        (K.moderated, False, False, False),
        (K.failed, False, False, False),
    ],
)
def test_health_rules(kind: K, counts: bool, unhealthy: bool, fall_back: bool) -> None:
    err = ProviderError(kind, "x", resend_safe=True)
    e = health_effect(err)
    assert (e.counts, e.unhealthy) == (counts, unhealthy)
    assert can_fall_back(err) is fall_back


def test_rate_limit_retry_after_cools_and_unsent_safety_gates_fallback() -> None:
    assert health_effect(ProviderError(K.rate_limited, "x", retry_after=7)).cool_for == 7
    assert health_effect(ProviderError(K.retryable, "x", retry_after=7)).cool_for is None
    # a 5xx after the create may have started a task: never resent elsewhere
    assert not can_fall_back(ProviderError(K.retryable, "x", resend_safe=False))
    assert health_effect(ValueError("our bug")).counts is False


# --- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_base: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(f"{redis_base}/0")
    yield r
    await r.aclose()


@pytest.fixture
async def prefix(redis: aioredis.Redis) -> AsyncIterator[str]:
    p = f"test-router:{uuid.uuid4().hex[:12]}"
    yield p
    keys = [k async for k in redis.scan_iter(match=f"{p}:*")]
    if keys:
        await redis.delete(*keys)


def D(name: str = "d", **kw: Any) -> Deployment:
    return Deployment.model_validate(dep(name, **kw))


async def test_acquire_release_and_a_crashed_workers_slot_frees_itself(redis: aioredis.Redis, prefix: str) -> None:
    lim = Limiter(redis, prefix)
    d = D(limits={"max_concurrency": 2})
    a = await lim.acquire(d, lease_id="job-a")
    b = await lim.acquire(d, lease_id="job-b", lease_seconds=0.3)  # its worker will "crash"
    assert isinstance(a, Lease) and isinstance(b, Lease)
    c = await lim.acquire(d, lease_id="job-c")
    assert isinstance(c, Denied) and c.reason == "concurrency" and c.retry_after is not None and c.retry_after <= 0.3
    again = await lim.acquire(d, lease_id="job-a")  # the same job again (at-least-once): no second slot
    assert isinstance(again, Lease)
    snap = await lim.snapshot([d])
    assert snap.states["d"].in_flight == 2 and abs(snap.now - time.time()) < 5
    await asyncio.sleep(0.35)
    c = await lim.acquire(d, lease_id="job-c")
    assert isinstance(c, Lease)
    assert await lim.renew(b) is None  # the expired lease is gone for good
    renewed = await lim.renew(a)
    assert renewed is not None and renewed.expires_at > a.expires_at
    assert await lim.release("d", "job-a") and not await lim.release("d", "job-a")  # idempotent
    assert (await lim.snapshot([d])).states["d"].in_flight == 1


async def test_rate_window_slides(redis: aioredis.Redis, prefix: str) -> None:
    lim = Limiter(redis, prefix, window_seconds=0.5)
    d = D(limits={"rpm": 5})
    got = [await lim.acquire(d) for _ in range(7)]
    assert [isinstance(g, Lease) for g in got] == [True] * 5 + [False] * 2
    denied = got[5]
    assert isinstance(denied, Denied) and denied.reason == "rpm" and denied.retry_after is not None and 0 < denied.retry_after <= 0.5
    st = (await lim.snapshot([d])).states["d"]
    assert st.requests_in_window == 5 and st.window_frees_at is not None
    await asyncio.sleep(0.55)
    assert isinstance(await lim.acquire(d), Lease)
    assert (await lim.snapshot([d])).states["d"].requests_in_window == 1


async def test_tokens_per_minute(redis: aioredis.Redis, prefix: str) -> None:
    lim = Limiter(redis, prefix, window_seconds=0.5)
    d = D(limits={"tpm": 1000})
    assert isinstance(await lim.acquire(d, tokens=600), Lease)
    assert isinstance(await lim.acquire(d, tokens=400), Lease)
    denied = await lim.acquire(d, tokens=1)
    assert isinstance(denied, Denied) and denied.reason == "tpm"
    assert (await lim.snapshot([d])).states["d"].tokens_in_window == 1000
    await asyncio.sleep(0.55)
    assert (await lim.snapshot([d])).states["d"].tokens_in_window == 0  # read-only view of the trim
    assert isinstance(await lim.acquire(d, tokens=5000), Lease)  # bigger than tpm, window empty
    assert (await lim.snapshot([d])).states["d"].tokens_in_window == 5000


async def test_cooldown_opens_after_failures_and_closes_after_the_window(redis: aioredis.Redis, prefix: str) -> None:
    lim = Limiter(redis, prefix, cooldown_failures=3, cooldown_seconds=0.6)
    a, b = D("a"), D("b")
    _, m = one(dep("a"), dep("b"))
    flaky = ProviderError(K.retryable, "502", resend_safe=True)
    for _ in range(10):  # user errors never count
        await lim.record_error(a, ProviderError(K.moderated, "flagged"), catalog_version="v")
        await lim.record_error(a, ProviderError(K.invalid, "bad size"), catalog_version="v")
    assert (await lim.snapshot([a])).states["a"] == DeploymentState()
    await lim.record_error(a, flaky, catalog_version="v")
    await lim.record_error(a, flaky, catalog_version="v")
    await lim.release("a", "x", success=True)  # a success in between resets the count
    await lim.record_error(a, flaky, catalog_version="v")
    await lim.record_error(a, flaky, catalog_version="v")
    snap = await lim.snapshot([a, b])
    assert snap.states["a"].failures == 2 and snap.states["a"].cooldown_until is None
    await lim.record_error(a, flaky, catalog_version="v")  # the third in a row opens it
    snap = await lim.snapshot([a, b])
    st = snap.states["a"]
    assert st.cooldown_until is not None and 0.4 < st.cooldown_until - snap.now <= 0.601
    assert names(plan(m, IMG, snap.states, now=snap.now)) == ["b"]
    await asyncio.sleep(0.65)
    snap = await lim.snapshot([a, b])
    assert snap.states["a"].cooldown_until is None and names(plan(m, IMG, snap.states, now=snap.now)) == ["a", "b"]
    # half-open: the first failure after it closed opens it again
    _, until = await lim.record_failure("a")
    assert until is not None


async def test_rate_limited_retry_after_cools_at_once(redis: aioredis.Redis, prefix: str) -> None:
    lim = Limiter(redis, prefix, cooldown_failures=5, max_cool_for_seconds=2)
    a = D("a")
    await lim.record_error(a, ProviderError(K.rate_limited, "429", retry_after=1.0), catalog_version="")
    snap = await lim.snapshot([a])
    assert snap.states["a"].cooldown_until is not None and 0.8 < snap.states["a"].cooldown_until - snap.now <= 1.001
    await lim.record_error(a, ProviderError(K.rate_limited, "429", retry_after=3600), catalog_version="")
    snap = await lim.snapshot([a])
    assert snap.states["a"].cooldown_until is not None and snap.states["a"].cooldown_until - snap.now <= 2.001


async def test_auth_marks_unhealthy_until_the_catalog_reloads(redis: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_TEST_KEY", "old-key")
    lim = Limiter(redis, prefix)
    a = D("a", api_key_env="ROUTER_TEST_KEY")
    effect = await lim.record_error(a, ProviderError(K.auth, "401"), catalog_version="v1")
    assert effect.unhealthy
    assert (await lim.snapshot([a], catalog_version="v1")).states["a"].unhealthy
    assert not (await lim.snapshot([a], catalog_version="v2")).states["a"].unhealthy  # a new catalog
    monkeypatch.setenv("ROUTER_TEST_KEY", "new-key")
    assert not (await lim.snapshot([a], catalog_version="v1")).states["a"].unhealthy  # a new key
    monkeypatch.setenv("ROUTER_TEST_KEY", "old-key")
    assert (await lim.snapshot([a], catalog_version="v1")).states["a"].unhealthy
    await lim.clear_unhealthy(["a"])  # a reload of the same file
    assert not (await lim.snapshot([a], catalog_version="v1")).states["a"].unhealthy


async def test_limiter_from_settings(redis: aioredis.Redis) -> None:
    from core.settings import Settings

    lim = Limiter.from_settings(redis, Settings(redis_prefix="gx", router_cooldown_seconds=5))
    assert lim.key("slots", "d") == "gx:rt:slots:d" and lim.cooldown_ms == 5000 and lim.lease_ms == 300_000


async def test_snapshot_is_one_round_trip_and_feeds_least_busy(redis: aioredis.Redis, prefix: str) -> None:
    lim = Limiter(redis, prefix)
    _, m = one(dep("a"), dep("b"), dep("c"), strategy="least_busy")
    deps = m.deployments
    for i in range(3):
        await lim.acquire(deps[0], lease_id=f"a{i}")
    await lim.acquire(deps[2], lease_id="c0")
    await lim.snapshot(deps)  # loads the script
    calls: list[Any] = []
    real = redis.execute_command

    async def counting(*args: Any, **kw: Any) -> Any:
        calls.append(args[0])
        return await real(*args, **kw)

    redis.execute_command = counting  # type: ignore[method-assign]
    try:
        snap = await lim.snapshot(deps)
    finally:
        del redis.execute_command
    assert calls == ["EVALSHA"]
    assert [snap.states[n].in_flight for n in ("a", "b", "c")] == [3, 0, 1]
    assert names(plan(m, IMG, snap.states, now=snap.now)) == ["b", "c", "a"]


# --- several processes ------------------------------------------------------------------------------

PEAK = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


async def _hammer_async(url: str, prefix: str, mode: str, seconds: float) -> None:
    r = aioredis.Redis.from_url(url)
    lim = Limiter(r, prefix)
    peak = r.register_script(PEAK)
    rng = random.Random()
    if mode == "concurrency":
        d = D("shared", limits={"max_concurrency": 3})
    else:
        d = D("shared", limits={"rpm": 25})
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            got = await lim.acquire(d, lease_seconds=30)
            if isinstance(got, Denied):
                await r.incr(f"{prefix}:obs:denied")
                await asyncio.sleep(0.001)
                continue
            await r.incr(f"{prefix}:obs:granted")
            if mode == "concurrency":
                await peak(keys=[f"{prefix}:obs:inflight", f"{prefix}:obs:peak"])
                await asyncio.sleep(rng.uniform(0, 0.004))  # the "provider call"
                await r.decr(f"{prefix}:obs:inflight")
            await lim.release(d.name, got.lease_id, success=True)
    finally:
        await r.aclose()


def _hammer(url: str, prefix: str, mode: str, seconds: float, barrier: Any) -> None:
    barrier.wait(timeout=30)  # start together, after every interpreter has imported
    asyncio.run(_hammer_async(url, prefix, mode, seconds))


def _run_processes(url: str, prefix: str, mode: str, n: int = 4, seconds: float = 1.5) -> None:
    # forkserver: one clean interpreter imports this module once, then forks the hammers
    # (fork from pytest's threaded, event-looped process is unsafe; spawn re-imports per child)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_hammer, args=(url, prefix, mode, seconds, barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n


async def observed(redis: aioredis.Redis, prefix: str, *names: str) -> list[int]:
    return [int(v or 0) for v in await redis.mget([f"{prefix}:obs:{n}" for n in names])]


async def test_concurrency_limit_holds_across_processes(redis_base: str, redis: aioredis.Redis, prefix: str) -> None:
    await asyncio.to_thread(_run_processes, f"{redis_base}/0", prefix, "concurrency")
    peak, granted, denied = await observed(redis, prefix, "peak", "granted", "denied")
    assert peak == 3, (peak, granted, denied)  # reached, never passed
    assert granted > 200 and denied > 0  # the processes really contended
    assert int(await redis.get(f"{prefix}:obs:inflight") or 0) == 0
    assert (await Limiter(redis, prefix).snapshot([D("shared")])).states["shared"].in_flight == 0


async def test_rate_limit_gives_exactly_n_per_window_across_processes(redis_base: str, redis: aioredis.Redis, prefix: str) -> None:
    await asyncio.to_thread(_run_processes, f"{redis_base}/0", prefix, "rate", 4, 1.0)
    granted, denied = await observed(redis, prefix, "granted", "denied")
    assert granted == 25 and denied > 100, (granted, denied)
