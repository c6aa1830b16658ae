"""
``Agent/$push``: validate, resolve agent and device, de-duplicate, journal, hand to the hub,
and (when asked) wait for the device's answer.  No HTTP here; L{medagent.relay.web} adapts.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any, Mapping

import attr
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.destination import DestinationError, lane_key, parse_destination
from medagent import schemes, wire
from medagent._twisted import shielded
from medagent.contenttypes import HL7_V2, PING
from medagent.fhir import FHIRError, bad_request, forbidden, not_found, parameters_to_dict
from medagent.hl7.message import HL7Error
from medagent.hl7.message import control_id as msh_control_id
from medagent.relay.access import check_push_destination
from medagent.relay.auth import Principal
from medagent.relay.fields import message_fields
from medagent.relay.hub import Hub
from medagent.storage import journal as j
from medagent.storage.interfaces import PushJournal as Journal
from medagent.storage.journal import Push, RepeatedPush, message_hash
from medagent.storage.resources import search_one

log = Logger()

DEFAULT_WAIT_MS = 10_000
MAX_WAIT_MS = 55_000
#: The longest ``ttl`` a push may ask for, in seconds (30 days).
MAX_TTL_S = 30 * 24 * 3600
#: The longest ``Idempotency-Key`` header accepted, in characters.
MAX_IDEMPOTENCY_KEY = 255


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
    #: the first attempt failed and the push is retried (answered 502 with its status URL)
    retrying: bool = False


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
        try:  # Medplum forwards JSON bodies as-is; NaN/Infinity are not JSON
            body = json.dumps(body, separators=(",", ":"), allow_nan=False)
        except ValueError:
            raise bad_request("body must not contain NaN or infinite numbers")
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
    for name, text in (("body", body), ("contentType", content_type),
                       ("destination", destination)):
        _check_text(text, name)
    wait = _bool(payload.get("waitForResponse"), "waitForResponse")
    raw_timeout = payload.get("waitTimeout")
    if raw_timeout is None:
        raw_timeout = DEFAULT_WAIT_MS
    timeout = _number(raw_timeout, "Invalid wait timeout: waitTimeout must be milliseconds "
                                   "(integer)")
    if timeout != math.floor(timeout):
        raise bad_request("Invalid wait timeout: waitTimeout must be milliseconds (integer)")
    if not 0 <= timeout <= MAX_WAIT_MS:
        raise bad_request(f"Invalid wait timeout: must be between 0 and {MAX_WAIT_MS} ms")
    wait_timeout = int(timeout)
    options: dict[str, Any] = {}
    return_ack = payload.get("returnAck")
    if return_ack is not None:
        if return_ack not in ("first", "application"):
            raise bad_request("returnAck must be 'first' or 'application'")
        options["returnAck"] = return_ack
    expires_in = payload.get("ttl")
    if expires_in is not None:
        expires_in = _number(expires_in, "ttl must be a number of seconds")
        if not 0 < expires_in <= MAX_TTL_S:
            raise bad_request(f"ttl must be more than 0 and at most {MAX_TTL_S} seconds")
    return PushRequest(
        destination=destination,
        content_type=content_type,
        body=body,
        wait=wait,
        wait_timeout_ms=wait_timeout,
        options=options,
        expires_in=expires_in,
    )


def _number(value: Any, message: str) -> float:
    """
    A finite number from JSON or a Parameters C{value[x]} (a number, or its text); anything
    else (a boolean, NaN, Infinity, ``1e309``, an integer too large for a float) is a 400.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad_request(message)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise bad_request(message)
    if not math.isfinite(number):
        raise bad_request(message + "; NaN and infinite values are refused")
    return number


def _check_text(text: str, name: str) -> None:
    """Text we store and forward must be Unicode (JSON lets a lone surrogate through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{name} is not valid Unicode text")


def check_idempotency_key(key: str | None) -> str | None:
    """The C{Idempotency-Key} header: absent, or 1 to 255 printable characters."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise bad_request(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return key


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
    if first.find(first[3], 4) < 0:
        # MSH-1 and MSH-2 only: no field after them, so no MSH-10 either
        raise bad_request("HL7 message has no MSH-10 (message control id)")
    try:
        # the one MSH parser (the agent and the journal read MSH-10 with it too)
        return msh_control_id(first)
    except HL7Error as e:
        raise bad_request(str(e))


def _message_scope(push: Push) -> tuple[str, str, str]:
    return (push.agent_id, push.control_id or "", push.body_hash or "")


def _hash_of(push: Push) -> str:
    return push.body_hash or message_hash(push.content_type, push.body)


def _same_message(a: Push, b: Push) -> bool:
    """The same bytes of the same type to the same device through the same agent."""
    return (a.agent_id == b.agent_id and lane_key(a.remote) == lane_key(b.remote)
            and _hash_of(a) == _hash_of(b))


def _check_same_key(earlier: Push, new: Push) -> None:
    """The caller's Idempotency-Key names C{earlier}: a repeat if it is the same message,
    else a 409 (the key was used for another message)."""
    if not _same_message(earlier, new):
        raise FHIRError(
            409,
            f"Idempotency-Key was already used by this client for a different message "
            f"(push {earlier.id}: {_difference(earlier, new)}); nothing was sent. "
            "Use a new key for a new message.",
            "conflict",
        )


def _difference(earlier: Push, new: Push) -> str:
    """What differs, in words without content (no PHI): for the 409's text."""
    if earlier.agent_id != new.agent_id:
        return "another agent"
    if lane_key(earlier.remote) != lane_key(new.remote):
        return "another device"
    if earlier.content_type != new.content_type:
        return "another contentType"
    return "another body"


class PushService:
    def __init__(self, hub: Hub, store: Any, journal: Journal, clock: Any) -> None:
        self.hub = hub
        self.store = store
        self.journal = journal
        self.clock = clock
        #: pushes being written, so that a concurrent repeat finds them too: by (caller,
        #: Idempotency-Key), and by (agent, MSH-10, body hash) for the same-message rule
        self._creating_by_key: dict[tuple[str, str], Push] = {}
        self._creating_by_message: dict[tuple[str, str, str], list[Push]] = {}
        #: pushes being written (by id): who waits to learn what each turned out to be
        self._writes: dict[str, list[Deferred[Push]]] = {}

    @inlineCallbacks
    def resolve_agent(self, agent_id: str | None, identifier: str | None):
        if agent_id:
            agent = yield self.store.read("Agent", agent_id)
            return agent
        if identifier:
            agent = yield search_one(self.store, "Agent", {"identifier": [identifier]})
            return agent
        raise bad_request("Must specify agent ID or identifier")

    def schemes_for(self, agent_id: str | None) -> tuple[frozenset[str], str]:
        """
        The destination schemes a push to C{agent_id} may use, and whose list that is: the
        schemes the connected agent announced (its capabilities), or - the agent is offline,
        or announces none, as Medplum's agent - every scheme of the registry, so a queued
        push still works.
        """
        session = self.hub.sessions.get(agent_id) if agent_id is not None else None
        announced = wire.announced_schemes(session.capabilities) if session else frozenset()
        if announced:
            return announced, f"Agent/{agent_id} supports"
        return schemes.sender_schemes(), "supported"

    @inlineCallbacks
    def resolve_remote(self, request: PushRequest, agent_id: str | None = None):
        """
        The device URL a destination names: Device/{id}, Device?search, or a URL, with a
        scheme that C{agent_id} can deliver to (L{schemes_for}).
        """
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
        supported, whose = self.schemes_for(agent_id)
        if parsed.scheme not in supported:
            raise bad_request(
                f"Unsupported destination scheme {parsed.scheme}:// "
                f"({whose}: {', '.join(sorted(supported))})"
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
        *,
        ping_by_operator: bool = False,
    ):
        """
        Journal and submit a push (and wait for it when asked).  C{ping_by_operator}: the
        console's ping of a lane, which an operator may send although it may not push;
        anything but a ping is then refused.
        """
        received = self.clock.seconds()
        agent = yield self.resolve_agent(*agent_ref)
        agent_id = agent["id"]
        if not (ping_by_operator and principal.may_operate()):
            principal.require_push(agent_id)
        key = check_idempotency_key(idempotency_key)
        request = parse_push_body(payload)
        if ping_by_operator and request.content_type != PING:
            raise forbidden("Only a ping may be sent this way")
        if agent.get("status") == "off" and request.content_type != PING:
            raise bad_request("Agent is currently disabled. Agent.status is 'off'")
        remote = yield self.resolve_remote(request, agent_id)
        yield check_push_destination(self.store, principal, agent, remote)
        control_id = accession = None
        found = message_fields(request.content_type, request.body)  # (search only)
        if request.content_type == HL7_V2:
            control_id = hl7_control_id(request.body)  # and refuse HL7 without MSH-10
            accession = found["accession"]
        push = Push(
            id=self.journal.new_id(),
            agent_id=agent_id,
            destination=request.destination,
            remote=remote,
            content_type=request.content_type,
            body=request.body,
            options=dict(request.options),
            idempotency_key=key,
            requester=principal.client_id,
            control_id=control_id,
            body_hash=message_hash(request.content_type, request.body),
            accession=accession,
            patient_id=found["patient_id"],
            study_uid=found["study_uid"],
            sop_uid=found["sop_uid"],
        )
        push.stamp("received", received)
        # A waited push to an agent not connected here looks first (a repeat is answered even
        # while its agent is away); the journal's insert checks again in its own transaction
        # either way, so a push not waited for, or to an agent this node holds, saves the
        # lookups and their database round trip (L{RepeatedPush} below).
        look_up = request.wait and not self.hub.is_connected(agent_id)
        existing, by_key = yield self._find_repeat(push, look_up=look_up)
        if existing is not None:
            result = yield self._repeat(push, existing, by_key, request)
            return result
        if request.wait and not (yield self.hub.held_anywhere(agent_id)):
            raise FHIRError(
                503,
                f"Agent/{agent_id} is not connected; nothing was sent. Push without "
                "waitForResponse to queue it for delivery when the agent connects.",
                "transient",
            )
        now = self.clock.seconds()
        push.expires_at = (now + request.expires_in) if request.expires_in else None
        if request.wait:
            self.hub.track(push)
        self._start_creating(push)
        created = self.journal.create(push)

        def stored(p: Push) -> Push:
            p.stamp("journaled", self.clock.seconds())  # (written with its next transition)
            self._done_creating(push, p)
            self.hub.submit(p)  # even if the caller has gone meanwhile
            return p

        def not_stored(f: Any) -> Any:
            self._done_creating(push, f.value.earlier if f.check(RepeatedPush) else f)
            self.hub.untrack(push.id)
            return f

        created.addCallbacks(stored, not_stored)
        try:
            stored_push = yield shielded(created)
        except RepeatedPush as e:
            # found in the insert's own transaction: another relay node (or a request here
            # that raced this one) journaled it first
            if e.by_key:
                _check_same_key(e.earlier, push)
            result = yield self._repeat(push, e.earlier, e.by_key, request)
            return result
        result = yield self._maybe_wait(stored_push, request)
        return result

    @inlineCallbacks
    def _repeat(self, new: Push, earlier: Push, by_key: bool, request: PushRequest):
        """C{new} repeats C{earlier}: nothing is sent again; the caller gets C{earlier}."""
        if new.idempotency_key is not None and not by_key:
            yield self._bind_key(new, earlier)
        log.info(
            "Push to Agent/{agent_id} repeats push {push_id} (same message to the same "
            "device); not sent again",
            agent_id=new.agent_id,
            push_id=earlier.id,
        )
        result = yield self._maybe_wait(earlier, request, duplicate=True)
        return result

    @inlineCallbacks
    def _find_repeat(self, new: Push, look_up: bool = True):
        """
        The earlier push C{new} repeats (or C{None}), and whether the caller's key found it.
        Two rules, both always applied:

        - the caller's own C{Idempotency-Key}: the same key with the same message (agent,
          device, content type and body) is a repeat; with anything else it is a 409;
        - the same message: an HL7 v2 push with the same MSH-10 and the same body to the same
          device through the same agent, whatever key (or none) and whichever caller allowed
          on that agent sent it.  Same MSH-10 with another body is another message.

        Pushes still being written count too (checked before and after the journal lookup, so
        a concurrent repeat cannot slip between).  Without C{look_up}, only those: the
        journal's insert finds the rest (L{RepeatedPush}).
        """
        if new.idempotency_key is not None:
            scope = (new.requester or "", new.idempotency_key)
            earlier = self._creating_by_key.get(scope)
            if earlier is None and look_up:
                earlier = yield self.journal.find_by_key(*scope)
            if earlier is None:
                earlier = self._creating_by_key.get(scope)
            if earlier is not None:
                earlier = yield self._written(earlier)
                _check_same_key(earlier, new)
                return earlier, True
        if new.control_id is not None and new.body_hash is not None:
            device = lane_key(new.remote)
            earlier = self._creating_message(new, device)
            if earlier is None and look_up:
                earlier = yield self.journal.find_same_message(
                    new.agent_id, device, new.control_id, new.body_hash)
            if earlier is None:
                earlier = self._creating_message(new, device)
            if earlier is not None:
                earlier = yield self._written(earlier)
            return earlier, False
        return None, False

    @inlineCallbacks
    def _bind_key(self, new: Push, existing: Push):
        """The caller's key now names C{existing} (see L{Journal.remember_key})."""
        scope = (new.requester or "", new.idempotency_key or "")
        if scope in self._creating_by_key:
            return
        self._creating_by_key[scope] = existing
        try:
            # batched after C{existing}'s own write if that is still going on, so never before
            yield self.journal.remember_key(scope[0], scope[1], existing.id)
        except Exception:
            log.failure("Could not bind an Idempotency-Key to push {push_id}",
                        push_id=existing.id)
        finally:
            if self._creating_by_key.get(scope) is existing:
                del self._creating_by_key[scope]

    def _creating_message(self, new: Push, device: str) -> Push | None:
        for p in self._creating_by_message.get(_message_scope(new), ()):
            if lane_key(p.remote) == device:
                return p
        return None

    def _written(self, push: Push) -> Deferred[Push]:
        """
        What C{push} (found by the guards above, maybe still being written) is in the
        journal: itself once written, or the earlier push its write found it repeats (another
        node journaled that one); fails as its write failed.
        """
        if push.id not in self._writes:
            return succeed(push)
        d: Deferred[Push] = Deferred()
        self._writes[push.id].append(d)
        return d

    def _start_creating(self, push: Push) -> None:
        self._writes[push.id] = []
        if push.idempotency_key is not None:
            self._creating_by_key[(push.requester or "", push.idempotency_key)] = push
        if push.control_id is not None:
            self._creating_by_message.setdefault(_message_scope(push), []).append(push)

    def _done_creating(self, push: Push, outcome: Push | Failure) -> None:
        waiting = self._writes.pop(push.id, [])
        if push.idempotency_key is not None:
            scope = (push.requester or "", push.idempotency_key)
            if self._creating_by_key.get(scope) is push:
                del self._creating_by_key[scope]
        if push.control_id is not None:
            scope3 = _message_scope(push)
            pending = self._creating_by_message.get(scope3, [])
            if push in pending:
                pending.remove(push)
            if not pending:
                self._creating_by_message.pop(scope3, None)
        for d in waiting:
            d.callback(outcome) if isinstance(outcome, Push) else d.errback(outcome)

    @inlineCallbacks
    def _maybe_wait(self, push: Push, request: PushRequest, duplicate: bool = False):
        if not request.wait or push.final:
            return PushResult(push, waited=request.wait, duplicate=duplicate)
        live = self.hub.live_push(push)
        if duplicate and live.state == j.ACCEPTED and live.last_error:
            # A repeat of a push whose attempts are failing (e.g. the Medplum client re-POSTs
            # on our 502): the same answer at once, not a wait for the next attempt.
            return PushResult(live, waited=True, duplicate=True, retrying=True)
        d = self.hub.wait_for(push)
        timer = self.clock.callLater(request.wait_timeout_ms / 1000.0, d.cancel)
        try:
            done = yield d
        except CancelledError:
            return PushResult(push, waited=True, timed_out=True, duplicate=duplicate)
        finally:
            if timer.active():
                timer.cancel()
        return PushResult(done, waited=True, duplicate=duplicate, retrying=not done.final)

    @inlineCallbacks
    def cancel(self, principal: Principal, push_id: str):
        """
        Queued on the relay: cancelled at once.  Already on the agent: the hub asks the agent
        to drop it (409 if it is being delivered, or the agent cannot cancel).
        """
        push = yield self.journal.get(push_id)
        principal.require_manage_push(push.agent_id)
        push = yield self.hub.cancel(push_id, principal.client_id)
        return push

    @inlineCallbacks
    def retry(self, principal: Principal, push_id: str):
        push = yield self.journal.get(push_id)
        principal.require_manage_push(push.agent_id)
        if push.state not in (j.FAILED, j.EXPIRED):
            raise FHIRError(409, f"Push {push_id} is {push.state}; only failed or expired "
                            "pushes can be retried", "conflict")
        push.expires_at = None
        yield self.journal.transition(push, j.QUEUED, error="")
        self.hub.submit(push)
        return push

    @inlineCallbacks
    def resend(self, principal: Principal, push_id: str):
        """
        Send a finished push's message again as a new push (its C{resent_from} names the
        original, which is left as it is).  Deliberately not a repeat: the same-message rule
        is what a resend overrides, so the new push goes to the device even with the same
        MSH-10 and body.  Only pushes in a final state (an open one is still on its way).
        """
        original = yield self.journal.get(push_id)
        principal.require_manage_push(original.agent_id)
        if not original.final:
            raise FHIRError(409, f"Push {push_id} is {original.state}; only a finished push "
                            "can be resent", "conflict")
        push = Push(
            id=self.journal.new_id(),
            agent_id=original.agent_id,
            destination=original.destination,
            remote=original.remote,
            content_type=original.content_type,
            body=original.body,
            options=dict(original.options),
            requester=principal.client_id,
            control_id=original.control_id,
            body_hash=original.body_hash,
            accession=original.accession,
            patient_id=original.patient_id,
            study_uid=original.study_uid,
            sop_uid=original.sop_uid,
            resent_from=original.id,
        )
        push = yield self.journal.create(push)
        log.info("Push {push_id} to Agent/{agent_id} resends push {original} (by {client_id})",
                 push_id=push.id, agent_id=push.agent_id, original=original.id,
                 client_id=principal.client_id)
        self.hub.submit(push)
        return push
