"""Blob store on the local disk, for one-box setups and development.

Files are served by the API at `/v1/files/{key}?exp=..&sig=..`; the signature is
HMAC-SHA256(secret, f"{key}\\n{exp}") in hex. `verify` is what that route calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shutil
import tempfile
import time
from pathlib import Path

from core.errors import NotFound
from storage.base import StorageError, validate_key

_NOT_FOUND = "file not found or link expired"


class LocalBlobStore:
    """Blobs as files under `root`; downloads through HMAC-signed, expiring URLs."""

    def __init__(self, root: Path, public_url: str, secret: str) -> None:
        if not secret:
            raise ValueError("LocalBlobStore needs a secret to sign URLs")
        self.root = Path(root)
        self.public_url = public_url.rstrip("/")
        self._secret = secret.encode()

    def path_for(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _sign(self, key: str, exp: int) -> str:
        return hmac.new(self._secret, f"{key}\n{exp}".encode(), hashlib.sha256).hexdigest()

    # -- BlobStore -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage directory {self.root}: {exc}") from exc

    async def check(self) -> None:
        def probe() -> None:
            with tempfile.TemporaryFile(dir=self.root, prefix=".check-") as f:
                f.write(b"ok")

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise StorageError(f"storage directory {self.root} is not writable: {exc}") from exc

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        # content_type is not kept: the serving route derives it from the key's extension.
        # Every OSError here is this store's own directory failing (disk full, read-only,
        # EIO, permissions, the directory gone or replaced): our infrastructure, not the
        # output's fault, so it is `unavailable` and waited on like an S3 outage
        # (storage.ingest._put_waiting), never a reason to end the job at once.
        dest = self.path_for(key)
        try:
            await asyncio.to_thread(_copy_atomically, Path(path), dest)
        except OSError as exc:
            raise StorageError(f"cannot write {key} under {self.root}: {exc}", unavailable=True) from exc

    async def url(self, key: str, *, expires_in: int) -> str:
        validate_key(key)
        if expires_in <= 0:
            raise ValueError("expires_in must be positive")
        exp = int(time.time()) + expires_in
        return f"{self.public_url}/v1/files/{key}?exp={exp}&sig={self._sign(key, exp)}"

    async def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key}: {exc}") from exc

    async def close(self) -> None:
        return None

    # -- serving ---------------------------------------------------------------------

    def verify(self, key: str, exp: int | str, sig: str) -> Path:
        """Check a signed link and return the file's path.

        Every failure (bad key, bad or expired signature, missing file) raises the same
        NotFound, so a caller learns nothing about which keys exist.
        """
        try:
            validate_key(key)
            exp_int = int(exp)
        except (TypeError, ValueError):
            raise NotFound(_NOT_FOUND) from None
        expected = self._sign(key, exp_int).encode()
        given = sig.encode("utf-8", "replace") if isinstance(sig, str) else b""
        if not hmac.compare_digest(expected, given) or exp_int < time.time():
            raise NotFound(_NOT_FOUND)
        path = self.root / key
        if not path.is_file():
            raise NotFound(_NOT_FOUND)
        return path


def _copy_atomically(src: Path, dest: Path) -> None:
    """Copy through a temp file in the destination directory, then rename over `dest`.

    `os.replace` within one directory is atomic, so a reader sees the old file or the
    whole new one, never half of it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
