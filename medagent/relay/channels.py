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

from typing import Any, Mapping

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from medagent.contenttypes import HL7_V2
from medagent.fhir import FHIRError
from medagent.hl7 import message as hl7msg
from medagent.relay import bots as b

log = Logger()

MAX_REASON = 500


def _answer(status: int, body: str, content_type: str = "text/plain") -> dict[str, Any]:
    return {"statusCode": status, "contentType": content_type, "body": body}


def find_channel(agent: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    for channel in agent.get("channel") or []:
        if isinstance(channel, Mapping) and channel.get("name") == name:
            return channel
    return None


class ChannelRouter:
    """``hub.inbound``: C{router(agent_id, message) -> Deferred[answer dict]}."""

    def __init__(self, store: Any, runner: b.BotRunner) -> None:
        self.store = store
        self.runner = runner

    def __call__(self, agent_id: str, message: Mapping[str, Any]) -> Deferred[dict[str, Any]]:
        return ensureDeferred(self.route(agent_id, message))

    async def route(self, agent_id: str, message: Mapping[str, Any]) -> dict[str, Any]:
        try:
            answer = await self._run(agent_id, message)
        except Exception:  # a bug here must still give an HL7 device its AE
            log.failure("Inbound message from Agent/{agent_id} failed", agent_id=agent_id)
            answer = _answer(500, "Relay error")
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

    async def _run(self, agent_id: str, message: Mapping[str, Any]) -> dict[str, Any]:
        name = message.get("channel")
        body = message.get("body")
        content_type = message.get("contentType")
        if not isinstance(name, str) or not name:
            return _answer(400, "Missing channel name")
        if not isinstance(body, str):
            return _answer(400, "Missing body")
        if not isinstance(content_type, str) or not content_type:
            content_type = "text/plain"
        try:
            agent = await self.store.read("Agent", agent_id)
        except FHIRError:
            return _answer(404, f"Agent/{agent_id} not found")
        channel = find_channel(agent, name)
        if channel is None:
            log.warn("Agent/{agent_id} sent a message for unknown channel {channel}",
                     agent_id=agent_id, channel=name)
            return _answer(404, f"Channel {name!r} not found on Agent/{agent_id}")
        target = channel.get("targetReference")
        reference = target.get("reference") if isinstance(target, Mapping) else None
        if not isinstance(reference, str) or not reference.startswith("Bot/") or \
                len(reference) <= len("Bot/"):
            return _answer(404, f"Channel {name!r} of Agent/{agent_id} has no Bot "
                                "(channel.targetReference must be Bot/{id})")
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
        failed = _answer(run.http_status, run.error_text()[:MAX_REASON])
        # for the device: what failed and where operators find it, not the bot's error text
        failed["deviceReason"] = f"Bot/{run.bot_id} failed ({run.outcome})" + (
            f"; see AuditEvent/{run.audit_id}" if run.audit_id else "")
        return failed
