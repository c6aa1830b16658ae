"""
The ``tcp://host:port?startChar=%02&endChar=%03`` sender: one connection per message, the
message written as one frame (L{medagent.tcp.framing}), the peer's first frame back is the
answer, then the connection is closed.

Bodies: ``application/octet-stream`` is base64 (answered base64, same type); any other content
type is text, sent as UTF-8 and answered as ``text/plain`` (base64 ``application/octet-stream``
when the answer is not UTF-8).  ``connectTimeout`` and ``ackTimeout`` (seconds) apply per
message.  There is no application-level ACK to read: whatever frame comes back is the answer.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Mapping

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import Clock, ClientEndpoint, DelayedCall, maybe_transport, transport_of
from medagent.contenttypes import OCTET_STREAM, TEXT
from medagent.delivery import BEFORE_WRITE, DeliveryError, Reply
from medagent.destination import Destination, DestinationError
from medagent.net import no_delay, tcp_ping
from medagent.tcp.framing import (
    DEFAULT_MAX_SIZE,
    FrameDecoder,
    FrameTooLarge,
    FramingError,
    delimiters,
    frame,
)

log = Logger()

#: (reactor, host, port, connect timeout) → the endpoint to connect with (tests swap it)
EndpointFactory = Callable[[Any, str, int, float], ClientEndpoint]


def _hostname_endpoint(reactor: Any, host: str, port: int,
                       timeout: float) -> ClientEndpoint:
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@attr.s(frozen=True, auto_attribs=True)
class TCPSettings:
    """A destination's framing and timeouts, checked before anything is sent."""

    start: int
    end: int
    connect_timeout: float
    ack_timeout: float

    @classmethod
    def from_destination(cls, destination: Destination, connect_timeout: float,
                         ack_timeout: float) -> TCPSettings:
        if not destination.host or destination.port is None:
            raise DestinationError("tcp:// destination needs a host and a port")
        try:
            start, end = delimiters(destination.param("startChar"),
                                    destination.param("endChar"))
        except FramingError as e:
            raise DestinationError(str(e))
        ct = destination.float_param("connectTimeout", connect_timeout)
        at = destination.float_param("ackTimeout", ack_timeout)
        if not (0 < ct <= 3600 and 0 < at <= 3600):
            raise DestinationError("connectTimeout and ackTimeout must be 0-3600 seconds")
        return cls(start=start, end=end, connect_timeout=ct, ack_timeout=at)


class FramedClientProtocol(Protocol):
    """
    One request at a time: L{request} writes a frame and fires with the peer's next frame,
    or fails with L{DeliveryError} (``ack`` phase: timeout, closed before answering;
    ``protocol``: an oversize answer).  Its timer runs on C{clock}.
    """

    def __init__(self, clock: Clock, start: int, end: int,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.clock = clock
        self.start, self.end = start, end
        self.decoder = FrameDecoder(start, end, max_size)
        self._waiting: Deferred[bytes] | None = None
        self._timer: DelayedCall | None = None
        self.gone = False

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def request(self, payload: bytes, timeout: float) -> Deferred[bytes]:
        if self._waiting is not None:
            return fail(DeliveryError("A request is already in flight", phase="send"))
        if self.gone:
            return fail(DeliveryError("Connection closed before the message was written",
                                      phase="send"))
        d: Deferred[bytes] = Deferred()
        self._waiting = d
        self._timer = self.clock.callLater(timeout, self._timed_out, timeout)
        transport_of(self).write(frame(payload, self.start, self.end))
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameTooLarge as e:
            frames = e.payloads
            if not frames:
                self._finish(DeliveryError(
                    f"Answer larger than {e.max_size} bytes", transient=False,
                    phase="protocol"))
                transport_of(self).abortConnection()
                return
        if frames and self._waiting is not None:
            self._finish(frames[0])

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True
        self._finish(DeliveryError("Peer closed the connection before answering",
                                   phase="ack"))

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self._finish(DeliveryError(f"No answer within {timeout:g} s (timeout)", phase="ack",
                                   timed_out=True))
        transport_of(self).abortConnection()

    def _finish(self, outcome: bytes | DeliveryError) -> None:
        d, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if d is None:
            return
        if isinstance(outcome, DeliveryError):
            d.errback(Failure(outcome))
        else:
            d.callback(outcome)


class TCPSender:
    """
    L{medagent.delivery.Sender} for ``tcp://``.  Right before the frame is written the
    queue's L{BEFORE_WRITE} hook (if given) is awaited, so that "may have been received" is
    on disk before it can be true; a connect failure is never in doubt.
    """

    schemes = ("tcp",)
    marks_first_write = True

    def __init__(self, reactor: Any, *, connect_timeout: float = 10.0,
                 ack_timeout: float = 30.0, max_message_size: int = DEFAULT_MAX_SIZE,
                 endpoint_factory: EndpointFactory | None = None) -> None:
        self._reactor = reactor
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_message_size = max_message_size
        self._endpoint = endpoint_factory or _hostname_endpoint
        self._open: set[FramedClientProtocol] = set()

    def send(self, destination: Destination, content_type: str, body: str,
             options: Mapping[str, Any]) -> Deferred[Reply]:
        try:
            settings = TCPSettings.from_destination(destination, self.connect_timeout,
                                                    self.ack_timeout)
            port = destination.require_port()
        except DestinationError as e:
            return fail(DeliveryError(str(e), transient=False, phase="destination"))
        binary = content_type == OCTET_STREAM
        try:
            payload = (base64.b64decode(body, validate=True) if binary
                       else body.encode("utf-8"))
        except (binascii.Error, ValueError):
            return fail(DeliveryError("application/octet-stream body must be base64",
                                      transient=False, phase="decode"))
        if len(payload) > self.max_message_size:
            return fail(DeliveryError(f"Message larger than {self.max_message_size} bytes",
                                      transient=False, phase="message"))
        try:
            frame(payload, settings.start, settings.end)
        except FramingError as e:
            return fail(DeliveryError(str(e), transient=False, phase="encode"))
        before_write = options.get(BEFORE_WRITE)
        proto = FramedClientProtocol(self._reactor, settings.start, settings.end,
                                     self.max_message_size)
        endpoint = self._endpoint(self._reactor, destination.host, port,
                                  settings.connect_timeout)
        connected = connectProtocol(endpoint, proto)

        def connect_failed(f: Failure) -> Failure:
            raise DeliveryError(f"Could not connect to {destination.host}:{destination.port}: "
                                f"{f.getErrorMessage()}", phase="connect")

        def write(_: Any) -> Deferred[bytes]:
            self._open.add(proto)
            marked = before_write() if before_write is not None else succeed(None)
            return marked.addCallback(lambda _: proto.request(payload, settings.ack_timeout))

        def answered(data: bytes) -> Reply:
            if binary:
                return Reply(body=base64.b64encode(data).decode("ascii"),
                             content_type=OCTET_STREAM)
            try:
                return Reply(body=data.decode("utf-8"), content_type=TEXT)
            except UnicodeDecodeError:
                return Reply(body=base64.b64encode(data).decode("ascii"),
                             content_type=OCTET_STREAM)

        def done(result: Any) -> Any:
            self._open.discard(proto)
            transport = maybe_transport(proto)
            if transport is not None and not proto.gone:
                transport.loseConnection()
            return result

        d = connected.addCallbacks(write, connect_failed)
        return d.addCallback(answered).addBoth(done)

    def ping(self, destination: Destination) -> Deferred[Reply]:
        return tcp_ping(self._reactor, destination, timeout=self.connect_timeout)

    def close(self) -> Deferred[None]:
        for proto in list(self._open):
            transport = maybe_transport(proto)
            if transport is not None:
                transport.abortConnection()
        self._open.clear()
        return succeed(None)
