"""Where a webhook may be sent: http(s) URLs whose every resolved address is public, unless an
allow-list admits it (Tier 2 usually lives on a private network: the allow-list is how to admit it).

``check_url`` resolves the host once and checks every address. ``GuardedTransport`` (an httpx
transport) runs that check on each request and then connects to the checked address itself, so a
second DNS answer (DNS rebinding) cannot redirect the connection. The ``Host`` header and, for
https, the TLS server name (SNI and certificate check) stay those of the URL's host name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from mlx_fusion.errors import WebhookTargetRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[..., Iterable[tuple[Any, ...]]]
"""``socket.getaddrinfo``-shaped: ``(host, port, type=...) -> [(family, type, proto, canon,
sockaddr)]``; tests inject their own."""

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def _parse_allow(allow: Sequence[str]) -> tuple[list[IPNetwork], set[str]]:
    networks: list[IPNetwork] = []
    names: set[str] = set()
    for entry in allow:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return networks, names


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, 6to4, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or (addr in _V4_COMPATIBLE and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public(addr: IPAddress) -> bool:
    """Whether an address is globally routable unicast: not loopback, private, link-local,
    multicast, reserved, unspecified or shared (100.64/10); IPv6 forms that embed an IPv4 address
    (::ffff:a.b.c.d, ::a.b.c.d, 6to4, NAT64) and Teredo are never public here."""
    if isinstance(addr, ipaddress.IPv6Address):
        if _embedded_v4(addr) is not None or addr.teredo is not None:
            return False
        if addr.scope_id:
            return False
    return not (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or (isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED)
        or not addr.is_global
    )


def _admitted(addr: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    candidates: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        v4 = _embedded_v4(addr)
        if v4 is not None:
            candidates.append(v4)
    return any(c in net for c in candidates for net in networks if c.version == net.version)


def _resolve(host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    out: list[IPAddress] = []
    for info in resolver(host, port, type=socket.SOCK_STREAM):
        text = str(info[4][0]).split("%", 1)[0]
        addr = ipaddress.ip_address(text)
        if addr not in out:
            out.append(addr)
    return out


def check_url(
    url: str,
    *,
    allow: Sequence[str] = (),
    resolver: Resolver = socket.getaddrinfo,
) -> list[IPAddress]:
    """The checked addresses of ``url``'s host, in resolver order; ``WebhookTargetRefused`` if the
    URL may not be called. Allow-list entries are CIDRs / addresses (``127.0.0.0/8``, ``::1``)
    or exact host names (``tier2.internal``: every address it resolves to is admitted). A resolver
    error (``OSError``) propagates: that is a delivery failure to retry, not a refusal."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise WebhookTargetRefused(f"invalid webhook URL: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookTargetRefused(f"webhook URL scheme must be http or https, not {scheme!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookTargetRefused("webhook URL has no host")
    networks, names = _parse_allow(allow)
    addrs = _resolve(host, port or (443 if scheme == "https" else 80), resolver)
    if not addrs:
        raise WebhookTargetRefused(f"webhook host {host!r} resolved to no address")
    if host.lower() in names:
        return addrs
    for addr in addrs:
        if not is_public(addr) and not _admitted(addr, networks):
            raise WebhookTargetRefused(
                f"webhook host {host!r} resolves to {addr}, which is not a public address "
                "(admit it with the webhook allow-list)"
            )
    return addrs


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport that refuses URLs ``check_url`` refuses and connects to the checked
    address (the first one), keeping the URL's host name for ``Host`` and TLS.

    Build clients with ``guarded_client`` (or ``trust_env=False``): an httpx client that reads
    proxy settings from the environment would route around this transport. By default the inner
    transport keeps no idle connections, so a TLS connection made for one host name is never
    reused for another name that resolved to the same address.
    """

    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        resolver: Resolver = socket.getaddrinfo,
        inner: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self.allow = tuple(allow)
        self.resolver = resolver
        self.inner = inner or httpx.HTTPTransport(
            verify=verify,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        try:
            addrs = check_url(str(url), allow=self.allow, resolver=self.resolver)
        except OSError as e:
            raise httpx.ConnectError(f"cannot resolve {url.host}: {e}", request=request) from e
        extensions = dict(request.extensions)
        if url.scheme == "https":
            extensions["sni_hostname"] = url.host
        pinned = httpx.Request(
            request.method,
            url.copy_with(host=str(addrs[0])),
            headers=request.headers,
            stream=request.stream,
            extensions=extensions,
        )
        return self.inner.handle_request(pinned)

    def close(self) -> None:
        self.inner.close()


def guarded_client(
    *,
    allow: Sequence[str] = (),
    resolver: Resolver = socket.getaddrinfo,
    timeout_s: float = 15.0,
    inner: httpx.BaseTransport | None = None,
    verify: Any = True,
) -> httpx.Client:
    """An httpx client for webhook delivery: guarded transport, no environment proxies, no
    redirects followed (a 3xx is a failed attempt)."""
    transport = GuardedTransport(allow=allow, resolver=resolver, inner=inner, verify=verify)
    return httpx.Client(
        transport=transport, trust_env=False, follow_redirects=False, timeout=timeout_s
    )
