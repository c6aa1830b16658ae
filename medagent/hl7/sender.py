"""
The ``mllp://`` and ``mllps://`` sender of the agent (L{MLLPSender}): per-destination
settings, one pooled connection per device, what is learned about a device that closes after
each ACK, and the default endpoint (TCP, or TLS with the agent's own certificate files).

The wire conversation of one connection is L{medagent.hl7.client.MLLPClientProtocol}; this
module decides which connection a message goes on and never writes a message twice.
Message content is patient data: logs carry control ids, sizes and peers, never the text.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import attr
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    fail,
    succeed,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import ClientEndpoint, DelayedCall
from medagent.contenttypes import HL7_V2
from medagent.delivery import BEFORE_WRITE, DeliveryError, Reply
from medagent.net import tcp_ping
from medagent.destination import Destination, DestinationError
from medagent.hl7 import message as hl7msg
from medagent.hl7.client import (
    CLOSE_AFTER_ACK_WINDOW,
    RETURN_ACK_MODES,
    MLLPClientProtocol,
    NotSent,
    _ClientFactory,
)
from medagent.hl7.message import HL7Error
from medagent.hl7.mllp import DEFAULT_MAX_SIZE, WIDE_CODECS, FramingError, frame

log = Logger()

# A device that closes within CLOSE_AFTER_ACK_WINDOW of its last ACK (see client.py) is taken
# to close after every message (hl7apy's MLLPServer does), and we stop reusing connections to
# it rather than race its close with our next write; but only once that was seen on this many
# connections in a row (no connection reused in between): one close right after an ACK is
# also what a device crash looks like.
CLOSE_AFTER_ACK_CONFIRMATIONS = 2

# And not for good: while it is learned, each connection is kept for CLOSE_AFTER_ACK_WINDOW
# after its ACK (never written to again); a device that leaves it open that long keeps its
# connections after all (reconfigured, replaced) and gets a persistent one again.

# Before a connection is reused for the first time we wait this long, so that a device that
# closes after every ACK has shown it (its close arrives) before we write into a dying socket.
# Paid once per connection; later reuses only wait two reactor turns.
FIRST_REUSE_GRACE = 0.05


@attr.s(frozen=True, auto_attribs=True)
class MLLPSettings:
    """
    Per-destination settings, from the URL's query and the per-message options.  Parsed (and
    range-checked) once per message, before anything is opened, so that a bad parameter is
    the caller's permanent error (phase ``destination``), never a half-sent message.
    """

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
    """
    The pooled connection of one device and what we learned about it.  Its lock keeps a
    device to one message at a time even without the dispatcher's lanes, so that two sends
    never share (and confuse) one connection.
    """

    key: str
    lock: DeferredLock = attr.ib(factory=DeferredLock)
    proto: MLLPClientProtocol | None = None
    #: what the pooled connection was opened with (scheme, TLS settings): a message asking
    #: for another transport to the same device gets a new connection
    transport: tuple[Any, ...] | None = None
    idle_timer: DelayedCall | None = None
    connecting: Deferred | None = None
    closes_after_ack: bool = False
    #: connections in a row that the device closed right after an ACK
    closed_after_ack_seen: int = 0


EndpointFactory = Callable[[Destination, MLLPSettings], ClientEndpoint]


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
        self._sleeps: dict[Deferred[None], DelayedCall] = {}
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
        """Deliver one HL7 message; fire with the device's ACK as a L{Reply}."""
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
        """A TCP connect to the device (no HL7 is sent): can it be reached at all."""
        try:
            ct = destination.float_param("connectTimeout", self.connect_timeout)
        except DestinationError as e:
            return fail(DeliveryError(str(e), transient=False, phase="destination"))
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
        all_closed = DeferredList(waits, consumeErrors=True)
        all_closed.addTimeout(5.0, self._reactor)
        return all_closed.addBoth(lambda _: None)

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
        if codec.startswith(WIDE_CODECS):
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
        if ack_codec.startswith(WIDE_CODECS):
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
    ) -> ClientEndpoint:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        endpoint = HostnameEndpoint(
            self._reactor, destination.host, destination.require_port(),
            timeout=settings.connect_timeout,
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
        # HostnameEndpoint provides IStreamClientEndpoint via @implementer, which mypy cannot see.
        return wrapClientTLS(options, endpoint)  # type: ignore[arg-type]

    def _pem(self, path: str) -> bytes:
        # Small local files, read once per path.
        if path not in self._pem_cache:
            try:
                with open(path, "rb") as f:
                    self._pem_cache[path] = f.read(1024 * 1024)
            except OSError as e:
                raise DestinationError(f"cannot read {path}: {e.strerror}")
        return self._pem_cache[path]
