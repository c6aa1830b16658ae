"""
Inbound ASTM: L{ASTMChannel} listens on a TCP endpoint or holds a serial port open for what
an analyzer sends (results, host queries) and hands each complete message to
L{InboundHandler}, which forwards it to the relay and sends an ASTM answer (a host-query
answer from a Bot) back on the same link.

A serial line is a C{ClientService} over L{medagent.astm.serial.SerialClientEndpoint}: when
the port disappears it is opened again with the backoff of
L{medagent.astm.serial.reopen_policy}, the way a TCP client reconnects.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from medagent._twisted import ClientEndpoint, ListeningPort, ProtocolFactory, maybe_transport
from medagent.contenttypes import ASTM
from medagent.astm.link import ASTMLink, LinkConfig
from medagent.astm.serial import SerialClientEndpoint, no_jitter, reopen_policy
from medagent.astm.settings import Framing, link_settings, serial_settings
from medagent.destination import Destination, parse_destination

log = Logger()


class InboundHandler:
    """
    What we do with a complete message a device sent us: forward it (to the relay, durably)
    as ``x-application/astm`` and, when the answer is itself an ASTM message (a host-query
    answer from a Bot), send that back to the device on the same link.  Counts what is in
    flight so the link can answer ENQ with NAK ("busy") instead of piling messages up.

    One class for the channel and the sender's links alike, because an instrument sends on
    whichever link it has, and what it sends must be treated the same either way.
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
        """Whether another message can be taken now (else the device's ENQ gets NAK)."""
        return self.pending < self.max_pending

    def handle(self, link: ASTMLink, framing: Framing, remote: str, text: str) -> Deferred:
        """Forward C{text}; fires (never fails) once it is forwarded and any answer queued."""
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


class _LinkFactory(Factory):
    """Accepted TCP connections: one link each, named by the analyzer's address."""

    def __init__(self, channel: "ASTMChannel") -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> ASTMLink:
        remote = f"astm://{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"
        return self.channel._new_link(remote)


class _SerialLinkFactory(Factory):
    """The serial line: a fresh link for each time the port is opened."""

    def __init__(self, channel: "ASTMChannel", remote: str) -> None:
        self.channel = channel
        self.remote = remote

    def buildProtocol(self, addr: Any) -> ASTMLink:
        link = self.channel._new_link(self.remote)
        self.channel._opening = link
        return link


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Says why an open failed (C{ClientService} only says it will try again)."""

    def __init__(self, endpoint: ClientEndpoint,
                 failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def __repr__(self) -> str:
        return repr(self._endpoint)

    def connect(self, protocolFactory: ProtocolFactory) -> Deferred[Any]:
        def report(f: Failure) -> Failure:
            if not f.check(CancelledError):
                self._failed(f)
            return f

        return self._endpoint.connect(protocolFactory).addErrback(report)


class ASTMChannel(Service):
    """
    Inbound ASTM: listens on a TCP endpoint string (``tcp:15210:interface=127.0.0.1``) or
    holds a serial port open (``astm+serial:///dev/ttyS0?baudrate=9600`` or a device path,
    reopened with backoff when it disappears), receives what the analyzer sends and calls
    C{forward('x-application/astm', message, remote)} once per complete message (H..L).
    When the forward fires with an ASTM reply (a host-query answer), it goes back to the
    analyzer on the same link.

    A service of its own (not a C{strports.service}) because a serial port is not a listening
    endpoint: the channel owns the C{ClientService} that keeps the line open.
    C{serial_endpoint(destination)} builds the serial line's endpoint (default
    L{SerialClientEndpoint}); C{reopen_jitter} is the backoff's jitter.
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
        reopen_jitter: Callable[[], float] | None = None,
        name: str = "astm",
        serial_endpoint: Callable[[Destination], ClientEndpoint] | None = None,
    ) -> None:
        if (endpoint is None) == (serial is None):
            raise ValueError("ASTMChannel needs exactly one of endpoint or serial")
        # Twisted's Service says ``name = None``, which mypy takes as the type None.
        self.name = name  # type: ignore[assignment]
        self._reactor = reactor
        self._endpoint = endpoint
        self._serial_dest: Destination | None = None
        base = link_config or LinkConfig()
        self._config = base
        self._framing = Framing(encoding=base.encoding)
        self._client: ClientService | None = None
        if serial is not None:
            url = serial if "://" in serial else f"astm+serial://{serial}"
            self._serial_dest = parse_destination(url, needs_port=False)
            settings = serial_settings(self._serial_dest)
            self._config, self._framing = link_settings(self._serial_dest, base)
            line = (serial_endpoint(self._serial_dest) if serial_endpoint is not None else
                    SerialClientEndpoint(reactor, self._serial_dest.path, settings))
            policy = reopen_policy(reopen_delay, max_reopen_delay,
                                   jitter=reopen_jitter or no_jitter)
            # Both provide the interfaces ClientService wants via @implementer / Factory,
            # which mypy cannot see.
            self._client = ClientService(
                _ReportingEndpoint(line, self._open_failed),  # type: ignore[arg-type]
                _SerialLinkFactory(self, self._serial_dest.url),  # type: ignore[arg-type]
                retryPolicy=policy, clock=reactor, prepareConnection=self._opened)
        self.inbound = InboundHandler(forward, max_pending=max_pending,
                                      reply_to_device=reply_to_device, name=name)
        self.links: set[ASTMLink] = set()
        self.port: ListeningPort | None = None
        self._listening: Deferred | None = None
        self._listen_error: Failure | None = None
        self._opening: ASTMLink | None = None
        self._stopped: list[Deferred] = []

    # ------------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        if self._client is not None:
            self._client.startService()
            return
        ep = serverFromString(self._reactor, self._endpoint)
        self._listening = ep.listen(_LinkFactory(self))
        self._listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: ListeningPort) -> None:
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
        if self._client is not None and self._client.running:
            waits.append(self._client.stopService())
        if self.port is not None:
            waits.append(maybeDeferred(self.port.stopListening))
            self.port = None
        for link in list(self.links):
            transport = maybe_transport(link)
            if transport is not None:
                d: Deferred = Deferred()
                self._stopped.append(d)
                waits.append(d)
                transport.loseConnection()
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

    def _opened(self, protocol: Any) -> None:
        self._opening = None
        assert self._serial_dest is not None
        log.info("ASTM channel {name}: serial port {path} open", name=self.name,
                 path=self._serial_dest.path)

    def _open_failed(self, f: Failure) -> None:
        if self._opening is not None and not self._opening.connected_:
            self.links.discard(self._opening)
        self._opening = None
        assert self._serial_dest is not None
        log.warn("ASTM channel {name}: cannot open {path} ({why}); trying again",
                 name=self.name, path=self._serial_dest.path, why=f.getErrorMessage())
