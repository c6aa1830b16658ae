"""
Agent <-> relay websocket messages: Medplum's message set, parsed and checked, no I/O.

One JSON object per text frame. Field names follow ``@medplum/core``'s ``agent.ts`` so a real
Medplum agent or server understands us. Our extensions (``capabilities``, ``pushId``,
``delivery``, ``agent:accepted``...) ride on the same envelope and are used only when the
peer announced the matching capability; unknown fields are ignored.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping

from medagent.jsonsafe import JSONInputError, loads

#: Medplum's version string we answer heartbeats with.
PROTOCOL_VERSION = "medagent-0.1.0"

CONNECT_REQUEST = "agent:connect:request"
CONNECT_RESPONSE = "agent:connect:response"
HEARTBEAT_REQUEST = "agent:heartbeat:request"
HEARTBEAT_RESPONSE = "agent:heartbeat:response"
TRANSMIT_REQUEST = "agent:transmit:request"
TRANSMIT_RESPONSE = "agent:transmit:response"
RELOADCONFIG_REQUEST = "agent:reloadconfig:request"
RELOADCONFIG_RESPONSE = "agent:reloadconfig:response"
LOGS_REQUEST = "agent:logs:request"
LOGS_RESPONSE = "agent:logs:response"
STATS_REQUEST = "agent:stats:request"
STATS_RESPONSE = "agent:stats:response"
UPGRADE_REQUEST = "agent:upgrade:request"
UPGRADE_RESPONSE = "agent:upgrade:response"
ERROR = "agent:error"
#: Extension (relay → agent, only to agents that announced "durable"): the relay has recorded
#: the answer for ``pushId``; the agent may stop re-sending it.
TRANSMIT_CONFIRM = "agent:transmit:confirm"
#: Extension (relay → agent, only to agents that announced "cancel"): drop ``pushId`` from the
#: agent's queue if it is not being delivered yet.  The agent answers
#: ``agent:transmit:cancel:response`` with the request's ``callback``, the ``pushId`` and a
#: ``statusCode``: 200 dropped (its recorded answer says ``delivery: "cancelled"``), 409 being
#: delivered or already answered, 404 not held by the agent.
TRANSMIT_CANCEL = "agent:transmit:cancel"
TRANSMIT_CANCEL_RESPONSE = "agent:transmit:cancel:response"
#: Extension (relay → agent, only to agents that announced "lane-hold"): ``lanes`` is the
#: whole list of the agent's device lanes (keys, L{medagent.destination.lane_key}) an operator
#: paused.  The agent starts no further delivery on them (one already on its way to the
#: device finishes) until a later message leaves a lane out; it keeps the list on disk.  Sent
#: after every connect (an empty list included) and whenever the list changes.  No answer.
LANES_HOLD = "agent:lanes:hold"

#: Deprecated names that Medplum still accepts, mapped to the current ones.
ALIASES = {
    "connect": CONNECT_REQUEST,
    "connected": CONNECT_RESPONSE,
    "transmit": TRANSMIT_REQUEST,
    "push": TRANSMIT_REQUEST,
}

#: Required string fields per message type (beyond ``type``).
_REQUIRED: Mapping[str, tuple[str, ...]] = {
    CONNECT_REQUEST: ("accessToken", "agentId"),
    TRANSMIT_REQUEST: ("remote", "contentType", "body"),
    TRANSMIT_RESPONSE: ("remote", "body"),
    ERROR: ("body",),
    TRANSMIT_CONFIRM: ("pushId",),
    TRANSMIT_CANCEL: ("pushId",),
    TRANSMIT_CANCEL_RESPONSE: ("pushId",),
}

KNOWN_TYPES = frozenset(
    [
        CONNECT_REQUEST,
        CONNECT_RESPONSE,
        HEARTBEAT_REQUEST,
        HEARTBEAT_RESPONSE,
        TRANSMIT_REQUEST,
        TRANSMIT_RESPONSE,
        RELOADCONFIG_REQUEST,
        RELOADCONFIG_RESPONSE,
        LOGS_REQUEST,
        LOGS_RESPONSE,
        STATS_REQUEST,
        STATS_RESPONSE,
        UPGRADE_REQUEST,
        UPGRADE_RESPONSE,
        ERROR,
        TRANSMIT_CONFIRM,
        TRANSMIT_CANCEL,
        TRANSMIT_CANCEL_RESPONSE,
        LANES_HOLD,
    ]
)

#: Capabilities an agent may announce in ``agent:connect:request``.
CAP_DURABLE = "durable"
#: Our agent remembers the push ids it answered, so a push re-sent after a reconnect is
#: answered from that record instead of being delivered again.
CAP_DEDUPE = "dedupe"
#: The agent sends a fresh ``accessToken`` on its heartbeat requests before its token expires,
#: so the relay may end its session once the token it holds has expired.  Agents without it
#: (Medplum's) keep an established session until their client is revoked, as on Medplum.
CAP_TOKEN_REFRESH = "token-refresh"
#: The agent understands ``agent:transmit:cancel``.
CAP_CANCEL = "cancel"
#: The agent understands ``agent:lanes:hold`` (pushes of a paused lane already on its disk
#: wait there too).
CAP_LANE_HOLD = "lane-hold"
#: Lanes one ``agent:lanes:hold`` may name, at most, and the longest lane key.
MAX_HELD_LANES = 1000
MAX_LANE_KEY = 2000

#: ``agent:error`` texts that say the agent did not take the message at all: nothing reached
#: a device, so the push stays queued and is sent again once the agent is ready.
#: Medplum's agent answers the first of them until it has read its ``Agent`` resource.
NOT_DELIVERED_ERRORS = (
    "Agent.status is currently set to off",
    "Agent could not store the message",
)


def error_not_delivered(msg: Mapping[str, Any]) -> bool:
    """Whether an ``agent:error`` says its message never left the agent (safe to resend)."""
    body = msg.get("body")
    return isinstance(body, str) and body.startswith(NOT_DELIVERED_ERRORS)

#: The capabilities that are features; every other one an agent announces is a destination
#: scheme it can deliver to (ours announces each scheme of its senders).
FEATURE_CAPABILITIES = frozenset([CAP_DURABLE, CAP_DEDUPE, CAP_TOKEN_REFRESH, CAP_CANCEL,
                                  CAP_LANE_HOLD])
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}\Z")


def announced_schemes(capabilities: Iterable[str]) -> frozenset[str]:
    """The destination schemes among an agent's capabilities (none for Medplum's agent)."""
    return frozenset(c for c in capabilities
                     if c not in FEATURE_CAPABILITIES and _SCHEME.match(c))

#: Default largest frame either side accepts (bytes).  Medplum's server uses 1 MiB; DICOM
#: instances travel base64 encoded, so we default higher and make it configurable.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

#: Longest piece of peer-supplied text quoted in an error, a log line or a close reason.
MAX_REASON = 200

#: An agent id is a FHIR id (Medplum uses UUIDs); anything else is refused before it is
#: looked up, logged or echoed.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def clip(text: Any, limit: int = MAX_REASON) -> str:
    """C{text} as a string of at most C{limit} characters (marked when cut)."""
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WireError(ValueError):
    """
    A frame that is not a valid message.  ``callback`` is kept when it could be read, so the
    ``agent:error`` answer can still be correlated.
    """

    def __init__(self, reason: str, callback: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.callback = callback


def decode(data: bytes | str, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> dict[str, Any]:
    """
    Parse one frame into a message dict with a known ``type`` and its required fields.

    Raises L{WireError} for anything else; the caller answers ``agent:error`` and keeps the
    connection.
    """
    if len(data) > max_size:
        raise WireError(f"Message too large ({len(data)} bytes, limit {max_size})")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("Message is not valid UTF-8")
    try:
        msg = loads(data)
    except JSONInputError as e:
        raise WireError(f"Message is not JSON: {e.msg}")
    if not isinstance(msg, dict):
        raise WireError("Message is not a JSON object")
    callback = msg.get("callback")
    if callback is not None and not isinstance(callback, str):
        raise WireError("callback must be a string")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise WireError("Missing message type", callback)
    kind = ALIASES.get(kind, kind)
    if kind not in KNOWN_TYPES:
        raise WireError(f"Unknown message type: {clip(kind)}", callback)
    msg["type"] = kind
    for field in _REQUIRED.get(kind, ()):
        value = msg.get(field)
        if not isinstance(value, str) or (field != "body" and not value):
            raise WireError(f"Missing {field}", callback)
    if kind == CONNECT_REQUEST and not _FHIR_ID.fullmatch(msg["agentId"]):
        raise WireError("agentId is not a valid id", callback)
    status = msg.get("statusCode")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
        raise WireError("statusCode must be an integer", callback)
    return msg


def encode(msg: Mapping[str, Any]) -> bytes:
    """Serialize a message for one text frame (UTF-8, compact, ``None`` fields dropped)."""
    return json.dumps(
        {k: v for k, v in msg.items() if v is not None}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def error(body: str, callback: str | None = None) -> dict[str, Any]:
    return {"type": ERROR, "body": body, "callback": callback}


def heartbeat_response() -> dict[str, Any]:
    return {"type": HEARTBEAT_RESPONSE, "version": PROTOCOL_VERSION}


def transmit_response(
    request: Mapping[str, Any],
    *,
    status_code: int,
    content_type: str,
    body: str,
    **extra: Any,
) -> dict[str, Any]:
    """The answer to C{request} (an ``agent:transmit:request``), echoing its correlation."""
    msg = {
        "type": TRANSMIT_RESPONSE,
        "channel": request.get("channel"),
        "remote": request.get("remote"),
        "callback": request.get("callback"),
        "contentType": content_type,
        "statusCode": status_code,
        "body": body,
    }
    msg.update(extra)
    return msg
