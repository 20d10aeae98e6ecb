"""Secrets at rest: tenants' webhook signing secrets are stored encrypted (AES-256-GCM).

    stored = "enc:v1:" + kid + ":" + base64url(nonce(12) || ciphertext || tag(16))

Keys come from the settings, newest first:

    GENROUTE_WEBHOOK_ENCRYPTION_KEYS   ["new", "old", ...]: the first encrypts, every one decrypts
    GENROUTE_SECRET_KEY                always decrypts too; encrypts when the list is empty

Each is any string (at least 16 characters of randomness are advised) stretched to 32 bytes
with HKDF-SHA256, so the same string always gives the same key. `kid` is 8 hex characters
of the key's own hash: it tells which key a row needs and lets `genroute webhooks
reencrypt` find the rows still under an old key. The row's tenant is bound as associated
data, so a ciphertext copied into another tenant's row does not decrypt.

Rotation (README "Webhook secrets at rest"): put the new key first in
GENROUTE_WEBHOOK_ENCRYPTION_KEYS on every process, run `genroute webhooks reencrypt`, then
drop the old key. A value stored before encryption existed (no "enc:" prefix) is read as it
is and encrypted on that read (core/webhooks.py), or by the migration (0008) or reencrypt.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "enc:v1:"
_INFO = b"genroute webhook secrets v1"


class NoKey(RuntimeError):
    """No key is configured, so secrets cannot be stored."""


class Undecryptable(RuntimeError):
    """A stored secret that none of the configured keys opens."""


def derive(material: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(material.encode())


def kid_of(key: bytes) -> str:
    return hashlib.sha256(b"kid:" + key).hexdigest()[:8]


def is_encrypted(stored: str | None) -> bool:
    return bool(stored) and str(stored).startswith(PREFIX)


def kid_in(stored: str) -> str | None:
    if not is_encrypted(stored):
        return None
    return stored[len(PREFIX):].partition(":")[0]


@dataclass(frozen=True)
class SecretBox:
    keys: tuple[bytes, ...]  # the first encrypts

    def __post_init__(self) -> None:
        if not self.keys:
            raise NoKey("no key: set GENROUTE_SECRET_KEY or GENROUTE_WEBHOOK_ENCRYPTION_KEYS")

    @property
    def current_kid(self) -> str:
        return kid_of(self.keys[0])

    def encrypt(self, plain: str, context: str) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self.keys[0]).encrypt(nonce, plain.encode(), context.encode())
        return f"{PREFIX}{self.current_kid}:{base64.urlsafe_b64encode(nonce + sealed).decode().rstrip('=')}"

    def decrypt(self, stored: str, context: str) -> str:
        """The plaintext of `stored`; a value that was never encrypted is returned as it is."""
        if not is_encrypted(stored):
            return stored
        kid, _, body = stored[len(PREFIX):].partition(":")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise Undecryptable("a stored secret is not valid base64") from None
        candidates = [k for k in self.keys if kid_of(k) == kid] or list(self.keys)
        for key in candidates:
            try:
                return AESGCM(key).decrypt(raw[:12], raw[12:], context.encode()).decode()
            except (InvalidTag, ValueError):
                continue
        raise Undecryptable(
            f"a stored webhook secret (key id {kid}) opens with none of the configured keys: list the key it was "
            "encrypted with in GENROUTE_WEBHOOK_ENCRYPTION_KEYS (README: Webhook secrets at rest)"
        )

    def is_current(self, stored: str | None) -> bool:
        """Encrypted with the key that encrypts now (None counts: nothing to rewrite)."""
        return stored is None or kid_in(stored) == self.current_kid


@functools.lru_cache(maxsize=8)
def _box(keys: tuple[str, ...], secret_key: str) -> SecretBox | None:
    materials = [k for k in keys if k] + ([secret_key] if secret_key else [])
    if not materials:
        return None
    derived = tuple(dict.fromkeys(derive(m) for m in materials))  # the secret key may also be listed
    return SecretBox(derived)


def box_for(settings: object) -> SecretBox | None:
    """The box of the process's settings; None when neither setting is given."""
    keys = tuple(getattr(settings, "webhook_encryption_keys", ()) or ())
    return _box(keys, getattr(settings, "secret_key", "") or "")


def require_box(settings: object) -> SecretBox:
    box = box_for(settings)
    if box is None:
        raise NoKey("webhook secrets are stored encrypted and no key is set: set GENROUTE_SECRET_KEY "
                    "(or GENROUTE_WEBHOOK_ENCRYPTION_KEYS) on every API and worker process")
    return box
