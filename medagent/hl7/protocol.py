"""
HL7 v2 over MLLP on Twisted: the device-facing client (L{MLLPClientProtocol}, pooled by
L{MLLPSender} for ``mllp://`` and ``mllps://`` destinations) and the listener for agent
channels (L{MLLPServerProtocol} in front of the application object L{MLLPChannel}).

The protocols only frame bytes, match acknowledgements and run timers on the injected clock;
everything HL7 is in L{medagent.hl7.message} and the framing in L{medagent.hl7.mllp}.
Message content is patient data: logs carry control ids, types, sizes, peers and ACK codes,
never the text.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Mapping

import attr
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from medagent.contenttypes import HL7_V2
from medagent.delivery import BEFORE_WRITE, DeliveryError, Reply
from medagent.destination import Destination, DestinationError
from medagent.hl7 import message as hl7msg
from medagent.hl7.message import HL7Error
from medagent.hl7.mllp import DEFAULT_MAX_SIZE, FramingError, FrameTooLarge, MLLPDecoder, frame
from medagent.net import no_delay, tcp_ping

log = Logger()

RETURN_ACK_MODES = ("first", "application")
CHANNEL_MODES = ("original", "enhanced", "aa")
APP_LEVEL_ACKS = ("AL", "ER", "NE", "SU")

# A device that closes within this many seconds of its last ACK, with nothing in flight, is
# taken to close after every message (hl7apy's MLLPServer does): we stop reusing connections
# to it rather than race its close with our next write.
CLOSE_AFTER_ACK_WINDOW = 1.0

# ... but only once that was seen on this many connections in a row (no connection reused in
# between): one close right after an ACK is also what a device crash looks like.
CLOSE_AFTER_ACK_CONFIRMATIONS = 2

# And not for good: while it is learned, each connection is kept for CLOSE_AFTER_ACK_WINDOW
# after its ACK (never written to again); a device that leaves it open that long keeps its
# connections after all (reconfigured, replaced) and gets a persistent one again.

# Before a connection is reused for the first time we wait this long, so that a device that
# closes after every ACK has shown it (its close arrives) before we write into a dying socket.
# Paid once per connection; later reuses only wait two reactor turns.
FIRST_REUSE_GRACE = 0.05

# Codecs whose bytes can contain VT/FS: MLLP cannot carry them.
_WIDE_CODECS = ("utf-16", "utf-32")


class NotSent(DeliveryError):
    """The connection was gone before any byte of the message was written: safe to retry."""

    not_written = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=True, phase="send")


def _fail(exc: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(exc))
    return d


def _peer_name(transport: Any) -> str:
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------
# Client side


@attr.s(auto_attribs=True)
class _PendingSend:
    deferred: Deferred
    control_id: str
    return_ack: str
    timeout: float
    timer: IDelayedCall
    size: int
    started: float


class _LostWaiters:
    """C{when_lost()} for both MLLP protocols (closing a connection waits for it)."""

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


@implementer(IHandshakeListener)
class MLLPClientProtocol(_LostWaiters, Protocol):
    """
    One connection to a device.  One message at a time: L{send_message} writes a frame and
    fires with the payload of the ACK whose MSA-2 is the message's MSH-10.  Anything that
    leaves the conversation in doubt (an ACK for another message, garbage, an oversize frame,
    no ACK in time) fails the send with a reason and drops the connection, because the next
    message must not inherit the confusion.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        ack_timeout: float = 30.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
        peer: str = "",
    ) -> None:
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.peer = peer
        self._decoder = MLLPDecoder(max_message_size)
        self._pending: _PendingSend | None = None
        # Control ids already answered on this connection: a late application ACK after a
        # CA (returnAck=first), or a peer that repeats old ACKs, must not look like confusion.
        self._answered: deque[str] = deque(maxlen=32)
        self._lost = False
        self._dropping = False
        self._closing_by_us = False
        self._skipped_logged = 0
        self._lost_waiters: list[Deferred[None]] = []
        self.last_ack_at: float | None = None
        self.closed_after_ack = False
        self.messages = 0
        self._handshake: Deferred[None] | None = None
        self._handshake_done = False
        # Called once with this protocol when the connection is gone (used by the pool).
        self.on_lost: Callable[[MLLPClientProtocol], None] | None = None

    # -- state

    @property
    def idle(self) -> bool:
        """Connected, nothing in flight, not closing: ready for the next message."""
        return (
            bool(self.connected)
            and not self._lost
            and not self._dropping
            and self._pending is None
            and not getattr(self.transport, "disconnecting", False)
        )

    @property
    def waiting(self) -> bool:
        return self._pending is not None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if not self.peer:
            self.peer = _peer_name(self.transport)

    def handshakeCompleted(self) -> None:
        """TLS is up (called by Twisted's TLS layer on ``mllps`` connections)."""
        self._handshake_done = True
        if self._handshake is not None and not self._handshake.called:
            self._handshake.callback(None)

    def handshake(self) -> Deferred[None]:
        """
        Fires when the TLS handshake has completed, or fails with the reason the connection
        was lost before (e.g. certificate verification).  Cancelling aborts the connection.
        """
        if self._handshake_done:
            return succeed(None)
        if self._lost:
            return _fail(DeliveryError("connection closed during the TLS handshake",
                                       phase="connect"))
        if self._handshake is None:
            self._handshake = Deferred(lambda d: self._abort())
        return self._handshake

    # -- sending

    def send_message(
        self,
        payload: bytes,
        control_id: str,
        return_ack: str = "first",
        timeout: float | None = None,
    ) -> Deferred[bytes]:
        """
        Frame and write C{payload}; fire with the matching ACK's payload.  C{return_ack}
        ``first`` takes the first matching ACK, ``application`` waits past a ``CA`` for
        AA/AE/AR/CE/CR.  Fails with L{NotSent} if the connection was already gone, else with
        L{DeliveryError} (phase ``ack``).
        """
        if return_ack not in RETURN_ACK_MODES:
            return _fail(
                DeliveryError(
                    f"returnAck must be one of {', '.join(RETURN_ACK_MODES)}",
                    transient=False,
                    phase="message",
                )
            )
        if self._pending is not None:
            return _fail(
                DeliveryError(
                    f"a message ({self._pending.control_id}) is already waiting for its ACK "
                    "on this connection",
                    phase="send",
                )
            )
        if not self.idle:
            return _fail(NotSent("connection closed before the message was sent"))
        try:
            data = frame(payload)
        except FramingError as e:
            return _fail(DeliveryError(str(e), transient=False, phase="message"))
        timeout = self.ack_timeout if timeout is None else timeout
        d: Deferred[bytes] = Deferred(self._cancelled)
        timer = self.clock.callLater(timeout, self._ack_timed_out)
        self._pending = _PendingSend(
            d, control_id, return_ack, timeout, timer, len(payload), self.clock.seconds()
        )
        self.messages += 1
        log.debug(
            "MLLP {peer}: sent control id {control_id} ({size} bytes), waiting for "
            "{return_ack} ACK",
            peer=self.peer,
            control_id=control_id,
            size=len(payload),
            return_ack=return_ack,
        )
        self.transport.write(data)
        return d

    def _cancelled(self, d: Deferred[bytes]) -> None:
        pending = self._pending
        if pending is not None and pending.deferred is d:
            self._fail_and_drop(
                DeliveryError(
                    f"send of control id {pending.control_id} cancelled before its ACK",
                    phase="ack",
                )
            )

    # -- receiving

    def dataReceived(self, data: bytes) -> None:
        if self._dropping or self._lost:
            return
        too_large: FrameTooLarge | None = None
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as e:
            payloads, too_large = e.payloads, e
        if self._decoder.skipped > self._skipped_logged:
            log.debug(
                "MLLP {peer}: {count} bytes outside MLLP frames skipped so far",
                peer=self.peer,
                count=self._decoder.skipped,
            )
            self._skipped_logged = self._decoder.skipped
        for payload in payloads:
            if self._dropping:
                return
            self._frame_received(payload)
        if too_large is not None and not self._dropping:
            self._fail_and_drop(
                DeliveryError(
                    f"device sent a frame larger than {too_large.max_size} bytes", phase="ack"
                ),
                no_pending_note=f"device sent a frame larger than {too_large.max_size} bytes",
            )

    def _frame_received(self, payload: bytes) -> None:
        pending = self._pending
        try:
            # MSA-1/MSA-2 are ASCII; Latin-1 reads any bytes without failing.
            ack = hl7msg.parse_ack(payload.decode("latin-1"))
        except HL7Error as e:
            self._fail_and_drop(
                DeliveryError(f"device answered with something that is not an HL7 ACK ({e})",
                              phase="ack"),
                no_pending_note="unsolicited non-ACK frame",
            )
            return
        if pending is not None and ack.control_id == pending.control_id:
            if pending.return_ack == "application" and ack.code == "CA":
                log.info(
                    "MLLP {peer}: commit ACK CA for {control_id}; waiting for the application ACK",
                    peer=self.peer,
                    control_id=ack.control_id,
                )
                return
            self._pending = None
            if pending.timer.active():
                pending.timer.cancel()
            self._answered.append(pending.control_id)
            self.last_ack_at = self.clock.seconds()
            log.info(
                "MLLP {peer}: {code} for control id {control_id} ({size} bytes sent, "
                "{ack_size} bytes ACK, {ms:.1f} ms)",
                peer=self.peer,
                code=ack.code,
                control_id=ack.control_id,
                size=pending.size,
                ack_size=len(payload),
                ms=(self.clock.seconds() - pending.started) * 1000,
            )
            pending.deferred.callback(payload)
            return
        if ack.control_id in self._answered:
            log.info(
                "MLLP {peer}: extra {code} for already answered control id {control_id} ignored",
                peer=self.peer,
                code=ack.code,
                control_id=ack.control_id,
            )
            return
        if pending is not None:
            self._fail_and_drop(
                DeliveryError(
                    f"device sent an ACK ({ack.code}) for control id {ack.control_id!r} while "
                    f"waiting for {pending.control_id!r}",
                    phase="ack",
                )
            )
        else:
            self._fail_and_drop(
                None, no_pending_note=f"ACK for unknown control id {ack.control_id!r}"
            )

    def _ack_timed_out(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._fail_and_drop(
            DeliveryError(
                f"no ACK within {pending.timeout:g} s for control id {pending.control_id}",
                phase="ack",
                timed_out=True,
            )
        )

    # -- ending

    def _take_pending(self) -> _PendingSend | None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def _fail_pending(self, error: DeliveryError) -> None:
        pending = self._take_pending()
        if pending is not None:
            pending.deferred.errback(Failure(error))

    def _fail_and_drop(self, error: DeliveryError | None, no_pending_note: str = "") -> None:
        """Fail what is in flight with C{error} and abort the connection."""
        if self._pending is not None and error is not None:
            log.warn("MLLP {peer}: {reason}; dropping the connection", peer=self.peer,
                     reason=error.reason)
        elif self._pending is None and no_pending_note:
            log.warn(
                "MLLP {peer}: {note}; dropping the connection", peer=self.peer, note=no_pending_note
            )
        self._dropping = True
        self._closing_by_us = True
        # Take the send first (connectionLost must not claim it), fail it after the abort (so
        # whoever handles the failure sees a connection that is going away).
        pending = self._take_pending()
        self._abort()
        if pending is not None and error is not None:
            pending.deferred.errback(Failure(error))

    def _abort(self) -> None:
        if self.transport is None or self._lost:
            return
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()

    def close(self, reason: str = "connection closed by the agent") -> Deferred[None]:
        """Close the connection; fail an in-flight send with C{reason}.  Fires when closed."""
        d = self.when_lost()
        if self._lost:
            return d
        self._closing_by_us = True
        if self._pending is not None:
            self._fail_and_drop(
                DeliveryError(f"{reason} before ACK for control id {self._pending.control_id}",
                              phase="ack")
            )
        elif self.transport is not None:
            self.transport.loseConnection()
        return d

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self.connected = False
        why = reason.getErrorMessage() if reason is not None else "closed"
        if self._handshake is not None and not self._handshake.called:
            self._handshake.errback(
                Failure(DeliveryError(f"TLS handshake failed: {why}", phase="connect"))
            )
        if self._pending is not None:
            cid = self._pending.control_id
            log.warn(
                "MLLP {peer}: connection closed by device before ACK for control id "
                "{control_id} ({why})",
                peer=self.peer,
                control_id=cid,
                why=why,
            )
            self._fail_pending(
                DeliveryError(
                    f"connection closed by device before ACK for control id {cid} ({why})",
                    phase="ack",
                )
            )
        elif not self._closing_by_us:
            since = None if self.last_ack_at is None else self.clock.seconds() - self.last_ack_at
            if since is not None and since <= CLOSE_AFTER_ACK_WINDOW:
                self.closed_after_ack = True
            log.info("MLLP {peer}: device closed the idle connection", peer=self.peer)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(self)
        self._fire_lost_waiters()


class _ClientFactory(Factory):
    def __init__(self, build: Callable[[], MLLPClientProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> MLLPClientProtocol:
        p = self._build()
        p.factory = self
        return p


@attr.s(frozen=True, auto_attribs=True)
class MLLPSettings:
    """Per-destination settings, from the URL's query and the per-message options."""

    encoding: str | None
    return_ack: str
    keep_alive: bool
    connect_timeout: float
    ack_timeout: float

    @classmethod
    def from_destination(
        cls,
        destination: Destination,
        options: Mapping[str, Any],
        *,
        connect_timeout: float,
        ack_timeout: float,
    ) -> "MLLPSettings":
        encoding = destination.param("encoding") or None
        if encoding is not None:
            try:
                encoding = hl7msg.check_codec(encoding)
            except HL7Error as e:
                raise DestinationError(f"{e} in {destination.scheme}:// destination")
        return_ack = (
            options.get("returnAck")
            or destination.param("returnAck")
            or destination.param("defaultReturnAck")
            or "first"
        )
        return_ack = str(return_ack).lower()
        if return_ack not in RETURN_ACK_MODES:
            raise DestinationError(
                f"returnAck must be one of {', '.join(RETURN_ACK_MODES)}, not {return_ack!r}"
            )
        ct = destination.float_param("connectTimeout", connect_timeout)
        at = destination.float_param("ackTimeout", ack_timeout)
        if ct <= 0 or at <= 0:
            raise DestinationError("connectTimeout and ackTimeout must be positive (seconds)")
        return cls(
            encoding=encoding,
            return_ack=return_ack,
            keep_alive=destination.bool_param("keepAlive", True),
            connect_timeout=ct,
            ack_timeout=at,
        )


@attr.s(auto_attribs=True)
class _Link:
    """The pooled connection of one destination and what we learned about the device."""

    key: str
    lock: DeferredLock = attr.ib(factory=DeferredLock)
    proto: MLLPClientProtocol | None = None
    #: what the pooled connection was opened with (scheme, TLS settings): a message asking
    #: for another transport to the same device gets a new connection
    transport: tuple[Any, ...] | None = None
    idle_timer: IDelayedCall | None = None
    connecting: Deferred | None = None
    closes_after_ack: bool = False
    #: connections in a row that the device closed right after an ACK
    closed_after_ack_seen: int = 0


EndpointFactory = Callable[[Destination, MLLPSettings], IStreamClientEndpoint]


class MLLPSender:
    """
    L{medagent.delivery.Sender} for ``mllp://host:port`` (and ``mllps://`` over TLS).

    Destination parameters: ``encoding`` (default: MSH-18, else UTF-8), ``returnAck``
    (``first``|``application``; the message's ``options['returnAck']`` wins),
    ``keepAlive`` (default true: one persistent connection per destination, closed after
    C{idle_timeout} idle), ``connectTimeout`` and ``ackTimeout`` in seconds.  For ``mllps``
    the trust root (default: the platform's) and client certificate are the sender's
    C{tls_ca}, C{tls_cert} and C{tls_key}, set from the agent's configuration.

    A message is never written twice by this class: if a connection is found dead before the
    write, a new one is opened; once written, a lost connection fails the send (transient) and
    the retry, with its duplicate risk, is the queue's visible decision.

    Connections are pooled per device (L{Destination.key}: query parameters excluded), so
    URL variants of one device share its connection; ``returnAck``, ``ackTimeout`` and
    ``encoding`` apply per message.  Right before the first byte of a message is written the
    queue's L{BEFORE_WRITE} hook (if given) is awaited, so that "may have been received" is
    on disk before it can be true.
    """

    schemes = ("mllp", "mllps")
    marks_first_write = True

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        idle_timeout: float = 60.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
        endpoint_factory: EndpointFactory | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self._reactor = reactor
        #: PEM files for ``mllps``, from the agent's configuration only (never from a URL)
        self.tls_ca, self.tls_cert, self.tls_key = tls_ca, tls_cert, tls_key
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self._endpoint_factory = endpoint_factory or self._default_endpoint
        self._links: dict[str, _Link] = {}
        self._sleeps: dict[Deferred[None], IDelayedCall] = {}
        self._closed = False
        self._pem_cache: dict[str, bytes] = {}

    # -- Sender interface

    def send(
        self,
        destination: Destination,
        content_type: str,
        body: str,
        options: Mapping[str, Any] | None = None,
    ) -> Deferred[Reply]:
        return Deferred.fromCoroutine(self._send(destination, body, options or {}))

    def ready_to_write(self, destination: Destination) -> bool:
        """
        An idle persistent connection to the device, usable for C{destination}: the next
        message's first byte follows without a connect (the queue then marks it in flight
        with its claim instead of waiting for L{BEFORE_WRITE}).
        """
        link = self._links.get(destination.key)
        if link is None or link.proto is None or not link.proto.idle or link.lock.locked:
            return False
        try:
            keep_alive = destination.bool_param("keepAlive", True)
        except DestinationError:
            return False
        return (keep_alive and not link.closes_after_ack
                and link.transport == self._transport_of(destination))

    def ping(self, destination: Destination) -> Deferred[Reply]:
        try:
            ct = destination.float_param("connectTimeout", self.connect_timeout)
        except DestinationError as e:
            return _fail(DeliveryError(str(e), transient=False, phase="destination"))
        return tcp_ping(self._reactor, destination, timeout=ct)

    def close(self) -> Deferred[None]:
        """Close every connection, fail in-flight sends, cancel timers; fires when closed."""
        self._closed = True
        for d, call in list(self._sleeps.items()):
            if call.active():
                call.cancel()
            self._sleeps.pop(d, None)
            d.errback(Failure(DeliveryError("MLLP sender closed", phase="send")))
        waits = []
        for link in list(self._links.values()):
            self._cancel_idle(link)
            if link.connecting is not None:
                link.connecting.cancel()
            if link.proto is not None:
                waits.append(link.proto.close("MLLP sender closed"))
        self._links.clear()
        if not waits:
            return succeed(None)
        d = DeferredList(waits, consumeErrors=True)
        d.addTimeout(5.0, self._reactor)
        return d.addBoth(lambda _: None)

    # -- one message

    async def _send(self, destination: Destination, body: str, options: Mapping[str, Any]) -> Reply:
        where = f"MLLP {destination.host}:{destination.port}"
        if self._closed:
            raise DeliveryError(f"{where}: sender is closed", phase="send")
        if destination.port is None:
            raise DeliveryError(f"{where}: destination needs a port", transient=False,
                                phase="destination")
        try:
            settings = MLLPSettings.from_destination(
                destination,
                options,
                connect_timeout=self.connect_timeout,
                ack_timeout=self.ack_timeout,
            )
        except DestinationError as e:
            raise DeliveryError(str(e), transient=False, phase="destination")
        control_id, payload, codec = self._prepare(body, settings)
        link = self._links.get(destination.key)
        if link is None:
            link = self._links[destination.key] = _Link(destination.key)
        before_write = options.get(BEFORE_WRITE)
        async with link.lock:
            ack_payload = await self._deliver(link, destination, settings, payload, control_id,
                                              before_write)
        return self._reply(ack_payload, settings, codec)

    def _prepare(self, body: str, settings: MLLPSettings) -> tuple[str, bytes, str]:
        """Normalise, check and encode the message: (control id, bytes, codec)."""
        try:
            text = hl7msg.normalise(body)
            cid = hl7msg.control_id(text)
            codec = settings.encoding or hl7msg.charset(text) or "utf-8"
            codec = hl7msg.check_codec(codec)
        except HL7Error as e:
            raise DeliveryError(f"Invalid HL7 message: {e}", transient=False, phase="message")
        if codec.startswith(_WIDE_CODECS):
            raise DeliveryError(
                f"HL7 message {cid}: {codec} cannot be carried over MLLP (its bytes can be "
                "MLLP block characters); use UTF-8",
                transient=False,
                phase="message",
            )
        try:
            payload = text.encode(codec)
        except UnicodeEncodeError as e:
            raise DeliveryError(
                f"HL7 message {cid} cannot be encoded as {codec} (character at position "
                f"{e.start}); set ?encoding= on the destination or MSH-18",
                transient=False,
                phase="message",
            )
        if len(payload) > self.max_message_size:
            raise DeliveryError(
                f"HL7 message {cid} is {len(payload)} bytes, over the {self.max_message_size} "
                "byte limit",
                transient=False,
                phase="message",
            )
        try:
            frame(payload)
        except FramingError as e:
            raise DeliveryError(f"HL7 message {cid}: {e}", transient=False, phase="message")
        return cid, payload, codec

    async def _deliver(
        self,
        link: _Link,
        destination: Destination,
        settings: MLLPSettings,
        payload: bytes,
        control_id: str,
        before_write: Callable[[], Deferred[None]] | None = None,
    ) -> bytes:
        where = f"MLLP {destination.host}:{destination.port}"
        for attempt in (1, 2):
            proto = await self._connection(link, destination, settings)
            reused = proto.messages > 0
            try:
                if before_write is not None:
                    await before_write()  # NotWritten if the mark cannot be recorded
                ack = await proto.send_message(
                    payload, control_id, settings.return_ack, timeout=settings.ack_timeout
                )
            except NotSent as e:
                if attempt == 1:
                    log.info(
                        "{where}: connection gone before control id {control_id} was written; "
                        "sending on a new connection",
                        where=where,
                        control_id=control_id,
                    )
                    continue
                raise DeliveryError(f"{where}: {e.reason}", phase=e.phase)
            except DeliveryError as e:
                error = DeliveryError(f"{where}: {e.reason}", transient=e.transient,
                                      phase=e.phase, timed_out=e.timed_out)
                error.not_written = e.not_written
                raise error
            if reused:
                # The device kept a connection open across messages: whatever closed one
                # right after an ACK before (a crash, a restart) was not its habit.
                link.closed_after_ack_seen = 0
            self._after_ack(link, proto, settings)
            return ack
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connection(
        self, link: _Link, destination: Destination, settings: MLLPSettings
    ) -> MLLPClientProtocol:
        proto = link.proto
        wanted = self._transport_of(destination)
        if proto is not None and link.transport != wanted:
            log.info("MLLP {host}:{port}: message asks for another transport (TLS settings); "
                     "new connection", host=destination.host, port=destination.port)
            self._cancel_idle(link)
            await proto.close()
            proto = link.proto
        if proto is not None and settings.keep_alive and not link.closes_after_ack:
            self._cancel_idle(link)
            if proto.idle:
                # Let a close the device sent right after its last ACK reach us before we
                # write on this connection: once written, a lost connection is a failure.
                if proto.messages == 1:
                    await self._sleep(FIRST_REUSE_GRACE)
                else:
                    await self._settle()
            if proto.idle and link.proto is proto:
                return proto
            log.info(
                "MLLP {host}:{port}: pooled connection is closed; connecting again",
                host=destination.host,
                port=destination.port,
            )
        elif proto is not None:
            self._cancel_idle(link)
            await proto.close()
        if self._closed:
            raise DeliveryError("MLLP sender closed", phase="send")
        return await self._connect(link, destination, settings)

    async def _settle(self) -> None:
        """Two reactor turns: the I/O in between delivers a pending close of the peer."""
        await self._sleep(0)
        await self._sleep(0)

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def fire() -> None:
            self._sleeps.pop(d, None)
            d.callback(None)

        self._sleeps[d] = self._reactor.callLater(seconds, fire)
        return d

    async def _connect(
        self, link: _Link, destination: Destination, settings: MLLPSettings
    ) -> MLLPClientProtocol:
        where = f"{destination.host}:{destination.port}"
        try:
            endpoint = self._endpoint_factory(destination, settings)
        except (DestinationError, OSError, ValueError) as e:
            raise DeliveryError(f"MLLP {where}: {e}", transient=False, phase="destination")
        factory = _ClientFactory(
            lambda: MLLPClientProtocol(
                self._reactor,
                ack_timeout=settings.ack_timeout,
                max_message_size=self.max_message_size,
                peer=where,
            )
        )
        tls = destination.scheme == "mllps"

        async def open_connection() -> MLLPClientProtocol:
            proto = await endpoint.connect(factory)
            if tls:
                await proto.handshake()
            return proto

        # Cancelling this cancels whatever it awaits: the TCP connect or the TLS handshake.
        d = Deferred.fromCoroutine(open_connection())
        timed_out = []

        def on_timeout() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(settings.connect_timeout, on_timeout)
        link.connecting = d
        started = time.monotonic()
        try:
            proto = await d
        except (CancelledError, ConnectingCancelledError):
            if timed_out:
                raise DeliveryError(
                    f"MLLP {where}: connect timed out after {settings.connect_timeout:g} s",
                    phase="connect",
                )
            raise DeliveryError(f"MLLP {where}: connect cancelled (sender closed)",
                                phase="connect")
        except DeliveryError as e:
            raise DeliveryError(f"MLLP {where}: {e.reason}", phase="connect")
        except Exception as e:
            raise DeliveryError(f"MLLP {where}: cannot connect: {e}", phase="connect")
        finally:
            link.connecting = None
            if timer.active():
                timer.cancel()
        if self._closed:
            await proto.close("MLLP sender closed")
            raise DeliveryError("MLLP sender closed", phase="connect")
        proto.on_lost = lambda p: self._lost(link, p)
        link.proto = proto
        link.transport = self._transport_of(destination)
        log.info(
            "MLLP {where}: connected in {ms:.1f} ms (keepAlive={keep_alive})",
            where=where,
            ms=(time.monotonic() - started) * 1000,
            keep_alive=settings.keep_alive,
        )
        return proto

    @staticmethod
    def _transport_of(destination: Destination) -> tuple[Any, ...]:
        """What a connection is opened with, beyond the device: TLS or not, and its trust."""
        if destination.scheme != "mllps":
            return (destination.scheme,)
        return (destination.scheme, destination.host, destination.param("ca"),
                destination.param("cert"), destination.param("key"))

    def _after_ack(self, link: _Link, proto: MLLPClientProtocol, settings: MLLPSettings) -> None:
        if not settings.keep_alive:
            proto.close()
            return
        self._cancel_idle(link)
        if link.closes_after_ack:
            # Not written to again (the next message opens its own connection), but watched:
            # if the device leaves it open past the window, it keeps connections after all.
            link.idle_timer = self._reactor.callLater(
                CLOSE_AFTER_ACK_WINDOW, self._watched_after_ack, link, proto)
            return
        link.idle_timer = self._reactor.callLater(self.idle_timeout, self._idle_close, link, proto)

    def _watched_after_ack(self, link: _Link, proto: MLLPClientProtocol) -> None:
        link.idle_timer = None
        if link.proto is not proto or not proto.idle:
            return
        link.closes_after_ack = False
        link.closed_after_ack_seen = 0
        log.info("MLLP {peer}: device kept the connection open after its ACK; using a "
                 "persistent connection again", peer=proto.peer)
        link.idle_timer = self._reactor.callLater(
            max(self.idle_timeout - CLOSE_AFTER_ACK_WINDOW, 0.0), self._idle_close, link, proto)

    def _idle_close(self, link: _Link, proto: MLLPClientProtocol) -> None:
        link.idle_timer = None
        if link.proto is proto and proto.idle:
            log.info(
                "MLLP {peer}: closing connection idle for {seconds} s",
                peer=proto.peer,
                seconds=self.idle_timeout,
            )
            proto.close()

    def _cancel_idle(self, link: _Link) -> None:
        if link.idle_timer is not None:
            if link.idle_timer.active():
                link.idle_timer.cancel()
            link.idle_timer = None

    def _lost(self, link: _Link, proto: MLLPClientProtocol) -> None:
        if link.proto is proto:
            link.proto = None
            self._cancel_idle(link)
        if proto.closed_after_ack and not link.closes_after_ack:
            link.closed_after_ack_seen += 1
            if link.closed_after_ack_seen >= CLOSE_AFTER_ACK_CONFIRMATIONS:
                link.closes_after_ack = True
                log.info(
                    "MLLP {peer}: device closes the connection after each ACK; using a new "
                    "connection per message",
                    peer=proto.peer,
                )
        if link.proto is None and not link.lock.locked and not link.closes_after_ack \
                and not link.closed_after_ack_seen:
            self._links.pop(link.key, None)

    def _reply(self, ack_payload: bytes, settings: MLLPSettings, codec: str) -> Reply:
        ack_codec = settings.encoding or hl7msg.charset_of_bytes(ack_payload) or codec
        try:
            ack_codec = hl7msg.check_codec(ack_codec)
        except HL7Error:
            ack_codec = codec
        if ack_codec.startswith(_WIDE_CODECS):
            ack_codec = codec
        text = ack_payload.decode(ack_codec, errors="replace")
        ack = hl7msg.parse_ack(text)
        return Reply(
            body=text,
            content_type=HL7_V2,
            status_code=200,
            delivered=ack.code in hl7msg.POSITIVE_ACK_CODES,
            detail=ack.code,
        )

    # -- endpoints

    def _default_endpoint(
        self, destination: Destination, settings: MLLPSettings
    ) -> IStreamClientEndpoint:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        endpoint = HostnameEndpoint(
            self._reactor, destination.host, destination.port, timeout=settings.connect_timeout
        )
        if destination.scheme != "mllps":
            return endpoint
        from twisted.internet.ssl import (
            Certificate,
            PrivateCertificate,
            optionsForClientTLS,
            platformTrust,
        )

        for name in ("ca", "cert", "key"):
            if destination.param(name) is not None:
                # A URL comes from whoever pushes; letting it name files on this machine
                # would make the agent read (and reveal the existence of) any local file.
                raise DestinationError(
                    f"mllps:// does not take {name}= in the URL: certificate files come from "
                    "the agent's own configuration (tlsCa, tlsCert, tlsKey)")
        ca, cert, key = self.tls_ca, self.tls_cert, self.tls_key
        trust = Certificate.loadPEM(self._pem(ca)) if ca else platformTrust()
        client_cert = None
        if cert:
            pem = self._pem(cert) + (b"\n" + self._pem(key) if key else b"")
            client_cert = PrivateCertificate.loadPEM(pem)
        options = optionsForClientTLS(
            destination.host, trustRoot=trust, clientCertificate=client_cert
        )
        return wrapClientTLS(options, endpoint)

    def _pem(self, path: str) -> bytes:
        # Small local files, read once per path.
        if path not in self._pem_cache:
            try:
                with open(path, "rb") as f:
                    self._pem_cache[path] = f.read(1024 * 1024)
            except OSError as e:
                raise DestinationError(f"cannot read {path}: {e.strerror}")
        return self._pem_cache[path]


# --------------------------------------------------------------------------------------------
# Server side (agent channels: devices send to us)

Respond = Callable[[bytes], None]


class MLLPServerProtocol(_LostWaiters, Protocol):
    """
    One inbound device connection.  Frames are queued and handed to the channel one at a
    time, so answers go back strictly in arrival order; reading pauses while the queue is
    full.  An oversize frame is answered with a reject (after the messages before it) and the
    connection closed.
    """

    def __init__(
        self,
        channel: "MLLPChannel",
        clock: IReactorTime,
        *,
        max_message_size: int = DEFAULT_MAX_SIZE,
        max_queued: int = 64,
        idle_timeout: float | None = None,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.max_queued = max_queued
        self.idle_timeout = idle_timeout
        self.remote = "?"
        self._decoder = MLLPDecoder(max_message_size)
        self._queue: deque[tuple[str, Any]] = deque()
        self._busy = False
        self._pumping = False
        self._paused = False
        self._lost = False
        self._stop_reading = False
        self._idle_call: IDelayedCall | None = None
        self._lost_waiters: list[Deferred[None]] = []
        self._close_when_idle = False

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.remote = _peer_name(self.transport)
        self.channel.connections.add(self)
        log.info("MLLP channel {channel}: connection from {remote}",
                 channel=self.channel.name, remote=self.remote)
        self._touch()

    def dataReceived(self, data: bytes) -> None:
        if self._stop_reading or self._lost:
            return
        self._touch()
        try:
            payloads = self._decoder.feed(data)
            too_large = None
        except FrameTooLarge as e:
            payloads, too_large = e.payloads, e
        for p in payloads:
            self._queue.append(("message", p))
        if too_large is not None:
            # Answer what came before, then reject and close; read nothing more.
            self._queue.append(("oversize", too_large))
            self._stop_reading = True
        if len(self._queue) >= self.max_queued and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._busy and self._queue and not self._lost:
                kind, item = self._queue.popleft()
                if self._paused and len(self._queue) < self.max_queued // 2:
                    self._paused = False
                    self.transport.resumeProducing()
                if kind == "oversize":
                    self._respond(self.channel.oversize_nak(item.max_size))
                    log.warn(
                        "MLLP channel {channel}: {remote} sent a frame over {limit} bytes; "
                        "rejected and closing",
                        channel=self.channel.name,
                        remote=self.remote,
                        limit=item.max_size,
                    )
                    self._queue.clear()
                    self.transport.loseConnection()
                    return
                self._busy = True
                d = maybeDeferred(self.channel.handle, item, self.remote, self._respond)
                d.addErrback(self._handler_failed)
                d.addBoth(self._handled)
        finally:
            self._pumping = False

    def _handler_failed(self, f: Failure) -> None:
        log.failure(
            "MLLP channel {channel}: handler failed for a message from {remote}",
            f,
            channel=self.channel.name,
            remote=self.remote,
        )

    def _handled(self, _: Any) -> None:
        self._busy = False
        if self._close_when_idle and not self._lost:
            self.transport.loseConnection()
            return
        self._touch()
        self._pump()

    def _respond(self, payload: bytes) -> None:
        if self._lost:
            log.warn(
                "MLLP channel {channel}: {remote} disconnected before its ACK could be sent",
                channel=self.channel.name,
                remote=self.remote,
            )
            return
        self.transport.write(frame(payload))

    def _touch(self) -> None:
        if not self.idle_timeout or self._lost:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_call = None
        if self._busy or self._queue:
            self._touch()
            return
        log.info(
            "MLLP channel {channel}: closing connection from {remote} idle for {seconds} s",
            channel=self.channel.name,
            remote=self.remote,
            seconds=self.idle_timeout,
        )
        self.transport.loseConnection()

    def close(self, grace: float = 10.0) -> Deferred[None]:
        """
        Close once the message being handled is answered (at most C{grace} seconds), then
        abort; messages queued behind it are not taken (the device will resend them).
        Fires when the connection is gone.
        """
        d = self.when_lost()
        if self._lost:
            return d
        self._stop_reading = True
        self._queue.clear()
        abort = self.clock.callLater(grace, self._abort)
        d.addBoth(lambda r: (abort.cancel() if abort.active() else None, r)[1])
        if self._busy:
            self._close_when_idle = True
        else:
            self.transport.loseConnection()
        return d

    def _abort(self) -> None:
        if not self._lost:
            getattr(self.transport, "abortConnection", self.transport.loseConnection)()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self.connected = False
        self.channel.connections.discard(self)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        unanswered = sum(1 for kind, _ in self._queue if kind == "message") + int(self._busy)
        self._queue.clear()
        log.info(
            "MLLP channel {channel}: {remote} disconnected ({unanswered} message(s) unanswered)",
            channel=self.channel.name,
            remote=self.remote,
            unanswered=unanswered,
        )
        self._fire_lost_waiters()


# Header used to answer a frame that is not HL7 at all (no separators to borrow).
_FALLBACK_MSH = "MSH|^~\\&|||||||||P|2.5.1\r"


class MLLPChannel(Factory):
    """
    The application behind an MLLP listener of the agent: each message goes to
    C{forward(content_type, body, remote)} (which sends it up to the relay and fires with the
    cloud's L{Reply} or None), and the device is answered per C{mode}:

      - ``original``: the cloud's ACK is sent back as is; if the forward fails, times out or
        brings no HL7 answer, we send an ``AE`` ourselves (never silence).
      - ``enhanced``: ``CA`` once the forward has fired (the message is the agent's
        responsibility), then the cloud's application ACK per C{app_level_ack}
        (``AL`` always, ``NE`` never, ``ER`` only if not AA, ``SU`` only if AA; codes other
        than AA/AE/AR always); a failed forward gets ``CE``.
      - ``aa``: ``AA`` once the forward has fired, for senders that cannot do enhanced mode;
        the cloud's answer is not sent.

    A frame that is not a usable HL7 message gets an ``AR`` (``CR`` in enhanced mode) built
    by us, with MSA-2 set when the control id could be read; the connection stays up.
    Also the Twisted factory for the listener (``strports.service(endpoint, channel)``).
    """

    def __init__(
        self,
        forward: Callable[[str, str, str], Deferred[Reply | None]],
        *,
        mode: str = "original",
        encoding: str | None = None,
        app_level_ack: str = "AL",
        max_message_size: int = DEFAULT_MAX_SIZE,
        clock: IReactorTime,
        forward_timeout: float = 60.0,
        idle_timeout: float | None = None,
        max_queued: int = 64,
        name: str = "mllp",
    ) -> None:
        if mode not in CHANNEL_MODES:
            raise ValueError(f"MLLP channel mode must be one of {', '.join(CHANNEL_MODES)}")
        app_level_ack = app_level_ack.upper()
        if app_level_ack not in APP_LEVEL_ACKS:
            raise ValueError(f"appLevelAck must be one of {', '.join(APP_LEVEL_ACKS)}")
        if encoding is not None:
            encoding = hl7msg.check_codec(encoding)
        self.forward = forward
        self.mode = mode
        self.encoding = encoding
        self.app_level_ack = app_level_ack
        self.max_message_size = max_message_size
        self.clock = clock
        self.forward_timeout = forward_timeout
        self.idle_timeout = idle_timeout
        self.max_queued = max_queued
        self.name = name
        self.received = 0
        self.rejected = 0
        self.connections: set[MLLPServerProtocol] = set()

    def close_connections(self, grace: float = 10.0) -> Deferred[None]:
        """
        Close every device connection (after stopping the listener, on shutdown or reload):
        each finishes the message it is handling, for at most C{grace} seconds.
        """
        waits = [p.close(grace) for p in list(self.connections)]
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def buildProtocol(self, addr: Any) -> MLLPServerProtocol:
        p = MLLPServerProtocol(
            self,
            self.clock,
            max_message_size=self.max_message_size,
            max_queued=self.max_queued,
            idle_timeout=self.idle_timeout,
        )
        p.factory = self
        return p

    # -- per message

    def handle(self, payload: bytes, remote: str, respond: Respond) -> Deferred[None]:
        """
        Deal with one received frame: answer through C{respond} (zero or more times) and
        fire when done with it, so the connection can take the next one.  Never fails.
        """
        self.received += 1
        try:
            text = hl7msg.normalise(hl7msg.decode(payload, self.encoding))
            cid = hl7msg.control_id(text)
        except HL7Error as e:
            self._reject(payload, remote, respond, str(e))
            return succeed(None)
        codec = self._codec(text)
        log.info(
            "MLLP channel {channel}: {type} control id {control_id} from {remote} ({size} bytes)",
            channel=self.name,
            type=hl7msg.message_type(text),
            control_id=cid,
            remote=remote,
            size=len(payload),
        )
        done: Deferred[None] = Deferred()
        result = self._forward_with_timeout(text, remote, cid)
        result.addCallbacks(
            self._answered,
            self._forward_failed,
            callbackArgs=(text, cid, codec, remote, respond),
            errbackArgs=(text, cid, codec, remote, respond),
        )
        result.addErrback(
            lambda f: log.failure("MLLP channel {channel}: answering {control_id} failed", f,
                                  channel=self.name, control_id=cid)
        )
        result.addBoth(lambda _: done.callback(None))
        return done

    def _forward_with_timeout(self, text: str, remote: str, cid: str) -> Deferred[Reply | None]:
        out: Deferred[Reply | None] = Deferred()
        d = maybeDeferred(self.forward, HL7_V2, text, remote)

        def timed_out() -> None:
            if not out.called:
                out.errback(
                    Failure(
                        DeliveryError(f"no answer from the cloud within {self.forward_timeout:g} s")
                    )
                )

        timer = self.clock.callLater(self.forward_timeout, timed_out)

        def relay(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(outcome) if not isinstance(outcome, Failure) else out.errback(outcome)
            else:
                log.warn(
                    "MLLP channel {channel}: late cloud answer for {control_id} ignored (the "
                    "device was already answered)",
                    channel=self.name,
                    control_id=cid,
                )

        d.addBoth(relay)
        return out

    def _answered(
        self, reply: Any, text: str, cid: str, codec: str, remote: str, respond: Respond
    ) -> Deferred[None] | None:
        answer = getattr(reply, "answer", None)
        if isinstance(answer, Deferred):
            # Two stages (the agent's durable outbox): the message is on disk now, the
            # cloud's answer comes later.  Enhanced and AA modes answer the device at once
            # and move on to the next message; original mode waits for the cloud.
            if self.mode == "original":
                return answer.addCallbacks(
                    self._answered, self._forward_failed,
                    callbackArgs=(text, cid, codec, remote, respond),
                    errbackArgs=(text, cid, codec, remote, respond))
            code = "AA" if self.mode == "aa" else "CA"
            self._send(respond, hl7msg.build_ack(text, code), codec, cid, remote)
            if self.mode == "enhanced":
                answer.addCallback(self._late_app_ack, text, cid, codec, remote, respond)
            answer.addErrback(lambda f: log.warn(
                "MLLP channel {channel}: no cloud answer for {control_id}: {reason}",
                channel=self.name, control_id=cid, reason=f.getErrorMessage()))
            return None
        if self.mode == "aa":
            self._send(respond, hl7msg.build_ack(text, "AA"), codec, cid, remote)
            return
        if self.mode == "enhanced":
            self._send(respond, hl7msg.build_ack(text, "CA"), codec, cid, remote)
            body = self._cloud_ack(reply, cid)
            if body is not None and self._should_send_app_ack(body):
                self._send(respond, body, self._codec(body, codec), cid, remote)
            return
        body = self._cloud_ack(reply, cid)
        if body is None:
            body = hl7msg.build_ack(
                text, "AE", error="No HL7 acknowledgement from the receiving application"
            )
            self._send(respond, body, codec, cid, remote)
            return
        self._send(respond, body, self._codec(body, codec), cid, remote)

    def _late_app_ack(self, reply: Reply | None, text: str, cid: str, codec: str, remote: str,
                      respond: Respond) -> None:
        body = self._cloud_ack(reply, cid)
        if body is None:  # the Bot failed: the sender still learns it, per appLevelAck
            body = hl7msg.build_ack(
                text, "AE", error="No HL7 acknowledgement from the receiving application")
        if self._should_send_app_ack(body):
            self._send(respond, body, self._codec(body, codec), cid, remote)

    def _forward_failed(
        self, f: Failure, text: str, cid: str, codec: str, remote: str, respond: Respond
    ) -> None:
        reason = f.value.reason if isinstance(f.value, DeliveryError) else f.getErrorMessage()
        log.warn(
            "MLLP channel {channel}: could not forward control id {control_id} from {remote}: "
            "{reason}",
            channel=self.name,
            control_id=cid,
            remote=remote,
            reason=reason,
        )
        code = "CE" if self.mode == "enhanced" else "AE"
        nak = hl7msg.build_ack(text, code, error=f"Message not accepted: {reason}")
        self._send(respond, nak, codec, cid, remote)

    def _cloud_ack(self, reply: Reply | None, cid: str) -> str | None:
        """The cloud's answer as HL7 text, or None (logged) if there is nothing usable."""
        if reply is None:
            log.warn("MLLP channel {channel}: no answer from the cloud for {control_id}",
                     channel=self.name, control_id=cid)
            return None
        if reply.status_code >= 400:
            log.warn(
                "MLLP channel {channel}: cloud answered status {status} for {control_id}",
                channel=self.name,
                status=reply.status_code,
                control_id=cid,
            )
            return None
        try:
            body = hl7msg.normalise(reply.body)
        except HL7Error as e:
            log.warn(
                "MLLP channel {channel}: cloud answer for {control_id} is not HL7 ({error})",
                channel=self.name,
                control_id=cid,
                error=str(e),
            )
            return None
        try:
            ack = hl7msg.parse_ack(body)
        except HL7Error:
            # A response message without MSA: passed on as is, the device may expect it.
            log.info(
                "MLLP channel {channel}: cloud answer for {control_id} has no MSA; sent as is",
                channel=self.name,
                control_id=cid,
            )
            return body
        if ack.control_id != cid:
            log.warn(
                "MLLP channel {channel}: cloud ACK is for control id {ack_id}, not {control_id}",
                channel=self.name,
                ack_id=ack.control_id,
                control_id=cid,
            )
        return body

    def _should_send_app_ack(self, body: str) -> bool:
        try:
            code = hl7msg.parse_ack(body).code
        except HL7Error:
            return True
        if code not in ("AA", "AE", "AR"):
            return True
        if self.app_level_ack == "AL":
            return True
        if self.app_level_ack == "NE":
            return False
        if self.app_level_ack == "ER":
            return code != "AA"
        return code == "AA"  # SU

    def _codec(self, text: str, fallback: str = "utf-8") -> str:
        codec = self.encoding
        if codec is None:
            try:
                codec = hl7msg.charset(text)
            except HL7Error:
                codec = None
        codec = codec or fallback
        try:
            codec = hl7msg.check_codec(codec)
        except HL7Error:
            codec = fallback
        return fallback if codec.startswith(_WIDE_CODECS) else codec

    def _send(self, respond: Respond, text: str, codec: str, cid: str, remote: str) -> None:
        # The block characters cannot travel inside a frame; nothing legitimate contains them.
        text = text.replace("\x0b", "").replace("\x1c", "")
        try:
            payload = text.encode(codec)
        except UnicodeEncodeError:
            log.warn("MLLP channel {channel}: ACK for {control_id} not encodable as {codec}; "
                     "unencodable characters replaced", channel=self.name, control_id=cid,
                     codec=codec)
            payload = text.encode(codec, errors="replace")
        try:
            code = hl7msg.parse_ack(text).code
        except HL7Error:
            code = "-"
        log.info(
            "MLLP channel {channel}: {code} for control id {control_id} to {remote} ({size} bytes)",
            channel=self.name,
            code=code,
            control_id=cid,
            remote=remote,
            size=len(payload),
        )
        respond(payload)

    def _reject(self, payload: bytes, remote: str, respond: Respond, reason: str) -> None:
        """Answer an unusable frame with AR/CR built by us; MSA-2 carries MSH-10 if readable."""
        self.rejected += 1
        code = "CR" if self.mode == "enhanced" else "AR"
        text = payload.decode("latin-1")
        try:
            text = hl7msg.normalise(text)
            nak = hl7msg.build_ack(text, code, error=reason, error_code="101"
                                   if "MSH-10" in reason else "100")
        except HL7Error:
            nak = hl7msg.build_ack(_FALLBACK_MSH, code, error=reason, error_code="100")
        try:
            cid = hl7msg.control_id(text)
        except HL7Error:
            cid = ""
        log.warn(
            "MLLP channel {channel}: rejected a {size}-byte frame from {remote} (control id "
            "{control_id!r}): {reason}",
            channel=self.name,
            size=len(payload),
            remote=remote,
            control_id=cid,
            reason=reason,
        )
        self._send(respond, nak, self._codec(nak), cid, remote)

    def oversize_nak(self, limit: int) -> bytes:
        """The reject sent before closing a connection that sent a frame over C{limit}."""
        self.rejected += 1
        code = "CR" if self.mode == "enhanced" else "AR"
        nak = hl7msg.build_ack(
            _FALLBACK_MSH, code, error=f"Message larger than {limit} bytes", error_code="100"
        )
        return nak.encode("ascii")
