"""`genroute submit` as a person uses it, against a real stack: `--wait`'s progress bar in a
terminal (log lines are printed above it, never into it; a long provider message does not
squeeze it), and `--json` with `--wait` (the finished job)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from cli.submit import BAR, describe, progress_bar
from tests.stack import Stack, make_stack, running

BIN = Path(sys.executable).parent / "genroute"
SLOW = ["--input", "size=256x256", "--input", "provider_params.latency_seconds=3",
        "--input", "provider_params.progress_steps=6"]
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_base: str) -> AsyncIterator[Stack]:
    st = await make_stack(tmp_path_factory.mktemp("cli"), redis_url=f"{redis_base}/0")
    async with running(st):
        yield st


def _env(stack: Stack, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    return {**base, "GENROUTE_URL": stack.api_url, "GENROUTE_API_KEY": stack.keys["alice"], **extra}


def _in_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 90) -> str:
    """Run argv with stdout and stderr on a pseudo-terminal; everything it wrote, raw."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    proc.wait(10)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


async def test_wait_prints_log_lines_above_the_bar_not_into_it(stack: Stack) -> None:
    # DEBUG: httpx and httpcore log every request, the worst case for a bar
    env = _env(stack, GENROUTE_LOG_LEVEL="DEBUG", TERM="xterm-256color", COLUMNS="100")
    out = _in_a_terminal([str(BIN), "submit", "--model", "local-image", "--input", "prompt=a bar", *SLOW, "--wait"], env)
    starts = [m.start() for m in LOG_LINE.finditer(out)]
    assert len(starts) >= 3, out[-3000:]  # log lines were written while the bar was up
    assert "━" in out and "/v1/files/" in out, out[-3000:]  # a bar was drawn; the output URL printed
    for at in starts:
        before = re.sub(r"(\x1b\[\?25[hl])+$", "", out[max(0, at - 12):at])  # cursor shown or hidden
        # each log line begins a line of its own: after a newline, or after rich erased the bar
        # to print it above (ESC[2K); written into the bar, it would follow the bar's last cell
        assert at == 0 or before.endswith(("\n", "\r", "\x1b[2K")), repr(out[max(0, at - 200):at + 80])


@pytest.mark.parametrize("message", ["step 3/10", "x" * 300, "[/INST] done [bold]" * 10, "a\nb\tc " * 40])
def test_a_long_or_bracketed_message_leaves_the_bar_whole_on_one_line(message: str) -> None:
    for width in (60, 80, 160):
        buf = io.StringIO()
        bar = progress_bar(Console(file=buf, width=width, force_terminal=False, color_system=None))
        text = describe(f"running #12 in queue {message}", width)
        if width >= 80:  # beside a full bar: the status and queue position at least
            assert text.startswith("running #12 in queue"), (width, text)
        task = bar.add_task(text, total=1.0)
        bar.update(task, completed=1.0)
        bar.console.print(bar.get_renderable())
        lines = buf.getvalue().splitlines()
        assert len(lines) == 1 and len(lines[0]) <= width, (width, lines)
        assert lines[0].count("━") == BAR and lines[0].rstrip().endswith("100% 0:00:00"), (width, lines)


def test_wait_with_json_prints_the_finished_job(stack: Stack) -> None:
    out = subprocess.run([str(BIN), "submit", "--model", "local-image", "--input", "prompt=json please",
                          "--input", "size=256x256", "--wait", "--json"], env=_env(stack), capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded" and job["outputs"][0]["url"], job
    assert "Traceback" not in out.stderr
