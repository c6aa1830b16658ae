"""
The ASTM E1381 (CLSI LIS1-A) data link as a Twisted protocol: one state machine per serial
port or TCP connection, both roles on the same link (we send orders, the analyzer sends
results and queries), every timer on an injected clock.

Sending: establishment (ENQ; ACK starts the transfer; NAK = busy, ENQ again after
C{busy_delay}; ENQ in reply = contention: as "computer" we yield, receive the instrument's
message and try again, as "instrument" we re-send ENQ after C{contention_retry}), transfer
(one frame at a time, ACK = next, NAK or any other reply = the same frame with the same
number again, at most C{max_attempts} sends per frame, EOT = receiver interrupt), termination
(EOT).  Receiving: ACK valid frames, NAK bad checksums and frame numbers, ACK a repeated frame
once without keeping its text twice, join ETB continuations, drop an unfinished message on a
C{receive_timeout} silence, an ENQ restart or a lost connection.

Nothing here knows about the agent: outcomes are L{SendResult} or L{LinkError}; received
messages go to C{on_message}.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import Clock, DelayedCall, maybe_transport
from medagent.astm import codec
from medagent.astm.codec import ACK, ENQ, EOT, NAK
from medagent.net import no_delay

log = Logger()

NEUTRAL = "neutral"
ESTABLISHING = "establishing"    # ENQ sent, waiting for ACK/NAK/ENQ
BUSY_WAIT = "busy-wait"          # NAK to our ENQ (or contention as instrument): ENQ again later
CONTENTION = "contention"        # we yielded to the instrument: waiting for its ENQ
TRANSFER = "transfer"            # frame sent, waiting for its reply
RECEIVING = "receiving"          # we ACKed the other side's ENQ

ROLES = ("computer", "instrument")


@attr.s(frozen=True, auto_attribs=True)
class LinkConfig:
    """Per-device link settings; defaults are the E1381 values (2.5.7 of protocols.md)."""

    role: str = attr.ib(default="computer", validator=attr.validators.in_(ROLES))
    enq_timeout: float = 15.0        # no reply to ENQ -> termination
    busy_delay: float = 10.0         # NAK to ENQ -> ENQ again after this
    max_enq_attempts: int = 6        # ENQs answered NAK before we give up on a message
    contention_wait: float = 20.0    # computer: wait this long for the instrument's ENQ
    contention_retry: float = 1.0    # instrument: re-send ENQ after this
    max_contentions: int = 10        # contentions before we give up on a message
    ack_timeout: float = 15.0        # no reply to a frame -> abort
    max_attempts: int = 6            # sends of one frame (first + retransmissions)
    receive_timeout: float = 30.0    # receiver: silence that drops an unfinished message
    honour_interrupt: bool = True    # EOT in place of ACK: stop, let the other side talk
    interrupt_holdoff: float = 15.0  # after an honoured interrupt, wait before ENQ again
    max_interrupts: int = 3          # interrupts before we give up on a message
    max_input_frame_text: int = codec.DEFAULT_MAX_INPUT_FRAME_TEXT
    max_message_bytes: int = 1 << 20  # bound of one received message
    max_queue: int = 1000            # messages waiting on this link
    encoding: str = "latin-1"        # of received text


class LinkError(Exception):
    """
    A message the link could not move.  C{phase}: ``establishment``, ``transfer``,
    ``connection``; C{transient}: worth trying again later.
    """

    def __init__(self, phase: str, reason: str, *, transient: bool = True) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase = phase
        self.reason = reason
        self.transient = transient


@attr.s(auto_attribs=True)
class SendResult:
    """What it took to move one message: every frame ACKed and EOT sent."""

    frames: int
    records: int
    retransmissions: int = 0
    busy: int = 0
    contentions: int = 0
    interrupts: int = 0


@attr.s(auto_attribs=True, eq=False)
class _Outgoing:
    frames: list  # [(text, final)]
    records: int
    deferred: Deferred
    probe: bool = False
    timeout: float | None = None
    index: int = 0
    number: int = 1
    attempts: int = 0
    wire: bytes = b""
    enq_attempts: int = 0
    contentions: int = 0
    interrupts: int = 0
    retransmissions: int = 0
    busy: int = 0


class ASTMLink(Protocol):
    """
    One E1381 link.  C{send_frames} queues a message and fires with a L{SendResult} or fails
    with L{LinkError}; C{probe} sends ENQ and fires with ``"ACK"``, ``"NAK"`` or ``"ENQ"``.
    Complete received messages (H..L, records each ending in CR) go to C{on_message};
    C{accept_inbound} says whether we can take a message now (else the other side's ENQ is
    answered NAK, "busy", and it keeps its message).
    """

    def __init__(
        self,
        clock: Clock,
        config: LinkConfig | None = None,
        *,
        on_message: Callable[[str], None] | None = None,
        accept_inbound: Callable[[], bool] | None = None,
        on_lost: Callable[["ASTMLink", Failure], None] | None = None,
        name: str = "astm",
    ) -> None:
        self.clock = clock
        self.config = config or LinkConfig()
        self.on_message = on_message
        self.accept_inbound = accept_inbound or (lambda: on_message is not None)
        self.on_lost = on_lost
        self.name = name
        self.state = NEUTRAL
        self.connected_ = False
        self.stats = {
            "sent_messages": 0, "sent_frames": 0, "retransmissions": 0, "failed_messages": 0,
            "received_messages": 0, "received_frames": 0, "rejected_frames": 0,
            "duplicate_frames": 0, "discarded_messages": 0, "busy_naks_sent": 0,
            "ignored_bytes": 0,
        }
        self._queue: deque[_Outgoing] = deque()
        self._timer: DelayedCall | None = None
        self._holdoff: DelayedCall | None = None
        self._decoder = codec.FrameDecoder(self.config.max_input_frame_text)
        self._assembler = codec.MessageAssembler()
        self._last_fn: int | None = None
        self._partial = bytearray()
        self._received_bytes = 0
        self._in_data = False
        self._kick_later = False

    # ------------------------------------------------------------------ public API

    def send_frames(self, frames: list[tuple[bytes, bool]], records: int) -> Deferred:
        """Queue one prepared message (see L{codec.prepare_message}) for sending."""
        d: Deferred = Deferred()
        if not frames:
            d.errback(LinkError("establishment", "empty message", transient=False))
            return d
        if len(self._queue) >= self.config.max_queue:
            d.errback(LinkError("establishment", f"{len(self._queue)} messages already waiting"))
            return d
        if not self.connected_:
            d.errback(LinkError("connection", "not connected"))
            return d
        self._queue.append(_Outgoing(list(frames), records, d))
        self._kick()
        return d

    def send_message(self, text: str, *, encoding: str = "latin-1", packed: bool = False,
                     max_text: int = codec.MAX_FRAME_TEXT) -> Deferred:
        """Frame C{text} (records separated by CR) and queue it; bad text fails permanently."""
        try:
            frames, records = codec.prepare_message(
                text, encoding=encoding, packed=packed, max_text=max_text)
        except codec.ASTMError as e:
            d: Deferred = Deferred()
            d.errback(LinkError("encode", str(e), transient=False))
            return d
        return self.send_frames(frames, records)

    def probe(self, timeout: float | None = None) -> Deferred:
        """
        ENQ probe (ping): fires with ``"ACK"`` (EOT follows), ``"NAK"``, ``"ENQ"`` (the other
        side is sending) or ``"BUSY"`` (a transfer is going on); fails after C{timeout}
        (default the ENQ timeout) without a reply.
        """
        d: Deferred = Deferred()
        if not self.connected_:
            d.errback(LinkError("connection", "not connected"))
            return d
        if self.state != NEUTRAL or self._queue:
            d.callback("BUSY")  # a transfer is going on: the device is there
            return d
        self._queue.append(_Outgoing([], 0, d, probe=True, timeout=timeout))
        self._kick()
        return d

    @property
    def idle(self) -> bool:
        return self.state == NEUTRAL and not self._queue

    # ------------------------------------------------------------------ Protocol

    def connectionMade(self) -> None:
        self.connected_ = True
        # Stop-and-wait: every write is a whole unit the peer waits for (an EOT followed
        # by the next ENQ must not sit in Nagle's buffer for a delayed ACK).
        no_delay(self.transport)
        log.info("ASTM link {name} up", name=self.name)
        self._kick()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was = self.state
        self.connected_ = False
        self._cancel_timer()
        if self._holdoff is not None and self._holdoff.active():
            self._holdoff.cancel()
        self._holdoff = None
        if was == RECEIVING:
            self._discard("connection lost")
        self.state = NEUTRAL
        queue, self._queue = self._queue, deque()
        log.info("ASTM link {name} down in state {state}", name=self.name, state=was)
        if self.on_lost is not None:
            # First, so whoever owns the link forgets it before a failure handler asks again.
            self.on_lost(self, reason)
        for out in queue:
            self._fail(out, LinkError("connection", f"link lost in state {was}"))

    def dataReceived(self, data: bytes) -> None:
        self._in_data = True
        try:
            self._handle(data)
        finally:
            self._in_data = False
        if self._kick_later:
            self._kick_later = False
            self._kick()

    def _handle(self, data: bytes) -> None:
        while data and self.connected_:
            if self.state == RECEIVING:
                self._decoder.feed(data)
                data = b""
                while self.state == RECEIVING:
                    event = self._decoder.next_event()
                    if event is None:
                        break
                    self._on_receive_event(*event)
                if self.state != RECEIVING:
                    data = self._decoder.rest()
            else:
                i = 0
                n = len(data)
                while i < n and self.state != RECEIVING and self.connected_:
                    self._on_byte(data[i:i + 1])
                    i += 1
                data = data[i:]

    # ------------------------------------------------------------------ helpers

    def _write(self, data: bytes) -> None:
        transport = maybe_transport(self)
        if self.connected_ and transport is not None:
            transport.write(data)

    def _set_timer(self, delay: float, fn: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.clock.callLater(delay, self._fire_timer, fn)

    def _fire_timer(self, fn: Callable[[], None]) -> None:
        self._timer = None
        fn()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _kick(self) -> None:
        """Start the next establishment if the line is ours to take."""
        if self._in_data:
            # Bytes later in the chunk being handled were sent before our ENQ: they cannot
            # answer it.  Establish once the chunk is done.
            self._kick_later = True
            return
        if (self.state != NEUTRAL or not self._queue or not self.connected_
                or (self._holdoff is not None and self._holdoff.active())):
            return
        self._send_enq()

    def _send_enq(self) -> None:
        out = self._queue[0]
        out.enq_attempts += 1
        self.state = ESTABLISHING
        self._write(ENQ)
        self._set_timer(out.timeout or self.config.enq_timeout, self._enq_timed_out)

    def _fail(self, out: _Outgoing, error: LinkError) -> None:
        if not out.probe:
            self.stats["failed_messages"] += 1
            log.warn("ASTM link {name}: message not sent ({phase}: {reason})", name=self.name,
                     phase=error.phase, reason=error.reason)
        if not out.deferred.called:
            out.deferred.errback(error)

    def _finish_current(self, error: LinkError | None = None, result: object = None) -> None:
        """Drop the head of the queue with its outcome; the line is already neutral."""
        out = self._queue.popleft()
        if error is not None:
            self._fail(out, error)
        elif not out.deferred.called:
            out.deferred.callback(result)

    def _terminate(self) -> None:
        """Termination phase: EOT, line neutral."""
        self._cancel_timer()
        self._write(EOT)
        self.state = NEUTRAL

    # ------------------------------------------------------------ byte handling (not receiving)

    def _on_byte(self, b: bytes) -> None:
        state = self.state
        if state == ESTABLISHING:
            if b == ACK:
                self._established()
            elif b == NAK:
                self._busy()
            elif b == ENQ:
                self._contention()
            else:
                self.stats["ignored_bytes"] += 1  # E1381: ignore all but ACK, NAK, ENQ
        elif state == TRANSFER:
            if b == ACK:
                self._frame_acked()
            elif b == EOT:
                self._interrupted()
            else:
                self._frame_refused(b)  # NAK, or anything else counts as NAK
        elif b == ENQ:  # NEUTRAL, BUSY_WAIT, CONTENTION: the other side wants to send
            self._incoming_enq()
        else:
            self.stats["ignored_bytes"] += 1

    # ------------------------------------------------------------------ establishment

    def _established(self) -> None:
        out = self._queue[0]
        if out.probe:
            self._terminate()
            self._finish_current(result="ACK")
            self._kick()
            return
        out.index = 0
        out.number = 1
        out.attempts = 0
        self.state = TRANSFER
        self._send_frame(out)

    def _busy(self) -> None:
        out = self._queue[0]
        out.busy += 1
        self._cancel_timer()
        self.state = NEUTRAL
        if out.probe:
            self._finish_current(result="NAK")
            self._kick()
            return
        if out.enq_attempts >= self.config.max_enq_attempts:
            self._finish_current(LinkError(
                "establishment", f"device busy: ENQ answered NAK {out.busy} times"))
            self._kick()
            return
        self.state = BUSY_WAIT
        self._set_timer(self.config.busy_delay, self._retry_enq)

    def _retry_enq(self) -> None:
        if self.state == BUSY_WAIT:
            self.state = NEUTRAL
            self._kick()

    def _contention(self) -> None:
        out = self._queue[0]
        out.contentions += 1
        self._cancel_timer()
        log.info("ASTM link {name}: contention (both sent ENQ), we are {role}",
                 name=self.name, role=self.config.role)
        if out.probe:
            self._finish_current(result="ENQ")
        elif out.contentions > self.config.max_contentions:
            self._finish_current(LinkError(
                "establishment", f"line contention {out.contentions} times in a row"))
        if self.config.role == "computer":
            # The instrument has priority: it re-sends ENQ after >= 1 s; we answer that one.
            self.state = CONTENTION
            self._set_timer(self.config.contention_wait, self._contention_over)
        else:
            self.state = BUSY_WAIT
            self._set_timer(self.config.contention_retry, self._retry_enq)

    def _contention_over(self) -> None:
        if self.state == CONTENTION:
            self.state = NEUTRAL
            self._kick()

    def _enq_timed_out(self) -> None:
        timeout = self._queue[0].timeout or self.config.enq_timeout
        self._terminate()
        self._finish_current(LinkError("establishment", f"no reply to ENQ within {timeout:g} s"))
        self._kick()

    # ------------------------------------------------------------------ transfer

    def _send_frame(self, out: _Outgoing) -> None:
        text, final = out.frames[out.index]
        out.wire = codec.build_frame(out.number, text, final)
        out.attempts = 1
        self.stats["sent_frames"] += 1
        self._write(out.wire)
        self._set_timer(self.config.ack_timeout, self._ack_timed_out)

    def _frame_acked(self) -> None:
        out = self._queue[0]
        out.index += 1
        if out.index >= len(out.frames):
            self._terminate()
            self.stats["sent_messages"] += 1
            self._finish_current(result=SendResult(
                frames=len(out.frames), records=out.records,
                retransmissions=out.retransmissions, busy=out.busy,
                contentions=out.contentions, interrupts=out.interrupts))
            self._kick()
            return
        out.number = codec.next_frame_number(out.number)
        self._send_frame(out)

    def _frame_refused(self, reply: bytes) -> None:
        out = self._queue[0]
        what = "NAK" if reply == NAK else f"reply 0x{reply[0]:02X}"
        if out.attempts >= self.config.max_attempts:
            self._terminate()
            self._finish_current(LinkError(
                "transfer", f"frame {out.number} refused ({what}) after "
                            f"{out.attempts} attempts"))
            self._kick()
            return
        out.attempts += 1
        out.retransmissions += 1
        self.stats["retransmissions"] += 1
        log.info("ASTM link {name}: frame {number} refused ({what}), attempt {attempt}",
                 name=self.name, number=out.number, what=what, attempt=out.attempts)
        self._write(out.wire)
        self._set_timer(self.config.ack_timeout, self._ack_timed_out)

    def _interrupted(self) -> None:
        """EOT in place of ACK: the frame is good and the receiver wants the line."""
        out = self._queue[0]
        if out.index + 1 >= len(out.frames) or not self.config.honour_interrupt:
            if self.config.honour_interrupt:
                self._hold_off()  # last frame: we stop anyway, then leave the line to them
            self._frame_acked()
            return
        out.interrupts += 1
        self._terminate()
        log.info("ASTM link {name}: receiver interrupt after frame {number}",
                 name=self.name, number=out.number)
        if out.interrupts > self.config.max_interrupts:
            self._finish_current(LinkError(
                "transfer", f"receiver interrupted {out.interrupts} times"))
        # Else the whole message goes again in a new transfer phase, after the other side's
        # message or the hold-off, so the receiver never sees half of it as a whole.
        self._hold_off()

    def _hold_off(self) -> None:
        if self._holdoff is not None and self._holdoff.active():
            self._holdoff.cancel()
        self._holdoff = self.clock.callLater(self.config.interrupt_holdoff, self._holdoff_over)

    def _holdoff_over(self) -> None:
        self._holdoff = None
        self._kick()

    def _ack_timed_out(self) -> None:
        out = self._queue[0]
        self._terminate()
        self._finish_current(LinkError(
            "transfer", f"no reply to frame {out.number} within {self.config.ack_timeout:g} s"))
        self._kick()

    # ------------------------------------------------------------------ receiving

    def _incoming_enq(self) -> None:
        self._cancel_timer()
        try:
            accept = self.accept_inbound()
        except Exception:
            log.failure("ASTM link {name}: accept_inbound failed", name=self.name)
            accept = False
        if not accept:
            self.stats["busy_naks_sent"] += 1
            self._write(NAK)
            if self.state == CONTENTION:
                self.state = NEUTRAL
            if self.state == NEUTRAL:
                self._kick()
            elif self.state == BUSY_WAIT:
                self._set_timer(self.config.busy_delay, self._retry_enq)
            return
        self.state = RECEIVING
        self._decoder.reset()
        self._last_fn = None
        self._partial.clear()
        self._received_bytes = 0
        self._write(ACK)
        self._set_timer(self.config.receive_timeout, self._receive_timed_out)

    def _on_receive_event(self, kind: str, value: object) -> None:
        if kind == codec.EVENT_FRAME:
            assert isinstance(value, codec.Frame)
            self._on_frame(value)
        elif kind == codec.EVENT_BAD_FRAME:
            self._reject(str(value))
        elif value == EOT:
            self._cancel_timer()
            if self._partial:
                log.warn("ASTM link {name}: EOT inside a multi-frame record; partial record "
                         "dropped", name=self.name)
                self._partial.clear()
            self.state = NEUTRAL
            for message in self._assembler.end_session(True):
                log.warn("ASTM link {name}: message ended by EOT without an L record",
                         name=self.name)
                self._deliver(message)
            if self._holdoff is not None and self._holdoff.active():
                self._holdoff.cancel()  # the other side had its turn: ours now
                self._holdoff = None
            self._kick()
        elif value == ENQ:
            self._discard("ENQ during a transfer (the other side restarted)")
            self.state = NEUTRAL
            self._incoming_enq()
        else:
            self.stats["ignored_bytes"] += 1

    def _reject(self, reason: str) -> None:
        self.stats["rejected_frames"] += 1
        log.info("ASTM link {name}: defective frame -> NAK ({reason})", name=self.name,
                 reason=reason)
        self._write(NAK)
        self._set_timer(self.config.receive_timeout, self._receive_timed_out)

    def _on_frame(self, frame: codec.Frame) -> None:
        if self._last_fn is not None and frame.number == self._last_fn:
            self.stats["duplicate_frames"] += 1  # our ACK was lost: ACK again, keep once
            self._write(ACK)
            self._set_timer(self.config.receive_timeout, self._receive_timed_out)
            return
        expected = 1 if self._last_fn is None else codec.next_frame_number(self._last_fn)
        if frame.number != expected:
            self._reject(f"frame number {frame.number}, expected {expected}")
            return
        if self._received_bytes + len(frame.text) > self.config.max_message_bytes:
            self._reject(f"message longer than {self.config.max_message_bytes} bytes")
            return
        self._last_fn = frame.number
        self._received_bytes += len(frame.text)
        self.stats["received_frames"] += 1
        self._partial += frame.text
        self._write(ACK)
        self._set_timer(self.config.receive_timeout, self._receive_timed_out)
        if frame.final:
            text = bytes(self._partial).decode(self.config.encoding, "replace")
            self._partial.clear()
            try:
                messages = self._assembler.add_text(text)
            except codec.ASTMError as e:
                log.warn("ASTM link {name}: {reason}; message dropped", name=self.name,
                         reason=str(e))
                messages = []
            for message in messages:
                self._received_bytes = 0
                self._deliver(message)

    def _deliver(self, records: list[str]) -> None:
        self.stats["received_messages"] += 1
        log.info("ASTM link {name}: message received ({records} records, types {types})",
                 name=self.name, records=len(records), types="".join(r[:1] for r in records))
        if self.on_message is None:
            log.warn("ASTM link {name}: no handler for a received message; dropped",
                     name=self.name)
            return
        try:
            self.on_message("".join(r + "\r" for r in records))
        except Exception:
            log.failure("ASTM link {name}: message handler failed", name=self.name)

    def _discard(self, why: str) -> None:
        had = bool(self._assembler.pending or self._partial)
        self._assembler.end_session(False)
        if had:
            self.stats["discarded_messages"] += 1
            log.warn("ASTM link {name}: unfinished message discarded ({why})", name=self.name,
                     why=why)
        self._partial.clear()
        self._received_bytes = 0
        self._decoder.reset()

    def _receive_timed_out(self) -> None:
        if self.state != RECEIVING:
            return
        self._discard(f"nothing received for {self.config.receive_timeout:g} s")
        self.state = NEUTRAL
        self._kick()
