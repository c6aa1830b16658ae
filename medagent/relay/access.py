"""
Who may read which resource: the read scope of each role, and the link between an Agent and
the Devices and Endpoints it serves.

The scope of a non-admin client is derived from the ``Agent`` resources it is tied to, never
from the resource being read (an attacker can write nothing, so nothing he controls widens
it):

- **pusher**: the Agents in its scope (``*`` = every Agent) and the Devices of those Agents
  (``*`` = every Device).  No Endpoint (the sites' listening addresses), no Bot, no clinical
  resource.
- **agent**: its own Agent, the Endpoints its ``Agent.channel[].endpoint`` references (what it
  must listen on) and its Devices.  Not the channel Bots: the relay runs them, the agent never
  reads them (neither does Medplum's agent: it reloads ``Agent`` and ``Endpoint`` only).
- **admin** (and Bot principals, which currently run as admin): everything.

The link Agent → Device is explicit and lives on the Agent, which only an admin can write:

- ``Agent.device`` (Medplum's element, one reference), and
- every ``Agent.extension`` with url L{EXT_DEVICE} and a ``valueReference`` ``Device/{id}``
  (repeatable: the devices this agent delivers to).

A Device that no Agent lists is visible to admins (and ``*`` pushers) only.

A resource outside the caller's scope is reported exactly like a missing one (404 with the
same text), so a read by id does not reveal that it exists; a type the role may never read
is a 403 whatever the id (that reveals nothing about any instance).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from twisted.internet.defer import Deferred, inlineCallbacks

from medagent.fhir import FHIRError, forbidden, not_found
from medagent.relay.auth import ADMIN, AGENT, BOT, PUSHER, Principal

#: ``Agent.extension[].url`` of a Device this Agent delivers to (``valueReference``).
EXT_DEVICE = "urn:medagent:fhir:StructureDefinition:device"

#: Resource types a role may read at all (what it sees of them is narrowed further below).
READABLE: Mapping[str, frozenset[str]] = {
    PUSHER: frozenset(["Agent", "Device"]),
    AGENT: frozenset(["Agent", "Device", "Endpoint"]),
}


def _reference_id(reference: Any, resource_type: str) -> str | None:
    """The id of a relative reference ``{resource_type}/{id}``, else None."""
    if not isinstance(reference, Mapping):
        return None
    ref = reference.get("reference")
    prefix = resource_type + "/"
    if not isinstance(ref, str) or not ref.startswith(prefix):
        return None
    rest = ref[len(prefix):]
    if not rest or "/" in rest or "?" in rest:
        return None
    return rest


def agent_device_ids(agent: Mapping[str, Any]) -> set[str]:
    """The Devices an Agent serves: ``Agent.device`` and every L{EXT_DEVICE} extension."""
    ids: set[str] = set()
    own = _reference_id(agent.get("device"), "Device")
    if own:
        ids.add(own)
    extensions = agent.get("extension")
    for ext in extensions if isinstance(extensions, list) else []:
        if isinstance(ext, Mapping) and ext.get("url") == EXT_DEVICE:
            device = _reference_id(ext.get("valueReference"), "Device")
            if device:
                ids.add(device)
    return ids


def agent_endpoint_ids(agent: Mapping[str, Any]) -> set[str]:
    """The Endpoints an Agent's channels listen on (``Agent.channel[].endpoint``)."""
    ids: set[str] = set()
    channels = agent.get("channel")
    for channel in channels if isinstance(channels, list) else []:
        if isinstance(channel, Mapping):
            endpoint = _reference_id(channel.get("endpoint"), "Endpoint")
            if endpoint:
                ids.add(endpoint)
    return ids


@inlineCallbacks
def _agents(store: Any, ids: Iterable[str]):
    found = []
    for agent_id in sorted(ids):
        try:
            agent = yield store.read("Agent", agent_id)
        except FHIRError:
            continue  # an Agent in the scope that does not exist (any more) grants nothing
        found.append(agent)
    return found


@inlineCallbacks
def visible_ids(principal: Principal, resource_type: str, store: Any):
    """
    Fires with the ids of C{resource_type} the caller may read, or None for "all of them";
    fails with 403 when the role may not read that type at all.
    """
    if principal.role == ADMIN:
        return None
    if resource_type not in READABLE.get(principal.role, frozenset()):
        raise forbidden(f"This client may not read {resource_type}")
    everything = principal.role == PUSHER and "*" in principal.agents
    if resource_type == "Agent":
        return None if everything else frozenset(principal.agents - {"*"})
    if everything:
        return None  # a '*' pusher may push to any Device through any Agent
    agents = yield _agents(store, principal.agents)
    ids: set[str] = set()
    for agent in agents:
        if resource_type == "Device":
            ids |= agent_device_ids(agent)
        elif resource_type == "Endpoint":
            ids |= agent_endpoint_ids(agent)
    return frozenset(ids)


def check_visible(principal: Principal, resource_type: str, id: str, store: Any
                  ) -> Deferred[None]:
    """Fires when C{resource_type/id} is in scope; else fails exactly as a missing one does."""

    def check(ids: frozenset[str] | None) -> None:
        if ids is not None and id not in ids:
            raise not_found(f"{resource_type}/{id} not found")  # the store's words for it

    return visible_ids(principal, resource_type, store).addCallback(check)


def scoped_search(params: Mapping[str, list[str]], ids: frozenset[str]) -> dict[str, list[str]]:
    """
    C{params} narrowed to C{ids}: one more ``_id`` value, ANDed with whatever the caller asked,
    so paging and ``_count`` work on the caller's own resources only.
    """
    narrowed = {k: list(v) for k, v in params.items()}
    narrowed.setdefault("_id", []).append(",".join(sorted(ids)))
    return narrowed


def _device_of(url: str, bare: bool) -> str | None:
    """
    What identifies the device of C{url} (its lane key), or with C{bare} only its host name
    (lower case), or None if the URL names no device.
    """
    from medagent.destination import DestinationError, parse_destination

    try:
        parsed = parse_destination(url, needs_port=False)
    except DestinationError:
        return None
    return parsed.host.lower().rstrip(".") if bare else parsed.key


@inlineCallbacks
def check_push_destination(store: Any, principal: Principal, agent: Mapping[str, Any],
                           remote: str) -> Any:
    """
    A pusher (or a Bot) may push only to a device of the Agent it pushes to (L{agent_device_ids}),
    however it names it (``Device/{id}``, a search, or the device's URL): a raw URL to any
    host:port of the site would turn the agent into the pusher's port scanner.  A ping by bare
    host (as Medplum's CLI sends) must name the host of one of those devices.  Admins may use
    any destination; the agent's own allowlist still applies to everyone.
    """
    if principal.role not in (PUSHER, BOT):
        return
    bare = "://" not in remote
    wanted = _device_of(f"ping://{remote}" if bare else remote, bare)
    for device_id in sorted(agent_device_ids(agent)):
        try:
            device = yield store.read("Device", device_id)
        except FHIRError:
            continue
        url = device.get("url")
        if wanted is not None and isinstance(url, str) and _device_of(url, bare) == wanted:
            return
    raise forbidden(f"Agent/{agent.get('id')} has no Device with this destination; a pusher "
                    "may push only to the Agent's Devices (Agent.device or the "
                    f"{EXT_DEVICE} extension)")

