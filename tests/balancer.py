"""
A small round-robin TCP load balancer for the cluster tests, in the test's own reactor.

Each new connection goes to the next backend in turn; a backend that refuses (a node killed
with ``kill -9``) is skipped for the next, and the client is closed only when every backend
refused.  Bytes are relayed both ways with Twisted's port forwarder (its producer/consumer
wiring bounds what the balancer holds).  Loopback only: it listens on 127.0.0.1 and its
backends are ports on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols import portforward
from twisted.python.failure import Failure

#: seconds a connection attempt to one backend may take before the next is tried
CONNECT_TIMEOUT = 5.0


class _BackendConnection(portforward.ProxyClient):
    """The balancer's connection to a backend, for one front connection."""

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.balancer.backs.add(self)
        if not self.peer.transport.connected:  # the client left while we were connecting
            self.transport.loseConnection()
            return
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.balancer.backs.discard(self)
        self.lost.callback(None)


class _Backend(portforward.ProxyClientFactory):
    """Connects one front connection to backend number C{index}; on refusal, the next."""

    protocol = _BackendConnection

    def __init__(self, balancer: "RoundRobin", front: "_Front", index: int,
                 tried: int) -> None:
        self.balancer, self.front, self.index, self.tried = balancer, front, index, tried
        self.setServer(front)

    def buildProtocol(self, addr: Any) -> portforward.ProxyClient:
        self.balancer.chosen.append(self.balancer.backends[self.index])
        self.front.backend = self.balancer.backends[self.index]
        return super().buildProtocol(addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.balancer.refused.append(self.balancer.backends[self.index])
        self.balancer.connect(self.front, self.index + 1, self.tried + 1)


class _Front(portforward.ProxyServer):
    """A client's connection to the balancer."""

    factory: "RoundRobin"  # type: ignore[assignment]
    backend: int | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # nothing read until a backend is connected
        self.lost: Deferred[None] = Deferred()
        self.factory.fronts.add(self)
        self.factory.connect(self, self.factory.take_turn(), 0)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.fronts.discard(self)
        self.lost.callback(None)


class RoundRobin(Factory):
    """
    The balancer: C{backends} are ports on 127.0.0.1.  C{chosen} records the backend each
    connection went to, C{refused} each refusal (for the tests to check the rotation).
    """

    protocol = _Front

    def __init__(self, reactor: Any, backends: list[int]) -> None:
        self.reactor = reactor
        self.backends = list(backends)
        self.chosen: list[int] = []
        self.refused: list[int] = []
        self.fronts: set[_Front] = set()
        self.backs: set[_BackendConnection] = set()
        self._turn = 0
        self._port: IListeningPort | None = None

    def take_turn(self) -> int:
        index = self._turn % len(self.backends)
        self._turn += 1
        return index

    def connect(self, front: _Front, index: int, tried: int) -> None:
        if tried >= len(self.backends) or not front.transport.connected:
            front.transport.loseConnection()  # every backend refused (or the client left)
            return
        index %= len(self.backends)
        self.reactor.connectTCP("127.0.0.1", self.backends[index],
                                _Backend(self, front, index, tried),
                                timeout=CONNECT_TIMEOUT)

    def listen(self) -> int:
        """Listen on a free loopback port; the port."""
        self._port = self.reactor.listenTCP(0, self, interface="127.0.0.1")
        return int(self._port.getHost().port)

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("The balancer is not listening")
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def close(self) -> Deferred[Any]:
        """Stop listening and cut every relayed connection; fires when all are gone."""
        stopped = succeed(None) if self._port is None else self._port.stopListening()
        waits: list[Deferred[Any]] = [stopped]
        for conn in [*self.fronts, *self.backs]:
            waits.append(conn.lost)
            conn.transport.abortConnection()
        return DeferredList(waits)
