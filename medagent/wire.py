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
#: Extension (either way, only to a peer that announced "batch"): several messages in one
#: frame, ``{"type": "agent:batch", "messages": [...]}``, each handled as if it came in a
#: frame of its own, in order.  Sent when several messages are ready in one reactor turn
#: (L{FrameBatcher}); at most L{MAX_BATCH} messages, never nested.
BATCH = "agent:batch"
#: Field of our agent's answer to a push: milliseconds from handing the message to the device
#: until this answer (the agent's clock: an interval, not a time, since clocks differ); the
#: relay puts the push's "device" stage that long before the answer came.
DEVICE_MS = "deviceMs"
#: Most messages one ``agent:batch`` frame may carry.
MAX_BATCH = 64
#: A batch frame stays below this many bytes; a bigger message goes in a frame of its own.
BATCH_BYTES = 256 * 1024
#: Field of the connect request (agent) and response (relay) next to the "batch" capability:
#: the largest batch frame the sender accepts (at most L{BATCH_BYTES}, and within its own
#: message size limit), which the other side keeps its batches under.
BATCH_BYTES_FIELD = "batchBytes"
#: The smallest batch limit a peer may announce (below it, it gets no batches).
MIN_BATCH_BYTES = 1024


def batch_limit(own_max_message: int) -> int:
    """The C{batchBytes} to announce: L{BATCH_BYTES}, or less if our own limit is lower."""
    return max(MIN_BATCH_BYTES, min(BATCH_BYTES, own_max_message))


def peer_batch_limit(msg: Mapping[str, Any]) -> int | None:
    """
    The batch limit the peer's connect message announced, or C{None} (no batches to it):
    it must name the "batch" capability and a whole C{batchBytes} from L{MIN_BATCH_BYTES}
    to L{BATCH_BYTES} (a number from outside, range-checked).
    """
    caps = msg.get("capabilities")
    limit = msg.get(BATCH_BYTES_FIELD)
    if not (isinstance(caps, list) and CAP_BATCH in caps):
        return None
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    return limit if MIN_BATCH_BYTES <= limit <= BATCH_BYTES else None

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
        BATCH,
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
#: The peer reads ``agent:batch`` frames (announced by our agent in its connect request and
#: by our relay in its connect response; each side batches only to a peer that announced it).
CAP_BATCH = "batch"

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
                                  CAP_LANE_HOLD, CAP_BATCH])
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
    return check(msg)


def check(msg: dict[str, Any]) -> dict[str, Any]:
    """A decoded JSON object as a message (its ``type`` known, its fields there), or
    L{WireError}; a frame's object, or one of an ``agent:batch``."""
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
    if kind == BATCH:
        items = msg.get("messages")
        if not isinstance(items, list) or not items:
            raise WireError("messages must be a non-empty list", callback)
        if len(items) > MAX_BATCH:
            raise WireError(f"Too many messages in one batch ({len(items)}, limit "
                            f"{MAX_BATCH})", callback)
    return msg


def unbatch(batch: Mapping[str, Any]) -> list[dict[str, Any] | WireError]:
    """
    The messages of an ``agent:batch`` (checked by L{decode}), each checked as a frame's
    would be: a message, or the L{WireError} to answer for it (a nested batch is one).
    """
    out: list[dict[str, Any] | WireError] = []
    for item in batch["messages"]:
        try:
            if not isinstance(item, dict):
                raise WireError("Message is not a JSON object")
            msg = check(item)
            if msg["type"] == BATCH:
                raise WireError("agent:batch inside agent:batch", msg.get("callback"))
            out.append(msg)
        except WireError as e:
            out.append(e)
    return out


def encode(msg: Mapping[str, Any]) -> bytes:
    """Serialize a message for one text frame (UTF-8, compact, ``None`` fields dropped)."""
    return json.dumps(
        {k: v for k, v in msg.items() if v is not None}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def encode_batch(frames: Iterable[bytes]) -> bytes:
    """One ``agent:batch`` frame from messages already L{encode}d (not encoded again)."""
    return b'{"type":"agent:batch","messages":[' + b",".join(frames) + b"]}"


_BATCH_ENVELOPE = len(encode_batch([]))


class FrameBatcher:
    """
    What a websocket's C{send_message} goes through: while off (the default, and for a peer
    that did not announce L{CAP_BATCH}, such as Medplum's agent), each message is written as
    its own frame at once.  Once L{enable}d, messages sent in one reactor turn are written
    together at the end of it (C{clock.callLater(0)}): one frame for one message, an
    ``agent:batch`` for several (up to L{MAX_BATCH} messages and the peer's announced
    C{batchBytes}; a message that does not fit goes alone, as it would have), always in
    the order they were sent.  A websocket frame costs both sides far more than the JSON
    of a small message, and sixteen pushes answered in one turn become one frame, not
    sixteen.  C{write(frame_bytes)} writes one text frame.
    """

    def __init__(self, clock: Any, write: Any) -> None:
        self._clock = clock
        self._write = write
        self._pending: list[bytes] = []
        self._call: Any = None
        self.enabled = False
        #: the largest batch frame (the peer's announced C{batchBytes})
        self.max_bytes = BATCH_BYTES
        #: frames written, and messages in them (for tests and stats)
        self.frames = 0
        self.messages = 0

    def enable(self, max_bytes: int = BATCH_BYTES) -> None:
        """Batch from now on, each batch frame at most C{max_bytes} (the peer's limit)."""
        self.enabled = True
        self.max_bytes = min(max_bytes, BATCH_BYTES)

    def send(self, msg: Mapping[str, Any]) -> None:
        data = encode(msg)
        if not self.enabled:
            self._emit(data, 1)
            return
        self._pending.append(data)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write what is pending now (also before a close, so nothing sent is held back)."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        pending, self._pending = self._pending, []
        group: list[bytes] = []
        size = _BATCH_ENVELOPE
        for data in pending:
            if group and (len(group) >= MAX_BATCH or size + len(data) + 1 > self.max_bytes):
                self._emit_group(group)
                group, size = [], _BATCH_ENVELOPE
            group.append(data)
            size += len(data) + 1
        if group:
            self._emit_group(group)

    def discard(self) -> None:
        """The connection is gone: drop what is pending (and its timer)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._pending = []

    def _emit_group(self, group: list[bytes]) -> None:
        self._emit(group[0] if len(group) == 1 else encode_batch(group), len(group))

    def _emit(self, frame: bytes, n: int) -> None:
        self.frames += 1
        self.messages += n
        self._write(frame)


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
