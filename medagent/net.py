"""
Small network helpers shared by the relay's and the agent's adapters and the device senders:
socket settings and the plain TCP reachability probe.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from medagent.contenttypes import PING
from medagent.delivery import DeliveryError, Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTCP, IReactorTime
    from twisted.python.failure import Failure

    from medagent.destination import Destination


def no_delay(transport: Any) -> None:
    """Small frames both ways: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


def tcp_ping(
    reactor: IReactorTCP | IReactorTime, destination: Destination, timeout: float = 5.0
) -> Deferred[Reply]:
    """
    Reachability by TCP connect, with the round trip in the reply.  Used by senders that have
    no protocol-level probe.
    """
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
    from twisted.internet.defer import fail
    from twisted.internet.protocol import Protocol as _P

    from medagent._twisted import transport_of

    if destination.port is None:
        return fail(DeliveryError("Ping needs a host and port", transient=False))
    started = time.monotonic()
    endpoint = HostnameEndpoint(reactor, destination.host, destination.port, timeout=timeout)
    d = connectProtocol(endpoint, _P())

    def connected(proto: _P) -> Reply:
        rtt_ms = (time.monotonic() - started) * 1000
        transport_of(proto).loseConnection()
        return Reply(
            body=f"PING {destination.host}:{destination.port}: connected in {rtt_ms:.1f} ms",
            content_type=PING,
            detail=f"{rtt_ms:.3f}",
        )

    def failed(f: Failure) -> Failure:
        raise DeliveryError(
            f"PING {destination.host}:{destination.port}: {f.getErrorMessage()}", phase="connect"
        )

    return d.addCallbacks(connected, failed)
