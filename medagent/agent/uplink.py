"""
The agent's websocket to the relay: a thin autobahn client protocol inside a
L{ClientService}, which reconnects with jittered backoff (1–5 s, ×1.3, capped at 10 s, as
Medplum's agent does; L{RelayBackoff}).
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

from medagent import _autobahn, wire  # noqa: E402, F401 (_autobahn: its debug lines lazy)
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


class RelayBackoff:
    """
    The delay before the next connection attempt: a per-process random base of 1–5 s (so a
    fleet that lost its relay at one instant does not come back at one instant), ×1.3 per
    failed attempt, at most 10 s, as Medplum's agent.

    An attempt fails until the relay I{accepted} the agent (its C{agent:connect:response},
    L{accepted}), not merely until TCP connected: L{ClientService} counts attempts from the
    last TCP connect, so a relay that refuses the websocket or never answers it would be
    retried at the base delay for ever, by the whole fleet, just when it is overloaded.
    """

    def __init__(self, low: float = 1.0, high: float = 5.0, factor: float = 1.3,
                 cap: float = 10.0,
                 rng: Callable[[float, float], float] = random.uniform) -> None:
        self.base = rng(low, high)
        self.factor = factor
        self.cap = cap
        #: attempts since the relay last accepted us
        self.failures = 0

    def __call__(self, attempt: int) -> float:
        """L{ClientService}'s retry policy (its own attempt count is not ours: see above)."""
        self.failures += 1
        return min(self.base * self.factor ** (self.failures - 1), self.cap)

    def accepted(self) -> None:
        """The relay accepted the agent: the next loss retries after the base delay."""
        self.failures = 0


def medplum_backoff(
    low: float = 1.0, high: float = 5.0, factor: float = 1.3, cap: float = 10.0,
    rng: Callable[[float, float], float] = random.uniform,
) -> RelayBackoff:
    """Our agent's retry policy (L{RelayBackoff})."""
    return RelayBackoff(low, high, factor, cap, rng)


#: Seconds the agent waits for the relay's answer to its websocket upgrade.
OPEN_HANDSHAKE_TIMEOUT = 15


def websocket_options(max_message_size: int) -> dict[str, Any]:
    """The agent's autobahn options (also the fake agents' of C{bench/connect_storm.py})."""
    slack = 1024 * 1024
    return {
        "maxMessagePayloadSize": max_message_size + slack,
        "maxFramePayloadSize": max_message_size + slack,
        # a relay busy with a connect storm answers late; giving up sooner only makes it
        # answer again (the relay itself gives a socket 10 s to send its connect request)
        "openHandshakeTimeout": OPEN_HANDSHAKE_TIMEOUT,
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
        _autobahn.frames(self).discard()
        if self.factory.app.conn is self:
            self.factory.app.connection_lost(reason or f"code {code}")

    def send_message(self, message: Mapping[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            _autobahn.frames(self).send(message)

    def enable_batching(self, max_bytes: int) -> None:
        """The peer reads C{agent:batch} frames up to C{max_bytes} (it announced C{batch})."""
        _autobahn.frames(self).enable(max_bytes)

    def close(self, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            _autobahn.frames(self).flush()
            self.sendClose(code=4000, reason=reason[:100])
        elif self.transport is not None:
            self.transport.abortConnection()


def uplink_service(
    reactor: Any, relay_url: str, app: AgentApp, *,
    retry_policy: Callable[[int], float] | None = None,
) -> ClientService:
    """
    The agent's connection to the relay.  Without a C{retry_policy}, a L{RelayBackoff}
    reset each time the relay accepts the agent (L{AgentApp.on_live}).
    """
    factory = _RelayFactory(websocket_url(relay_url), reactor=reactor)
    factory.protocol = RelaySocket
    factory.app = app
    factory.setProtocolOptions(**websocket_options(app.max_message_size))
    if retry_policy is None:
        backoff = medplum_backoff()
        app.on_live.append(backoff.accepted)
        retry_policy = backoff
    # Both provide the interfaces ClientService wants (@implementer), which mypy cannot see.
    return ClientService(
        relay_endpoint(reactor, relay_url),  # type: ignore[arg-type]
        factory,  # type: ignore[arg-type]
        retryPolicy=retry_policy,
        clock=reactor,
    )
