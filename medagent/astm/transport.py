"""
ASTM links to real devices: L{ASTMSender} pushes messages to analyzers (``astm://host:port``
over TCP, ``astm+serial:///dev/ttyUSB0?baudrate=9600...`` over a serial port) for the agent's
dispatcher, and L{ASTMChannel} listens on a TCP endpoint or a serial port for the messages an
analyzer sends (results, host queries) and forwards each complete one to the relay.

Both keep one long-lived L{ASTMLink} per device (instruments expect the line to stay up) and
both directions share it: a message the instrument sends while we hold the line (contention,
or simply between our pushes) is received and handed on, never dropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import attr
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, fail, maybeDeferred, succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.contenttypes import ASTM, JSON, PING
from medagent.delivery import DeliveryError, Reply
from medagent.astm import codec
from medagent.astm.link import ASTMLink, LinkConfig, LinkError
from medagent.destination import Destination, DestinationError, parse_destination

log = Logger()

SCHEME_TCP = "astm"
SCHEME_SERIAL = "astm+serial"
SCHEMES = (SCHEME_TCP, SCHEME_SERIAL)

#: Destination URL parameter -> (LinkConfig field, kind).  Timers are in seconds.
#: ``frameAttempts`` is E1381's sends of one frame; ``maxAttempts`` is not here: on every
#: scheme it is the agent queue's delivery attempts of the whole message.
_LINK_PARAMS = {
    "role": ("role", str),
    "enqTimeout": ("enq_timeout", float),
    "busyDelay": ("busy_delay", float),
    "maxEnqAttempts": ("max_enq_attempts", int),
    "contentionWait": ("contention_wait", float),
    "contentionRetry": ("contention_retry", float),
    "maxContentions": ("max_contentions", int),
    "ackTimeout": ("ack_timeout", float),
    "frameAttempts": ("max_attempts", int),
    "receiveTimeout": ("receive_timeout", float),
    "honourInterrupt": ("honour_interrupt", bool),
    "interruptHoldoff": ("interrupt_holdoff", float),
    "maxInterrupts": ("max_interrupts", int),
    "encoding": ("encoding", str),
}

_PARITIES = {"N": "N", "E": "E", "O": "O", "M": "M", "S": "S", "NONE": "N", "EVEN": "E",
             "ODD": "O", "MARK": "M", "SPACE": "S"}


@attr.s(frozen=True, auto_attribs=True)
class Framing:
    """How our messages are cut into frames for one device."""

    encoding: str = "latin-1"
    packed: bool = False
    max_text: int = codec.MAX_FRAME_TEXT


def link_settings(destination: Destination, base: LinkConfig) -> tuple[LinkConfig, Framing]:
    """
    The link and framing settings a destination URL asks for (``?ackTimeout=5&packed=1``);
    L{DestinationError} for values that make no sense.
    """
    changes: dict[str, Any] = {}
    for param, (name, kind) in _LINK_PARAMS.items():
        if destination.param(param) in (None, ""):
            continue
        if kind is float:
            value: Any = destination.float_param(param, 0.0)
            if value <= 0:
                raise DestinationError(f"{param} must be positive")
        elif kind is int:
            value = destination.int_param(param, 0)
            if value < 1:
                raise DestinationError(f"{param} must be at least 1")
        elif kind is bool:
            value = destination.bool_param(param, False)
        else:
            value = destination.param(param)
        changes[name] = value
    if "role" in changes and changes["role"] not in ("computer", "instrument"):
        raise DestinationError("role must be computer or instrument")
    try:
        config = attr.evolve(base, **changes)
    except (TypeError, ValueError) as e:
        raise DestinationError(f"bad ASTM link setting: {e}")
    encoding = config.encoding
    try:
        "".encode(encoding)
    except LookupError:
        raise DestinationError(f"unknown encoding {encoding!r}")
    max_text = destination.int_param("maxFrameText", codec.MAX_FRAME_TEXT)
    if max_text < 1:
        raise DestinationError("maxFrameText must be at least 1")
    return config, Framing(encoding, destination.bool_param("packed", False), max_text)


def serial_settings(destination: Destination) -> dict[str, Any]:
    """pyserial settings from ``?baudrate=9600&bytesize=8&parity=N&stopbits=1&rtscts=0&xonxoff=0``."""
    baudrate = destination.int_param("baudrate", 9600)
    if baudrate < 50 or baudrate > 4_000_000:
        raise DestinationError("baudrate out of range")
    bytesize = destination.int_param("bytesize", 8)
    if bytesize not in (5, 6, 7, 8):
        raise DestinationError("bytesize must be 5, 6, 7 or 8")
    parity = _PARITIES.get((destination.param("parity") or "N").upper())
    if parity is None:
        raise DestinationError("parity must be N, E, O, M or S")
    stopbits = destination.float_param("stopbits", 1)
    if stopbits not in (1, 1.5, 2):
        raise DestinationError("stopbits must be 1, 1.5 or 2")
    return {
        "baudrate": baudrate,
        "bytesize": bytesize,
        "parity": parity,
        "stopbits": int(stopbits) if stopbits != 1.5 else 1.5,
        "rtscts": int(destination.bool_param("rtscts", False)),
        "xonxoff": int(destination.bool_param("xonxoff", False)),
    }


def _serial_port_class() -> Any:
    from twisted.internet.serialport import SerialPort
    return SerialPort


def open_serial(link: ASTMLink, destination: Destination, reactor: Any,
                port_class: Any = None) -> Any:
    """Open the destination's serial device with C{link} on it (raises OSError-like errors)."""
    cls = port_class or _serial_port_class()
    return cls(link, destination.path, reactor, **serial_settings(destination))


class InboundHandler:
    """
    What we do with a complete message a device sent us: forward it (to the relay, durably)
    as ``x-application/astm`` and, when the answer is itself an ASTM message (a host-query
    answer from a Bot), send that back to the device on the same link.  Counts what is in
    flight so the link can answer ENQ with NAK ("busy") instead of piling messages up.
    """

    def __init__(self, forward: Callable[[str, str, str], Any], *, max_pending: int = 100,
                 reply_to_device: bool = True, name: str = "astm") -> None:
        self.forward = forward
        self.max_pending = max_pending
        self.reply_to_device = reply_to_device
        self.name = name
        self.pending = 0
        self.forwarded = 0

    def accept(self) -> bool:
        return self.pending < self.max_pending

    def handle(self, link: ASTMLink, framing: Framing, remote: str, text: str) -> Deferred:
        self.pending += 1
        self.forwarded += 1
        d = maybeDeferred(self.forward, ASTM, text, remote)

        def answered(reply: Any) -> None:
            body = getattr(reply, "body", None)
            if (not self.reply_to_device or reply is None or not isinstance(body, str)
                    or getattr(reply, "content_type", None) != ASTM or not body.strip()):
                return
            if not link.connected_:
                log.warn("ASTM {name}: answer for {remote} dropped, link is gone",
                         name=self.name, remote=remote)
                return
            sent = link.send_message(body, encoding=framing.encoding, packed=framing.packed,
                                     max_text=framing.max_text)
            sent.addErrback(lambda f: log.warn(
                "ASTM {name}: answer to {remote} not sent: {why}", name=self.name,
                remote=remote, why=f.getErrorMessage()))

        def failed(f: Failure) -> None:
            log.failure("ASTM {name}: forwarding a message from {remote} failed", f,
                        name=self.name, remote=remote)

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        return d.addCallbacks(answered, failed).addBoth(done)


class _Device:
    """One device's link, while connecting and while up."""

    def __init__(self, destination: Destination, framing: Framing) -> None:
        self.destination = destination
        self.framing = framing
        self.link: ASTMLink | None = None
        self.waiters: list[Deferred] = []
        self.connecting: Deferred | None = None
        self.lost: Deferred = Deferred()

    def settle(self, outcome: Any) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(self)


def _delivery_error(e: LinkError, destination: Destination) -> DeliveryError:
    where = destination.path if destination.scheme == SCHEME_SERIAL else \
        f"{destination.host}:{destination.port}"
    reason = f"ASTM {where}: {e.phase}: {e.reason}"
    return DeliveryError(reason, transient=e.transient, phase=e.phase)


class ASTMSender:
    """
    L{medagent.delivery.Sender} for ``astm://host:port`` (TCP client) and
    ``astm+serial:///dev/...`` (serial port).  A message (records separated by CR or LF) is
    accepted once every frame was ACKed and EOT sent; the reply is JSON
    ``{"frames": N, "records": M, "retransmissions": R}``.  Failures are L{DeliveryError}s
    naming the phase (``encode``, ``connect``, ``establishment``, ``transfer``,
    ``connection``) and why.  The link stays up between messages; a lost one is made again
    for the next message (a missing serial port is retried after each of
    C{open_retry_delays} first).

    C{on_inbound(content_type, body, remote)}: where messages the device sends us go (with
    it, a device's ENQ is answered; without it, it is answered NAK so the device keeps its
    message).
    """

    schemes = SCHEMES

    def __init__(
        self,
        reactor: Any,
        *,
        on_inbound: Callable[[str, str, str], Any] | None = None,
        link_config: LinkConfig | None = None,
        connect_timeout: float = 10.0,
        open_retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0),
        ping_timeout: float = 5.0,
        max_pending_inbound: int = 100,
        serial_port_class: Any = None,
    ) -> None:
        self._reactor = reactor
        self._base = link_config or LinkConfig()
        self._connect_timeout = connect_timeout
        self._open_retry_delays = tuple(open_retry_delays)
        self._ping_timeout = ping_timeout
        self._serial_port_class = serial_port_class
        self._inbound = InboundHandler(on_inbound, max_pending=max_pending_inbound,
                                       name="sender") if on_inbound is not None else None
        self._devices: dict[str, _Device] = {}
        self._closing = False

    # ------------------------------------------------------------------ Sender

    def send(self, destination: Destination, content_type: str, body: str,
             options: Mapping[str, Any] | None = None) -> Deferred:
        if content_type != ASTM:
            return fail(DeliveryError(
                f"ASTM destinations take {ASTM}, not {content_type}", transient=False,
                phase="encode"))
        try:
            config, framing = self._settings(destination)
            frames, records = codec.prepare_message(
                body, encoding=framing.encoding, packed=framing.packed,
                max_text=framing.max_text)
        except (DestinationError, codec.ASTMError) as e:
            return fail(DeliveryError(f"ASTM: {e}", transient=False, phase="encode"))

        def go(device: _Device) -> Deferred:
            assert device.link is not None
            log.info("ASTM push to {target}: {frames} frames, {records} records",
                     target=self._target(destination), frames=len(frames), records=records)
            return device.link.send_frames(frames, records)

        def sent(result: Any) -> Reply:
            body = json.dumps({"frames": result.frames, "records": result.records,
                               "retransmissions": result.retransmissions})
            return Reply(body, JSON, detail=f"{result.frames} frames ACKed")

        d = self._device(destination, config, framing)
        return d.addCallback(go).addCallbacks(sent, lambda f: self._failed(f, destination))

    def ping(self, destination: Destination) -> Deferred:
        """ENQ probe: ACK (then EOT), NAK (busy) or ENQ (the device is sending) all mean 'there'."""
        try:
            config, framing = self._settings(destination)
        except DestinationError as e:
            return fail(DeliveryError(f"ASTM: {e}", transient=False, phase="destination"))
        started = self._reactor.seconds()
        target = self._target(destination)

        def answered(reply: str) -> Reply:
            rtt_ms = (self._reactor.seconds() - started) * 1000
            text = {"ACK": "ENQ answered ACK", "NAK": "ENQ answered NAK (device busy)",
                    "ENQ": "device is sending (contention)",
                    "BUSY": "link busy with a transfer"}[reply]
            return Reply(f"PING {target}: {text} in {rtt_ms:.1f} ms", PING,
                         detail=f"{rtt_ms:.3f}")

        d = self._device(destination, config, framing)
        d.addCallback(lambda device: device.link.probe(timeout=self._ping_timeout))
        return d.addCallbacks(answered, lambda f: self._failed(f, destination))

    def close(self) -> Deferred:
        """Drop every link; what is in flight fails (transient)."""
        self._closing = True
        waits = []
        for device in list(self._devices.values()):
            waits.append(device.lost)
            if device.connecting is not None:
                device.connecting.cancel()
            elif device.link is not None and device.link.transport is not None:
                device.link.transport.loseConnection()
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # ------------------------------------------------------------------ links

    def _settings(self, destination: Destination) -> tuple[LinkConfig, Framing]:
        if destination.scheme not in SCHEMES:
            raise DestinationError(f"not an ASTM destination: {destination.scheme}://")
        if destination.scheme == SCHEME_TCP and not destination.port:
            raise DestinationError("astm:// destination needs host:port")
        if destination.scheme == SCHEME_SERIAL:
            serial_settings(destination)
        return link_settings(destination, self._base)

    @staticmethod
    def _target(destination: Destination) -> str:
        if destination.scheme == SCHEME_SERIAL:
            return destination.path
        return f"{destination.host}:{destination.port}"

    def _failed(self, f: Failure, destination: Destination) -> Failure:
        if f.check(LinkError):
            raise _delivery_error(f.value, destination)
        return f

    def _device(self, destination: Destination, config: LinkConfig,
                framing: Framing) -> Deferred:
        """Fires with the device once its link is up, connecting (or opening) when needed."""
        if self._closing:
            return fail(DeliveryError("ASTM sender is closed", phase="connect"))
        device = self._devices.get(destination.key)
        if device is not None and device.link is not None and device.link.connected_:
            return succeed(device)
        waiter: Deferred = Deferred()
        if device is not None and device.connecting is not None:
            device.waiters.append(waiter)
            return waiter
        device = _Device(destination, framing)
        device.waiters.append(waiter)
        self._devices[destination.key] = device
        inbound = self._inbound
        remote = destination.url

        def on_message(text: str) -> None:
            assert inbound is not None and device.link is not None
            inbound.handle(device.link, framing, remote, text)

        device.link = ASTMLink(
            self._reactor, config,
            on_message=on_message if inbound is not None else None,
            accept_inbound=inbound.accept if inbound is not None else (lambda: False),
            on_lost=lambda link, why: self._lost(device),
            name=self._target(destination),
        )
        if destination.scheme == SCHEME_TCP:
            device.connecting = self._connect_tcp(device)
        else:
            device.connecting = self._open_serial(device)

        def up(_: Any) -> None:
            device.connecting = None
            device.settle(device)

        def down(f: Failure) -> None:
            device.connecting = None
            if f.check(CancelledError):
                f = Failure(DeliveryError("ASTM sender closed while connecting",
                                          phase="connect"))
            self._lost(device)
            device.settle(f)

        device.connecting.addCallbacks(up, down)
        return waiter

    def _lost(self, device: _Device) -> None:
        if self._devices.get(device.destination.key) is device:
            del self._devices[device.destination.key]
        if not device.lost.called:
            device.lost.callback(None)

    def _connect_tcp(self, device: _Device) -> Deferred:
        dest = device.destination
        endpoint = HostnameEndpoint(self._reactor, dest.host, dest.port,
                                    timeout=self._connect_timeout)
        d = connectProtocol(endpoint, device.link)

        def failed(f: Failure) -> Failure:
            if f.check(CancelledError):
                return f
            raise DeliveryError(f"ASTM {dest.host}:{dest.port}: connect: {f.getErrorMessage()}",
                                phase="connect")

        return d.addCallbacks(lambda _: None, failed)

    def _open_serial(self, device: _Device) -> Deferred:
        """Open the port; a missing port is tried again after each of C{open_retry_delays}."""
        dest = device.destination
        delays = list(self._open_retry_delays)
        pending: list[IDelayedCall] = []

        def cancel(d: Deferred) -> None:
            for call in pending:
                if call.active():
                    call.cancel()
            pending.clear()
            d.errback(CancelledError())

        result: Deferred = Deferred(cancel)

        def attempt() -> None:
            pending.clear()
            try:
                open_serial(device.link, dest, self._reactor, self._serial_port_class)
            except Exception as e:  # SerialException, OSError: missing, busy, no permission
                if delays:
                    log.info("ASTM serial {path} not available ({why}); trying again",
                             path=dest.path, why=str(e))
                    pending.append(self._reactor.callLater(delays.pop(0), attempt))
                    return
                result.errback(DeliveryError(
                    f"ASTM {dest.path}: connect: serial port missing or unusable: {e}",
                    phase="connect"))
                return
            result.callback(None)

        attempt()
        return result


class _LinkFactory(Factory):
    def __init__(self, channel: "ASTMChannel") -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> ASTMLink:
        remote = f"astm://{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"
        return self.channel._new_link(remote)


class ASTMChannel(Service):
    """
    Inbound ASTM: listens on a TCP endpoint string (``tcp:15210:interface=127.0.0.1``) or
    holds a serial port open (``astm+serial:///dev/ttyS0?baudrate=9600`` or a device path,
    reopened with backoff when it disappears), receives what the analyzer sends and calls
    C{forward('x-application/astm', message, remote)} once per complete message (H..L).
    When the forward fires with an ASTM reply (a host-query answer), it goes back to the
    analyzer on the same link.
    """

    def __init__(
        self,
        forward: Callable[[str, str, str], Any],
        *,
        reactor: Any,
        endpoint: str | None = None,
        serial: str | None = None,
        link_config: LinkConfig | None = None,
        max_pending: int = 100,
        reply_to_device: bool = True,
        reopen_delay: float = 1.0,
        max_reopen_delay: float = 30.0,
        name: str = "astm",
        serial_port_class: Any = None,
    ) -> None:
        if (endpoint is None) == (serial is None):
            raise ValueError("ASTMChannel needs exactly one of endpoint or serial")
        self.name = name
        self._reactor = reactor
        self._endpoint = endpoint
        self._serial_dest: Destination | None = None
        base = link_config or LinkConfig()
        self._config = base
        self._framing = Framing(encoding=base.encoding)
        if serial is not None:
            url = serial if "://" in serial else f"astm+serial://{serial}"
            self._serial_dest = parse_destination(url, needs_port=False)
            serial_settings(self._serial_dest)
            self._config, self._framing = link_settings(self._serial_dest, base)
        self.inbound = InboundHandler(forward, max_pending=max_pending,
                                      reply_to_device=reply_to_device, name=name)
        self._reopen_delay = reopen_delay
        self._max_reopen_delay = max_reopen_delay
        self._serial_port_class = serial_port_class
        self.links: set[ASTMLink] = set()
        self.port: IListeningPort | None = None
        self._listening: Deferred | None = None
        self._listen_error: Failure | None = None
        self._reopen_call: IDelayedCall | None = None
        self._delay = reopen_delay
        self._serial_transport: Any = None
        self._stopped: list[Deferred] = []

    # ------------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        if self._endpoint is not None:
            ep = serverFromString(self._reactor, self._endpoint)
            self._listening = ep.listen(_LinkFactory(self))
            self._listening.addCallbacks(self._listened, self._listen_failed)
        else:
            self._open()

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        log.info("ASTM channel {name} listening on {endpoint}", name=self.name,
                 endpoint=self._endpoint)

    def _listen_failed(self, f: Failure) -> None:
        self._listen_error = f
        log.failure("ASTM channel {name}: cannot listen on {endpoint}", f, name=self.name,
                    endpoint=self._endpoint)

    def when_listening(self) -> Deferred:
        """Fires with the listening port (TCP) once it is bound, or fails why it is not."""
        if self._listening is None:
            return fail(RuntimeError("not a TCP channel or not started"))
        d: Deferred = Deferred()

        def ready(_: Any) -> None:
            if self.port is not None:
                d.callback(self.port)
            else:
                d.errback(self._listen_error or RuntimeError("channel stopped"))

        self._listening.addCallback(ready)
        return d

    def stopService(self) -> Deferred:
        super().stopService()
        waits: list[Deferred] = []
        if self._reopen_call is not None and self._reopen_call.active():
            self._reopen_call.cancel()
        self._reopen_call = None
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        for link in list(self.links):
            if link.transport is not None:
                d: Deferred = Deferred()
                self._stopped.append(d)
                waits.append(d)
                link.transport.loseConnection()
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # ------------------------------------------------------------------ links

    def _new_link(self, remote: str) -> ASTMLink:
        framing = self._framing

        def on_message(text: str) -> None:
            self.inbound.handle(link, framing, remote, text)

        link = ASTMLink(self._reactor, self._config, on_message=on_message,
                        accept_inbound=self.inbound.accept, on_lost=self._link_lost,
                        name=f"{self.name} {remote}")
        self.links.add(link)
        return link

    def _link_lost(self, link: ASTMLink, reason: Failure) -> None:
        self.links.discard(link)
        if not self.links:
            stopped, self._stopped = self._stopped, []
            for d in stopped:
                d.callback(None)
        if self._serial_dest is not None and self.running:
            log.warn("ASTM channel {name}: serial port {path} lost; reopening",
                     name=self.name, path=self._serial_dest.path)
            self._serial_transport = None
            self._schedule_reopen()

    def _open(self) -> None:
        self._reopen_call = None
        if not self.running:
            return
        dest = self._serial_dest
        assert dest is not None
        link = self._new_link(dest.url)
        try:
            self._serial_transport = open_serial(link, dest, self._reactor,
                                                 self._serial_port_class)
        except Exception as e:
            self.links.discard(link)
            log.warn("ASTM channel {name}: cannot open {path} ({why}); again in {delay} s",
                     name=self.name, path=dest.path, why=str(e), delay=self._delay)
            self._schedule_reopen()
            return
        self._delay = self._reopen_delay
        log.info("ASTM channel {name}: serial port {path} open", name=self.name,
                 path=dest.path)

    def _schedule_reopen(self) -> None:
        if self._reopen_call is not None and self._reopen_call.active():
            return
        delay = self._delay
        self._delay = min(self._delay * 2, self._max_reopen_delay)
        self._reopen_call = self._reactor.callLater(delay, self._open)
