"""
Limits on what strangers can make the relay hold: connections (in all and per address) and
failed logins (per client id and per address).  No knowledge of HTTP routes here.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from medagent.fhir import FHIRError

log = Logger()

DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_MAX_CONNECTIONS_PER_PEER = 128


def peer_host(addr: Any) -> str:
    """The host part of an address (IPv4/IPv6/UNIX), as a dictionary key."""
    host = getattr(addr, "host", None)
    return str(host) if host is not None else str(addr)


class ConnectionLimits(WrappingFactory):
    """
    Wraps the relay's L{Site}: at most C{max_connections} open TCP connections, at most
    C{max_per_peer} from one address; one more is closed at once, before any byte is read.
    (Twisted's C{LimitConnectionsByPeer} indexes the address as a tuple, which
    C{IPv4Address} no longer is; C{LimitTotalConnectionsFactory} has no per-peer limit.)
    Websocket connections are HTTP connections first, so they count here too.
    """

    def __init__(self, wrapped: Any, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER) -> None:
        if max_connections < 1 or max_per_peer < 1:
            raise ValueError("connection limits must be positive")
        super().__init__(wrapped)
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.by_peer: dict[str, int] = {}
        self.refused = 0

    # Twisted annotates WrappingFactory.buildProtocol as never returning None, but
    # IProtocolFactory.buildProtocol may return None to refuse a connection, which is our job.
    def buildProtocol(  # type: ignore[override]
            self, addr: IAddress | None) -> ProtocolWrapper | None:
        host = peer_host(addr)
        if len(self.protocols) >= self.max_connections:
            self._refuse(host, "connections in all", len(self.protocols))
            return None
        if self.by_peer.get(host, 0) >= self.max_per_peer:
            self._refuse(host, "connections from this address", self.by_peer[host])
            return None
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol._medagent_host = host  # type: ignore[attr-defined]
            self.by_peer[host] = self.by_peer.get(host, 0) + 1
        return protocol

    def _refuse(self, host: str, what: str, n: int) -> None:
        self.refused += 1
        if self.refused % 1000 == 1:  # a flood logs a line per thousand, not per attempt
            log.warn("Refusing a connection from {host}: {n} {what} already "
                     "({refused} refused so far)", host=host, n=n, what=what,
                     refused=self.refused)

    def unregisterProtocol(self, protocol: ProtocolWrapper) -> None:
        super().unregisterProtocol(protocol)
        host = getattr(protocol, "_medagent_host", None)
        if host is None:
            return
        left = self.by_peer.get(host, 1) - 1
        if left > 0:
            self.by_peer[host] = left
        else:
            self.by_peer.pop(host, None)


class LoginThrottle:
    """
    Sliding-window count of failed logins per client id and per source address.  When either
    has C{max_failures} failures within C{window} seconds, further attempts are answered 429
    (with C{Retry-After}) without checking the secret, until the oldest failure leaves the
    window.  A successful login clears its client id's count (not the address's: an
    attacker's own valid login must not reset a guessing run).  Bounded: at most C{max_keys}
    keys are remembered, the least recently failed are forgotten first.
    """

    def __init__(self, clock: Any, *, max_failures_per_client: int = 10,
                 max_failures_per_address: int = 30, window: float = 300.0,
                 max_keys: int = 10_000) -> None:
        self.clock = clock
        self.limits = {"client": max_failures_per_client, "address": max_failures_per_address}
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def _keys(self, client_id: str | None, address: str) -> list[tuple[str, str]]:
        keys = [("address", address[:100])]
        if client_id:
            keys.append(("client", client_id[:200]))
        return keys

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def check(self, client_id: str | None, address: str) -> None:
        """Raise a 429 L{FHIRError} if this client id or address is locked out now."""
        now = self.clock.seconds()
        wait = 0.0
        for key in self._keys(client_id, address):
            times = self._recent(key, now)
            if times is not None and len(times) >= self.limits[key[0]]:
                wait = max(wait, times[-self.limits[key[0]]] + self.window - now)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise FHIRError(429, f"Too many failed logins; try again in {seconds} s",
                            "throttled", headers={"Retry-After": str(seconds)})

    def failed(self, client_id: str | None, address: str) -> None:
        now = self.clock.seconds()
        for key in self._keys(client_id, address):
            times = self._recent(key, now)
            if times is None:
                times = self._failures[key] = deque(maxlen=max(self.limits.values()))
            times.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, client_id: str) -> None:
        self._failures.pop(("client", client_id[:200]), None)
