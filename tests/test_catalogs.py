"""Every catalog the project ships passes `genroute catalog check`, and every process
refuses at start a catalog that `catalog check` refuses (an unknown adapter included), as
the check does: exit code 2 and the file:line of the problem, never a running process whose
jobs sit queued for a deployment it cannot build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENROUTE = Path(sys.executable).parent / "genroute"
SHIPPED = sorted([*ROOT.glob("catalogs/*.yaml"), *ROOT.glob("examples/*catalog*.yaml"), ROOT / "core/routing/catalog.yaml"])


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GENROUTE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_catalog_passes_catalog_check(path: Path) -> None:
    got = _run("catalog", "check", str(path))
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith(f"{path}: ") and "ok" in got.stdout, got.stdout


UNKNOWN = """\
models:
  - id: ghost-image
    modality: image
    deployments:
      - name: ghost-1
        adapter: no_such_adapter
        model: m
"""


@pytest.fixture
def unknown_adapter_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(UNKNOWN)
    return path


def test_catalog_check_names_the_unknown_adapter_and_its_line(unknown_adapter_catalog: Path) -> None:
    got = _run("catalog", "check", str(unknown_adapter_catalog))
    assert got.returncode == 1
    assert f"{unknown_adapter_catalog}:6:" in got.stderr and "unknown adapter 'no_such_adapter'" in got.stderr, got.stderr
    assert "openai" in got.stderr  # the known ones are listed, so the typo can be fixed


@pytest.mark.parametrize("command", [["dev"], ["api"], ["worker"]])
def test_every_process_refuses_at_start_what_catalog_check_refuses(
    command: list[str], unknown_adapter_catalog: Path, tmp_path: Path
) -> None:
    env = {"GENROUTE_CATALOG": str(unknown_adapter_catalog), "GENROUTE_SECRET_KEY": "x" * 32,
           "GENROUTE_DATA_DIR": str(tmp_path / "data")}
    got = _run(*command, env=env, timeout=90)
    assert got.returncode == 2, (got.returncode, got.stdout[-2000:], got.stderr[-2000:])
    assert "unknown adapter 'no_such_adapter'" in got.stderr and f"{unknown_adapter_catalog}:6" in got.stderr, got.stderr
