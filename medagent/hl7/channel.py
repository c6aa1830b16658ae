"""
The application behind an agent's MLLP listener (L{MLLPChannel}): each message a device sends
goes up to the cloud, and the device is answered per the channel's mode.  The decisions of the
modes are the pure functions of L{medagent.hl7.acking}; this module runs them on the
forward's Deferreds, builds and encodes the answers and logs.  The connection itself is
L{medagent.hl7.server.MLLPServerProtocol}.

Message content is patient data: logs carry control ids, types, sizes, peers and ACK codes,
never the text.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent._twisted import Clock
from medagent.contenttypes import HL7_V2
from medagent.delivery import DeliveryError, Reply
from medagent.hl7 import acking
from medagent.hl7 import message as hl7msg
from medagent.hl7.acking import Answer
from medagent.hl7.message import HL7Error
from medagent.hl7.mllp import DEFAULT_MAX_SIZE
from medagent.hl7.server import MLLPServerProtocol, Respond

log = Logger()

# Header used to answer a frame that is not HL7 at all (no separators to borrow).
_FALLBACK_MSH = "MSH|^~\\&|||||||||P|2.5.1\r"


class MLLPChannel(Factory):
    """
    The application behind an MLLP listener of the agent: each message goes to
    C{forward(content_type, body, remote)} (which sends it up to the relay and fires with the
    cloud's L{Reply} or None), and the device is answered per C{mode}:

      - ``original``: the cloud's ACK is sent back as is; if the forward fails, times out or
        brings no HL7 answer, we send an ``AE`` ourselves (never silence).
      - ``enhanced``: ``CA`` once the forward has fired (the message is the agent's
        responsibility), then the cloud's application ACK per C{app_level_ack}
        (``AL`` always, ``NE`` never, ``ER`` only if not AA, ``SU`` only if AA; codes other
        than AA/AE/AR always); a failed forward gets ``CE``.
      - ``aa``: ``AA`` once the forward has fired, for senders that cannot do enhanced mode;
        the cloud's answer is not sent.

    A frame that is not a usable HL7 message gets an ``AR`` (``CR`` in enhanced mode) built
    by us, with MSA-2 set when the control id could be read; the connection stays up.
    Also the Twisted factory for the listener (``strports.service(endpoint, channel)``).

    These rules are the functions of L{medagent.hl7.acking}; this class only applies them
    where the forward's Deferreds fire, so that the two can be read and tested apart.
    """

    def __init__(
        self,
        forward: Callable[[str, str, str], Deferred[Reply | None]],
        *,
        mode: str = "original",
        encoding: str | None = None,
        app_level_ack: str = "AL",
        max_message_size: int = DEFAULT_MAX_SIZE,
        clock: Clock,
        forward_timeout: float = 60.0,
        idle_timeout: float | None = None,
        max_queued: int = 64,
        name: str = "mllp",
    ) -> None:
        app_level_ack = acking.check_settings(mode, app_level_ack)
        if encoding is not None:
            encoding = hl7msg.check_codec(encoding)
        self.forward = forward
        self.mode = mode
        self.encoding = encoding
        self.app_level_ack = app_level_ack
        self.max_message_size = max_message_size
        self.clock = clock
        self.forward_timeout = forward_timeout
        self.idle_timeout = idle_timeout
        self.max_queued = max_queued
        self.name = name
        self.received = 0
        self.rejected = 0
        #: answers sent to devices, by MSA-1 code (``-`` when the cloud's has none)
        self.sent: dict[str, int] = {}
        self.connections: set[MLLPServerProtocol] = set()

    def close_connections(self, grace: float = 10.0) -> Deferred[None]:
        """
        Close every device connection (after stopping the listener, on shutdown or reload):
        each finishes the message it is handling, for at most C{grace} seconds.
        """
        waits = [p.close(grace) for p in list(self.connections)]
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def buildProtocol(self, addr: Any) -> MLLPServerProtocol:
        p = MLLPServerProtocol(
            self,
            self.clock,
            max_message_size=self.max_message_size,
            max_queued=self.max_queued,
            idle_timeout=self.idle_timeout,
        )
        p.factory = self
        return p

    # -- per message

    def handle(self, payload: bytes, remote: str, respond: Respond) -> Deferred[None]:
        """
        Deal with one received frame: answer through C{respond} (zero or more times) and
        fire when done with it, so the connection can take the next one.  Never fails.
        """
        self.received += 1
        try:
            text = hl7msg.normalise(hl7msg.decode(payload, self.encoding))
            cid = hl7msg.control_id(text)
        except HL7Error as e:
            self._reject(payload, remote, respond, str(e))
            return succeed(None)
        codec = self._codec(text)
        # No line per message (twistd writes every level, and two lines per message were
        # the hot path's largest cost): C{received} and C{sent} count them; what goes
        # wrong (a reject, a failed forward, a bad cloud answer) is always a line.
        done: Deferred[None] = Deferred()
        result = self._forward_with_timeout(text, remote, cid)
        result.addCallbacks(
            self._answered,
            self._forward_failed,
            callbackArgs=(text, cid, codec, remote, respond),
            errbackArgs=(text, cid, codec, remote, respond),
        )
        result.addErrback(
            lambda f: log.failure("MLLP channel {channel}: answering {control_id} failed", f,
                                  channel=self.name, control_id=cid)
        )
        result.addBoth(lambda _: done.callback(None))
        return done

    def _forward_with_timeout(self, text: str, remote: str, cid: str) -> Deferred[Reply | None]:
        out: Deferred[Reply | None] = Deferred()
        d = maybeDeferred(self.forward, HL7_V2, text, remote)

        def timed_out() -> None:
            if not out.called:
                out.errback(
                    Failure(
                        DeliveryError(f"no answer from the cloud within {self.forward_timeout:g} s")
                    )
                )

        timer = self.clock.callLater(self.forward_timeout, timed_out)

        def relay(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(outcome) if not isinstance(outcome, Failure) else out.errback(outcome)
            else:
                log.warn(
                    "MLLP channel {channel}: late cloud answer for {control_id} ignored (the "
                    "device was already answered)",
                    channel=self.name,
                    control_id=cid,
                )

        d.addBoth(relay)
        return out

    def _answered(
        self, reply: Any, text: str, cid: str, codec: str, remote: str, respond: Respond
    ) -> Deferred[None] | None:
        answer = getattr(reply, "answer", None)
        if isinstance(answer, Deferred):
            # Two stages (the agent's durable outbox): the message is on disk now, the
            # cloud's answer comes later.  Enhanced and AA modes answer the device at once
            # and move on to the next message; original mode waits for the cloud.
            if acking.waits_for_cloud(self.mode):
                return answer.addCallbacks(
                    self._answered, self._forward_failed,
                    callbackArgs=(text, cid, codec, remote, respond),
                    errbackArgs=(text, cid, codec, remote, respond))
            self._give(acking.commit_answers(self.mode), text, codec, cid, remote, respond)
            if acking.uses_cloud_answer(self.mode):
                answer.addCallback(self._late_app_ack, text, cid, codec, remote, respond)
            answer.addErrback(lambda f: log.warn(
                "MLLP channel {channel}: no cloud answer for {control_id}: {reason}",
                channel=self.name, control_id=cid, reason=f.getErrorMessage()))
            return None
        self._give(acking.commit_answers(self.mode), text, codec, cid, remote, respond)
        if acking.uses_cloud_answer(self.mode):
            body = self._cloud_ack(reply, cid)
            self._give(acking.application_answers(self.mode, self.app_level_ack, body),
                       text, codec, cid, remote, respond)
        return None

    def _late_app_ack(self, reply: Reply | None, text: str, cid: str, codec: str, remote: str,
                      respond: Respond) -> None:
        # If the Bot failed (no usable answer), the sender still learns it, per appLevelAck.
        body = self._cloud_ack(reply, cid)
        self._give(acking.application_answers(self.mode, self.app_level_ack, body, stored=True),
                   text, codec, cid, remote, respond)

    def _give(self, answers: list[Answer], text: str, codec: str, cid: str, remote: str,
              respond: Respond) -> None:
        """Build (from the device's C{text}) or pass on each answer, and send it."""
        for answer in answers:
            if answer.body is not None:
                self._send(respond, answer.body, self._codec(answer.body, codec), cid, remote,
                           acking.ack_code(answer.body) or "-")
            else:
                ack = hl7msg.build_ack(text, answer.code, error=answer.error)
                self._send(respond, ack, codec, cid, remote, answer.code)

    def _forward_failed(
        self, f: Failure, text: str, cid: str, codec: str, remote: str, respond: Respond
    ) -> None:
        reason = f.value.reason if isinstance(f.value, DeliveryError) else f.getErrorMessage()
        log.warn(
            "MLLP channel {channel}: could not forward control id {control_id} from {remote}: "
            "{reason}",
            channel=self.name,
            control_id=cid,
            remote=remote,
            reason=reason,
        )
        self._give([acking.failure_answer(self.mode, reason)], text, codec, cid, remote, respond)

    def _cloud_ack(self, reply: Reply | None, cid: str) -> str | None:
        """The cloud's answer as HL7 text, or None (logged) if there is nothing usable."""
        read = acking.read_cloud_answer(reply, cid)
        if read.issue == acking.NO_REPLY:
            log.warn("MLLP channel {channel}: no answer from the cloud for {control_id}",
                     channel=self.name, control_id=cid)
        elif read.issue == acking.ERROR_STATUS:
            log.warn(
                "MLLP channel {channel}: cloud answered status {status} for {control_id}",
                channel=self.name,
                status=read.status,
                control_id=cid,
            )
        elif read.issue == acking.NOT_HL7:
            log.warn(
                "MLLP channel {channel}: cloud answer for {control_id} is not HL7 ({error})",
                channel=self.name,
                control_id=cid,
                error=read.error,
            )
        elif read.issue == acking.NO_MSA:
            # A response message without MSA: passed on as is, the device may expect it.
            log.info(
                "MLLP channel {channel}: cloud answer for {control_id} has no MSA; sent as is",
                channel=self.name,
                control_id=cid,
            )
        elif read.issue == acking.OTHER_ID:
            log.warn(
                "MLLP channel {channel}: cloud ACK is for control id {ack_id}, not {control_id}",
                channel=self.name,
                ack_id=read.ack_id,
                control_id=cid,
            )
        return read.body

    def _codec(self, text: str, fallback: str = "utf-8") -> str:
        return acking.answer_codec(self.encoding, text, fallback)

    def _send(self, respond: Respond, text: str, codec: str, cid: str, remote: str,
              code: str) -> None:
        # The block characters cannot travel inside a frame; nothing legitimate contains them.
        text = text.replace("\x0b", "").replace("\x1c", "")
        try:
            payload = text.encode(codec)
        except UnicodeEncodeError:
            log.warn("MLLP channel {channel}: ACK for {control_id} not encodable as {codec}; "
                     "unencodable characters replaced", channel=self.name, control_id=cid,
                     codec=codec)
            payload = text.encode(codec, errors="replace")
        self.sent[code] = self.sent.get(code, 0) + 1
        respond(payload)

    def _reject(self, payload: bytes, remote: str, respond: Respond, reason: str) -> None:
        """Answer an unusable frame with AR/CR built by us; MSA-2 carries MSH-10 if readable."""
        self.rejected += 1
        code = acking.reject_code(self.mode)
        text = payload.decode("latin-1")
        try:
            text = hl7msg.normalise(text)
            nak = hl7msg.build_ack(text, code, error=reason, error_code="101"
                                   if "MSH-10" in reason else "100")
        except HL7Error:
            nak = hl7msg.build_ack(_FALLBACK_MSH, code, error=reason, error_code="100")
        try:
            cid = hl7msg.control_id(text)
        except HL7Error:
            cid = ""
        log.warn(
            "MLLP channel {channel}: rejected a {size}-byte frame from {remote} (control id "
            "{control_id!r}): {reason}",
            channel=self.name,
            size=len(payload),
            remote=remote,
            control_id=cid,
            reason=reason,
        )
        self._send(respond, nak, self._codec(nak), cid, remote, code)

    def oversize_nak(self, limit: int) -> bytes:
        """The reject sent before closing a connection that sent a frame over C{limit}."""
        self.rejected += 1
        code = acking.reject_code(self.mode)
        nak = hl7msg.build_ack(
            _FALLBACK_MSH, code, error=f"Message larger than {limit} bytes", error_code="100"
        )
        return nak.encode("ascii")
