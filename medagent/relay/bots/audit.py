"""
The C{AuditEvent} of one bot run or subscription delivery.

No payload ever goes into it: never the input, the result, the bot's output or an
exception's text (any of them can quote the HL7 message); only sizes, the exception type and
line, ids and outcomes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from medagent.relay.bots.outcomes import (
    BUSY,
    CRASH,
    DISABLED,
    ERROR,
    INVALID,
    MEMORY,
    NOT_FOUND,
    STOPPED,
    SUCCESS,
    TIMEOUT,
)
from medagent.storage.resources import now_iso

EXT = "urn:medagent:fhir:StructureDefinition:"
EXT_BOT_RUN = EXT + "bot-run"
AUDIT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
              "code": "rest", "display": "RESTful Operation"}
AUDIT_SUBTYPE = {"system": "http://hl7.org/fhir/restful-interaction", "code": "execute",
                 "display": "execute"}
#: AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure.
AUDIT_OUTCOME = {SUCCESS: "0", ERROR: "4", INVALID: "4", NOT_FOUND: "4", TIMEOUT: "8",
                 MEMORY: "8", CRASH: "8", BUSY: "4", STOPPED: "4", DISABLED: "8"}


def fhir_reference(ref: Any) -> dict[str, Any] | None:
    """A Reference to put in an AuditEvent: C{"Type/id"}, or a Reference's own
    C{reference}/C{display} (nothing else of it: no payload); None when there is none."""
    if isinstance(ref, str) and ref:
        return {"reference": ref}
    if isinstance(ref, Mapping) and (ref.get("reference") or ref.get("display")):
        return {k: ref[k] for k in ("reference", "display") if k in ref}
    return None


def audit_event(
    *,
    trigger: str,
    outcome: str,
    started: float,
    ended: float,
    summary: str,
    logs: str = "",
    bot: Mapping[str, Any] | None = None,
    bot_ref: str | None = None,
    requester: Any = None,
    entities: Sequence[Any] = (),
    attempt: int | None = None,
    extra: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """
    An AuditEvent for one bot run or subscription delivery.  No payload: never the input,
    the result, the bot's output or an exception's text (any of them can quote the HL7
    message); only sizes, the exception type and line (C{extra}), ids and outcomes.
    """
    desc = summary
    agents: list[dict[str, Any]] = []
    if bot_ref:
        who = {"reference": bot_ref}
        if bot is not None and isinstance(bot.get("name"), str):
            who["display"] = bot["name"]
        agents.append({"who": who, "requestor": False,
                       "type": {"text": "bot"}})
    req = fhir_reference(requester)
    if req is not None:
        agents.append({"who": req, "requestor": True})
    if not agents:
        agents.append({"who": {"display": "medagent-relay"}, "requestor": False})
    entity = []
    if bot_ref:
        entity.append({"what": {"reference": bot_ref}, "role": {"code": "bot"}})
    for e in entities:
        ref = fhir_reference(e)
        if ref is not None:
            entity.append({"what": ref})
    details = [{"url": "trigger", "valueCode": trigger},
               {"url": "outcome", "valueCode": outcome},
               {"url": "durationMs", "valueDecimal": round((ended - started) * 1000.0, 3)}]
    if attempt is not None:
        details.append({"url": "attempt", "valueInteger": attempt})
    if logs:
        details.append({"url": "outputBytes", "valueInteger": len(logs.encode("utf-8"))})
    details.extend(dict(x) for x in extra)
    return {
        "resourceType": "AuditEvent",
        "type": AUDIT_TYPE,
        "subtype": [AUDIT_SUBTYPE],
        "action": "E",
        "period": {"start": now_iso(started), "end": now_iso(ended)},
        "recorded": now_iso(ended),
        "outcome": AUDIT_OUTCOME.get(outcome, "4"),
        "outcomeDesc": desc,
        "agent": agents,
        "source": {"observer": {"display": "medagent-relay"}},
        "entity": entity,
        "extension": [{"url": EXT_BOT_RUN, "extension": details}],
    }

