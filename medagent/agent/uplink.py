"""
The agent's websocket to the relay: a thin autobahn client protocol inside a
L{ClientService}, which reconnects with jittered backoff (1–5 s, ×1.3, capped at 10 s, as
Medplum's agent does).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import txaio

txaio.use_twisted()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.application.internet import ClientService  # noqa: E402
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from medagent import wire  # noqa: E402
from medagent._twisted import ClientEndpoint  # noqa: E402
from medagent.agent.app import AgentApp  # noqa: E402
from medagent.net import no_delay  # noqa: E402

log = Logger()


def websocket_url(relay_url: str) -> str:
    """``https://relay.example/anything`` → ``wss://relay.example/ws/agent`` (as Medplum)."""
    parts = urlsplit(relay_url)
    scheme = {"https": "wss", "wss": "wss"}.get(parts.scheme, "ws")
    return f"{scheme}://{parts.netloc}/ws/agent"


def relay_endpoint(reactor: Any, relay_url: str, timeout: float = 10.0) -> ClientEndpoint:
    parts = urlsplit(relay_url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    endpoint: ClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS

        # HostnameEndpoint provides IStreamClientEndpoint via @implementer, unseen by mypy.
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)  # type: ignore[arg-type]
    return endpoint


def medplum_backoff(
    low: float = 1.0, high: float = 5.0, factor: float = 1.3, cap: float = 10.0,
    rng: Callable[[float, float], float] = random.uniform,
) -> Callable[[int], float]:
    """Retry delay for attempt n: a per-process random base of 1–5 s, ×1.3 each time, ≤ 10 s."""
    base = rng(low, high)

    def policy(attempt: int) -> float:
        return min(base * factor ** max(attempt - 1, 0), cap)

    return policy


def websocket_options(max_message_size: int) -> dict[str, Any]:
    """The agent's autobahn options (also the fake agents' of C{bench/connect_storm.py})."""
    slack = 1024 * 1024
    return {
        "maxMessagePayloadSize": max_message_size + slack,
        "maxFramePayloadSize": max_message_size + slack,
        "openHandshakeTimeout": 4,
        "closeHandshakeTimeout": 3,
        "autoPingInterval": 0,
    }


class _RelayFactory(WebSocketClientFactory):
    """The websocket factory, carrying the L{AgentApp} its L{RelaySocket}s talk to."""

    app: AgentApp


class RelaySocket(WebSocketClientProtocol):
    def onOpen(self) -> None:
        no_delay(self.transport)
        self.factory.app.connection_made(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.app.frame_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.factory.app.conn is self:
            self.factory.app.connection_lost(reason or f"code {code}")

    def send_message(self, message: Mapping[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(wire.encode(message), isBinary=False)

    def close(self, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(code=4000, reason=reason[:100])
        elif self.transport is not None:
            self.transport.abortConnection()


def uplink_service(
    reactor: Any, relay_url: str, app: AgentApp, *,
    retry_policy: Callable[[int], float] | None = None,
) -> ClientService:
    factory = _RelayFactory(websocket_url(relay_url), reactor=reactor)
    factory.protocol = RelaySocket
    factory.app = app
    factory.setProtocolOptions(**websocket_options(app.max_message_size))
    # Both provide the interfaces ClientService wants (@implementer), which mypy cannot see.
    return ClientService(
        relay_endpoint(reactor, relay_url),  # type: ignore[arg-type]
        factory,  # type: ignore[arg-type]
        retryPolicy=retry_policy or medplum_backoff(),
        clock=reactor,
    )
