"""Which addresses an outbound request may reach: no SSRF into our own network.

Every URL a tenant or a provider hands us (webhook targets, input images and masks,
provider output URLs and polling/callback follow-ups) is checked here before a byte is
sent, and `core.fetcher` connects to the very address checked (no second DNS answer, so a
rebinding DNS server cannot swap a private address in after the check).

    url ─► parse (http/https, a host, no credentials)
        ─► addresses: an IP literal (every IPv4 spelling: 127.1, 0x7f.1, 2130706433, 0177.0.0.1)
                      or the host's DNS answers (a bounded wait, its own small thread pool)
        ─► each address and every IPv4 embedded in it (::ffff:a.b.c.d, ::ffff:0:a.b.c.d,
           ::a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32) must be
           globally routable — or admitted by the operator's allowlist
        ─► Target(address to connect to, host for Host/SNI)

The allowlist (settings.outbound_allowlist, GENROUTE_OUTBOUND_ALLOWLIST: CIDRs) is for
development and operator-run services on private addresses; it is set once per process
at start (`configure`, from core.runtime.open_runtime), and is empty until then.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Not globally routable, whatever Python's `is_global` says in this version (3.11 calls
# several of these global). IPv4 forms embedded in IPv6 are unwrapped before this check.
_DENIED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "2002::/16",
        "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8", "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96",
        "64:ff9b::/96",
    )
)
# Prefixes whose low 32 bits are an IPv4 address (RFC 4291 mapped/compatible, RFC 2765
# translated, RFC 6052 NAT64 well-known): the embedded address is what gets reached.
_LOW32 = tuple(ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96"))
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use: never global
_TEREDO = ipaddress.ip_network("2001::/32")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


class UnsafeURL(ValueError):
    """The URL may not be called: wrong scheme, no host, non-global address, does not resolve."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The process's outbound rules: CIDRs admitted although not global, and how long a
    DNS answer may take."""

    allow: tuple[Network, ...] = ()
    resolve_timeout: float = 3.0


_policy = Policy()
_dns_pool: ThreadPoolExecutor | None = None


def networks(allowlist: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in allowlist)


def configure(allowlist: list[str], *, resolve_timeout: float = 3.0) -> Policy:
    """Set this process's policy (at start; tests also call it). Returns the previous one."""
    global _policy
    previous, _policy = _policy, Policy(networks(allowlist), resolve_timeout)
    return previous


def set_policy(policy: Policy) -> None:
    global _policy
    _policy = policy


def policy() -> Policy:
    return _policy


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


def parse(url: str) -> SplitResult:
    """Syntax only: scheme http(s), a host, no credentials, sane length."""
    if len(url) > 2000:
        raise UnsafeURL("URL is longer than 2000 characters")
    if any(c in url for c in "\r\n\t\x00 "):
        raise UnsafeURL("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL(f"only http and https URLs are allowed, not {parts.scheme or 'a relative URL'!r}")
    if not parts.hostname:
        raise UnsafeURL("the URL has no host")
    if parts.username or parts.password or "@" in parts.netloc:
        raise UnsafeURL("credentials in the URL are not allowed")
    return parts


def embedded_ipv4(ip: IP) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries (and so reaches through a translator)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    out: list[ipaddress.IPv4Address] = []
    if any(ip in net for net in _LOW32) and not (ip.is_loopback or ip.is_unspecified):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:  # RFC 6052 /48 layout: bits 48-63 and 72-87 (bits 64-71 are zero)
        v = int(ip)
        out.append(ipaddress.IPv4Address(((v >> 64) & 0xFFFF) << 16 | ((v >> 40) & 0xFFFF)))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip in _TEREDO and ip.teredo is not None:
        out.extend(ip.teredo)  # (server, client)
    return out


def refusal(ip: IP, allow: tuple[Network, ...] = ()) -> str | None:
    """Why `ip` may not be reached (None: it may). The allowlist is checked against the
    address as given and against the IPv4 it embeds, so `["127.0.0.1/32"]` also admits
    `::ffff:127.0.0.1`; the refusal names the address that decided."""
    if ip.version == 6 and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%")[0])
    inner = embedded_ipv4(ip)
    if any(a in net for net in allow for a in (ip, *inner) if a.version == net.version):
        return None
    for a in (*inner, ip):  # the embedded address names the real target: report it first
        kind = _kind(a)
        if kind is not None:
            shown = f"{a} (inside {ip})" if a is not ip else str(a)
            return f"{shown} is {kind} address"
    return None


def _kind(a: IP) -> str | None:
    if a.is_loopback:
        return "a loopback"
    if a.is_link_local:
        return "a link-local"
    if a.is_multicast:
        return "a multicast"
    if a.is_unspecified:
        return "an unspecified"
    if isinstance(a, ipaddress.IPv4Address) and a in ipaddress.IPv4Network("100.64.0.0/10"):
        return "a shared (CGNAT)"
    if isinstance(a, ipaddress.IPv6Address) and embedded_ipv4(a):
        # a public IPv4 is reached by its own IPv4 form; translators are not ours to use
        return "an IPv4-embedding (mapped, compatible, NAT64, 6to4 or Teredo)"
    if a.is_private:
        return "a private"
    if a.is_reserved:
        return "a reserved"
    if any(a in net for net in _DENIED if net.version == a.version) or not a.is_global:
        return "a non-global"
    return None


def literal(host: str) -> IP | None:
    """The IP a host names without DNS: standard literals, and the other IPv4 spellings a
    resolver accepts (inet_aton: decimal 2130706433, hex 0x7f.1, octal 0177.0.0.1, 127.1)."""
    try:
        return ipaddress.ip_address(host.split("%")[0] if ":" in host else host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host.rstrip(".")):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise UnsafeURL(f"host {host!r} is not a valid address") from None
    return None


async def addresses(host: str, port: int, timeout: float) -> list[IP]:
    """The host's addresses: a literal at once, else DNS in its own small thread pool (the
    event loop and the default pool are never held; a slow resolver costs `timeout`)."""
    lit = literal(host)
    if lit is not None:
        return [lit]
    global _dns_pool
    if _dns_pool is None:
        _dns_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="genroute-dns")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.run_in_executor(_dns_pool, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM), timeout
        )
    except TimeoutError:
        raise UnsafeURL(f"host {host!r} did not resolve within {timeout:g} s") from None
    except (OSError, UnicodeError) as exc:
        raise UnsafeURL(f"host {host!r} does not resolve") from exc
    out = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not out:
        raise UnsafeURL(f"host {host!r} does not resolve")
    return out


async def resolve(url: str, allow: tuple[Network, ...] | list[Network] | None = None) -> Target:
    """Check `url` and resolve its host to one address that may be called. Every DNS
    answer must pass (a name with one private answer among public ones is refused).
    `allow` None: the process's policy."""
    pol = _policy
    allowed = tuple(allow) if allow is not None else pol.allow
    parts = parse(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    found = await addresses(host, port, pol.resolve_timeout)
    for a in found:
        why = refusal(a, allowed)
        if why is not None:
            via = "" if literal(host) is not None else f"host {host!r} resolves to "
            raise UnsafeURL(f"{via}{why}; such targets are refused unless GENROUTE_OUTBOUND_ALLOWLIST admits them")
    return Target(url=url, scheme=parts.scheme, host=host, port=port, address=str(found[0]))


def check_syntax_and_literal(url: str) -> None:
    """What can be refused without DNS (the submit path's cheap check): the syntax, and a
    host that is an address literal in any spelling."""
    parts = parse(url)
    lit = literal(parts.hostname or "")
    if lit is not None:
        why = refusal(lit, _policy.allow)
        if why is not None:
            raise UnsafeURL(f"{why}; such targets are refused unless GENROUTE_OUTBOUND_ALLOWLIST admits them")
