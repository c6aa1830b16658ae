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
