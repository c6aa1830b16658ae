"""
Pausing and resuming a device lane of an agent (issue 12): what an operator does when a
device is being serviced, or sends garbage, and its pushes must wait without being lost.

A pause is a record in the relay's storage (L{medagent.storage.interfaces.LanePauses}), so
every relay node of a cluster and a restarted relay hold the same lanes.  The node holding the
agent's socket (L{medagent.relay.hub.Hub}) sends none of a paused lane's pushes: they stay
queued in the journal, in order, and flow again in order once the lane is resumed.  Pushes
the agent already had when the lane was paused (on its disk) wait there too when the agent
announced ``lane-hold`` (ours: L{medagent.wire.LANES_HOLD}; one already on its way to the
device finishes); Medplum's agent delivers what it has, shown as "already on the agent".
Other lanes of the agent go on.

Only operators and admins may pause or resume (never a pusher, a Bot or an agent); each
change is an C{AuditEvent} (who, when, which agent and lane; never a payload).  The console,
the HTTP operations (``POST Agent/{id}/$pause-lane``, ``$resume-lane``, ``GET $lanes``) and
the CLI (``medagent lane pause|resume``) all come here.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from medagent.destination import DestinationError, lane_key, parse_destination
from medagent.fhir import FHIRError, bad_request, forbidden
from medagent.relay.auth import Principal
from medagent.relay.hub import STATUS_TIMEOUT
from medagent.storage.resources import now_iso

log = Logger()

#: the longest destination accepted (a URL or Device/{id})
MAX_DESTINATION = 1000


class LaneControl:
    """Pauses and resumes lanes: the record, the audit, and the hub holding the agent."""

    def __init__(self, hub: Any, store: Any, pauses: Any, clock: Any) -> None:
        self.hub = hub
        self.store = store
        self.pauses = pauses
        self.clock = clock

    async def lane_of(self, destination: Any) -> str:
        """The lane key of C{destination}: a destination URL or ``Device/{id}``."""
        if not isinstance(destination, str) or not destination.strip() or \
                len(destination) > MAX_DESTINATION:
            raise bad_request("destination must be a destination URL or Device/{id}")
        destination = destination.strip()
        if destination.startswith("Device/"):
            try:
                device = await self.store.read("Device", destination[len("Device/"):])
            except FHIRError:
                raise FHIRError(404, f"Destination device not found: {destination}",
                                "not-found")
            url = device.get("url")
            if not isinstance(url, str) or not url:
                raise bad_request(f"Destination device missing url: {destination}")
        else:
            url = destination
        try:
            parse_destination(url, needs_port=False)
        except DestinationError as e:
            raise bad_request(f"destination is not a destination URL: {e}")
        return lane_key(url)

    async def _agent(self, principal: Principal, agent_id: str) -> dict[str, Any]:
        if not principal.may_operate():
            log.warn("{client_id} ({role}) may not pause or resume lanes (Agent/{agent_id})",
                     client_id=principal.client_id, role=principal.role, agent_id=agent_id)
            raise forbidden("Pausing and resuming lanes needs an operator or admin client")
        agent: dict[str, Any] = await self.store.read("Agent", agent_id)
        return agent

    async def pause(self, principal: Principal, agent_id: str, destination: Any,
                    address: str = "") -> dict[str, Any]:
        """Pause the lane of C{destination}; what the lane is now (L{_result})."""
        agent = await self._agent(principal, agent_id)
        lane = await self.lane_of(destination)
        now = float(self.clock.seconds())
        changed = await self.pauses.pause(agent["id"], lane, principal.client_id, now)
        if changed:
            await self.store.create(lane_audit_event(principal, agent["id"], lane, "pause",
                                                     address, now))
            log.info("{client_id} paused lane {lane} of Agent/{agent_id}",
                     client_id=principal.client_id, lane=lane, agent_id=agent["id"])
        await self._tell_holder(agent["id"])
        return await self._result(agent["id"], lane, True, changed)

    async def resume(self, principal: Principal, agent_id: str, destination: Any,
                     address: str = "") -> dict[str, Any]:
        """Resume the lane of C{destination}: its waiting pushes flow again, in order."""
        agent = await self._agent(principal, agent_id)
        lane = await self.lane_of(destination)
        now = float(self.clock.seconds())
        changed = await self.pauses.resume(agent["id"], lane)
        if changed:
            await self.store.create(lane_audit_event(principal, agent["id"], lane, "resume",
                                                     address, now))
            log.info("{client_id} resumed lane {lane} of Agent/{agent_id}",
                     client_id=principal.client_id, lane=lane, agent_id=agent["id"])
        await self._tell_holder(agent["id"])
        return await self._result(agent["id"], lane, False, changed)

    def paused(self, agent_id: str | None = None) -> Deferred[list[dict[str, Any]]]:
        """The paused lanes (of C{agent_id}, or of every agent): agent, lane, by, since."""
        return self.pauses.list(agent_id)

    async def _tell_holder(self, agent_id: str) -> None:
        """The node holding the agent applies the change now (this one, or another)."""
        if agent_id in self.hub.sessions or self.hub.cluster is None:
            await self.hub.reload_pauses(agent_id)
            return
        try:
            await self.hub.call_holder(agent_id, {"op": "pauses", "timeout": STATUS_TIMEOUT})
        except FHIRError as e:
            # not connected anywhere (read at its connect), or its node did not answer:
            # that node reads the pauses again at its next poll
            log.debug("Paused lanes of Agent/{agent_id} not told to its node ({why})",
                      agent_id=agent_id, why=e.message)

    async def _result(self, agent_id: str, lane: str, paused: bool, changed: bool
                      ) -> dict[str, Any]:
        snapshot = await self.hub.snapshot_anywhere(agent_id)
        lanes: Mapping[str, Any] = (snapshot or {}).get("lanes") or {}
        on_agent = int((lanes.get(lane) or {}).get("inFlight") or 0)
        return {"agent": agent_id, "lane": lane, "paused": paused, "changed": changed,
                "onAgent": on_agent,
                "heldOnAgent": bool((snapshot or {}).get("holdsOnAgent"))}


def lane_audit_event(principal: Principal, agent_id: str, lane: str, action: str,
                     address: str, now: float) -> dict[str, Any]:
    """The AuditEvent of a lane paused or resumed: who, when, which agent and lane."""
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                 "code": "110100", "display": "Application Activity"},
        "subtype": [{"system": "urn:medagent:lane", "code": f"{action}-lane",
                     "display": f"{action} lane"}],
        "action": "U",
        "recorded": now_iso(now),
        "outcome": "0",
        "outcomeDesc": f"Lane {'paused' if action == 'pause' else 'resumed'} by an operator",
        "agent": [{"who": {"reference": f"ClientApplication/{principal.client_id}"},
                   "type": {"text": principal.role}, "requestor": True,
                   **({"network": {"address": address[:100], "type": "2"}}
                      if address else {})}],
        "source": {"observer": {"display": "medagent-relay"}},
        "entity": [{"what": {"reference": f"Agent/{agent_id}"}},
                   {"what": {"identifier": {"system": "urn:medagent:lane", "value": lane}},
                    "type": {"code": "AgentLane"}}],
    }
