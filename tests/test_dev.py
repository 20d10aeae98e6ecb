"""`genroute dev` as a newcomer runs it: an empty directory, no GENROUTE_* settings, and no
Redis where it looks (pointed at a closed port), so it must start its embedded one."""

from __future__ import annotations

import io
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from cli.embedded import free_port
from tests.stack import make_stack

BIN = Path(sys.executable).parent / "genroute"


def listening_on(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for table, words in (("/proc/net/tcp", 1), ("/proc/net/tcp6", 4)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:
                continue
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 8 * words, 8))
            found.add(str(ipaddress.ip_address(raw)))
    return found


async def test_genroute_api_listens_on_loopback_unless_told_otherwise(tmp_path: Path, redis_url: str) -> None:
    """`genroute api` with no --host is reachable from this machine only (README: Production
    layout says how to expose it)."""
    stack = await make_stack(tmp_path, redis_url=redis_url)
    port = free_port()
    stack._spawn("api", "api", "--port", str(port), "--no-access-log")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert listening_on(port) == {"127.0.0.1"}, (listening_on(port), stack.log("api"))
    finally:
        stack.stop()


def test_dev_mode_serves_readyz_and_completes_an_image_job(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENROUTE_")}
    env["HOME"] = str(tmp_path)
    env["GENROUTE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen([str(BIN), "dev", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        output = (tmp_path / "dev.log").read_text()
        assert ready is not None and ready.status_code == 200, output
        assert listening_on(port) == {"127.0.0.1"}  # no --host: loopback only
        assert "embedded redis-server" in output
        key = (tmp_path / ".genroute" / "dev-key").read_text().strip()
        assert key in output  # the ready-made key is printed on start
        r = httpx.post(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}", "Prefer": "wait=30"},
                       json={"model": "local-image", "input": {"prompt": "hello dev", "size": "512x512"}}, timeout=40)
        job = r.json()
        assert r.status_code == 200 and job["status"] == "succeeded", job
        img = Image.open(io.BytesIO(httpx.get(job["outputs"][0]["url"], timeout=10).content))
        assert img.size == (512, 512)
        # the CLI talks to it too, with dev mode's key found on disk
        out = subprocess.run([str(BIN), "submit", "--model", "local-audio", "--input", "text=hi there", "--wait",
                              "--url", base], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "/v1/files/" in out.stdout and ".wav" in out.stdout
        assert "cost: 0.000120 USD (settled" in out.stderr, out.stderr  # "hi there": 8 characters at 15000 per 1k
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()[-3000:]
    # the embedded Redis went away with it
    text = (tmp_path / "dev.log").read_text()
    assert "Traceback" not in text
    # readable: the job's end has its line, the once-a-second cron tasks have none
    assert f"job {job['id']} succeeded" in text and "genroute:deadlines" not in text, text[-3000:]
