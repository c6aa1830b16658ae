"""
The device-facing side of an ``mllp://`` push: one connection to a device, one message at a
time, its acknowledgement matched by control id (L{MLLPClientProtocol}).  Pooling, reuse and
TLS endpoints are the sender's business (L{medagent.hl7.sender}); this module only frames
bytes, matches ACKs and runs timers on the injected clock.

Message content is patient data: logs carry control ids, types, sizes, peers and ACK codes,
never the text.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from medagent._twisted import (
    Clock, DelayedCall, LostWaiters, maybe_transport, peer_name, transport_of,
)
from medagent.delivery import DeliveryError
from medagent.hl7 import message as hl7msg
from medagent.hl7.message import HL7Error
from medagent.hl7.mllp import DEFAULT_MAX_SIZE, FramingError, FrameTooLarge, MLLPDecoder, frame
from medagent.net import no_delay

log = Logger()

RETURN_ACK_MODES = ("first", "application")

# A device that closes within this many seconds of its last ACK, with nothing in flight, is
# taken to close after every message (hl7apy's MLLPServer does): we stop reusing connections
# to it rather than race its close with our next write.
CLOSE_AFTER_ACK_WINDOW = 1.0


class NotSent(DeliveryError):
    """The connection was gone before any byte of the message was written: safe to retry."""

    not_written = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=True, phase="send")


@attr.s(auto_attribs=True)
class _PendingSend:
    """The one message in flight on a connection and what its ACK wait needs."""

    deferred: Deferred
    control_id: str
    return_ack: str
    timeout: float
    timer: DelayedCall
    size: int
    started: float


@implementer(IHandshakeListener)
class MLLPClientProtocol(LostWaiters, Protocol):
    """
    One connection to a device.  One message at a time: L{send_message} writes a frame and
    fires with the payload of the ACK whose MSA-2 is the message's MSH-10.  Anything that
    leaves the conversation in doubt (an ACK for another message, garbage, an oversize frame,
    no ACK in time) fails the send with a reason and drops the connection, because the next
    message must not inherit the confusion.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        ack_timeout: float = 30.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
        peer: str = "",
    ) -> None:
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.peer = peer
        self._decoder = MLLPDecoder(max_message_size)
        self._pending: _PendingSend | None = None
        # Control ids already answered on this connection: a late application ACK after a
        # CA (returnAck=first), or a peer that repeats old ACKs, must not look like confusion.
        self._answered: deque[str] = deque(maxlen=32)
        self._lost = False
        self._dropping = False
        self._closing_by_us = False
        self._skipped_logged = 0
        self._lost_waiters: list[Deferred[None]] = []
        self.last_ack_at: float | None = None
        self.closed_after_ack = False
        self.messages = 0
        #: ACKs received for our messages, by acknowledgment code (AA, AE, AR, CA...)
        self.acks: dict[str, int] = {}
        self._handshake: Deferred[None] | None = None
        self._handshake_done = False
        # Called once with this protocol when the connection is gone (used by the pool).
        self.on_lost: Callable[[MLLPClientProtocol], None] | None = None

    # -- state

    @property
    def idle(self) -> bool:
        """Connected, nothing in flight, not closing: ready for the next message."""
        return (
            bool(self.connected)
            and not self._lost
            and not self._dropping
            and self._pending is None
            and not getattr(self.transport, "disconnecting", False)
        )

    @property
    def waiting(self) -> bool:
        """A message is written and its ACK not yet in."""
        return self._pending is not None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if not self.peer:
            self.peer = peer_name(self.transport)

    def handshakeCompleted(self) -> None:
        """TLS is up (called by Twisted's TLS layer on ``mllps`` connections)."""
        self._handshake_done = True
        if self._handshake is not None and not self._handshake.called:
            self._handshake.callback(None)

    def handshake(self) -> Deferred[None]:
        """
        Fires when the TLS handshake has completed, or fails with the reason the connection
        was lost before (e.g. certificate verification).  Cancelling aborts the connection.
        """
        if self._handshake_done:
            return succeed(None)
        if self._lost:
            return fail(DeliveryError("connection closed during the TLS handshake",
                                      phase="connect"))
        if self._handshake is None:
            self._handshake = Deferred(lambda d: self._abort())
        return self._handshake

    # -- sending

    def send_message(
        self,
        payload: bytes,
        control_id: str,
        return_ack: str = "first",
        timeout: float | None = None,
    ) -> Deferred[bytes]:
        """
        Frame and write C{payload}; fire with the matching ACK's payload.  C{return_ack}
        ``first`` takes the first matching ACK, ``application`` waits past a ``CA`` for
        AA/AE/AR/CE/CR.  Fails with L{NotSent} if the connection was already gone, else with
        L{DeliveryError} (phase ``ack``).
        """
        if return_ack not in RETURN_ACK_MODES:
            return fail(
                DeliveryError(
                    f"returnAck must be one of {', '.join(RETURN_ACK_MODES)}",
                    transient=False,
                    phase="message",
                )
            )
        if self._pending is not None:
            return fail(
                DeliveryError(
                    f"a message ({self._pending.control_id}) is already waiting for its ACK "
                    "on this connection",
                    phase="send",
                )
            )
        if not self.idle:
            return fail(NotSent("connection closed before the message was sent"))
        try:
            data = frame(payload)
        except FramingError as e:
            return fail(DeliveryError(str(e), transient=False, phase="message"))
        timeout = self.ack_timeout if timeout is None else timeout
        d: Deferred[bytes] = Deferred(self._cancelled)
        timer = self.clock.callLater(timeout, self._ack_timed_out)
        self._pending = _PendingSend(
            d, control_id, return_ack, timeout, timer, len(payload), self.clock.seconds()
        )
        # Counted, not logged: no line per message on the hot path (twistd writes debug too).
        self.messages += 1
        transport_of(self).write(data)
        return d

    def _cancelled(self, d: Deferred[bytes]) -> None:
        pending = self._pending
        if pending is not None and pending.deferred is d:
            self._fail_and_drop(
                DeliveryError(
                    f"send of control id {pending.control_id} cancelled before its ACK",
                    phase="ack",
                )
            )

    # -- receiving

    def dataReceived(self, data: bytes) -> None:
        if self._dropping or self._lost:
            return
        too_large: FrameTooLarge | None = None
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as e:
            payloads, too_large = e.payloads, e
        if self._decoder.skipped > self._skipped_logged:
            log.debug(
                "MLLP {peer}: {count} bytes outside MLLP frames skipped so far",
                peer=self.peer,
                count=self._decoder.skipped,
            )
            self._skipped_logged = self._decoder.skipped
        for payload in payloads:
            if self._dropping:
                return
            self._frame_received(payload)
        if too_large is not None and not self._dropping:
            self._fail_and_drop(
                DeliveryError(
                    f"device sent a frame larger than {too_large.max_size} bytes", phase="ack"
                ),
                no_pending_note=f"device sent a frame larger than {too_large.max_size} bytes",
            )

    def _frame_received(self, payload: bytes) -> None:
        pending = self._pending
        try:
            # MSA-1/MSA-2 are ASCII; Latin-1 reads any bytes without failing.
            ack = hl7msg.parse_ack(payload.decode("latin-1"))
        except HL7Error as e:
            self._fail_and_drop(
                DeliveryError(f"device answered with something that is not an HL7 ACK ({e})",
                              phase="ack"),
                no_pending_note="unsolicited non-ACK frame",
            )
            return
        if pending is not None and ack.control_id == pending.control_id:
            if pending.return_ack == "application" and ack.code == "CA":
                log.info(
                    "MLLP {peer}: commit ACK CA for {control_id}; waiting for the application ACK",
                    peer=self.peer,
                    control_id=ack.control_id,
                )
                return
            self._pending = None
            if pending.timer.active():
                pending.timer.cancel()
            self._answered.append(pending.control_id)
            self.last_ack_at = self.clock.seconds()
            self.acks[ack.code] = self.acks.get(ack.code, 0) + 1  # counted, not logged
            pending.deferred.callback(payload)
            return
        if ack.control_id in self._answered:
            log.info(
                "MLLP {peer}: extra {code} for already answered control id {control_id} ignored",
                peer=self.peer,
                code=ack.code,
                control_id=ack.control_id,
            )
            return
        if pending is not None:
            self._fail_and_drop(
                DeliveryError(
                    f"device sent an ACK ({ack.code}) for control id {ack.control_id!r} while "
                    f"waiting for {pending.control_id!r}",
                    phase="ack",
                )
            )
        else:
            self._fail_and_drop(
                None, no_pending_note=f"ACK for unknown control id {ack.control_id!r}"
            )

    def _ack_timed_out(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._fail_and_drop(
            DeliveryError(
                f"no ACK within {pending.timeout:g} s for control id {pending.control_id}",
                phase="ack",
                timed_out=True,
            )
        )

    # -- ending

    def _take_pending(self) -> _PendingSend | None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def _fail_pending(self, error: DeliveryError) -> None:
        pending = self._take_pending()
        if pending is not None:
            pending.deferred.errback(Failure(error))

    def _fail_and_drop(self, error: DeliveryError | None, no_pending_note: str = "") -> None:
        """Fail what is in flight with C{error} and abort the connection."""
        if self._pending is not None and error is not None:
            log.warn("MLLP {peer}: {reason}; dropping the connection", peer=self.peer,
                     reason=error.reason)
        elif self._pending is None and no_pending_note:
            log.warn(
                "MLLP {peer}: {note}; dropping the connection", peer=self.peer, note=no_pending_note
            )
        self._dropping = True
        self._closing_by_us = True
        # Take the send first (connectionLost must not claim it), fail it after the abort (so
        # whoever handles the failure sees a connection that is going away).
        pending = self._take_pending()
        self._abort()
        if pending is not None and error is not None:
            pending.deferred.errback(Failure(error))

    def _abort(self) -> None:
        transport = maybe_transport(self)
        if transport is None or self._lost:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def close(self, reason: str = "connection closed by the agent") -> Deferred[None]:
        """Close the connection; fail an in-flight send with C{reason}.  Fires when closed."""
        d = self.when_lost()
        if self._lost:
            return d
        self._closing_by_us = True
        if self._pending is not None:
            self._fail_and_drop(
                DeliveryError(f"{reason} before ACK for control id {self._pending.control_id}",
                              phase="ack")
            )
        elif (transport := maybe_transport(self)) is not None:
            transport.loseConnection()
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self.connected = False
        why = reason.getErrorMessage() if reason is not None else "closed"
        if self._handshake is not None and not self._handshake.called:
            self._handshake.errback(
                Failure(DeliveryError(f"TLS handshake failed: {why}", phase="connect"))
            )
        if self._pending is not None:
            cid = self._pending.control_id
            log.warn(
                "MLLP {peer}: connection closed by device before ACK for control id "
                "{control_id} ({why})",
                peer=self.peer,
                control_id=cid,
                why=why,
            )
            self._fail_pending(
                DeliveryError(
                    f"connection closed by device before ACK for control id {cid} ({why})",
                    phase="ack",
                )
            )
        elif not self._closing_by_us:
            since = None if self.last_ack_at is None else self.clock.seconds() - self.last_ack_at
            if since is not None and since <= CLOSE_AFTER_ACK_WINDOW:
                self.closed_after_ack = True
            log.info("MLLP {peer}: device closed the idle connection", peer=self.peer)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(self)
        self._fire_lost_waiters()


class _ClientFactory(Factory):
    """
    Builds the one protocol of a connect: the sender makes the protocol (with the settings of
    the message that opens the connection) and the endpoint only calls this factory.
    """

    def __init__(self, build: Callable[[], MLLPClientProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> MLLPClientProtocol:
        p = self._build()
        p.factory = self
        return p
