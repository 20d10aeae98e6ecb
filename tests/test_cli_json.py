"""`--json` on every command that prints data: each such command (found in the CLI's own
parser, so a new one without a case here fails) prints one JSON document on stdout, run
as a user would on a fresh SQLite data directory. `submit --json` needs a server: it has
its own tests (tests/test_cli_submit.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cli.main import build_parser
from core.routing.catalog import DEFAULT_CATALOG

BIN = Path(sys.executable).parent / "genroute"


def _json_commands() -> set[str]:
    """Every (sub)command of `genroute` that takes --json, as "keys create", "migrate", ..."""
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001  # argparse keeps them private
        if not subs and any("--json" in a.option_strings for a in parser._actions):  # noqa: SLF001
            found.add(" ".join(path))
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*path, name])

    walk(build_parser(), [])
    return found


def test_every_command_that_prints_data_answers_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    env.update(GENROUTE_DATA_DIR=str(tmp_path / "data"), GENROUTE_SECRET_KEY="s" * 32)
    cases = {
        "migrate": ["migrate"],
        "tenants create": ["tenants", "create", "acme", "--name", "Acme", "--budget", "5000000"],
        "tenants budget": ["tenants", "budget", "acme", "2500000"],
        "keys create": ["keys", "create", "--name", "ci", "--tenant", "acme"],
        "billing audit": ["billing", "audit"],
        "webhooks reencrypt": ["webhooks", "reencrypt"],
        "catalog check": ["catalog", "check", str(DEFAULT_CATALOG)],
    }
    assert _json_commands() - {"submit"} == set(cases), "a command with --json has no case here"
    for name, argv in cases.items():  # in this order: each may need what the ones before made
        out = subprocess.run([str(BIN), *argv, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, (name, out.stdout, out.stderr)
        data = json.loads(out.stdout)  # one JSON document, nothing else on stdout
        assert isinstance(data, dict | list) and data, (name, out.stdout)
        if name == "keys create":
            assert data["key"].startswith("gr_") and data["tenant"] == "acme", data
        if name == "tenants budget":
            assert "2500000" in out.stdout, data
