"""
Outbound ASTM: L{ASTMSender} pushes messages to analyzers (``astm://host:port`` over TCP,
``astm+serial:///dev/ttyUSB0?baudrate=9600...`` over a serial port) for the agent's
dispatcher.

It keeps one long-lived L{ASTMLink} per device (instruments expect the line to stay up) and
both directions share it: a message the instrument sends while we hold the line
(contention, or simply between our pushes) is received and handed on, never dropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, fail, succeed,
)
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import ClientEndpoint, maybe_transport
from medagent.contenttypes import ASTM, JSON, PING
from medagent.delivery import DeliveryError, Reply
from medagent.astm import codec
from medagent.astm.channel import InboundHandler
from medagent.astm.link import ASTMLink, LinkConfig, LinkError
from medagent.astm.serial import SerialClientEndpoint, connect_with_backoff, reopen_policy
from medagent.astm.settings import (
    SCHEME_SERIAL, SCHEME_TCP, SCHEMES, Framing, link_settings, serial_settings, target,
)
from medagent.destination import Destination, DestinationError

log = Logger()


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


class _GivenLink(Factory):
    """Hands the endpoint the device's link (what C{connectProtocol} does for one try)."""

    def __init__(self, link: Protocol) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.link


def _delivery_error(e: LinkError, destination: Destination) -> DeliveryError:
    reason = f"ASTM {target(destination)}: {e.phase}: {e.reason}"
    return DeliveryError(reason, transient=e.transient, phase=e.phase)


class ASTMSender:
    """
    L{medagent.delivery.Sender} for ``astm://host:port`` (TCP client) and
    ``astm+serial:///dev/...`` (serial port).  A message (records separated by CR or LF) is
    accepted once every frame was ACKed and EOT sent; the reply is JSON
    ``{"frames": N, "records": M, "retransmissions": R}``.  Failures are L{DeliveryError}s
    naming the phase (``encode``, ``connect``, ``establishment``, ``transfer``,
    ``connection``) and why.  The link stays up between messages; a lost one is made again
    for the next message (a missing serial port is tried C{open_retries} more times first,
    waiting C{open_backoff(n)} before the C{n}th retry).

    Opens on demand, not in the background, because a device that is gone fails its
    message at once and the agent's durable queue owns when to try again.

    C{on_inbound(content_type, body, remote)}: where messages the device sends us go (with
    it, a device's ENQ is answered; without it, it is answered NAK so the device keeps its
    message).  C{endpoint_factory(destination)}: the client endpoint to reach a device by
    (default C{HostnameEndpoint} or L{SerialClientEndpoint}); tests pass an in-memory one
    and a C{Clock} as C{reactor}.
    """

    schemes = SCHEMES

    def __init__(
        self,
        reactor: Any,
        *,
        on_inbound: Callable[[str, str, str], Any] | None = None,
        link_config: LinkConfig | None = None,
        connect_timeout: float = 10.0,
        open_retries: int = 3,
        open_backoff: Callable[[int], float] | None = None,
        ping_timeout: float = 5.0,
        max_pending_inbound: int = 100,
        endpoint_factory: Callable[[Destination], ClientEndpoint] | None = None,
    ) -> None:
        self._reactor = reactor
        self._base = link_config or LinkConfig()
        self._connect_timeout = connect_timeout
        if open_retries < 0:
            raise ValueError("open_retries must not be negative")
        self._open_retries = open_retries
        self._open_backoff = open_backoff or reopen_policy(0.5, 2.0)
        self._ping_timeout = ping_timeout
        self._endpoint_factory = endpoint_factory or self._default_endpoint
        self._inbound = InboundHandler(on_inbound, max_pending=max_pending_inbound,
                                       name="sender") if on_inbound is not None else None
        self._devices: dict[str, _Device] = {}
        self._closing = False

    # ------------------------------------------------------------------ Sender

    def send(self, destination: Destination, content_type: str, body: str,
             options: Mapping[str, Any] | None = None) -> Deferred:
        """Push one message; fires with a L{Reply} once it is accepted (see the class)."""
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
                     target=target(destination), frames=len(frames), records=records)
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
        where = target(destination)

        def answered(reply: str) -> Reply:
            rtt_ms = (self._reactor.seconds() - started) * 1000
            text = {"ACK": "ENQ answered ACK", "NAK": "ENQ answered NAK (device busy)",
                    "ENQ": "device is sending (contention)",
                    "BUSY": "link busy with a transfer"}[reply]
            return Reply(f"PING {where}: {text} in {rtt_ms:.1f} ms", PING,
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
            elif device.link is not None and (
                    transport := maybe_transport(device.link)) is not None:
                transport.loseConnection()
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

    def _default_endpoint(self, destination: Destination) -> ClientEndpoint:
        if destination.scheme == SCHEME_SERIAL:
            return SerialClientEndpoint(self._reactor, destination.path,
                                        serial_settings(destination))
        return HostnameEndpoint(self._reactor, destination.host, destination.require_port(),
                                timeout=self._connect_timeout)

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
            name=target(destination),
        )
        device.connecting = self._connect(device)

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

    def _connect(self, device: _Device) -> Deferred:
        """
        Connect (TCP: once) or open (serial: a missing port is tried again
        C{open_retries} times); fails with a L{DeliveryError} of phase ``connect``.
        """
        dest = device.destination
        assert device.link is not None
        serial = dest.scheme == SCHEME_SERIAL
        try:
            d = connect_with_backoff(
                self._reactor, self._endpoint_factory(dest), _GivenLink(device.link),
                attempts=1 + self._open_retries if serial else 1,
                policy=self._retry_delay(dest))
        except Exception:
            d = fail()

        def failed(f: Failure) -> Failure:
            if f.check(CancelledError):
                return f
            if serial:
                raise DeliveryError(
                    f"ASTM {dest.path}: connect: serial port missing or unusable: "
                    f"{f.getErrorMessage()}", phase="connect")
            raise DeliveryError(f"ASTM {dest.host}:{dest.port}: connect: {f.getErrorMessage()}",
                                phase="connect")

        return d.addCallbacks(lambda _: None, failed)

    def _retry_delay(self, destination: Destination) -> Callable[[int], float]:
        policy = self._open_backoff

        def delay(attempt: int) -> float:
            seconds = policy(attempt)
            log.info("ASTM serial {path} not available; trying again in {delay} s",
                     path=destination.path, delay=seconds)
            return seconds

        return delay
