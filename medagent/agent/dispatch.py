"""
What the agent does with a pushed message: pick the sender for the destination's scheme and
deliver in order, one message in flight per destination (an ordered lane per device).

Senders (MLLP, ASTM, DICOM, raw TCP) implement L{Sender}; they never see the websocket.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Mapping, Protocol

import attr
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.destination import Destination, DestinationError, parse_destination
from medagent.fhir import HL7_V2  # noqa: F401 (re-exported: the content types in one list)

log = Logger()

ASTM = "x-application/astm"
PING = "x-application/ping"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
TEXT = "text/plain"
JSON = "application/json"


@attr.s(frozen=True, auto_attribs=True)
class Reply:
    """
    A device's answer.  C{delivered} is False for a negative application answer (HL7
    ``AE``/``AR``, DICOM failure status, ASTM refusal): the device got the message and said
    no, so it is not retried, but the caller still sees the answer.
    """

    body: str
    content_type: str = TEXT
    status_code: int = 200
    delivered: bool = True
    detail: str | None = None


class DeliveryError(Exception):
    """
    The message could not be delivered.  C{transient} failures (refused, reset, timeout) may
    be retried; others (bad message, unsupported scheme) may not.  C{phase} says where it
    broke (``connect``, ``send``, ``ack``...), for the 3 a.m. reader.
    """

    def __init__(self, reason: str, *, transient: bool = True, phase: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.phase = phase

    def __str__(self) -> str:
        return self.reason


class Sender(Protocol):
    """Delivers messages to one kind of device link."""

    def send(
        self, destination: Destination, content_type: str, body: str, options: Mapping[str, Any]
    ) -> Deferred[Reply]:
        """
        Deliver C{body}; fire with the device's L{Reply}, or fail with L{DeliveryError}.
        Must fire within its own timeouts.  Called with at most one message in flight per
        destination.  C{options} carries per-message settings such as ``returnAck``.
        """

    def ping(self, destination: Destination) -> Deferred[Reply]:
        """Check that the device answers (TCP connect, ENQ, C-ECHO...)."""

    def close(self) -> Deferred[None]:
        """Close idle and open connections; fail what is in flight."""


def tcp_ping(
    reactor: IReactorTCP | IReactorTime, destination: Destination, timeout: float = 5.0
) -> Deferred[Reply]:
    """
    Reachability by TCP connect, with the round trip in the reply.  Used by senders that have
    no protocol-level probe.
    """
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol as _P

    if destination.port is None:
        return _fail(DeliveryError("Ping needs a host and port", transient=False))
    started = time.monotonic()
    endpoint = HostnameEndpoint(reactor, destination.host, destination.port, timeout=timeout)
    d = connectProtocol(endpoint, _P())

    def connected(proto: _P) -> Reply:
        rtt_ms = (time.monotonic() - started) * 1000
        proto.transport.loseConnection()
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


def _fail(exc: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(exc))
    return d


@attr.s(auto_attribs=True)
class _Lane:
    busy: bool = False
    waiting: deque = attr.ib(factory=deque)
    delivered: int = 0
    failed: int = 0


class Dispatcher:
    """
    Routes a push to the sender for its scheme and keeps one ordered lane per destination:
    one message in flight, FIFO behind it; lanes are independent.
    """

    def __init__(
        self,
        reactor: Any,
        senders: Mapping[str, Sender],
        *,
        max_waiting_per_lane: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reactor = reactor
        self._senders = dict(senders)
        self._lanes: dict[str, _Lane] = {}
        self._max_waiting = max_waiting_per_lane
        self._clock = clock

    def add_sender(self, scheme: str, sender: Sender) -> None:
        self._senders[scheme] = sender

    def schemes(self) -> list[str]:
        return sorted(self._senders)

    def resolve(self, remote: str) -> tuple[Destination, Sender]:
        """Parse C{remote} and find its sender; L{DeliveryError} (permanent) if we cannot."""
        try:
            destination = parse_destination(remote, needs_port=False)
        except DestinationError as e:
            raise DeliveryError(str(e), transient=False, phase="destination")
        sender = self._senders.get(destination.scheme)
        if sender is None:
            raise DeliveryError(
                f"Unsupported destination scheme {destination.scheme}:// "
                f"(this agent supports: {', '.join(self.schemes())})",
                transient=False,
                phase="destination",
            )
        return destination, sender

    def dispatch(
        self, remote: str, content_type: str, body: str, options: Mapping[str, Any] | None = None
    ) -> Deferred[Reply]:
        """Deliver in order on the destination's lane; fires with the L{Reply}."""
        options = options or {}
        if content_type == PING and "://" not in remote:
            # Medplum's form (a bare host, for the OS ping): we probe a device's own port.
            return _fail(DeliveryError(
                f"Ping of bare host {remote[:100]!r}: this agent pings a device by its "
                f"destination URL with a port, e.g. mllp://{remote[:100]}:2575",
                transient=False, phase="destination"))
        try:
            destination, sender = self.resolve(remote)
        except DeliveryError as e:
            return _fail(e)
        if content_type == PING:
            # Pings do not queue behind messages: they ask whether the device is there now.
            return maybeDeferred(sender.ping, destination)
        lane = self._lanes.setdefault(destination.key, _Lane())
        if len(lane.waiting) >= self._max_waiting:
            return _fail(
                DeliveryError(
                    f"Lane for {destination.scheme}://{destination.host} is full "
                    f"({self._max_waiting} waiting)",
                    phase="queue",
                )
            )
        result: Deferred[Reply] = Deferred()
        lane.waiting.append((destination, sender, content_type, body, options, result))
        self._pump(destination.key, lane)
        return result

    def _pump(self, key: str, lane: _Lane) -> None:
        if lane.busy or not lane.waiting:
            if not lane.busy and not lane.waiting:
                self._lanes.pop(key, None)
            return
        destination, sender, content_type, body, options, result = lane.waiting.popleft()
        lane.busy = True
        d = maybeDeferred(sender.send, destination, content_type, body, options)

        def done(outcome: Reply | Failure) -> None:
            lane.busy = False
            if isinstance(outcome, Failure):
                lane.failed += 1
            else:
                lane.delivered += 1
            result.callback(outcome) if not isinstance(outcome, Failure) else result.errback(
                outcome
            )
            self._pump(key, lane)

        d.addBoth(done)

    def stats(self) -> dict[str, Any]:
        return {
            "lanes": {
                key: {"inFlight": lane.busy, "waiting": len(lane.waiting)}
                for key, lane in self._lanes.items()
            }
        }

    def close(self) -> Deferred[None]:
        from twisted.internet.defer import DeferredList

        ds = [maybeDeferred(s.close) for s in set(self._senders.values())]
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None) if ds else succeed(
            None
        )
