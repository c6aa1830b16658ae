"""
Inbound channel messages (device → agent → relay → Bot → answer), the relay's half.

The hub hands us each ``agent:transmit:request`` an agent sends for one of its channels
(``channel`` = the name of an entry in ``Agent.channel[]``).  We find that channel's
``targetReference`` (a Bot), run the Bot with the message as input on a warm worker, and
answer the hub with ``{statusCode, contentType, body}``: 200 and the bot's return value (an
HL7 ACK, typically), 204 when the bot returned nothing, or an error status with a plain-text
reason the agent can put into its own negative acknowledgement.

An HL7 v2 message that fails here (its Bot failed, no such channel...) is answered with an
HL7 ``AE`` acknowledgement and status 200 instead: Medplum's agent drops every answer with a
status of 400 or more, so its device would get silence.  The AE's text names what failed (the
Bot, its outcome, the AuditEvent), never the Bot's own error text, which may quote the message.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.contenttypes import HL7_V2
from medagent.fhir import FHIRError
from medagent.hl7 import message as hl7msg
from medagent.relay import bots as b
from medagent.relay.fields import message_fields
from medagent.storage.inbound import InboundMessage

log = Logger()

MAX_REASON = 500
#: Negative HL7 acknowledgement codes (MSA-1): a message the Bot answered but refused.
NEGATIVE_ACKS = frozenset(["AE", "AR", "CE", "CR"])


def _answer(status: int, body: str, content_type: str = "text/plain") -> dict[str, Any]:
    return {"statusCode": status, "contentType": content_type, "body": body}


def find_channel(agent: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    for channel in agent.get("channel") or []:
        if isinstance(channel, Mapping) and channel.get("name") == name:
            return channel
    return None


def ack_code(content_type: Any, body: Any) -> str | None:
    """MSA-1 of an HL7 v2 answer (AA, AE, AR, ...), or None when it is not one."""
    if not (isinstance(content_type, str) and isinstance(body, str)
            and content_type.split(";")[0].strip().lower() == HL7_V2):
        return None
    try:
        code = hl7msg.parse_ack(body).code
    except (hl7msg.HL7Error, ValueError):
        return None
    return str(code)[:10] if code else None


class ChannelRouter:
    """
    ``hub.inbound``: C{router(agent_id, message) -> Deferred[answer dict]}.

    With an C{inbound_log} (L{medagent.storage.interfaces.InboundLog}) every message is
    recorded with its outcome - after the answer left, on the next turn of C{clock}: the
    record never delays nor fails the device's answer.  A record the log could not take is
    a log line (ids, never the payload) and a count in C{metrics}.  C{keep_payloads} False
    keeps the metadata only (``--inbound-log off``).
    """

    def __init__(self, store: Any, runner: b.BotRunner, *, clock: Any = None,
                 inbound_log: Any = None, keep_payloads: bool = True) -> None:
        self.store = store
        self.runner = runner
        self.clock = clock
        self.inbound_log: Any = inbound_log if clock is not None else None
        self.keep_payloads = keep_payloads
        #: the relay's metrics (L{medagent.metrics.RelayMetrics}), when it has them
        self.metrics: Any = None
        #: called with each message once it is recorded (the console's live view)
        self.recorded: list[Callable[[InboundMessage], None]] = []

    def __call__(self, agent_id: str, message: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        return ensureDeferred(self.route(agent_id, message))

    async def route(self, agent_id: str, message: Mapping[str, Any]) -> dict[str, Any]:
        started = self.clock.seconds() if self.inbound_log is not None else 0.0
        info: dict[str, Any] = {}
        answer = await self._answer(agent_id, message, info)
        if self.inbound_log is not None:
            took = (self.clock.seconds() - started) * 1000
            self.clock.callLater(0, self._record, agent_id, message, answer, info, started,
                                 took)
        return answer

    async def _answer(self, agent_id: str, message: Mapping[str, Any],
                      info: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await self._run(agent_id, message, info)
        except Exception:  # a bug here must still give an HL7 device its AE
            log.failure("Inbound message from Agent/{agent_id} failed", agent_id=agent_id)
            answer = _answer(500, "Relay error")
            info["error_kind"] = "relay-error"
        reason = answer.pop("deviceReason", answer["body"])
        if answer["statusCode"] < 400:
            return answer
        content_type = message.get("contentType")
        body = message.get("body")
        if not (isinstance(content_type, str) and isinstance(body, str)
                and content_type.split(";")[0].strip().lower() == HL7_V2):
            return answer
        try:
            ack = hl7msg.build_ack(body, "AE", error=reason[:MAX_REASON])
        except (hl7msg.HL7Error, ValueError):
            return answer  # not HL7 after all: the agent builds its own negative answer
        log.warn(
            "Channel {channel} of Agent/{agent_id}: failed with {status}; answered the device "
            "with an HL7 AE", channel=str(message.get("channel"))[:100], agent_id=agent_id,
            status=answer["statusCode"])
        return _answer(200, ack, content_type)

    async def _run(self, agent_id: str, message: Mapping[str, Any],
                   info: dict[str, Any]) -> dict[str, Any]:
        name = message.get("channel")
        body = message.get("body")
        content_type = message.get("contentType")
        if not isinstance(name, str) or not name:
            info["error_kind"] = "bad-request"
            return _answer(400, "Missing channel name")
        if not isinstance(body, str):
            info["error_kind"] = "bad-request"
            return _answer(400, "Missing body")
        if not isinstance(content_type, str) or not content_type:
            content_type = "text/plain"
        try:
            agent = await self.store.read("Agent", agent_id)
        except FHIRError:
            info["error_kind"] = "no-agent"
            return _answer(404, f"Agent/{agent_id} not found")
        channel = find_channel(agent, name)
        if channel is None:
            log.warn("Agent/{agent_id} sent a message for unknown channel {channel}",
                     agent_id=agent_id, channel=name)
            info["error_kind"] = "no-channel"
            return _answer(404, f"Channel {name!r} not found on Agent/{agent_id}")
        target = channel.get("targetReference")
        reference = target.get("reference") if isinstance(target, Mapping) else None
        if not isinstance(reference, str) or not reference.startswith("Bot/") or \
                len(reference) <= len("Bot/"):
            info["error_kind"] = "no-bot"
            return _answer(404, f"Channel {name!r} of Agent/{agent_id} has no Bot "
                                "(channel.targetReference must be Bot/{id})")
        info["bot"] = reference[:200]
        remote = message.get("remote") if isinstance(message.get("remote"), str) else None
        headers = {"X-Medagent-Agent": f"Agent/{agent_id}", "X-Medagent-Channel": name}
        if remote:
            headers["X-Forwarded-For"] = remote
        run = await self.runner.execute(
            reference[len("Bot/"):],
            b.parse_input(content_type, body),
            content_type,
            trigger="channel",
            requester=f"Agent/{agent_id}",
            headers=headers,
            entities=[f"Agent/{agent_id}"],
            event_extra={"agent": {"reference": f"Agent/{agent_id}"}, "channel": name,
                         "remoteAddress": remote},
        )
        if run.ok:
            if run.result_type == "none" or run.result is None:
                return _answer(204, "", content_type)
            return _answer(200, run.result, b.answer_type(content_type, run.result_type))
        info["error_kind"] = f"bot-{run.outcome}"[:50]
        failed = _answer(run.http_status, run.error_text()[:MAX_REASON])
        # for the device: what failed and where operators find it, not the bot's error text
        failed["deviceReason"] = f"Bot/{run.bot_id} failed ({run.outcome})" + (
            f"; see AuditEvent/{run.audit_id}" if run.audit_id else "")
        return failed

    # -- the inbound log ------------------------------------------------------------------

    def _record(self, agent_id: str, message: Mapping[str, Any], answer: Mapping[str, Any],
                info: Mapping[str, Any], received: float, took_ms: float) -> None:
        """Write one message's record (fire and forget: failures are a line and a count)."""
        try:
            entry = self._entry(agent_id, message, answer, info, received, took_ms)
        except Exception:
            log.failure("Inbound message from Agent/{agent_id} could not be recorded",
                        agent_id=agent_id)
            self._count_failure()
            return
        if self.metrics is not None:
            self.metrics.inbound_message(entry.outcome)

        def stored(done: InboundMessage) -> None:
            for listener in list(self.recorded):
                try:
                    listener(done)
                except Exception:
                    log.failure("An inbound listener failed")

        def failed(f: Failure) -> None:
            # (ids and the error's type only: a database error may quote the row)
            log.error("Inbound message {id} from Agent/{agent_id} ({channel}) was not "
                      "recorded: {error}", id=entry.id, agent_id=agent_id,
                      channel=entry.channel, error=f.type.__name__)
            self._count_failure()

        self.inbound_log.add(entry).addCallbacks(stored, failed)

    def _count_failure(self) -> None:
        if self.metrics is not None:
            self.metrics.inbound_log_failed()

    def _entry(self, agent_id: str, message: Mapping[str, Any], answer: Mapping[str, Any],
               info: Mapping[str, Any], received: float, took_ms: float) -> InboundMessage:
        body = message.get("body")
        text = body if isinstance(body, str) else ""
        content_type = message.get("contentType")
        if not isinstance(content_type, str) or not content_type:
            content_type = "text/plain"
        channel = message.get("channel")
        remote = message.get("remote")
        status = answer.get("statusCode")
        status = status if isinstance(status, int) and not isinstance(status, bool) else None
        code = ack_code(answer.get("contentType"), answer.get("body"))
        error_kind = info.get("error_kind")
        if error_kind is not None or status is None or status >= 400:
            outcome = "error"
        elif code in NEGATIVE_ACKS:
            outcome = "rejected"
        else:
            outcome = "ok"
        fields = message_fields(content_type, text)
        return InboundMessage(
            message_type=fields["message_type"], control_id=fields["control_id"],
            patient_id=fields["patient_id"], accession=fields["accession"],
            study_uid=fields["study_uid"], sop_uid=fields["sop_uid"],
            id=self.inbound_log.new_id(),
            agent_id=agent_id,
            channel=str(channel)[:200] if isinstance(channel, str) else "",
            received=received,
            content_type=content_type[:200],
            size=len(text.encode("utf-8", "surrogatepass")),
            remote=remote[:200] if isinstance(remote, str) else None,
            status=status,
            ack_code=code,
            outcome=outcome,
            bot=info.get("bot"),
            duration_ms=round(took_ms, 3),
            error_kind=error_kind,
            body=text if self.keep_payloads and isinstance(body, str) else None,
        )
