"""
The operators' web console, served by the relay at ``/console`` (issue 12): sign-in with a
client id and secret (roles ``viewer``, ``operator``, ``admin``), the fleet, an agent's lanes,
the push journal searched by MSH-10, order number, state, agent, destination and time, a
message's timeline, payload (audited) and actions, and alerts; live through server-sent
events.  Plain HTML and one small script; no build step.

- L{html}: the pages, pure functions;
- L{resource}: HTTP, sessions, CSRF, handlers;
- L{sessions}: the sign-in sessions; L{events}: the live stream; L{alerts}: the alerts.

L{Console} gathers them around the relay's own parts (authority, store, journal, hub, push
service); L{medagent.relay.service.RelayService} builds it and mounts its resource.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import gatherResults
from twisted.logger import Logger
from twisted.web.server import Request

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.auth import Authority, Principal
from medagent.relay.console.alerts import (
    DEFAULT_ERROR_MIN,
    DEFAULT_ERROR_MINUTES,
    DEFAULT_OFFLINE_MINUTES,
    DEFAULT_QUEUE_MINUTES,
    Alert,
    AlertMonitor,
)
from medagent.relay.console.events import EventBroker, ObservedJournal
from medagent.relay.console.resource import (MAX_AGENTS, ConsoleResource, audit_event,
                                             own_origin)
from medagent.relay.console.resource import TREND_BUCKETS, TREND_WIDTH
from medagent.relay.console.sessions import DEFAULT_IDLE, SessionStore
from medagent.relay.hub import STATUS_TIMEOUT
from medagent.relay.limits import LoginThrottle
from medagent.storage.journal import Push, Trend, trend_window

__all__ = ["Console", "EventBroker", "ObservedJournal", "DEFAULT_IDLE",
           "DEFAULT_OFFLINE_MINUTES", "DEFAULT_QUEUE_MINUTES"]

log = Logger()

#: the fleet's "errors" column counts failures of this many last seconds
ERROR_WINDOW = 3600.0


class Console:
    """The console's state and its reads of the relay; the resource is L{resource}."""

    def __init__(self, clock: Any, authority: Authority, store: Any, journal: Any, hub: Any,
                 pushes: Any, broker: EventBroker, *, base_url: str | None = None,
                 throttle: LoginThrottle | None = None, idle: float = DEFAULT_IDLE,
                 alert_offline: float | None = DEFAULT_OFFLINE_MINUTES * 60,
                 alert_queue_age: float | None = None, alert_error_rate: float | None = None,
                 alert_error_window: float = DEFAULT_ERROR_MINUTES * 60,
                 alert_error_min: int = DEFAULT_ERROR_MIN,
                 shared_sessions: Any = None) -> None:
        self.clock = clock
        self.authority = authority
        self.store = store
        self.journal = journal
        self.hub = hub
        self.pushes = pushes
        self.broker = broker
        #: the inbound log (L{medagent.storage.interfaces.InboundLog}; set by the service)
        self.inbound: Any = None
        self.base_url = base_url
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.sessions = SessionStore(clock, idle=idle, shared=shared_sessions)
        self.alerts = AlertMonitor(clock, hub, store, offline_after=alert_offline,
                                   journal=journal, queue_age_after=alert_queue_age,
                                   error_rate=alert_error_rate or None,
                                   error_window=alert_error_window,
                                   error_min=alert_error_min) \
            if alert_offline or alert_queue_age or alert_error_rate else None
        #: pauses and resumes lanes (L{medagent.relay.lanes.LaneControl}; set by the service)
        self.lanes: Any = None
        self.resource = ConsoleResource(self)
        authority.revocation_listeners.append(self.sessions.drop_client)
        hub.session_listeners.append(self._agent_changed)
        broker.on_pushes_changed = self.publish_queues
        broker.key_alive = lambda key: self.sessions.alive(key, authority)
        if self.alerts is not None:
            self.alerts.listeners.append(self._alert_changed)

    def now(self) -> float:
        return float(self.clock.seconds())

    def own_origin(self, request: Request) -> str:
        return own_origin(self.base_url, request)

    def secure_cookies(self, request: Request) -> bool:
        """Cookies are C{Secure} when the relay is reached over HTTPS."""
        return bool(request.isSecure() or (self.base_url or "").lower().startswith("https:"))

    # -- reads ------------------------------------------------------------------------

    async def fleet_rows(self, agents: Sequence[dict[str, Any]] | None = None
                         ) -> list[dict[str, Any]]:
        """One row per Agent (all of them, or C{agents}): connection, queue, errors."""
        if agents is None:
            agents = await self.store.search("Agent", {"_count": [str(MAX_AGENTS)]})
        summaries = await self.journal.agent_summaries(self.now() - ERROR_WINDOW)
        rows = [self._row(agent, summaries.get(agent["id"], {})) for agent in agents]
        if self.lanes is not None:
            paused: dict[str, int] = {}
            for pause in await self.lanes.paused():
                paused[pause["agent"]] = paused.get(pause["agent"], 0) + 1
            for row in rows:
                row["paused"] = paused.get(row["id"], 0)
        sessions = getattr(self.hub, "agent_sessions", None)
        if sessions is not None:
            away = [r for r in rows if not r["connected"]]
            holders = await gatherResults([sessions.holder(r["id"]) for r in away],
                                          consumeErrors=True)
            for row, holder in zip(away, holders):
                if holder is not None:
                    row.update(connected=True, node=holder)
        return rows

    def _row(self, agent: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        agent_id = agent["id"]
        session = self.hub.sessions.get(agent_id)
        row: dict[str, Any] = {
            "id": agent_id, "name": agent.get("name"), "connected": session is not None,
            "open": summary.get("open", 0), "oldest_open": summary.get("oldestOpen"),
            "errors": summary.get("failedSince", 0),
        }
        if session is not None:
            row.update(version=session.version, last_heartbeat=session.last_heartbeat,
                       rtt=session.heartbeat_rtt, connected_since=session.connected_at,
                       node=self.hub.node_id)
        else:
            status = self.hub.status(agent_id)
            row.update(version=status.get("version") if status.get("version") != "unknown"
                       else None)
        return row

    async def lane_details(self, agent_id: str, connected: bool) -> dict[str, Any]:
        """
        What the agent page shows of each lane beyond the journal: the paused lanes, the
        relay's view (pushes on the agent, retrying) and the agent's own lane statistics
        (last ACK, latency, recent errors: C{None} from an agent that does not report them,
        such as Medplum's, or did not answer within L{STATUS_TIMEOUT}).
        """
        paused = {p["lane"]: p for p in await self.lanes.paused(agent_id)} \
            if self.lanes is not None else {}
        details: dict[str, Any] = {"paused": paused, "relay": {}, "agent": None}
        if not connected:
            return details
        snapshot = await self.hub.snapshot_anywhere(agent_id)
        if snapshot is None:
            return details
        details["relay"] = snapshot.get("lanes") or {}
        details["holdsOnAgent"] = bool(snapshot.get("holdsOnAgent"))
        if snapshot.get("durable"):
            try:
                answer = await self.hub.request(agent_id, {"type": wire.STATS_REQUEST},
                                                STATUS_TIMEOUT)
            except FHIRError:
                return details
            stats = answer.get("stats") if isinstance(answer, dict) else None
            if isinstance(stats, dict) and isinstance(stats.get("laneStats"), dict):
                details["agent"] = stats["laneStats"]
        return details

    async def trends(self, agent_id: str | None = None
                     ) -> tuple[float, dict[str, Trend]]:
        """
        The last L{TREND_BUCKETS} buckets of L{TREND_WIDTH} s (whole hours, the last one
        now's) by agent: one journal read (the same on every node), and its start.
        """
        start = trend_window(self.now(), TREND_WIDTH, TREND_BUCKETS)
        return start, await self.journal.trends(start, TREND_WIDTH, TREND_BUCKETS,
                                                agent_id=agent_id)

    async def audit_payload_view(self, principal: Principal, push: Push, address: str
                                 ) -> None:
        await self.store.create(audit_event(principal, push, address, self.now()))
        log.info("Console: {client_id} viewed the payload of push {push_id}",
                 client_id=principal.client_id, push_id=push.id)

    # -- live -------------------------------------------------------------------------

    def _agent_changed(self, agent_id: str, connected: bool) -> None:
        session = self.hub.sessions.get(agent_id) if connected else None
        self.broker.agent_changed(
            agent_id, connected, node=self.hub.node_id if connected else None,
            since=session.connected_at if session is not None else None,
            version=session.version if session is not None else None)

    def sessions_now(self) -> dict[str, Any]:
        """The agents this node holds, for a stream that just opened (no payload)."""
        return {"node": self.hub.node_id, "agents": {
            agent_id: {"since": session.connected_at, "version": session.version}
            for agent_id, session in list(self.hub.sessions.items())[:MAX_AGENTS]}}

    def publish_queues(self) -> None:
        now = self.now()

        def send(summaries: dict[str, dict[str, Any]]) -> None:
            self.broker.publish("queue", {"agents": {
                agent_id: {"open": s["open"], "errors": s["failedSince"],
                           "oldestAge": (now - s["oldestOpen"]) if s["oldestOpen"] is not None
                           else None}
                for agent_id, s in summaries.items()}})

        self.journal.agent_summaries(now - ERROR_WINDOW).addCallbacks(
            send, lambda f: log.failure("Reading the queue columns failed", f))

    def _alert_changed(self, alert: Alert, raised: bool) -> None:
        assert self.alerts is not None
        self.broker.publish("alert", {"agent": alert.agent_id, "raised": raised,
                                      "active": len(self.alerts.active)})

    def service(self) -> service.Service:
        return _ConsoleService(self)


#: Seconds between prunes of the shared sessions' idle rows (cluster only).
PRUNE_SESSIONS = 600.0


class _ConsoleService(service.MultiService):
    """Starts the alert checks (and on a cluster the prune of idle shared sessions); on
    stop ends them and every live stream."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        if console.sessions.shared is not None:
            prune = TimerService(PRUNE_SESSIONS, console.sessions.prune)
            prune.clock = console.clock
            prune.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        if self.console.alerts is not None:
            self.console.alerts.start()

    def stopService(self) -> Any:
        if self.console.alerts is not None:
            self.console.alerts.stop()
        self.console.broker.close()
        return super().stopService()
