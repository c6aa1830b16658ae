"""
The ``/ws/agent`` websocket: a thin autobahn adapter between frames and the L{Hub}.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import txaio

txaio.use_twisted()

from autobahn.twisted.resource import WebSocketResource  # noqa: E402
from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from medagent import _autobahn, wire  # noqa: E402, F401 (_autobahn: its debug lines lazy)
from medagent.net import no_delay  # noqa: E402
from medagent.relay.hub import Hub, Session  # noqa: E402

log = Logger()



#: Largest frame/message a socket may send before it has authenticated: an
#: ``agent:connect:request`` is well under 4 KiB.
PRE_AUTH_MAX_MESSAGE = 64 * 1024
#: Sockets open and not yet authenticated, at most: in all, and from one address.
DEFAULT_MAX_PENDING = 512
DEFAULT_MAX_PENDING_PER_PEER = 32
#: Seconds the listening ports stay paused at most while the pending sockets are at their
#: limit (L{AcceptGate}): HTTP callers queued behind a connect storm wait no longer.
MAX_ACCEPT_PAUSE = 1.0


def _host(transport: Any) -> str:
    try:
        return str(transport.getPeer().host)
    except Exception:
        return "?"


class AcceptGate:
    """
    Bounds the handshake work a connect storm brings: while C{high} websockets wait to
    authenticate, the relay's listening ports stop accepting, until fewer than C{low} wait
    (or C{max_pause} seconds have passed).

    Why: each socket the relay accepts costs it an HTTP parse, a websocket handshake and, at
    the limit, a refusal.  When a fleet reconnects at once (after a relay restart), accepting
    every socket only to refuse most, or to answer them after their own opening-handshake
    timeout, spends the relay's time on sockets that never connect, and the storm feeds
    itself.  Not accepted, they wait in the kernel's listen queue at no cost, and beyond it
    their SYNs go unanswered, so their TCP stacks retry with their own backoff.  A pause
    ends after C{max_pause} at the latest (then a socket beyond the limit is refused as
    before), so HTTP callers queued behind the agents wait that long at most.
    """

    def __init__(self, clock: Any, high: int, low: int | None = None,
                 max_pause: float = MAX_ACCEPT_PAUSE) -> None:
        if high < 1:
            raise ValueError("the pending-socket limit must be positive")
        self.clock = clock
        self.high = high
        self.low = low if low is not None else max(1, high * 3 // 4)
        self.max_pause = max_pause
        self.ports: list[Any] = []
        self.paused = False
        #: how many times the ports were paused (for logs and tests)
        self.pauses = 0
        self._resume_call: Any = None
        #: after a pause ran out at the limit: no new pause before this (clock seconds)
        self._open_until = 0.0

    def add_port(self, port: Any) -> None:
        """A listening port (a L{twisted.internet.tcp.Port}) to pause and resume."""
        self.ports.append(port)
        if self.paused:
            self._stop(port)

    def changed(self, pending: int) -> None:
        """The number of sockets waiting to authenticate is now C{pending}."""
        if not self.paused and pending >= self.high and self.clock.seconds() >= self._open_until:
            self.paused = True
            self.pauses += 1
            for port in self.ports:
                self._stop(port)
            self._resume_call = self.clock.callLater(self.max_pause, self._time_up)
        elif pending < self.low:
            self._open_until = 0.0
            if self.paused:
                self._resume()

    def _time_up(self) -> None:
        self._resume_call = None
        # still at the limit: accept (refusing beyond it) as long again before a new pause
        self._open_until = self.clock.seconds() + self.max_pause
        self._resume()

    def _resume(self) -> None:
        self.paused = False
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        for port in self.ports:
            if getattr(port, "connected", True) and not getattr(port, "disconnecting", False):
                start: Callable[[], None] | None = getattr(port, "startReading", None)
                if start is not None:
                    start()

    @staticmethod
    def _stop(port: Any) -> None:
        stop: Callable[[], None] | None = getattr(port, "stopReading", None)
        if stop is not None:
            stop()

    def stop(self) -> None:
        """The relay stops: no timer left behind (the ports close by themselves)."""
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        self.ports.clear()


class AgentSocketFactory(WebSocketServerFactory):
    """The factory of L{AgentSocket}s: the hub they talk to and the pending-socket counts
    the sockets share (set up by L{websocket_resource})."""

    hub: Hub
    max_pending: int
    max_pending_per_peer: int
    pending_total: int
    pending: dict[str, int]
    refused: int
    authenticated_limit: int
    gate: AcceptGate | None

    def full(self, host: str) -> bool:
        """Whether one more unauthenticated socket from C{host} is one too many (counted
        as refused)."""
        if (self.pending_total >= self.max_pending
                or self.pending.get(host, 0) >= self.max_pending_per_peer):
            self.refused += 1
            if self.refused % 1000 == 1:
                log.warn("Refusing websocket from {host}: too many unauthenticated sockets "
                         "({total} open; {refused} refused so far)", host=host,
                         total=self.pending_total, refused=self.refused)
            return True
        return False


class _AgentSocketResource(WebSocketResource):
    """
    Refuses a websocket beyond the pending limits with a plain 503 before autobahn sees
    it: in a connect storm most refused sockets then cost the relay an HTTP parse, not a
    websocket protocol, a handshake and two log lines each.
    """

    def render(self, request: Any) -> Any:
        factory = self._factory
        host = str(getattr(request.getClientAddress(), "host", "?"))
        if factory.full(host):
            request.setResponseCode(503)
            request.setHeader(b"Retry-After", b"5")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Too many unauthenticated connections\n"
        return super().render(request)


class AgentSocket(WebSocketServerProtocol):
    """
    autobahn sets C{self.peer} (``tcp:host:port``), which the hub logs.  Until the hub says
    the agent authenticated, the socket counts as I{pending} and may only send small frames.
    """

    session: Session | None = None
    _pending_host: str | None = None

    def onConnect(self, request: Any) -> None:
        factory = self.factory
        host = _host(self.transport)
        if factory.full(host):  # (the resource refuses first; this one is for direct use)
            raise ConnectionDeny(503, "Too many unauthenticated connections")
        self._pending_host = host
        factory.pending_total += 1
        factory.pending[host] = factory.pending.get(host, 0) + 1
        if factory.gate is not None:
            factory.gate.changed(factory.pending_total)

    def _leave_pending(self) -> None:
        host, self._pending_host = self._pending_host, None
        if host is None:
            return
        factory = self.factory
        factory.pending_total -= 1
        left = factory.pending.get(host, 1) - 1
        if left > 0:
            factory.pending[host] = left
        else:
            factory.pending.pop(host, None)
        if factory.gate is not None:
            factory.gate.changed(factory.pending_total)

    def authenticated(self) -> None:
        """Called by the hub once the agent is connected: the normal size limit applies."""
        self._leave_pending()
        self.maxFramePayloadSize = self.factory.authenticated_limit
        self.maxMessagePayloadSize = self.factory.authenticated_limit

    def onOpen(self) -> None:
        no_delay(self.transport)
        self.session = self.factory.hub.connection_made(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.factory.hub.frame_received(self.session, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        _autobahn.frames(self).discard()
        self._leave_pending()
        if self.session is not None:
            self.factory.hub.connection_lost(self.session, wire.clip(reason or f"code {code}"))

    def send_message(self, message: Mapping[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            _autobahn.frames(self).send(message)

    def enable_batching(self, max_bytes: int) -> None:
        """The peer reads C{agent:batch} frames up to C{max_bytes} (it announced C{batch})."""
        _autobahn.frames(self).enable(max_bytes)

    def close(self, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            _autobahn.frames(self).flush()
            self.sendClose(code=1000 if reason == "relay shutting down" else 4000,
                           reason=reason[:100])


def websocket_resource(reactor: Any, hub: Hub, *, max_pending: int = DEFAULT_MAX_PENDING,
                       max_pending_per_peer: int = DEFAULT_MAX_PENDING_PER_PEER,
                       pre_auth_max_message: int = PRE_AUTH_MAX_MESSAGE,
                       gate: AcceptGate | None = None) -> WebSocketResource:
    """
    Frames up to the hub's limit are read and checked by us (a too-large message gets
    C{agent:error}); autobahn's own limit, a little higher, bounds the buffer.  Before the
    agent has authenticated, autobahn's limit is C{pre_auth_max_message} (a bigger frame
    closes the socket with 1009 before its payload is buffered), and at most C{max_pending}
    sockets (C{max_pending_per_peer} from one address) may be waiting to authenticate; a
    C{gate} (L{AcceptGate}) is told every change of their number.
    """
    factory = AgentSocketFactory(reactor=reactor)
    factory.protocol = AgentSocket
    factory.hub = hub
    factory.max_pending = max_pending
    factory.max_pending_per_peer = max_pending_per_peer
    factory.pending_total = 0
    factory.pending = {}
    factory.refused = 0
    factory.gate = gate
    slack = 1024 * 1024
    factory.authenticated_limit = hub.max_message_size + slack
    factory.setProtocolOptions(
        # per connection: AgentSocket.authenticated raises both to authenticated_limit
        maxMessagePayloadSize=pre_auth_max_message,
        maxFramePayloadSize=pre_auth_max_message,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=5,
        autoPingInterval=0,
        perMessageCompressionAccept=lambda offers: None,
    )
    return _AgentSocketResource(factory)
