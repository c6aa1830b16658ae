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

from medagent.agent.allow import DestinationPolicy
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
    broke (``connect``, ``send``, ``ack``...), for the 3 a.m. reader.  C{timed_out} marks "no
    answer in time" (HTTP 504), whatever the phase's wording.  A subclass sets C{not_written}
    when it knows that no byte of the message left the agent.

    C{reply}: the device answered but refused for now, having processed nothing (DICOM
    ``0xA7xx`` out of resources), so a retry is safe although bytes reached it.  The queue
    retries it at most C{max_attempts} times (and the destination's ``maxAttempts``); then
    C{reply} - the device's answer, C{delivered=False} - is the push's outcome.
    """

    #: True when no byte of the message can have been written (e.g. the connection was gone).
    not_written: bool = False
    reply: Reply | None = None
    max_attempts: int | None = None

    def __init__(self, reason: str, *, transient: bool = True, phase: str | None = None,
                 timed_out: bool = False, reply: Reply | None = None,
                 max_attempts: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.phase = phase
        self.timed_out = timed_out
        self.reply = reply
        self.max_attempts = max_attempts

    def __str__(self) -> str:
        return self.reason


#: Phases in which the caller's request is wrong: HTTP 400, never retried, never in doubt.
REQUEST_PHASES = frozenset(["destination", "decode", "encode", "message"])

#: Failure phases in which nothing can have reached the device: safe to try again.
RETRY_SAFE_PHASES = frozenset(
    ["connect", "send", "establishment", "association", "queue", "network", "open"]
)

#: Phases in which the device answered that it did not take the message (DICOM C-STORE
#: "out of resources"): it has the bytes but not the message, so not in doubt, and another
#: try later is what the device asks for.
REFUSED_PHASES = frozenset(["store"])

#: Transient failures in these phases are retried by the queue.
RETRYABLE_PHASES = RETRY_SAFE_PHASES | REFUSED_PHASES

#: Phases in which the message cannot have been taken by the device.
NOT_WRITTEN_PHASES = REQUEST_PHASES | RETRY_SAFE_PHASES | REFUSED_PHASES

#: The human half of the in-doubt marker (the machine half is ``inDoubt: true``).
IN_DOUBT_PHRASE = "the device may or may not have received this message"

#: Key of C{options} under which the queue hands a sender its "first byte" hook: a callable
#: returning a Deferred that fires once the entry's in-flight mark is on disk.  A sender
#: that declares C{marks_first_write = True} calls it right before its first write of the
#: message and writes nothing if it fails.
BEFORE_WRITE = "_beforeWrite"


class NotWritten(DeliveryError):
    """Nothing of the message was written (e.g. its in-flight mark could not be recorded)."""

    not_written = True

    def __init__(self, reason: str, *, phase: str = "send") -> None:
        super().__init__(reason, transient=True, phase=phase)


def http_status(error: BaseException) -> int:
    """
    The one mapping from a delivery failure to the HTTP status a waited caller gets (the
    README's table): 400 the request is wrong, 504 no answer in time, 502 the device could
    not be reached or broke the link, 500 an internal error of the agent.
    """
    if not isinstance(error, DeliveryError):
        return 500
    if error.phase in REQUEST_PHASES:
        return 400
    if error.timed_out:
        return 504
    if error.phase not in RETRY_SAFE_PHASES:
        reason = error.reason.lower()
        if "timeout" in reason or "timed out" in reason:  # senders without the flag
            return 504
    if not error.transient and error.phase is None:
        return 400
    return 502


def in_doubt(error: BaseException, may_have_written: bool) -> bool:
    """
    Whether a failed delivery may have reached the device: only once its first byte may have
    been written (C{may_have_written}: the in-flight mark was taken), and only for a failure
    after that point (not a refused connect, a rejected association, a bad message).
    """
    if not may_have_written:
        return False
    if isinstance(error, DeliveryError):
        return not error.not_written and error.phase not in NOT_WRITTEN_PHASES
    return True


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
        #: where this agent may connect (the site's allowlist; open unless configured)
        self.policy = DestinationPolicy()

    def add_sender(self, scheme: str, sender: Sender) -> None:
        self._senders[scheme] = sender

    def schemes(self) -> list[str]:
        return sorted(self._senders)

    def marks_first_write(self, remote: str, content_type: str) -> bool:
        """
        Whether the sender for C{remote} calls the L{BEFORE_WRITE} hook before it writes.
        Pings never write a message, so they count as marking (and never take the mark).
        A destination we cannot resolve fails before any write, so it counts too.
        """
        if content_type == PING:
            return True
        try:
            _, sender = self.resolve(remote)
        except DeliveryError:
            return True
        return bool(getattr(sender, "marks_first_write", False))

    def ready_to_write(self, remote: str) -> bool:
        """Whether the sender for C{remote} has an idle connection to its device right now."""
        try:
            destination, sender = self.resolve(remote)
        except DeliveryError:
            return False
        ready = getattr(sender, "ready_to_write", None)
        return bool(ready(destination)) if ready is not None else False

    def resolve(self, remote: str) -> tuple[Destination, Sender]:
        """Parse C{remote} and find its sender; L{DeliveryError} (permanent) if we cannot."""
        try:
            destination = parse_destination(remote, needs_port=False)
        except DestinationError as e:
            raise DeliveryError(str(e), transient=False, phase="destination")
        if not self.policy.allows(destination):
            raise DeliveryError(self.policy.refusal(destination), transient=False,
                                phase="destination")
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
