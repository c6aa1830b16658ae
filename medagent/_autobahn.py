"""
autobahn made cheap per connection; imported by the relay's and the agent's websocket adapters.

autobahn pretty-prints every connection's options for a debug line
(C{WebSocketProtocol._connectionMade}, and the client's C{startHandshake}) whether or not debug
is logged: a sixth of the relay's time in a connect storm.  With its module's C{pformat} lazy,
such a line costs nothing unless it is shown.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket import protocol as _protocol


class LazyPformat:
    """C{pprint.pformat(value)}, computed only if a log line shows it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        from pprint import pformat

        return pformat(self.value)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


_protocol.pformat = LazyPformat  # type: ignore[assignment]



def frames(proto: Any) -> Any:
    """
    The L{medagent.wire.FrameBatcher} every message of the relay's or the agent's websocket
    C{proto} (an autobahn protocol) goes through, made on first use: messages keep their
    order whether or not batching is on (the application switches it on once the peer
    announced L{medagent.wire.CAP_BATCH}).
    """
    batcher = proto.__dict__.get("_batcher")
    if batcher is None:
        from medagent.wire import FrameBatcher

        def write(data: bytes) -> None:
            if proto.state == proto.STATE_OPEN:
                proto.sendMessage(data, isBinary=False)

        # autobahn's factories carry the reactor they were made with
        batcher = proto._batcher = FrameBatcher(proto.factory.reactor, write)
    return batcher
