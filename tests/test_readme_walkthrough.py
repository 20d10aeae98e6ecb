"""The README's walk-through, run as a newcomer runs it: the commands are read from README.md
itself (the fenced bash blocks of "A walk through with curl"), then run in order in one
shell against `genroute dev` on a fresh data directory. Each must exit 0, every HTTP answer
curl gets must be below 400, and nothing may print a traceback.

What the test changes, and only that: it starts `genroute dev` itself (free port, empty
directory, no Redis where it looks, so dev starts its embedded one, as tests/test_dev.py
does), so the README's line that starts the server is left out; `127.0.0.1:8000` becomes
that port, and GENROUTE_URL points the CLI at it. `.venv` in the directory is this
checkout's virtualenv.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
SECTION = "## A walk through with curl"
STARTS_SERVER = re.compile(r"^\s*(scripts/dev|\S*genroute dev)\b")


def walkthrough_blocks(readme: str) -> list[str]:
    """The bash code blocks of the walk-through section, in order."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end != -1 else None]
    return re.findall(r"^```(?:bash|sh)\n(.*?)^```", section, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """One entry per shell command: comment and blank lines dropped, continued lines (a
    trailing backslash, an open quote) joined; bash itself says when a command is complete."""
    out: list[str] = []
    cur: list[str] = []
    for line in block.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur.append(line)
        text = "\n".join(cur)
        if text.rstrip().endswith("\\"):
            continue
        if subprocess.run(["bash", "-n", "-c", text], capture_output=True).returncode != 0:
            continue  # e.g. a quoted JSON body spanning lines: not complete yet
        out.append(text)
        cur = []
    assert not cur, f"an incomplete command at the end of a block: {cur}"
    return out


def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    cmds = [c for b in walkthrough_blocks((ROOT / "README.md").read_text()) for c in commands(b)]
    assert len(cmds) >= 8, cmds  # the section was found and read
    assert any(STARTS_SERVER.match(c) for c in cmds), "the walk-through no longer says how to start the server"
    cmds = [c for c in cmds if not STARTS_SERVER.match(c)]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / ".venv").symlink_to(VENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    env["HOME"] = str(tmp_path)
    env["GENROUTE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen([str(VENV / "bin" / "genroute"), "dev", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "dev.log").read_text()[-3000:])

        # One shell, so variables set by one command (KEY, API, JOB) hold for the next. Each
        # command's output, HTTP statuses (curl writes them to stderr) and exit code go to files.
        run = tmp_path / "run"
        run.mkdir()
        script = [
            "set -o pipefail",
            "curl() { command curl -w '%{stderr}\\n@@http %{http_code} %{url_effective}\\n' \"$@\"; }",
            f"export GENROUTE_URL={base}",
        ]
        for i, cmd in enumerate(cmds):
            cmd = cmd.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("localhost:8000", f"127.0.0.1:{port}")
            script.append(f"{{ {cmd}\n}} >{run}/{i}.out 2>{run}/{i}.err </dev/null; echo $? >{run}/{i}.rc")
        (tmp_path / "walk.sh").write_text("\n".join(script) + "\n")
        done = subprocess.run(["bash", str(tmp_path / "walk.sh")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr

        for i, cmd in enumerate(cmds):
            out, err = (run / f"{i}.out").read_text(), (run / f"{i}.err").read_text()
            rc = int((run / f"{i}.rc").read_text())
            what = f"README command {i + 1}:\n{cmd}\nexit {rc}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
            assert rc == 0, what
            statuses = [int(s) for s in re.findall(r"^@@http (\d+) ", err, flags=re.M)]
            if re.search(r"(^|\$\()curl ", cmd):
                assert statuses, what
            assert all(200 <= s < 400 for s in statuses), what
            assert "Traceback" not in out + err, what
            assert not re.match(r'\s*\{\s*"error"', out), what  # the error shape (a job's own `error` is fine)
        # what the walk-through shows came out: the fox, and the CLI's image
        assert (tmp_path / "fox.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        last = len(cmds) - 1
        assert "/v1/files/" in (run / f"{last}.out").read_text()
        # the comments' figures: $0.467 spent when the cap is set (the canceled boat's hold settled
        # in full; $0.167 if the cancel beat the worker to it), then $0.167 more under the $1 cap
        budget = next(i for i, c in enumerate(cmds) if "tenants budget" in c)
        assert re.search(r"budget 1000000 .*spent (467000|167000), held 0", (run / f"{budget}.out").read_text())
        assert "cost: 0.167000 USD (settled" in (run / f"{last}.err").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert "Traceback" not in (tmp_path / "dev.log").read_text()
