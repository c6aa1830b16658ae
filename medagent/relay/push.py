"""
``Agent/$push``: validate, resolve agent and device, de-duplicate, journal, hand to the hub,
and (when asked) wait for the device's answer.  No HTTP here; L{medagent.relay.web} adapts.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Mapping

import attr
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.destination import DestinationError, parse_destination
from medagent.fhir import HL7_V2, FHIRError, bad_request, not_found, parameters_to_dict
from medagent.relay import journal as j
from medagent.relay.auth import Principal
from medagent.relay.hub import Hub
from medagent.relay.journal import Journal, Push
from medagent.relay.store import search_one

log = Logger()

PING = "x-application/ping"

DEFAULT_WAIT_MS = 10_000
MAX_WAIT_MS = 55_000

#: Destination schemes the relay accepts for raw URL destinations.
KNOWN_SCHEMES = frozenset(
    ["mllp", "mllps", "astm", "astm+serial", "dicom", "tcp", "worklist"]
)


@attr.s(frozen=True, auto_attribs=True)
class PushRequest:
    destination: str
    content_type: str
    body: str
    wait: bool
    wait_timeout_ms: int
    options: Mapping[str, Any]
    expires_in: float | None = None


@attr.s(frozen=True, auto_attribs=True)
class PushResult:
    """What the HTTP layer answers: the push, and whether we waited for it."""

    push: Push
    waited: bool
    timed_out: bool = False
    duplicate: bool = False


def parse_push_body(payload: Any) -> PushRequest:
    """The five Medplum fields (plain JSON or FHIR Parameters, any value[x]) → PushRequest."""
    if not isinstance(payload, dict):
        raise bad_request("Body must be a JSON object or a FHIR Parameters resource")
    if payload.get("resourceType") == "Parameters":
        payload = parameters_to_dict(payload)
    body = payload.get("body")
    if body is None or body == "":
        raise bad_request("Missing body parameter")
    if not isinstance(body, str):
        body = json.dumps(body, separators=(",", ":"))  # Medplum forwards JSON bodies as-is
    content_type = payload.get("contentType")
    if not content_type:
        raise bad_request("Missing contentType parameter")
    if not isinstance(content_type, str):
        raise bad_request("contentType must be a string")
    destination = payload.get("destination")
    if not destination:
        raise bad_request("Missing destination parameter")
    if not isinstance(destination, str):
        raise bad_request("destination must be a string")
    wait = _bool(payload.get("waitForResponse"), "waitForResponse")
    raw_timeout = payload.get("waitTimeout", DEFAULT_WAIT_MS)
    try:
        wait_timeout = int(raw_timeout)
        if isinstance(raw_timeout, bool) or float(raw_timeout) != wait_timeout:
            raise ValueError
    except (TypeError, ValueError):
        raise bad_request("Invalid wait timeout: waitTimeout must be milliseconds (integer)")
    if not 0 <= wait_timeout <= MAX_WAIT_MS:
        raise bad_request(f"Invalid wait timeout: must be between 0 and {MAX_WAIT_MS} ms")
    options: dict[str, Any] = {}
    return_ack = payload.get("returnAck")
    if return_ack is not None:
        if return_ack not in ("first", "application"):
            raise bad_request("returnAck must be 'first' or 'application'")
        options["returnAck"] = return_ack
    expires_in = payload.get("ttl")
    if expires_in is not None:
        try:
            expires_in = float(expires_in)
        except (TypeError, ValueError):
            raise bad_request("ttl must be a number of seconds")
        if expires_in <= 0:
            raise bad_request("ttl must be positive")
    return PushRequest(
        destination=destination,
        content_type=content_type,
        body=body,
        wait=wait,
        wait_timeout_ms=wait_timeout,
        options=options,
        expires_in=expires_in,
    )


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise bad_request(f"{name} must be true or false")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def is_bare_host(text: str) -> bool:
    """An IPv4 address or a host name (RFC 1123), as Medplum accepts for a ping."""
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        pass
    if not text or len(text) > 253 or text.replace(".", "").isdigit():
        return False
    return all(_HOST_LABEL.match(label) for label in text.removesuffix(".").split("."))


def hl7_control_id(body: str) -> str:
    """MSH-10 of an HL7 v2 message, or a 400 saying what is wrong with it."""
    text = body.lstrip()
    if not text.startswith("MSH"):
        raise bad_request("HL7 message must start with an MSH segment")
    first = text.replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
    if len(first) < 8:
        raise bad_request("HL7 MSH segment is too short")
    fields = first.split(first[3])
    # fields[0] = 'MSH', fields[1] = encoding characters (MSH-2), so MSH-n = fields[n-1]
    control_id = fields[9].strip() if len(fields) > 9 else ""
    if not control_id:
        raise bad_request("HL7 message has no MSH-10 (message control id)")
    return control_id


def _shielded(d: Deferred[Any]) -> Deferred[Any]:
    """
    A Deferred for C{d}'s result whose cancellation (the HTTP caller went away) does not
    cancel C{d}: a push being written is written and sent, whoever still waits for it.
    """
    out: Deferred[Any] = Deferred()

    def relay(result: Any) -> None:
        if not out.called:
            out.errback(result) if isinstance(result, Failure) else out.callback(result)

    d.addBoth(relay)
    return out


class PushService:
    def __init__(self, hub: Hub, store: Any, journal: Journal, clock: Any) -> None:
        self.hub = hub
        self.store = store
        self.journal = journal
        self.clock = clock
        #: pushes being written, by idempotency key, so a concurrent repeat finds them too
        self._creating: dict[tuple[str, str, str], Push] = {}

    @inlineCallbacks
    def resolve_agent(self, agent_id: str | None, identifier: str | None):
        if agent_id:
            agent = yield self.store.read("Agent", agent_id)
            return agent
        if identifier:
            agent = yield search_one(self.store, "Agent", {"identifier": [identifier]})
            return agent
        raise bad_request("Must specify agent ID or identifier")

    @inlineCallbacks
    def resolve_remote(self, request: PushRequest):
        """The device URL a destination names: Device/{id}, Device?search, or a URL."""
        destination = request.destination
        if destination.startswith("Device/"):
            try:
                device = yield self.store.read("Device", destination[len("Device/"):])
            except FHIRError:
                raise not_found(f"Destination device not found: {destination}")
        elif destination.startswith("Device?"):
            from urllib.parse import parse_qs

            query = parse_qs(destination[len("Device?"):], keep_blank_values=True)
            try:
                device = yield search_one(self.store, "Device", query)
            except FHIRError as e:
                raise not_found(f"Destination device not found: {e.message}")
        elif "://" in destination:
            device = {"resourceType": "Device", "url": destination}
        elif request.content_type == PING and is_bare_host(destination):
            # Medplum's form (its server, agent and CLI): a bare IPv4 address or host name,
            # forwarded unchanged; the agent decides how (Medplum's runs the OS ping).
            return destination
        elif request.content_type == PING and "/" not in destination:
            raise bad_request("Ping destination must be an IPv4 address, a host name or a "
                              "destination URL, e.g. mllp://host:2575")
        else:
            raise not_found(f"Destination device not found: {destination}")
        url = device.get("url")
        if not url:
            raise bad_request(f"Destination device missing url: {destination}")
        try:
            parsed = parse_destination(url, needs_port=False)
        except DestinationError as e:
            raise bad_request(f"Destination device has an invalid url: {e}")
        if parsed.scheme not in KNOWN_SCHEMES:
            raise bad_request(
                f"Unsupported destination scheme {parsed.scheme}:// "
                f"(supported: {', '.join(sorted(KNOWN_SCHEMES))})"
            )
        if device.get("status") in ("inactive", "entered-in-error"):
            raise bad_request(f"Destination device is {device['status']}")
        return url

    @inlineCallbacks
    def push(
        self,
        principal: Principal,
        agent_ref: tuple[str | None, str | None],
        payload: Any,
        idempotency_key: str | None = None,
    ):
        agent = yield self.resolve_agent(*agent_ref)
        agent_id = agent["id"]
        principal.require_push(agent_id)
        request = parse_push_body(payload)
        if agent.get("status") == "off" and request.content_type != PING:
            raise bad_request("Agent is currently disabled. Agent.status is 'off'")
        remote = yield self.resolve_remote(request)
        key = idempotency_key
        if key is None and request.content_type == HL7_V2:
            key = "msh10:" + hl7_control_id(request.body)
        elif request.content_type == HL7_V2:
            hl7_control_id(request.body)  # still refuse HL7 without MSH-10
        if key is not None:
            existing = self._creating.get((agent_id, remote, key))
            if existing is None:
                existing = yield self.journal.find_idempotent(agent_id, remote, key)
            if existing is None:
                existing = self._creating.get((agent_id, remote, key))
            if existing is not None:
                log.info(
                    "Push to Agent/{agent_id} repeats push {push_id} (idempotency key); "
                    "not sent again",
                    agent_id=agent_id,
                    push_id=existing.id,
                )
                result = yield self._maybe_wait(existing, request, duplicate=True)
                return result
        if request.wait and not self.hub.is_connected(agent_id):
            raise FHIRError(
                503,
                f"Agent/{agent_id} is not connected; nothing was sent. Push without "
                "waitForResponse to queue it for delivery when the agent connects.",
                "transient",
            )
        now = self.clock.seconds()
        push = Push(
            id=self.journal.new_id(),
            agent_id=agent_id,
            destination=request.destination,
            remote=remote,
            content_type=request.content_type,
            body=request.body,
            options=dict(request.options),
            idempotency_key=key,
            expires_at=(now + request.expires_in) if request.expires_in else None,
            requester=principal.client_id,
        )
        if request.wait:
            self.hub.track(push)
        if key is not None:
            self._creating[(agent_id, remote, key)] = push
        created = self.journal.create(push)

        def stored(p: Push) -> Push:
            if key is not None:
                self._creating.pop((agent_id, remote, key), None)
            self.hub.submit(p)  # even if the caller has gone meanwhile
            return p

        def not_stored(f: Any) -> Any:
            if key is not None:
                self._creating.pop((agent_id, remote, key), None)
            return f

        created.addCallbacks(stored, not_stored)
        push = yield _shielded(created)
        result = yield self._maybe_wait(push, request)
        return result

    @inlineCallbacks
    def _maybe_wait(self, push: Push, request: PushRequest, duplicate: bool = False):
        if not request.wait or push.final:
            return PushResult(push, waited=request.wait, duplicate=duplicate)
        d = self.hub.wait_for(push)
        timer = self.clock.callLater(request.wait_timeout_ms / 1000.0, d.cancel)
        try:
            done = yield d
        except CancelledError:
            return PushResult(push, waited=True, timed_out=True, duplicate=duplicate)
        finally:
            if timer.active():
                timer.cancel()
        return PushResult(done, waited=True, duplicate=duplicate)

    @inlineCallbacks
    def cancel(self, principal: Principal, push_id: str):
        push = yield self.journal.get(push_id)
        principal.require_push(push.agent_id)
        if push.state != j.QUEUED:
            raise FHIRError(409, f"Push {push_id} is {push.state}; only queued pushes can be "
                            "cancelled", "conflict")
        yield self.journal.transition(push, j.CANCELLED, error="Cancelled by " + principal.client_id)
        return push

    @inlineCallbacks
    def retry(self, principal: Principal, push_id: str):
        push = yield self.journal.get(push_id)
        principal.require_push(push.agent_id)
        if push.state not in (j.FAILED, j.EXPIRED):
            raise FHIRError(409, f"Push {push_id} is {push.state}; only failed or expired "
                            "pushes can be retried", "conflict")
        push.expires_at = None
        yield self.journal.transition(push, j.QUEUED, error="")
        self.hub.submit(push)
        return push
