"""
The C{AuditEvent} of something a client did through the relay (read a payload, retried a
push, paused a lane): who (client and role), from where, when, on what; never a payload.
One shape for every such record, so that the audit trail reads the same whoever wrote it.
"""

from __future__ import annotations

from typing import Any, Sequence

from medagent.relay.auth import Principal
from medagent.storage.resources import now_iso

#: C{AuditEvent.type} of a REST interaction (a read, an operation)
REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest", "display": "RESTful Operation"}
#: the restful-interaction code system of C{AuditEvent.subtype}
INTERACTION = "http://hl7.org/fhir/restful-interaction"


def client_audit_event(principal: Principal, address: str, now: float, *,
                       type: dict[str, str], subtype: dict[str, str], action: str,
                       description: str, observer: str, entity: Sequence[dict[str, Any]]
                       ) -> dict[str, Any]:
    """
    An C{AuditEvent} of C{principal}'s act from C{address} (its network address, cut at 100
    characters; left out when empty) at C{now}: C{type}, C{subtype} and C{action} code it,
    C{description} says it in words (no message content), C{entity} is what it was done to.
    """
    who: dict[str, Any] = {"who": {"reference": f"ClientApplication/{principal.client_id}"},
                           "type": {"text": principal.role}, "requestor": True}
    if address:
        who["network"] = {"address": address[:100], "type": "2"}
    return {
        "resourceType": "AuditEvent",
        "type": type,
        "subtype": [subtype],
        "action": action,
        "recorded": now_iso(now),
        "outcome": "0",
        "outcomeDesc": description,
        "agent": [who],
        "source": {"observer": {"display": observer}},
        "entity": list(entity),
    }


def push_entities(push: Any) -> list[dict[str, Any]]:
    """What an AuditEvent of an act on a push names: the push (by id) and its agent."""
    return [{"what": {"identifier": {"system": "urn:medagent:push", "value": push.id}},
             "type": {"code": "AgentPush"}},
            {"what": {"reference": f"Agent/{push.agent_id}"}}]
