"""Every catalog the project ships passes `genroute catalog check`, and every process
refuses at start a catalog that `catalog check` refuses (an unknown adapter included), as
the check does: exit code 2 and the file:line of the problem, never a running process whose
jobs sit queued for a deployment it cannot build."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

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


REFUSED = {  # other refusals than the unknown adapter: what the check says, at which line
    "modality": (UNKNOWN.replace("modality: image", "modality: smell").replace("no_such_adapter", "local"), 3, "modality"),
    "price": (UNKNOWN.replace("no_such_adapter", "local") + "        price: {per_image: -5}\n", 8, "per_image"),
}


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


def _price_paragraph(path: Path) -> str:
    """The header comment paragraph that talks about prices ('' if none)."""
    header: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    paragraphs = "\n".join(header).split("\n\n")
    return next((p for p in paragraphs if "Prices" in p or "prices" in p.split("\n")[0]), "")


def _priced(data: dict[str, Any]) -> bool:
    return any("price" in dep for m in data.get("models", []) for dep in m.get("deployments", [])) or any(
        "price" in p for p in (data.get("providers") or {}).values())


@pytest.mark.parametrize("path", sorted(ROOT.glob("catalogs/*.yaml")), ids=lambda p: p.name)
def test_shipped_prices_say_when_they_were_read(path: Path) -> None:
    """A ready catalog that sets prices dates them (they change); one that sets none says so."""
    data = yaml.safe_load(path.read_text())
    paragraph = _price_paragraph(path)
    assert paragraph, f"{path.name}: no header paragraph on prices"
    if _priced(data):
        assert re.search(r"\b20\d\d-\d\d\b", paragraph), f"{path.name}: its prices carry no date:\n{paragraph}"
    else:
        assert "none" in paragraph or "unpriced" in paragraph, f"{path.name}: unpriced, and the header does not say so"


def _provider_table() -> dict[str, str]:
    """README's provider table: adapter name -> its row."""
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `([a-z_]+)`( \+ relay options)? \|", line)
        if m and "docs/adapters/" in line:
            rows.setdefault(m.group(1), line)
    return rows


def test_readme_lists_every_adapter_with_its_mapping_doc_and_every_ready_catalog() -> None:
    from core.routing.catalog import ADAPTERS

    readme = (ROOT / "README.md").read_text()
    rows = _provider_table()
    missing = sorted(set(ADAPTERS) - {"local"} - set(rows))  # `local` is the built-in stand-in, not a provider
    assert not missing, f"adapters with no row in README's provider table: {missing}"
    for name, row in rows.items():
        for doc in re.findall(r"\((docs/adapters/[a-z_]+\.md)", row):
            assert (ROOT / doc).is_file(), (name, doc)
    for path in sorted(ROOT.glob("catalogs/*.yaml")):
        assert f"(catalogs/{path.name})" in readme, f"README does not point at catalogs/{path.name}"
    # what is not covered is said where a reader looks for it
    assert "Midjourney-proxy routes are not covered" in readme
    assert "Midjourney-proxy routes" in (ROOT / "docs/adapters/grsai.md").read_text()


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_the_worker_refuses_at_start_any_catalog_that_catalog_check_refuses(kind: str, tmp_path: Path) -> None:
    text, line, word = REFUSED[kind]
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    checked = _run("catalog", "check", str(path))
    assert checked.returncode == 1 and f"{path}:{line}:" in checked.stderr and word in checked.stderr, checked.stderr
    env = {"GENROUTE_CATALOG": str(path), "GENROUTE_SECRET_KEY": "x" * 32, "GENROUTE_DATA_DIR": str(tmp_path / "data")}
    got = _run("worker", env=env, timeout=90)
    assert got.returncode == 2 and f"{path}:{line}" in got.stderr and word in got.stderr, (got.returncode, got.stderr[-2000:])
