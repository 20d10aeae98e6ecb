"""A bounded schemathesis run over /openapi.json with a valid key (fixed seed, so it is
repeatable): 0 answers >= 500 and 0 response-schema violations."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.services import fresh_postgres
from tests.stack import Stack, make_stack, running

ST = Path(sys.executable).parent / "st"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    async with fresh_postgres() as db:
        st = await make_stack(tmp_path_factory.mktemp("fuzz"), redis_url=f"{redis_base}/0", database_url=db,
                              max_wait_seconds="5")
        async with running(st, ("worker", "--queue", "media")):
            yield st


async def test_schemathesis_finds_no_server_errors(stack: Stack, tmp_path: Path) -> None:
    cmd = [str(ST), "run", f"{stack.api_url}/openapi.json", "-H", f"Authorization: Bearer {stack.keys['alice']}",
           "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", "8", "--seed", "20261202",
           "--request-timeout", "30", "--exclude-path-regex", "/events$|/content$", "--report", "ndjson",
           "--report-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
