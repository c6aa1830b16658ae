"""
Small Twisted helpers shared by the device protocols (MLLP today; DICOM and the bots' worker
pool can use them too).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed


class LostWaiters:
    """
    Mixin giving a protocol C{when_lost()}: closing a connection is asynchronous, and whoever
    closes it (a pool on shutdown, a reload) must be able to wait until it is really gone
    rather than share one public Deferred that the first waiter's callbacks could change.

    The protocol sets C{self._lost = False} and C{self._lost_waiters = []} in its
    C{__init__}, sets C{_lost} when the connection is gone and then calls
    L{_fire_lost_waiters}.
    """

    _lost: bool
    _lost_waiters: list[Deferred[None]]

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the connection is gone."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def _fire_lost_waiters(self) -> None:
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(None)


def peer_name(transport: Any) -> str:
    """``host:port`` of the other end, for logs; ``?`` when the transport cannot tell."""
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"
