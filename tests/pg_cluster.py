"""A private PostgreSQL cluster a test may stop and start (the shared one at 5432 is never
touched): `initdb` into a temp dir, `pg_ctl` on a free port, trust auth, bound to
127.0.0.1. As root, the binaries run as the `postgres` user (initdb refuses root).

    with private_postgres(tmp_path) as pg:     # skips when the binaries are missing
        url = pg.url                          # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.stop(); pg.start()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.embedded import free_port
from tests.services import IN_CI


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (Debian's layout, then PATH)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@dataclass
class PrivatePostgres:
    bindir: Path
    datadir: Path
    port: int
    user: str | None  # run the binaries as this user (when we are root)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir.parent / "pg.log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.datadir.parent} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")


@contextmanager
def private_postgres(root: Path) -> Iterator[PrivatePostgres]:
    bindir = pg_bindir()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) are not installed; apt-get install postgresql"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
        user = "postgres"
    root.mkdir(parents=True, exist_ok=True)
    datadir = root / "data"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o755)
        for parent in root.parents:  # the user must reach the directory
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    pg = PrivatePostgres(bindir, datadir, free_port(), user)
    pg._run("initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", timeout=120)
    pg.start()
    try:
        yield pg
    finally:
        try:
            pg.stop("immediate")
        except subprocess.SubprocessError:
            pass
