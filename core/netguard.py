"""Outbound safety for URLs a tenant gives us (webhooks): no SSRF into our own network.

Only http(s). The host is resolved and *every* address must be public (`is_global`):
loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 — the
cloud metadata address 169.254.169.254 — and fe80::/10), CGNAT, multicast, reserved and
unspecified addresses are refused, unless an allowlist CIDR (settings.webhook_allowlist)
admits them. The caller connects to the address checked here (not to a second DNS
answer), so a rebinding DNS server cannot swap in a private address after the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeURL(ValueError):
    """The URL may not be called: wrong scheme, private address, does not resolve."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # as given
    scheme: str
    host: str  # as given (for Host and SNI)
    port: int
    address: str  # the checked IP to connect to

    def pinned_url(self, parts: SplitResult) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{host}:{self.port}").geturl()


def networks(allowlist: list[str]) -> list[Network]:
    return [ipaddress.ip_network(c, strict=False) for c in allowlist]


def parse(url: str) -> SplitResult:
    """Syntax only: scheme http(s), a host, no credentials, sane length."""
    if len(url) > 2000:
        raise UnsafeURL("URL is longer than 2000 characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"only http and https URLs are allowed, not {parts.scheme or 'a relative URL'!r}")
    if not parts.hostname:
        raise UnsafeURL("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("credentials in the URL are not allowed; authenticate with the signature")
    return parts


def allowed(ip: IP, allow: list[Network]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return True
    return ip.is_global and not ip.is_multicast


async def resolve(url: str, allow: list[Network]) -> Target:
    """Check `url` and resolve its host to one address that may be called."""
    parts = parse(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal: IP | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise UnsafeURL(f"host {host!r} does not resolve") from exc
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise UnsafeURL(f"host {host!r} does not resolve")
    bad = [str(a) for a in addresses if not allowed(a, allow)]
    if bad:
        raise UnsafeURL(
            f"host {host!r} resolves to a private, loopback, link-local or reserved address ({bad[0]}); "
            "such targets are refused unless settings.webhook_allowlist admits them"
        )
    return Target(url=url, scheme=parts.scheme, host=host, port=port, address=str(addresses[0]))
