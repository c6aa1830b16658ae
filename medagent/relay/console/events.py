"""
The console's live updates: server-sent events (``/console/events``).

An L{EventBroker} fans events out to at most C{max_clients} open streams.  Each stream is a
push producer on its request: while the socket's buffer is full, events wait in a queue of at
most C{max_queued}; a client that falls further behind is dropped (it reconnects and reloads
what it shows), so a slow reader can never make the relay hold more than that.

Events carry no payload, only what a viewer may see: agent ids and connection state, push
ids, states, destinations and control ids (MSH-10, which the relay logs as well).

The sources: the hub's session listeners (agents on this node), and L{ObservedJournal}, a
journal wrapper that announces every push created or moved on this node.  In a cluster,
each node streams what happens on it; the pages themselves read the shared database.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from medagent.storage.journal import Push

log = Logger()

DEFAULT_MAX_CLIENTS = 64
#: streams of one sign-in session (a few tabs), so one browser cannot take them all
DEFAULT_MAX_PER_KEY = 8
DEFAULT_MAX_QUEUED = 256
#: seconds between keep-alive comments (a dead stream is noticed, proxies keep it open)
KEEPALIVE = 20.0


def sse_frame(event: str, data: Any) -> bytes:
    """One server-sent event; C{data} as compact JSON (one line: JSON escapes newlines)."""
    return (f"event: {event}\ndata: "
            + json.dumps(data, separators=(",", ":"), ensure_ascii=True) + "\n\n").encode()


@implementer(IPushProducer)
class Stream:
    """One client's event stream (a twisted.web request kept open)."""

    def __init__(self, broker: "EventBroker", request: Any, key: str | None = None) -> None:
        self.broker = broker
        self.request = request
        self.key = key
        self.paused = False
        self.queued: deque[bytes] = deque()
        self.closed = False

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.paused:
            if len(self.queued) >= self.broker.max_queued:
                log.info("Dropping a console event stream that fell behind ({n} events)",
                         n=len(self.queued))
                self.close()
                return
            self.queued.append(frame)
            return
        self.request.write(frame)

    # IPushProducer
    def pauseProducing(self) -> None:  # noqa: N802 (Twisted name)
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        while self.queued and not self.paused and not self.closed:
            self.request.write(self.queued.popleft())

    def stopProducing(self) -> None:  # noqa: N802
        self.closed = True
        self.queued.clear()
        self.broker.forget(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queued.clear()
        self.broker.forget(self)
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except Exception:
            pass  # the connection is gone already


class EventBroker:
    """Bounded fan-out of console events (see the module docstring)."""

    def __init__(self, clock: Any, *, max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 max_per_key: int = DEFAULT_MAX_PER_KEY) -> None:
        self.clock = clock
        self.max_clients = max_clients
        self.max_per_key = max_per_key
        self.max_queued = max_queued
        self.streams: list[Stream] = []
        self._keepalive: LoopingCall | None = None
        #: called (debounced) after pushes changed: the fleet's queue columns are refreshed
        self.on_pushes_changed: Callable[[], None] | None = None
        self._changed_call: Any = None
        #: seconds pushes changes are gathered before one queue refresh
        self.debounce = 1.0
        #: whether a stream's key (its sign-in session) still holds; checked with every
        #: keep-alive, so a stream ends within L{KEEPALIVE} of its session
        self.key_alive: Callable[[str], bool] | None = None

    def open(self, request: Any, key: str | None = None) -> Stream | None:
        """
        Start a stream on C{request}; None when there are C{max_clients} already, or
        C{max_per_key} of this C{key} (a sign-in session).
        """
        if len(self.streams) >= self.max_clients:
            return None
        if key is not None and sum(s.key == key for s in self.streams) >= self.max_per_key:
            return None
        stream = Stream(self, request, key)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.registerProducer(stream, True)
        self.streams.append(stream)
        request.notifyFinish().addBoth(lambda _: stream.stopProducing())
        stream.send(b"retry: 2000\n: medagent console\n\n")
        stream.send(sse_frame("hello", {"clients": len(self.streams)}))
        if self._keepalive is None:
            self._keepalive = LoopingCall(self._ping)
            self._keepalive.clock = self.clock
            self._keepalive.start(KEEPALIVE, now=False)
        return stream

    def forget(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams and self._keepalive is not None:
            if self._keepalive.running:
                self._keepalive.stop()
            self._keepalive = None

    def _ping(self) -> None:
        for stream in list(self.streams):
            if stream.key is not None and self.key_alive is not None and \
                    not self.key_alive(stream.key):
                stream.close()
                continue
            stream.send(b": keep-alive\n\n")

    def close_key(self, key: str) -> None:
        """End the streams of one sign-in session (signed out)."""
        for stream in [s for s in self.streams if s.key == key]:
            stream.close()

    def publish(self, event: str, data: Any) -> None:
        if not self.streams:
            return
        frame = sse_frame(event, data)
        for stream in list(self.streams):
            stream.send(frame)

    def close(self) -> None:
        """The relay stops: end every stream and timer."""
        for stream in list(self.streams):
            stream.close()
        if self._changed_call is not None and self._changed_call.active():
            self._changed_call.cancel()
        self._changed_call = None

    # -- sources ----------------------------------------------------------------------

    def agent_changed(self, agent_id: str, connected: bool, **fields: Any) -> None:
        self.publish("agent", {"agent": agent_id, "connected": connected, **fields})

    def push_changed(self, push: Push, created: bool = False) -> None:
        self.publish("push", push_event(push, created))
        if self.on_pushes_changed is not None and self.streams and (
                self._changed_call is None or not self._changed_call.active()):
            self._changed_call = self.clock.callLater(self.debounce, self._pushes_changed)

    def _pushes_changed(self) -> None:
        self._changed_call = None
        if self.on_pushes_changed is not None:
            try:
                self.on_pushes_changed()
            except Exception:
                log.failure("Refreshing the console's queue columns failed")


def push_event(push: Push, created: bool = False) -> dict[str, Any]:
    """What a stream says of a push: never its body or reply."""
    return {"id": push.id, "agent": push.agent_id, "state": push.state,
            "destination": push.destination, "controlId": push.control_id,
            "accession": push.accession,
            "attempts": push.attempts, "created": push.created, "updated": push.updated,
            "new": created, "resentFrom": push.resent_from}


class ObservedJournal:
    """
    A push journal that tells an L{EventBroker} about every push created or moved through
    it.  Everything else is the wrapped journal's, unchanged (the detail page's timeline is
    the push's own, L{medagent.storage.journal.Push.timeline}, kept by the journal).
    """

    def __init__(self, journal: Any, broker: EventBroker, clock: Any) -> None:
        self._journal = journal
        self._broker = broker
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._journal, name)

    def create(self, push: Push) -> Any:
        def created(p: Push) -> Push:
            self._broker.push_changed(p, created=True)
            return p

        return self._journal.create(push).addCallback(created)

    def transition(self, push: Push, state: str, **kw: Any) -> Any:
        d = self._journal.transition(push, state, **kw)
        # the object is moved at once (the journal's contract): announce it now
        self._broker.push_changed(push)
        return d


