"""
The ``/ws/agent`` websocket: a thin autobahn adapter between frames and the L{Hub}.
"""

from __future__ import annotations

from typing import Any, Mapping

import txaio

txaio.use_twisted()

from autobahn.twisted.resource import WebSocketResource  # noqa: E402
from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.logger import Logger  # noqa: E402

from medagent import wire  # noqa: E402
from medagent.net import no_delay  # noqa: E402
from medagent.relay.hub import Hub, Session  # noqa: E402

log = Logger()


class AgentSocket(WebSocketServerProtocol):
    """autobahn sets C{self.peer} (``tcp:host:port``), which the hub logs."""

    session: Session | None = None

    def onOpen(self) -> None:
        no_delay(self.transport)
        self.session = self.factory.hub.connection_made(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.factory.hub.frame_received(self.session, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.factory.hub.connection_lost(self.session, reason or f"code {code}")

    def send_message(self, message: Mapping[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(wire.encode(message), isBinary=False)

    def close(self, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(code=1000 if reason == "relay shutting down" else 4000,
                           reason=reason[:100])


def websocket_resource(reactor: Any, hub: Hub) -> WebSocketResource:
    """
    Frames up to the hub's limit are read and checked by us (a too-large message gets
    C{agent:error}); autobahn's own limit, a little higher, bounds the buffer.
    """
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = AgentSocket
    factory.hub = hub
    slack = 1024 * 1024
    factory.setProtocolOptions(
        maxMessagePayloadSize=hub.max_message_size + slack,
        maxFramePayloadSize=hub.max_message_size + slack,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=5,
        autoPingInterval=0,
        perMessageCompressionAccept=lambda offers: None,
    )
    return WebSocketResource(factory)
