"""
Small Twisted helpers shared by the device protocols (MLLP today; DICOM and the bots' worker
pool can use them too) and the relay (L{shielded}).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

_T = TypeVar("_T")


# Structural types for the few Twisted interfaces this code calls.  Twisted declares them as
# zope.interface Interfaces, whose methods have no ``self``; plain mypy (mypy-zope does not work
# with mypy 2.x) then rejects every call through them.  These Protocols say the same thing in a
# form mypy checks, and anything providing the interface (reactor, task.Clock, a transport)
# satisfies them at run time.


class DelayedCall(Protocol):
    """What C{IReactorTime.callLater} returns (the part we use)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, secondsFromNow: float) -> None: ...

    def getTime(self) -> float: ...


class Clock(Protocol):
    """C{IReactorTime}: the reactor or a C{task.Clock} in tests."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any,
                  **kw: Any) -> DelayedCall: ...


class Transport(Protocol):
    """The transport methods the device protocols call (C{ITCPTransport} and friends)."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def getPeer(self) -> Any: ...

    def getHost(self) -> Any: ...


class TCPTransport(Transport, Protocol):
    """A transport that can also be aborted and paused (TCP, TLS, serial)."""

    def abortConnection(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class ProtocolFactory(Protocol):
    """C{IProtocolFactory}: builds the protocol for a new connection."""

    def buildProtocol(self, addr: Any) -> Any: ...

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class ClientEndpoint(Protocol):
    """C{IStreamClientEndpoint}."""

    def connect(self, protocolFactory: Any) -> Deferred[Any]: ...


class ChildService(Protocol):
    """C{IService}, the part a parent calls to start and stop a child service."""

    def setServiceParent(self, parent: Any) -> Any: ...

    def disownServiceParent(self) -> Any: ...


class ListeningPort(Protocol):
    """C{IListeningPort}."""

    def stopListening(self) -> Deferred[None] | None: ...

    def getHost(self) -> Any: ...


def maybe_transport(protocol: Any) -> TCPTransport | None:
    """The transport of a protocol, typed, or C{None} before C{makeConnection}."""
    transport: TCPTransport | None = protocol.transport
    return transport


def transport_of(protocol: Any) -> TCPTransport:
    """
    The transport of a connected protocol, typed.  C{Protocol.transport} is C{None} until
    C{makeConnection}; calling this earlier is a programming error, so it raises rather than
    letting C{None.write} fail further away.
    """
    transport = protocol.transport
    if transport is None:
        raise RuntimeError(f"{type(protocol).__name__} is not connected")
    return transport


class LostWaiters:
    """
    Mixin giving a protocol C{when_lost()}: closing a connection is asynchronous, and whoever
    closes it (a pool on shutdown, a reload) must be able to wait until it is really gone
    rather than share one public Deferred that the first waiter's callbacks could change.

    The protocol sets C{self._lost = False} and C{self._lost_waiters = []} in its
    C{__init__}, sets C{_lost} when the connection is gone and then calls
    L{_fire_lost_waiters}.
    """

    _lost: bool
    _lost_waiters: list[Deferred[None]]

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the connection is gone."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def _fire_lost_waiters(self) -> None:
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(None)


def peer_name(transport: Any) -> str:
    """``host:port`` of the other end, for logs; ``?`` when the transport cannot tell."""
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


def shielded(inner: Deferred[_T],
             late_failure: Callable[[Failure], None] | None = None) -> Deferred[_T]:
    """
    A Deferred for C{inner}'s result whose cancellation stops the wait, never C{inner}: when an
    HTTP caller goes away, the push being written is still written and sent, the bot run still
    runs and is audited.  The caller's Deferred then fails with C{CancelledError} at once.

    A failure of C{inner} after its caller left has nobody to go to: it is given to
    C{late_failure} (to log it; a C{CancelledError} is not) or else dropped.
    """
    outer: Deferred[_T] = Deferred()

    def relay(result: Any) -> None:
        if not outer.called:
            outer.errback(result) if isinstance(result, Failure) else outer.callback(result)
        elif (isinstance(result, Failure) and late_failure is not None
              and not result.check(CancelledError)):
            late_failure(result)

    inner.addBoth(relay)
    return outer
