"""
Where the relay may send a Subscription's rest-hook, and how it gets there.

A rest-hook URL is written by whoever may write a Subscription, and the relay POSTs clinical
resources to it.  Left open, that is a server-side request forgery: plain ``http://`` to the
relay's own API (an endless write loop), to a cloud metadata service, or to any private
address behind the relay.  The rules, enforced at two depths:

 - when the Subscription is read (L{url_problem}, L{header_problem}): ``https`` only, unless
   the origin is on the admin's allowlist (``--webhook-allow``); no hop-by-hop, credential or
   routing headers (``Authorization``, ``Host``, ``Cookie``...), no header the relay sets
   itself, no control characters;
 - when the request is made (L{GuardedEndpointFactory}): the host name is resolved, and if any
   address it resolves to is loopback, link-local (cloud metadata), private, shared (CGNAT),
   multicast, reserved or unspecified the request is refused before a packet is sent; the
   connection then goes to the address that was checked (no second lookup that DNS
   rebinding could change), with TLS verified against the original host name.

An allowlisted origin (scheme, host and port exactly as written) skips both the https rule and
the address rule: that is how an operator points a hook at an internal integration engine on
purpose.  Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: Headers a Subscription may not set: hop-by-hop, credentials, routing, framing, and the
#: ones the relay sets itself (a forged signature or subscription id).
FORBIDDEN_HEADERS = frozenset(h.lower() for h in (
    "Authorization", "Proxy-Authorization", "Cookie", "Set-Cookie", "Host", "Connection",
    "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
    "Content-Length", "Content-Type", "Expect", "Forwarded", "X-Forwarded-For",
    "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP", "X-Signature",
))
FORBIDDEN_HEADER_PREFIXES = ("x-medplum-", "x-medagent-", "proxy-")

CONNECT_TIMEOUT = 10.0


class WebhookRefused(Exception):
    """A rest-hook the relay will not call; the message says why (no payload in it)."""


def origin(url: str) -> str:
    """C{scheme://host:port}, lower-cased, with the scheme's default port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if scheme == "https" else 80
    host = (parts.hostname or "").lower().rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class WebhookPolicy:
    """The admin's exceptions to the rules above: a set of allowed origins."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed = frozenset(origin(u) for u in allow if u)

    def allow(self, *urls: str) -> None:
        """Add origins (the relay's --webhook-allow; tests with a loopback receiver)."""
        self.allowed = self.allowed | frozenset(origin(u) for u in urls if u)

    def allows(self, url: str) -> bool:
        return origin(url) in self.allowed

    def url_problem(self, url: str) -> str | None:
        """Why C{url} can never be a rest-hook, or None."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            return "channel.endpoint is not a valid URL"
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return "channel.endpoint must be Bot/{id} or an https URL"
        if parts.username or parts.password:
            return "channel.endpoint must not carry credentials"
        if self.allows(url):
            return None
        if parts.scheme.lower() != "https":
            return ("channel.endpoint must use https (an admin can allow an http origin with "
                    "the relay's --webhook-allow)")
        address = _literal(parts.hostname)
        if address is not None and forbidden_address(address):
            return f"channel.endpoint points at a {_kind(address)} address"
        return None


def header_problem(name: str, value: str) -> str | None:
    """Why a Subscription's C{channel.header} entry cannot be sent, or None."""
    low = name.lower()
    if low in FORBIDDEN_HEADERS or low.startswith(FORBIDDEN_HEADER_PREFIXES):
        return f"channel.header {name!r} may not be set by a Subscription"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return f"channel.header {name!r} has control characters"
    return None


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not "private" in Python


def forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for every address a hook may not reach without an allowlist entry."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return forbidden_address(mapped)
    if address.version == 4 and address in _SHARED:
        return True
    return (address.is_loopback or address.is_link_local or address.is_private
            or address.is_multicast or address.is_reserved or address.is_unspecified
            or not address.is_global)


def _kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata)"
    if address.is_multicast:
        return "multicast"
    return "private or reserved"


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class _GuardedEndpoint:
    """Resolves, checks every address, then connects to the one it checked."""

    def __init__(self, reactor: Any, uri: URI, policy: WebhookPolicy) -> None:
        self.reactor = reactor
        self.uri = uri
        self.policy = policy

    @defer.inlineCallbacks
    def connect(self, factory: Any) -> Any:
        scheme = self.uri.scheme.decode("ascii")
        host = self.uri.host.decode("idna")
        port = self.uri.port
        url = f"{scheme}://{host}:{port}"
        allowed = self.policy.allows(url)
        if scheme != "https" and not allowed:
            raise WebhookRefused("rest-hook must use https")
        receiver = _Collect()
        self.reactor.nameResolver.resolveHostName(receiver, host, port)
        resolved: Sequence[Any] = yield receiver.done
        literals = [_literal(a.host) for a in resolved
                    if isinstance(a, (IPv4Address, IPv6Address))]
        addresses = [a for a in literals if a is not None]
        if not addresses:
            raise DNSLookupError(f"rest-hook host {host!r} did not resolve")
        if not allowed:
            bad = [a for a in addresses if forbidden_address(a)]
            if bad:
                raise WebhookRefused(
                    f"rest-hook host {host!r} resolves to a {_kind(bad[0])} address")
        target = addresses[0]
        endpoint: Any
        if target.version == 4:
            endpoint = TCP4ClientEndpoint(self.reactor, str(target), port,
                                          timeout=CONNECT_TIMEOUT)
        else:
            endpoint = TCP6ClientEndpoint(self.reactor, str(target), port,
                                          timeout=CONNECT_TIMEOUT)
        if scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        protocol = yield endpoint.connect(factory)
        return protocol


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """The endpoint factory of the rest-hook HTTP client (C{Agent.usingEndpointFactory})."""

    def __init__(self, reactor: Any, policy: WebhookPolicy) -> None:
        self.reactor = reactor
        self.policy = policy

    def endpointForURI(self, uri: URI) -> _GuardedEndpoint:
        return _GuardedEndpoint(self.reactor, uri, self.policy)
