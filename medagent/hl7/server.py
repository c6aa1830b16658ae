"""
The listening side of an agent's MLLP channel: one inbound device connection
(L{MLLPServerProtocol}) that frames bytes, keeps answers in arrival order, bounds what it
queues and closes idle or oversize-sending peers.  What a message means and how it is
answered is the channel's business (L{medagent.hl7.channel.MLLPChannel}).

Message content is patient data: logs carry peers, counts and sizes, never the text.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import Clock, DelayedCall, LostWaiters, peer_name, transport_of
from medagent.hl7.mllp import DEFAULT_MAX_SIZE, FrameTooLarge, MLLPDecoder, frame
from medagent.net import no_delay

if TYPE_CHECKING:
    from medagent.hl7.channel import MLLPChannel

log = Logger()

#: How a channel answers the device: called with one payload (framed and written in order).
Respond = Callable[[bytes], None]


class MLLPServerProtocol(LostWaiters, Protocol):
    """
    One inbound device connection.  Frames are queued and handed to the channel one at a
    time, so answers go back strictly in arrival order (a device may pair an answer with the
    message it sent last rather than by MSA-2); reading pauses while the queue is full, so a
    fast sender cannot grow our memory.  An oversize frame is answered with a reject (after
    the messages before it) and the connection closed.
    """

    def __init__(
        self,
        channel: "MLLPChannel",
        clock: Clock,
        *,
        max_message_size: int = DEFAULT_MAX_SIZE,
        max_queued: int = 64,
        idle_timeout: float | None = None,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.max_queued = max_queued
        self.idle_timeout = idle_timeout
        self.remote = "?"
        self._decoder = MLLPDecoder(max_message_size)
        self._queue: deque[tuple[str, Any]] = deque()
        self._busy = False
        self._pumping = False
        self._paused = False
        self._lost = False
        self._stop_reading = False
        self._idle_call: DelayedCall | None = None
        self._lost_waiters: list[Deferred[None]] = []
        self._close_when_idle = False

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.remote = peer_name(self.transport)
        self.channel.connections.add(self)
        log.info("MLLP channel {channel}: connection from {remote}",
                 channel=self.channel.name, remote=self.remote)
        self._touch()

    def dataReceived(self, data: bytes) -> None:
        if self._stop_reading or self._lost:
            return
        self._touch()
        try:
            payloads = self._decoder.feed(data)
            too_large = None
        except FrameTooLarge as e:
            payloads, too_large = e.payloads, e
        for p in payloads:
            self._queue.append(("message", p))
        if too_large is not None:
            # Answer what came before, then reject and close; read nothing more.
            self._queue.append(("oversize", too_large))
            self._stop_reading = True
        if len(self._queue) >= self.max_queued and not self._paused:
            self._paused = True
            transport_of(self).pauseProducing()
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._busy and self._queue and not self._lost:
                kind, item = self._queue.popleft()
                if self._paused and len(self._queue) < self.max_queued // 2:
                    self._paused = False
                    transport_of(self).resumeProducing()
                if kind == "oversize":
                    self._respond(self.channel.oversize_nak(item.max_size))
                    log.warn(
                        "MLLP channel {channel}: {remote} sent a frame over {limit} bytes; "
                        "rejected and closing",
                        channel=self.channel.name,
                        remote=self.remote,
                        limit=item.max_size,
                    )
                    self._queue.clear()
                    transport_of(self).loseConnection()
                    return
                self._busy = True
                d = maybeDeferred(self.channel.handle, item, self.remote, self._respond)
                d.addErrback(self._handler_failed)
                d.addBoth(self._handled)
        finally:
            self._pumping = False

    def _handler_failed(self, f: Failure) -> None:
        log.failure(
            "MLLP channel {channel}: handler failed for a message from {remote}",
            f,
            channel=self.channel.name,
            remote=self.remote,
        )

    def _handled(self, _: Any) -> None:
        self._busy = False
        if self._close_when_idle and not self._lost:
            transport_of(self).loseConnection()
            return
        self._touch()
        self._pump()

    def _respond(self, payload: bytes) -> None:
        if self._lost:
            log.warn(
                "MLLP channel {channel}: {remote} disconnected before its ACK could be sent",
                channel=self.channel.name,
                remote=self.remote,
            )
            return
        transport_of(self).write(frame(payload))

    def _touch(self) -> None:
        if not self.idle_timeout or self._lost:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_call = None
        if self._busy or self._queue:
            self._touch()
            return
        log.info(
            "MLLP channel {channel}: closing connection from {remote} idle for {seconds} s",
            channel=self.channel.name,
            remote=self.remote,
            seconds=self.idle_timeout,
        )
        transport_of(self).loseConnection()

    def close(self, grace: float = 10.0) -> Deferred[None]:
        """
        Close once the message being handled is answered (at most C{grace} seconds), then
        abort; messages queued behind it are not taken (the device will resend them).
        Fires when the connection is gone.
        """
        d = self.when_lost()
        if self._lost:
            return d
        self._stop_reading = True
        self._queue.clear()
        abort = self.clock.callLater(grace, self._abort)

        def cancel_abort(result: object) -> object:
            if abort.active():
                abort.cancel()
            return result

        d.addBoth(cancel_abort)
        if self._busy:
            self._close_when_idle = True
        else:
            transport_of(self).loseConnection()
        return d

    def _abort(self) -> None:
        if not self._lost:
            transport = transport_of(self)
            getattr(transport, "abortConnection", transport.loseConnection)()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self.connected = False
        self.channel.connections.discard(self)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        unanswered = sum(1 for kind, _ in self._queue if kind == "message") + int(self._busy)
        self._queue.clear()
        log.info(
            "MLLP channel {channel}: {remote} disconnected ({unanswered} message(s) unanswered)",
            channel=self.channel.name,
            remote=self.remote,
            unanswered=unanswered,
        )
        self._fire_lost_waiters()
