"""
The relay's side of the agent protocol, without a transport: which agents are connected,
what was sent to them, and what they answered.

A websocket adapter (L{medagent.relay.ws}) feeds frames in and gives the hub an
L{AgentConnection} to write to; the hub never touches a socket.  Pushes come from the
journal and go back to it: the hub moves them through ``queued → sent → delivered|failed``.
"""

from __future__ import annotations

import random
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Mapping, Protocol

import attr
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet import task
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent import wire
from medagent.destination import lane_key
from medagent.fhir import FHIRError
from medagent.metrics import RelayMetrics
from medagent.relay.auth import AGENT, CLIENT_REVOKED, TOKEN_EXPIRED, Authority
from medagent.storage import journal as j
from medagent.storage.interfaces import AgentSessions
from medagent.storage.interfaces import PushJournal as Journal
from medagent.storage.journal import Push
from medagent.storage.sqlite.database import DatabaseStopped, DatabaseUnavailable

log = Logger()

REPLAY_PAGE = 500

#: Unfinished pushes per device lane on an agent with ordered lanes (one that announces
#: "durable"): more than one so a lane is pipelined, few enough that a device that is down
#: only ever holds its own lane.  An agent without ordered lanes (Medplum's handles transmit
#: requests concurrently) gets one at a time per device, so order per device holds there too.
LANE_WINDOW = 100

#: Remotes excluded from a replay page query at most (a SQL parameter list).
_MAX_EXCLUDED = 200


def _safe(key: str) -> str:
    """A lane name for logs: no query (it may carry credentials)."""
    return key.split("?", 1)[0]


def _stored_seq(push: Push) -> int:
    """The journal position of a push read from the journal (it assigns one on insert)."""
    if push.seq is None:
        raise ValueError(f"push {push.id} read from the journal has no seq")
    return push.seq


@attr.s(auto_attribs=True, eq=False)
class _Lane:
    """One device of one agent, as the relay sees it: what is on the agent, what waits."""

    key: str
    #: every destination URL seen for this device (the journal stores URLs, not lanes)
    remotes: set = attr.ib(factory=set)
    #: push ids on the agent without a final answer
    in_flight: set = attr.ib(factory=set)
    #: seq of the first push of this lane that waits in the journal (None: none waits)
    next_seq: int | None = None
    #: a page of this lane is being read from the journal
    loading: bool = False
    #: while loading: the lowest seq that came to wait meanwhile (read again from there)
    rewind: int | None = None
    #: the agent reports this lane waiting on a retry (its device is down)
    stalled: bool = False
    #: waiting in the session's queue for room in the agent's window
    blocked: bool = False
    #: "lane is holding back" was logged for the current episode
    hold_logged: bool = False

#: Seconds an agent's pushes wait after a journal read failed, before it is read again.
JOURNAL_RETRY = 2.0
#: Seconds a call to another relay node waits beyond the agent's own timeout (its hops).
CALL_MARGIN = 2.0
#: Paused lanes read by one refresh, at most (L{Hub.refresh_pauses}).
MAX_PAUSES = 10000
#: Seconds an agent's status or snapshot is asked of the node holding it, at most.
STATUS_TIMEOUT = 3.0

#: Seconds an agent's session lease lasts on a cluster (L{Hub.agent_sessions}) unless its node
#: renews it: a node that died gives its agents up within this time.
SESSION_LEASE = 20.0

#: Seconds an agent's C{Agent} resource, read for its connect, answers later connects of it
#: without a read (a write on this node forgets it at once; one on another node of a cluster
#: is seen within this time), and how many are kept.
AGENT_CACHE_TTL = 60.0
AGENT_CACHE_SIZE = 100_000

#: Seconds a new socket has to authenticate with a valid ``agent:connect:request``.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Frames a socket may send before it has authenticated (a real agent needs one or two).
MAX_FRAMES_BEFORE_CONNECT = 16


class AgentConnection(Protocol):
    """What the hub needs from a transport."""

    peer: str

    def send_message(self, message: Mapping[str, Any]) -> None: ...

    def close(self, reason: str) -> None: ...


class Session:
    """One websocket connection, before and after it says which agent it is."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        #: this connection's id in the cluster's session table (L{Hub.agent_sessions})
        self.id = uuid.uuid4().hex
        self.agent_id: str | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.version: str | None = None
        self.outstanding_heartbeats = 0
        self.heartbeat: LoopingCall | None = None
        #: starts C{heartbeat} at this session's phase (see L{Hub.heartbeat_phase})
        self.heartbeat_start: Any = None
        #: pushes written to this socket and not yet answered, by push id
        self.in_flight: dict[str, Push] = {}
        self.replaying = False
        #: woken while a scan ran: scan again after this seq (L{Hub.wake})
        self.rescan: int | None = None
        #: on a cluster, the highest seq a scan of this agent's journal has read: per agent,
        #: seq order is commit order (L{medagent.storage.journal.write_scopes}), so nothing
        #: committed since can be below it (a push put back to queued is, L{Hub.submit})
        self.seen_seq = 0
        #: the first replay (all the agent's open pushes, oldest first) has run to its end
        self.scanned = False
        self.closed = False
        self.connected_at = 0.0
        #: who this session authenticated as (its token's expiry included); re-checked on
        #: every heartbeat tick and when its client is revoked
        self.principal: Any = None

        #: when the socket opened (a config read after this means the agent is configuring)
        self.opened_at = 0.0
        #: the agent can take pushes (it has read its config); see L{Hub._became_ready}
        self.ready = False
        self.ever_ready = False
        self.ready_call: Any = None
        #: consecutive "not delivered" agent errors: the backoff before trying again
        self.not_ready_count = 0
        self.lanes: dict[str, _Lane] = {}
        #: lanes with room of their own that wait for room in the agent's window, in order
        self.blocked: deque[_Lane] = deque()
        self.stalled: set[str] = set()
        self.hold_logged = False
        #: closes the socket unless it authenticates in time (cancelled when it does)
        self.connect_deadline: Any = None
        self.frames_before_connect = 0
        #: when the heartbeat request now unanswered was sent (clock seconds), for its RTT
        self.heartbeat_sent_at: float | None = None
        #: the last heartbeat from the agent (either direction answered), and its RTT: the
        #: console's fleet page
        self.last_heartbeat: float | None = None
        self.heartbeat_rtt: float | None = None
        #: the agent's paused lanes (keys), read from L{Hub.lane_pauses} before its first
        #: scan; None: not read yet (see L{Hub.apply_pauses})
        self.paused: set[str] | None = None

    @property
    def refreshes_token(self) -> bool:
        return wire.CAP_TOKEN_REFRESH in self.capabilities

    @property
    def resends_safely(self) -> bool:
        return wire.CAP_DEDUPE in self.capabilities or wire.CAP_DURABLE in self.capabilities

    @property
    def ordered_lanes(self) -> bool:
        """Our durable agent keeps one ordered lane per device; Medplum's agent does not."""
        return wire.CAP_DURABLE in self.capabilities


InboundHandler = Callable[[str, Mapping[str, Any]], Deferred]


def _no_inbound(agent_id: str, message: Mapping[str, Any]) -> Deferred:
    return succeed(
        {
            "statusCode": 501,
            "contentType": "text/plain",
            "body": f"No handler for channel {message.get('channel')!r} on this relay",
        }
    )


class Hub:
    def __init__(
        self,
        clock: Any,
        authority: Authority,
        store: Any,
        journal: Journal,
        *,
        heartbeat_interval: float = 10.0,
        max_missed_heartbeats: int = 2,
        max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE,
        request_timeout: float = 5.0,
        window: int = 1000,
        lane_window: int = LANE_WINDOW,
        max_tracked: int | None = None,
        ready_timeout: float = 5.0,
        ready_settle: float = 1.0,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        inbound: InboundHandler = _no_inbound,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        heartbeat_phase: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.authority = authority
        self.store = store
        self.journal = journal
        self.heartbeat_interval = heartbeat_interval
        self.max_missed_heartbeats = max_missed_heartbeats
        #: a session's first heartbeat comes after (0.5 + 0.5 × this, in [0, 1)) intervals:
        #: sessions accepted in one tick (a connect storm) do not all beat in one tick ever after
        self.heartbeat_phase = heartbeat_phase
        self.max_message_size = max_message_size
        self.request_timeout = request_timeout
        #: pushes on an agent's wire without a final answer, at most (pushes on lanes the
        #: agent reports as waiting on a retry not counted: they only hold their own lane)
        self.window = window
        #: ... and per device lane (agents with ordered lanes; others get one at a time)
        self.lane_window = lane_window
        #: in-flight records per agent in memory, at most, stalled lanes included
        self.max_tracked = max_tracked if max_tracked is not None else 10 * window
        #: an agent without our extensions gets pushes once it has read its config (observed
        #: as its REST read of its Agent resource, plus C{ready_settle} for the answer to
        #: reach it), or has answered a heartbeat, or after C{ready_timeout}: Medplum's agent
        #: reads its config when its process starts, not when it reconnects, so no read
        #: soon after connect means it has its config already.  Should it still refuse, the
        #: push stays queued and is tried again after a backoff.
        self.ready_timeout = ready_timeout
        self.ready_settle = ready_settle
        #: backoff after an agent said it did not take a message (never a hot loop)
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.inbound = inbound
        #: when each agent last read its Agent resource over REST (see L{agent_config_read})
        self._config_reads: dict[str, float] = {}
        self.connect_timeout = connect_timeout
        self.sessions: dict[str, Session] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._waiters: dict[str, list[Deferred[Push]]] = {}
        self._requests: dict[str, Deferred[dict[str, Any]]] = {}
        #: pushes someone waits on, so a late answer updates the copy the waiter holds
        self._pending_pushes: dict[str, Push] = {}
        #: counters and histograms moved here; a private registry unless the service sets one
        self.metrics = RelayMetrics()
        authority.revocation_listeners.append(self._client_revoked)
        #: relay nodes sharing a database: which node holds each agent (None: one node, the
        #: sessions in memory are the whole truth); see L{_claim} and L{renew_sessions}
        self.agent_sessions: AgentSessions | None = None
        self.node_id = "local"
        #: seconds a session's lease lasts without renewal; renewed every third of it
        self.session_lease = SESSION_LEASE
        self._renewed_at: float | None = None
        #: waited pushes of agents held elsewhere whose journal read is under way
        self._reading: set[str] = set()
        #: this node's link to the others (L{medagent.relay.cluster.ClusterLink}), on a cluster
        self.cluster: Any = None
        #: outcomes not yet written (the database was away) and the timers writing them again
        self._unrecorded: set[str] = set()
        self._retrying_writes: set[Deferred[Any]] = set()
        self._closing = False
        #: called with (agent id, connected) when an agent's session starts or ends on this
        #: node (the console's live fleet page); see L{_session_changed}
        self.session_listeners: list[Callable[[str, bool], None]] = []
        #: agent id -> (read at, its Agent resource): see L{AGENT_CACHE_TTL}
        self._agents: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._agent_writes = 0
        #: the paused lanes in storage (L{medagent.storage.interfaces.LanePauses}), or None:
        #: no lane is ever paused
        self.lane_pauses: Any = None
        #: per agent whose lanes were ever paused or resumed here, the number of the latest
        #: read of its pauses (L{reload_pauses}): an older read that answers later is not
        #: applied, and a first read (L{_load_pauses}) overtaken by one reads again
        self._pause_reads: dict[str, int] = {}
        listeners = getattr(store, "listeners", None)
        if listeners is not None:
            listeners.append(self._resource_written)

    # -- connection lifecycle ----------------------------------------------------------

    def _read_agent(self, agent_id: str) -> Deferred[dict[str, Any]]:
        """The agent's C{Agent} resource, for its connect: a fleet reconnecting at once
        (a relay restart, a storm of refused attempts) reads each one once a minute."""
        cached = self._agents.get(agent_id)
        now = self.clock.seconds()
        if cached is not None and now - cached[0] < AGENT_CACHE_TTL:
            return succeed(cached[1])
        writes = self._agent_writes

        def found(agent: dict[str, Any]) -> dict[str, Any]:
            if writes != self._agent_writes:
                return agent  # an Agent was written meanwhile: this read may be older
            self._agents[agent_id] = (now, agent)
            self._agents.move_to_end(agent_id)
            while len(self._agents) > AGENT_CACHE_SIZE:
                self._agents.popitem(last=False)
            return agent

        return self.store.read("Agent", agent_id).addCallback(found)

    def warm_agent_cache(self, page: int = 1000) -> Deferred[int]:
        """
        At start, read the C{Agent} resources (up to L{AGENT_CACHE_SIZE}, a page per
        database call) into the connect cache: the fleet that reconnects after a restart then
        costs no read per agent.  Fires with how many were read; a failure only leaves the
        cache cold.
        """
        now = self.clock.seconds()
        writes = self._agent_writes
        loaded = 0

        def got(agents: list[dict[str, Any]], offset: int) -> Any:
            nonlocal loaded
            if writes != self._agent_writes:
                return loaded  # an Agent was written meanwhile: the connects read it themselves
            for agent in agents:
                if isinstance(agent.get("id"), str) and agent["id"] not in self._agents:
                    self._agents[agent["id"]] = (now, agent)
            loaded += len(agents)
            if len(agents) < page or offset + page >= AGENT_CACHE_SIZE:
                return loaded
            return read(offset + page)

        def read(offset: int) -> Deferred[Any]:
            return self.store.search("Agent", {"_count": [str(page)],
                                               "_offset": [str(offset)]}).addCallback(
                got, offset)

        def failed(f: Failure) -> int:
            log.warn("Could not read the agents ahead of their connects ({error})",
                     error=f.getErrorMessage())
            return loaded

        return read(0).addErrback(failed)

    def _resource_written(self, interaction: str, resource: dict[str, Any] | None,
                          previous: dict[str, Any] | None) -> None:
        for r in (resource, previous):
            if r is not None and r.get("resourceType") == "Agent":
                self._agent_writes += 1
                self._agents.pop(str(r.get("id")), None)

    def connection_made(self, conn: AgentConnection) -> Session:
        session = Session(conn)
        session.opened_at = self.clock.seconds()
        session.connect_deadline = self.clock.callLater(
            self.connect_timeout, self._connect_timed_out, session)
        return session

    def _connect_timed_out(self, session: Session) -> None:
        session.connect_deadline = None
        if session.agent_id is None and not session.closed:
            log.info("Closing unauthenticated socket from {peer}: no valid "
                     "agent:connect:request within {timeout}s", peer=session.conn.peer,
                     timeout=self.connect_timeout)
            session.conn.close("no valid agent:connect:request in time")

    @staticmethod
    def _cancel_connect_deadline(session: Session) -> None:
        if session.connect_deadline is not None and session.connect_deadline.active():
            session.connect_deadline.cancel()
        session.connect_deadline = None

    def connection_lost(self, session: Session, reason: str = "closed") -> None:
        session.closed = True
        self._cancel_connect_deadline(session)
        if session.heartbeat_start is not None and session.heartbeat_start.active():
            session.heartbeat_start.cancel()
        session.heartbeat_start = None
        if session.heartbeat is not None and session.heartbeat.running:
            session.heartbeat.stop()
        if session.ready_call is not None and session.ready_call.active():
            session.ready_call.cancel()
        session.ready_call = None
        agent_id = session.agent_id
        if agent_id is None or self.sessions.get(agent_id) is not session:
            return
        del self.sessions[agent_id]
        self._release(agent_id, session)
        self.metrics.agent_disconnected()
        self._status[agent_id] = {
            "status": "disconnected",
            "version": session.version or "unknown",
            "lastUpdated": self.clock.seconds(),
        }
        self._session_changed(agent_id, False)
        log.info(
            "Agent/{agent_id} disconnected ({reason}); {n} push(es) unanswered",
            agent_id=agent_id,
            reason=reason,
            n=len(session.in_flight),
        )
        for push in list(session.in_flight.values()):
            if session.resends_safely:
                continue  # stays 'sent'; re-sent on reconnect, answered from the agent's record
            self._finish(
                push,
                j.FAILED,
                error="Agent disconnected before answering; the device may or may not have "
                "received this message",
                in_doubt=True,
            )
        session.in_flight.clear()
        session.lanes.clear()
        session.blocked.clear()
        session.stalled.clear()

    def _session_changed(self, agent_id: str, connected: bool) -> None:
        for listener in list(self.session_listeners):
            try:
                listener(agent_id, connected)
            except Exception:
                log.failure("Session listener failed for Agent/{agent_id}", agent_id=agent_id)

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self.sessions

    def status(self, agent_id: str) -> dict[str, Any]:
        session = self.sessions.get(agent_id)
        if session is not None:
            return {"status": "connected", "version": session.version or "unknown",
                    "lastUpdated": self.clock.seconds()}
        return self._status.get(agent_id, {"status": "disconnected", "version": "unknown",
                                           "lastUpdated": None})

    # -- frames in ----------------------------------------------------------------------

    def frame_received(self, session: Session, data: bytes | str) -> None:
        if session.agent_id is None:
            session.frames_before_connect += 1
            if session.frames_before_connect > MAX_FRAMES_BEFORE_CONNECT:
                if session.frames_before_connect == MAX_FRAMES_BEFORE_CONNECT + 1:
                    log.info("Closing unauthenticated socket from {peer}: {n} frames without "
                             "a valid agent:connect:request", peer=session.conn.peer,
                             n=MAX_FRAMES_BEFORE_CONNECT)
                    session.conn.close("too many frames before agent:connect:request")
                return
        try:
            msg = wire.decode(data, self.max_message_size)
        except wire.WireError as e:
            log.warn("Bad frame from {peer}: {reason}", peer=session.conn.peer, reason=e.reason)
            session.conn.send_message(wire.error(e.reason, e.callback))
            return
        if msg["type"] == wire.BATCH and session.agent_id is not None:
            # several messages in one frame (an agent that announced "batch"): each as if
            # it had come in a frame of its own, in order
            for item in wire.unbatch(msg):
                if isinstance(item, wire.WireError):
                    log.warn("Bad message in a batch from {peer}: {reason}",
                             peer=session.conn.peer, reason=item.reason)
                    session.conn.send_message(wire.error(item.reason, item.callback))
                else:
                    self._message_received(session, item)
            return
        self._message_received(session, msg)

    def _message_received(self, session: Session, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        try:
            if kind == wire.CONNECT_REQUEST:
                self._on_connect(session, msg)
            elif session.agent_id is None:
                session.conn.send_message(wire.error("Not connected", msg.get("callback")))
            elif kind == wire.HEARTBEAT_REQUEST:
                session.outstanding_heartbeats = 0
                session.last_heartbeat = self.clock.seconds()
                if msg.get("accessToken"):
                    self._refresh_principal(session, msg["accessToken"])
                session.conn.send_message(wire.heartbeat_response())
            elif kind == wire.HEARTBEAT_RESPONSE:
                session.outstanding_heartbeats = 0
                session.last_heartbeat = self.clock.seconds()
                if session.heartbeat_sent_at is not None:
                    session.heartbeat_rtt = self.clock.seconds() - session.heartbeat_sent_at
                    self.metrics.heartbeat_answered(session.heartbeat_rtt)
                    session.heartbeat_sent_at = None
                if isinstance(msg.get("version"), str):
                    session.version = msg["version"]
                if not session.ever_ready:
                    self._became_ready(session, "answered a heartbeat")
            elif kind == wire.TRANSMIT_RESPONSE:
                self._on_transmit_response(session, msg)
            elif kind == wire.TRANSMIT_REQUEST:
                self._on_inbound(session, msg)
            elif kind == wire.ERROR:
                self._on_agent_error(session, msg)
            elif kind in (
                wire.RELOADCONFIG_RESPONSE,
                wire.LOGS_RESPONSE,
                wire.STATS_RESPONSE,
                wire.UPGRADE_RESPONSE,
                wire.TRANSMIT_CANCEL_RESPONSE,
            ):
                self._on_request_response(session, msg)
            else:
                session.conn.send_message(
                    wire.error(f"Unexpected message type: {kind}", msg.get("callback"))
                )
        except Exception:
            log.failure("Error handling {kind} from {peer}", kind=kind, peer=session.conn.peer)
            session.conn.send_message(wire.error("Internal error", msg.get("callback")))

    def _on_connect(self, session: Session, msg: Mapping[str, Any]) -> None:
        agent_id = msg["agentId"]
        callback = msg.get("callback")
        try:
            principal = self.authority.verify_token(msg["accessToken"])
        except FHIRError as e:
            session.conn.send_message(wire.error(e.message, callback))
            return
        if not principal.can_connect_as(agent_id):
            log.warn(
                "Client {client_id} tried to connect as Agent/{agent_id}",
                client_id=principal.client_id,
                agent_id=agent_id,
            )
            session.conn.send_message(
                wire.error(f"This access token cannot act as Agent/{agent_id}", callback)
            )
            if principal.role != AGENT:  # admin, pusher, Bot: never an agent session
                session.conn.close("not an agent credential")
                self.connection_lost(session, "not an agent credential")
            return
        if session.agent_id is not None and session.agent_id != agent_id:
            session.conn.send_message(wire.error("Already connected as another agent", callback))
            return
        existing = self.sessions.get(agent_id)
        if existing is not None and existing is not session:
            log.warn(
                "Refused second connection for Agent/{agent_id} from {peer}; "
                "live connection from {other}",
                agent_id=agent_id,
                peer=session.conn.peer,
                other=existing.conn.peer,
            )
            session.conn.send_message(
                wire.error(
                    f"Agent/{agent_id} is already connected from another process; "
                    "only one connection per agent is allowed",
                    callback,
                )
            )
            session.conn.close("duplicate agent connection")
            return

        def found(agent: dict[str, Any]) -> None:
            if session.closed:
                return
            problem = self.authority.session_problem(principal)
            if problem is not None:  # revoked while the Agent was being read
                session.conn.send_message(wire.error(f"Access token refused: {problem}",
                                                     callback))
                return
            if agent_id in self.sessions and self.sessions[agent_id] is not session:
                session.conn.send_message(
                    wire.error(f"Agent/{agent_id} is already connected", callback)
                )
                session.conn.close("duplicate agent connection")
                return
            if self.agent_sessions is not None and session.agent_id is None:
                self._claim(session, agent_id, callback, lambda: claimed(agent))
                return
            accept(agent)

        def claimed(agent: dict[str, Any]) -> None:
            problem = self.authority.session_problem(principal)
            if problem is not None:  # revoked while the session was being claimed
                self._release(agent_id, session)
                session.conn.send_message(wire.error(f"Access token refused: {problem}",
                                                     callback))
                session.conn.close(problem)
                return
            accept(agent)

        def accept(agent: dict[str, Any]) -> None:
            caps = msg.get("capabilities")
            session.capabilities = frozenset(
                c for c in (caps if isinstance(caps, list) else []) if isinstance(c, str)
            )
            first = session.agent_id is None
            session.agent_id = agent_id
            session.principal = principal
            session.connected_at = self.clock.seconds()
            self.sessions[agent_id] = session
            if first:
                self.metrics.agent_connected(agent_id)
                self._session_changed(agent_id, True)
            self._cancel_connect_deadline(session)
            authenticated = getattr(session.conn, "authenticated", None)
            if authenticated is not None:
                authenticated()  # the transport lifts its pre-authentication limits
            session.conn.send_message(
                {"type": wire.CONNECT_RESPONSE, "callback": callback,
                 "capabilities": [wire.CAP_DURABLE, wire.CAP_BATCH],
                 wire.BATCH_BYTES_FIELD: wire.batch_limit(self.max_message_size)}
            )
            batching = getattr(session.conn, "enable_batching", None)
            limit = wire.peer_batch_limit(msg)
            if limit is not None and batching is not None:
                batching(limit)  # (after the response: it goes in a frame of its own)
            log.info(
                "Agent/{agent_id} connected from {peer} (capabilities: {caps})",
                agent_id=agent_id,
                peer=session.conn.peer,
                caps=",".join(sorted(session.capabilities)) or "none",
            )
            if first:
                session.heartbeat = LoopingCall(self._heartbeat, session)
                session.heartbeat.clock = self.clock
                phase = (0.5 + 0.5 * self.heartbeat_phase()) * self.heartbeat_interval
                session.heartbeat_start = self.clock.callLater(
                    phase, session.heartbeat.start, self.heartbeat_interval, True)
            if session.ready or session.ready_call is not None:
                return  # a repeated connect request on a live session
            if wire.CAP_DURABLE in session.capabilities:
                self._became_ready(session, "announced durable")
                return
            read_at = self._config_reads.get(agent_id)
            if read_at is not None and read_at >= session.opened_at:
                self._ready_after(session, read_at + self.ready_settle - self.clock.seconds(),
                                  "read its config")
            else:
                self._ready_after(session, self.ready_timeout, "ready timeout")

        def missing(f: Failure) -> None:
            text = f.value.message if isinstance(f.value, FHIRError) else "Agent lookup failed"
            session.conn.send_message(wire.error(text, callback))

        self._read_agent(agent_id).addCallbacks(found, missing)

    def _claim(self, session: Session, agent_id: str, callback: Any,
               accept: Callable[[], None]) -> None:
        """
        On a cluster: take the agent's session in the shared table before accepting the
        socket; one held by another node (whose lease is live) refuses this one, and the
        agent tries again (through the balancer) until that node lets go or its lease ends.
        """
        sessions = self.agent_sessions
        assert sessions is not None

        def claimed(holder: str | None) -> None:
            if holder is not None:
                log.warn("Refused connection for Agent/{agent_id} from {peer}: relay node "
                         "{holder} holds its session", agent_id=agent_id,
                         peer=session.conn.peer, holder=holder)
                session.conn.send_message(wire.error(
                    f"Agent/{agent_id} is already connected to relay node {holder}; only one "
                    "connection per agent is allowed", callback))
                session.conn.close("agent connected to another relay node")
                return
            if session.closed or (agent_id in self.sessions
                                  and self.sessions[agent_id] is not session):
                self._release(agent_id, session)
                if not session.closed:
                    session.conn.send_message(
                        wire.error(f"Agent/{agent_id} is already connected", callback))
                    session.conn.close("duplicate agent connection")
                return
            accept()

        def failed(f: Failure) -> None:
            log.warn("Could not record the session of Agent/{agent_id} ({error}); refusing "
                     "its connection", agent_id=agent_id, error=f.getErrorMessage())
            if not session.closed:
                session.conn.send_message(wire.error(
                    "The relay cannot record this connection now (database unavailable); "
                    "try again", callback))
                session.conn.close("session table unavailable")

        sessions.claim(agent_id, self.node_id, session.id, self.session_lease).addCallbacks(
            claimed, failed)

    def _release(self, agent_id: str, session: Session) -> None:
        """Give up C{session}'s row in the cluster's table (if any); a failure only waits
        for the lease to run out."""
        if self.agent_sessions is None:
            return
        self.agent_sessions.release(agent_id, session.id).addErrback(
            lambda f: log.warn("Could not release the session of Agent/{agent_id} ({error}); "
                               "its lease runs out by itself", agent_id=agent_id,
                               error=f.getErrorMessage()))

    def renew_sessions(self) -> Deferred[None]:
        """
        On a cluster, every third of a lease: extend this node's sessions.  A session the
        table no longer gives this node (taken over after a lapse) is closed at once; if no
        renewal has succeeded for a whole lease, every session is closed, since another node
        may have taken them meanwhile.
        """
        sessions = self.agent_sessions
        if sessions is None:
            return succeed(None)
        live = {s.id: s for s in self.sessions.values()}
        started = self.clock.seconds()

        def renewed(held: set[str]) -> None:
            self._renewed_at = started
            for session_id, session in live.items():
                if session_id not in held and not session.closed \
                        and self.sessions.get(session.agent_id or "") is session:
                    self._end_session(session, "session taken over by another relay node")

        def failed(f: Failure) -> None:
            last = self._renewed_at
            log.warn("Could not renew {n} agent session lease(s) ({error})", n=len(live),
                     error=f.getErrorMessage())
            if last is not None and self.clock.seconds() - last >= self.session_lease:
                for session in list(self.sessions.values()):
                    self._end_session(session, "session lease lapsed (database unavailable)")

        if self._renewed_at is None:
            self._renewed_at = started
        # bounded: a renewal that hangs must not keep sessions past their lease unchecked
        renewal = sessions.renew(self.node_id, sorted(live), self.session_lease)
        renewal.addTimeout(self.session_lease / 3, self.clock)
        return renewal.addCallbacks(renewed, failed)

    def poll_cluster(self) -> None:
        """
        On a cluster, at each full poll (L{medagent.relay.cluster.ClusterLink.poll}): pushes
        journaled by other nodes for the agents this node holds are read and sent (a rescan
        of each agent's open pushes, in journal order, skipping what is on the agent
        already), and callers waiting here on a push whose agent is held elsewhere get its
        outcome from the journal.
        """
        if self.agent_sessions is None:
            return
        idle = {agent_id: session for agent_id, session in self.sessions.items()
                if not session.closed and session.ready and session.scanned
                and not session.replaying}
        if self.lane_pauses is not None and self.sessions:
            self.refresh_pauses()  # (a lost "pauses changed" call costs one poll, no more)
        if idle:
            # one read for every agent held here; a rescan only where something is queued
            self.journal.agents_with_queued(idle).addCallbacks(
                self._wake_all,
                lambda f: log.warn("Could not read which agents have queued pushes ({error})",
                                   error=f.getErrorMessage()))
        for push_id in list(self._waiters):
            push = self._pending_pushes.get(push_id)
            if push is not None and push.agent_id not in self.sessions \
                    and push_id not in self._reading:
                self._read_outcome(push_id)  # (this node's own agents answer in L{_finish})

    def _read_outcome(self, push_id: str) -> None:
        """One journal read at a time for a waited push whose agent is held elsewhere."""
        self._reading.add(push_id)

        def failed(f: Failure) -> None:
            log.warn("Could not read push {push_id} for its waiting caller ({error})",
                     push_id=push_id, error=f.getErrorMessage())

        def done(_: Any) -> None:
            self._reading.discard(push_id)

        self.journal.get(push_id).addCallbacks(self._outcome_elsewhere, failed).addBoth(done)

    def _outcome_elsewhere(self, push: Push) -> None:
        """A push another node delivers: its waiters get it once it is final or retrying."""
        if push.final or (push.state == j.ACCEPTED and push.last_error):
            self._pending_pushes.pop(push.id, None)
            for d in self._waiters.pop(push.id, []):
                d.callback(push)

    def wake(self, agent_id: str, after: int = 0) -> None:
        """
        Pushes for C{agent_id} were journaled (here or by another node), with seqs above
        C{after}: if this node holds it, read its queued ones in journal order and send
        them.  A scan under way is followed by one more.
        """
        session = self.sessions.get(agent_id)
        if session is None or session.closed or not session.ready or not session.scanned:
            return  # not taking pushes yet: its first scan (or the next poll) reads them
        if session.replaying:
            session.rescan = after if session.rescan is None else min(session.rescan, after)
        else:
            self._replay(session, queued_after=after)

    def journaled(self, agent_id: str, seq: int) -> None:
        """
        Push C{seq} of C{agent_id} is in the journal (journaled here or by another node, or
        put back to queued by a retry): L{wake} from what this node has read of that agent,
        or from the start for a push below it (a retry).
        """
        session = self.sessions.get(agent_id)
        seen = session.seen_seq if session is not None else 0
        self.wake(agent_id, seen if seq > seen else 0)

    def _wake_all(self, agent_ids: Iterable[str]) -> None:
        for agent_id in sorted(agent_ids):
            self.wake(agent_id)

    def outcome_hint(self, push_id: str) -> None:
        """Another node recorded an outcome for C{push_id}: a caller waiting here gets it."""
        push = self._pending_pushes.get(push_id)
        if push_id in self._waiters and push is not None \
                and push.agent_id not in self.sessions and push_id not in self._reading:
            self._read_outcome(push_id)

    def held_anywhere(self, agent_id: str) -> Deferred[bool]:
        """Whether some node (this one included) holds a live session for C{agent_id}."""
        if agent_id in self.sessions or self.agent_sessions is None:
            return succeed(agent_id in self.sessions)
        return self.agent_sessions.holder(agent_id).addCallback(lambda node: node is not None)

    def _heartbeat(self, session: Session) -> None:
        problem = (self.authority.session_problem(session.principal)
                   if session.principal is not None else None)
        if problem == TOKEN_EXPIRED and not session.refreshes_token:
            # An agent that cannot refresh in-band (Medplum's) keeps its session, as on
            # Medplum; revoking its client is what ends it.
            problem = None
        if problem is not None:
            self._end_session(session, problem)
            return
        if session.outstanding_heartbeats >= self.max_missed_heartbeats:
            log.warn(
                "Agent/{agent_id} missed {n} heartbeats; closing its connection",
                agent_id=session.agent_id,
                n=session.outstanding_heartbeats,
            )
            session.conn.close("missed heartbeats")
            return
        session.outstanding_heartbeats += 1
        session.heartbeat_sent_at = self.clock.seconds()
        session.conn.send_message({"type": wire.HEARTBEAT_REQUEST})

    def _end_session(self, session: Session, problem: str) -> None:
        """Its credential no longer holds: tell the agent why, close, forget it at once."""
        log.warn("Closing the connection of Agent/{agent_id} from {peer}: {problem}",
                 agent_id=session.agent_id, peer=session.conn.peer, problem=problem)
        session.conn.send_message(wire.error(f"Connection closed: {problem}"))
        session.conn.close(problem)
        self.connection_lost(session, problem)

    def _client_revoked(self, client_id: str) -> None:
        """The authority's revocation listener (which returns nothing): L{close_client}."""
        self.close_client(client_id)

    def close_client(self, client_id: str) -> int:
        """A client was revoked: close every agent session it authenticated; how many."""
        ended = [s for s in list(self.sessions.values())
                 if s.principal is not None and s.principal.client_id == client_id]
        for session in ended:
            self._end_session(session, CLIENT_REVOKED)
        return len(ended)
    # -- readiness --------------------------------------------------------------------------

    def agent_config_read(self, agent_id: str) -> None:
        """
        The agent read its own C{Agent} resource over REST.  Medplum's agent does that right
        after its socket opens and refuses pushes until it has ("Agent.status is currently set
        to off"), so this is the sign it can take them (after C{ready_settle}, for our answer
        to reach it).
        """
        now = self.clock.seconds()
        self._config_reads[agent_id] = now
        session = self.sessions.get(agent_id)
        if session is None or session.ready or session.closed:
            return
        if wire.CAP_DURABLE in session.capabilities:
            return
        self._ready_after(session, self.ready_settle, "read its config")

    def _ready_after(self, session: Session, delay: float, why: str) -> None:
        """Become ready in C{delay} seconds, or sooner if already scheduled sooner."""
        delay = max(0.0, delay)
        call = session.ready_call
        if call is not None and call.active():
            if call.getTime() <= self.clock.seconds() + delay:
                return
            call.cancel()
        session.ready_call = self.clock.callLater(delay, self._became_ready, session, why)

    def _became_ready(self, session: Session, why: str) -> None:
        if session.ready_call is not None and session.ready_call.active():
            session.ready_call.cancel()
        session.ready_call = None
        if session.closed or session.ready or self.sessions.get(session.agent_id or "") \
                is not session:
            return
        session.ready = True
        first = not session.ever_ready
        session.ever_ready = True
        # debug: with "connected" a second line per connect, and a fleet reconnects at once
        log.debug("Agent/{agent_id} takes pushes ({why})", agent_id=session.agent_id, why=why)
        if first or not session.scanned:
            self._replay(session)
        else:
            self._pump_all(session)
            if self.cluster is not None:  # what was journaled while it was not ready
                self.wake(session.agent_id or "")

    def _not_ready(self, session: Session) -> None:
        """
        The agent said it did not take a message: it is not ready (yet, or again).  Send
        nothing until a backoff (1 s, 2 s, 4 s ... C{retry_cap}) has passed or it has read its
        config again.
        """
        if not session.ready:
            return
        session.ready = False
        session.not_ready_count += 1
        delay = min(self.retry_base * 2 ** (session.not_ready_count - 1), self.retry_cap)
        log.warn(
            "Agent/{agent_id} did not take a push (not ready); pushes to it wait, next try "
            "in {delay:.1f}s", agent_id=session.agent_id, delay=delay)
        self._ready_after(session, delay, "retry after not delivered")

    def _pause(self, session: Session, why: str) -> None:
        """
        A journal read failed (the database is away): send nothing for L{JOURNAL_RETRY}
        seconds, then read it again (a database back after a second's outage is used within
        a few, not after the agents' 30 s backoff).
        """
        if session.closed:
            return
        session.ready = False
        self._ready_after(session, min(JOURNAL_RETRY, self.retry_cap), why)

    # -- pushes ---------------------------------------------------------------------------

    def _lane(self, session: Session, remote: str) -> _Lane:
        key = lane_key(remote)
        lane = session.lanes.get(key)
        if lane is None:
            lane = session.lanes[key] = _Lane(key)
        lane.remotes.add(remote)
        return lane

    def _lane_limit(self, session: Session) -> int:
        return max(1, self.lane_window) if session.ordered_lanes else 1

    def _global_room(self, session: Session, lane: _Lane) -> int:
        """Room in the agent's window for C{lane}; a stalled lane only needs memory room."""
        memory = self.max_tracked - len(session.in_flight)
        if lane.stalled:
            return memory
        stalled = sum(len(session.lanes[k].in_flight) for k in session.stalled
                      if k in session.lanes)
        return min(self.window - (len(session.in_flight) - stalled), memory)

    def _room(self, session: Session, lane: _Lane) -> int:
        return min(self._lane_limit(session) - len(lane.in_flight),
                   self._global_room(session, lane))

    def submit(self, push: Push) -> None:
        """A journaled push: send it now if its agent takes it and nothing is ahead on its lane."""
        session = self.sessions.get(push.agent_id)
        if self.cluster is not None:
            if session is None:
                # the node holding the agent reads it now
                self.cluster.pushed(push.agent_id, push.seq or 0)
            else:
                # in journal order with what other nodes journaled just before (a client's
                # previous push may have gone through another node)
                self.journaled(push.agent_id, push.seq or 0)
            return
        if session is None or session.closed or not session.scanned or session.replaying:
            return  # stays queued; the replay picks it up in order
        if push.id in session.in_flight:
            return
        lane = self._lane(session, push.remote)
        if lane.next_seq is not None or lane.loading or not session.ready \
                or self._room(session, lane) <= 0 or self._lane_paused(session, lane):
            self._hold(session, lane, push.seq or 1)
            return
        self._send(session, lane, push)

    def _hold(self, session: Session, lane: _Lane, seq: int) -> None:
        """Push C{seq} (and what follows on its lane) waits in the journal."""
        if lane.loading:
            lane.rewind = seq if lane.rewind is None else min(lane.rewind, seq)
        elif lane.next_seq is None or seq < lane.next_seq:
            lane.next_seq = seq
        if not session.ready or self._lane_paused(session, lane):
            return
        limit = self._lane_limit(session)
        if len(lane.in_flight) >= limit:
            if not lane.hold_logged and limit > 1:
                lane.hold_logged = True
                log.info(
                    "Agent/{agent_id}: device {lane} has {n} push(es) unanswered (lane window "
                    "{limit}){why}; its further pushes wait in the journal, other devices go on",
                    agent_id=session.agent_id, lane=_safe(lane.key), n=len(lane.in_flight),
                    limit=limit, why=", waiting on a retry" if lane.stalled else "")
        elif self._global_room(session, lane) <= 0:
            self._block(session, lane)

    def _block(self, session: Session, lane: _Lane) -> None:
        if not lane.blocked:
            lane.blocked = True
            session.blocked.append(lane)
        if not session.hold_logged:
            session.hold_logged = True
            log.info(
                "Agent/{agent_id} has {n} push(es) unanswered (window {window}); further "
                "pushes wait in the journal and go device by device as answers come in",
                agent_id=session.agent_id, n=len(session.in_flight), window=self.window)

    def _send(self, session: Session, lane: _Lane, push: Push) -> None:
        if push.id in session.in_flight:
            return
        if push.expires_at is not None and push.expires_at <= self.clock.seconds():
            self._finish(push, j.EXPIRED, error="Expired before it could be sent")
            return
        msg: dict[str, Any] = {
            "type": wire.TRANSMIT_REQUEST,
            "remote": push.remote,
            "contentType": push.content_type,
            "body": push.body,
            "callback": f"Agent/{push.agent_id}-{push.id}",
            "pushId": push.id,
        }
        for key in ("returnAck", "waitTimeout"):
            if key in push.options:
                msg[key] = push.options[key]
        session.conn.send_message(msg)
        push.stamp("sent", self.clock.seconds())
        if push.state != j.ACCEPTED:
            self.journal.transition(push, j.SENT, count_attempt=True)
            self.metrics.push_state(j.SENT)
        # Until its answer only the record is kept, not the payload (someone waiting holds
        # the full push anyway): a window of thousands stays small in memory.
        session.in_flight[push.id] = (
            push if push.id in self._pending_pushes else attr.evolve(push, body=""))
        lane.in_flight.add(push.id)
        # (no line per push sent: twistd writes debug lines too; the counters say it)

    def _untrack(self, session: Session, push_id: str) -> tuple[Push | None, _Lane | None]:
        """Forget an in-flight push (its answer came); returns it and its lane."""
        push = session.in_flight.pop(push_id, None)
        if push is None:
            return None, None
        lane = session.lanes.get(lane_key(push.remote))
        if lane is not None:
            lane.in_flight.discard(push_id)
        return push, lane

    def _refill(self, session: Session, lane: _Lane | None) -> None:
        """Answers came in (their journal writes are queued): send what waits."""
        if session.closed:
            return
        if lane is not None:
            self._pump_lane(session, lane)
        self._serve_blocked(session)

    def _serve_blocked(self, session: Session) -> None:
        """Lanes that waited for the agent's window, oldest first, once half of it is free."""
        threshold = max(1, self.window // 2)
        for _ in range(len(session.blocked)):
            if not session.blocked or session.closed or not session.ready:
                return
            lane = session.blocked[0]
            need = min(self._lane_limit(session) - len(lane.in_flight), threshold)
            if not lane.stalled and self._global_room(session, lane) < max(1, need):
                return
            session.blocked.popleft()
            lane.blocked = False
            self._pump_lane(session, lane, from_blocked=True)
        if not session.blocked:
            session.hold_logged = False

    def _pump_all(self, session: Session) -> None:
        for lane in list(session.lanes.values()):
            self._pump_lane(session, lane)
        self._serve_blocked(session)

    def _pump_lane(self, session: Session, lane: _Lane, from_blocked: bool = False) -> None:
        """
        Read the next page of a lane that waits from the journal and send it: a device with a
        backlog of a million is streamed from disk, never held in memory, and only ever
        waits on itself.
        """
        if (session.closed or not session.ready or not session.scanned or lane.loading
                or lane.next_seq is None or (lane.blocked and not from_blocked)
                or self._lane_paused(session, lane)):
            return
        lane_room = self._lane_limit(session) - len(lane.in_flight)
        if lane_room <= 0 or (lane.in_flight and lane_room < self._lane_limit(session) // 2):
            return  # refill in half windows, not one read per answer
        global_room = self._global_room(session, lane)
        if global_room <= 0 or (not from_blocked and not lane.stalled
                                and global_room < min(lane_room, max(1, self.window // 2))):
            self._block(session, lane)
            return
        limit = min(lane_room, global_room)
        agent_id = session.agent_id
        assert agent_id is not None
        after = lane.next_seq - 1
        lane.loading = True
        lane.rewind = None
        states = j.OPEN_STATES if session.resends_safely else (j.QUEUED,)

        def got(pushes: list[Push]) -> None:
            lane.loading = False
            if session.closed:
                return
            next_seq: int | None = None if len(pushes) < limit else _stored_seq(pushes[-1]) + 1
            for push in pushes:
                live = self.live_push(push)
                if live.final or live.id in session.in_flight:
                    continue
                if not session.ready or self._room(session, lane) <= 0 \
                        or self._lane_paused(session, lane):
                    next_seq = push.seq
                    break
                self._send(session, lane, live)
            if lane.rewind is not None:
                next_seq = lane.rewind if next_seq is None else min(next_seq, lane.rewind)
                lane.rewind = None
            lane.next_seq = next_seq
            if next_seq is None:
                lane.hold_logged = False
            else:
                self._pump_lane(session, lane)

        def failed(f: Failure) -> None:
            lane.loading = False
            if lane.rewind is not None:
                lane.next_seq = min(lane.next_seq or lane.rewind, lane.rewind)
                lane.rewind = None
            log.failure("Reading the queued pushes of Agent/{agent_id} failed", f,
                        agent_id=agent_id)
            self._pause(session, "retry after a journal error")

        self.journal.open_pushes(agent_id, after_seq=after, remotes=sorted(lane.remotes),
                                 limit=limit, states=states).addCallbacks(got, failed)

    def _replay(self, session: Session, *, queued_after: int | None = None) -> None:
        """
        Send what the agent still owes an answer for, oldest first, page by page; new pushes
        wait in the journal meanwhile so order is kept.  A lane that fills up (or finds the
        agent's window full) keeps its place (the seq of its first waiting push) and is left
        out of the following pages: it resumes from there on its own, and the scan goes on to
        the other devices.  With C{queued_after} (a cluster's later scans, L{wake}): only
        queued pushes after that seq.
        """
        if session.replaying:
            return
        if session.paused is None and self.lane_pauses is not None:
            self._load_pauses(session, queued_after)
            return
        session.replaying = True
        agent_id = session.agent_id
        assert agent_id is not None
        if queued_after is None:
            states: tuple[str, ...] = j.OPEN_STATES if session.resends_safely else (j.QUEUED,)
        else:
            states = (j.QUEUED,)

        def page(after: int) -> None:
            if session.closed:
                session.replaying = False
                return
            held = [r for lane in session.lanes.values() if lane.next_seq is not None
                    for r in lane.remotes]
            self.journal.open_pushes(
                agent_id, after_seq=after, states=states, limit=REPLAY_PAGE,
                exclude_remotes=held if len(held) <= _MAX_EXCLUDED else (),
            ).addCallbacks(lambda pushes: got(pushes, after), failed)

        def got(pushes: list[Push], after: int) -> None:
            if session.closed:
                session.replaying = False
                return
            if not pushes:
                session.replaying = False
                session.scanned = True
                self._pump_all(session)
                if session.rescan is not None:  # woken while this scan ran
                    after, session.rescan = session.rescan, None
                    self._replay(session, queued_after=min(after, session.seen_seq))
                return
            for push in pushes:
                session.seen_seq = max(session.seen_seq, push.seq or 0)
                lane = self._lane(session, push.remote)
                live = self.live_push(push)
                if live.final or live.id in session.in_flight or lane.next_seq is not None:
                    continue
                if not session.ready or self._room(session, lane) <= 0 \
                        or self._lane_paused(session, lane):
                    self._hold(session, lane, push.seq or 1)
                    continue
                self._send(session, lane, live)
            page(pushes[-1].seq or after)

        def failed(f: Failure) -> None:
            session.replaying = False
            log.failure("Replay for Agent/{agent_id} failed", f, agent_id=agent_id)
            self._pause(session, "retry after a journal error")

        page(queued_after or 0)

    def live_push(self, push: Push) -> Push:
        """Prefer the in-memory copy of a push that someone is waiting on."""
        return self._pending_pushes.get(push.id, push)

    def track(self, push: Push) -> None:
        self._pending_pushes[push.id] = push

    def untrack(self, push_id: str) -> None:
        """A tracked push that was never journaled (its write failed, or it was a repeat)."""
        if not self._waiters.get(push_id):
            self._pending_pushes.pop(push_id, None)

    def wait_for(self, push: Push) -> Deferred[Push]:
        """Fires with C{push} once it reaches a final state; cancel to stop waiting."""
        if push.final:
            return succeed(push)
        self.track(push)

        def cancel(d: Deferred[Push]) -> None:
            waiters = self._waiters.get(push.id, [])
            if d in waiters:
                waiters.remove(d)
            if not waiters:
                self._waiters.pop(push.id, None)
                if push.agent_id not in self.sessions:
                    # nothing here will finish it (its agent is elsewhere or away): forget it,
                    # or L{poll_cluster} would read it for ever
                    self._pending_pushes.pop(push.id, None)

        d: Deferred[Push] = Deferred(cancel)
        self._waiters.setdefault(push.id, []).append(d)
        return d

    def _finish(
        self,
        push: Push,
        state: str,
        *,
        error: str | None = None,
        reply: tuple[int, str, str] | None = None,
        in_doubt: bool = False,
    ) -> Deferred[Push]:
        d = self._record(push, state, error=error, reply=reply, in_doubt=in_doubt)
        if self.cluster is not None:
            self.cluster.outcome(push.id)  # (sent after the transition commits)
        self.metrics.push_finished(
            state, self.clock.seconds() - push.created if push.created else None)
        self._pending_pushes.pop(push.id, None)
        for d in self._waiters.pop(push.id, []):
            d.callback(push)
        # a delivery is counted (medagent_relay_pushes_total), not logged: a line per message
        # is the hot path's cost (twistd writes debug lines too); what went wrong is a line
        if state != j.DELIVERED:
            log.info("Push {push_id} to Agent/{agent_id} {state}{why}", push_id=push.id,
                     agent_id=push.agent_id, state=state,
                     why=f": {wire.clip(error)}" if error else "")
        return d

    def _record(self, push: Push, state: str, **kw: Any) -> Deferred[Push]:
        """
        Write a push's outcome; while the database is away, again every L{JOURNAL_RETRY}
        seconds until it is written (or the relay stops).  What waits on the Deferred (the
        agent's confirmation: it keeps its answer until then) waits for the write that
        worked.
        """
        def later(f: Failure) -> Any:
            f.trap(DatabaseUnavailable)
            if self._closing or isinstance(f.value, DatabaseStopped):
                return f
            if push.id not in self._unrecorded:
                log.warn("Could not record push {push_id} as {state} ({error}); trying again "
                         "every {s} s", push_id=push.id, state=state,
                         error=f.getErrorMessage(), s=JOURNAL_RETRY)
            self._unrecorded.add(push.id)
            again: Deferred[None] = task.deferLater(self.clock, JOURNAL_RETRY, lambda: None)
            self._retrying_writes.add(again)

            def retry(result: Any) -> Any:
                self._retrying_writes.discard(again)
                if isinstance(result, Failure):
                    return result
                return self._record(push, state, **kw)

            return again.addBoth(retry)

        def written(p: Push) -> Push:
            self._unrecorded.discard(push.id)
            return p

        return self.journal.transition(push, state, **kw).addCallbacks(written, later)

    @staticmethod
    def _push_id(msg: Mapping[str, Any]) -> str | None:
        push_id = msg.get("pushId")
        if isinstance(push_id, str):
            return push_id
        callback = msg.get("callback")
        if isinstance(callback, str) and callback.startswith("Agent/") and "-" in callback:
            return callback.rsplit("-", 1)[1]
        return None

    def _on_transmit_response(self, session: Session, msg: Mapping[str, Any]) -> None:
        push_id = self._push_id(msg)
        push = session.in_flight.get(push_id) if push_id else None
        if push is None:
            if push_id is not None and self._on_request_response(session, msg, quiet=True):
                return
            # An answer for a push sent over an earlier connection (after a relay restart or a
            # reconnect): accept it only if the push was for this agent.
            if push_id is None:
                log.warn("Transmit response without push id from Agent/{agent_id}",
                         agent_id=session.agent_id)
                return

            def loaded(p: Push) -> None:
                if p.agent_id != session.agent_id:
                    log.warn(
                        "Agent/{agent_id} answered push {push_id} of another agent; ignored",
                        agent_id=session.agent_id,
                        push_id=push_id,
                    )
                    return
                if p.id in session.in_flight:  # re-sent meanwhile: answered on this socket
                    self._apply_response(session.in_flight[p.id], msg, session)
                elif not p.final:
                    self._apply_response(self.live_push(p), msg)
                    if msg.get("delivery") != "accepted":
                        self._confirm_when_recorded(session, p)
                elif msg.get("delivery") != "accepted":
                    self._confirm(session, p.id)

            self.journal.get(push_id).addCallbacks(loaded, lambda f: log.warn(
                "Transmit response for unknown push {push_id} from Agent/{agent_id}",
                push_id=push_id, agent_id=session.agent_id))
            return
        self._apply_response(push, msg, session)

    def _apply_response(
        self, push: Push, msg: Mapping[str, Any], session: Session | None = None
    ) -> None:
        status = msg.get("statusCode") or 200
        delivery = msg.get("delivery")
        body = msg.get("body", "")
        content_type = msg.get("contentType") or "text/plain"
        if delivery == "accepted":
            error = msg.get("error") if isinstance(msg.get("error"), str) else None
            if push.state != j.ACCEPTED:
                push.stamp("accepted", self.clock.seconds())
            if push.state != j.ACCEPTED or error:
                if push.state != j.ACCEPTED:
                    self.metrics.push_state(j.ACCEPTED)
                self.journal.transition(push, j.ACCEPTED, error=error)
            if error:
                self._answer_retrying(push)
                if session is not None:
                    self._stalled(session, push, True)
            return
        answered = self.clock.seconds()
        device_ms = msg.get(wire.DEVICE_MS)
        sent = push.timeline.get("sent")
        if (isinstance(device_ms, (int, float)) and not isinstance(device_ms, bool)
                and sent is not None and 0 <= device_ms <= (answered - sent) * 1000):
            # (a number from outside: only an interval that fits since the push was sent)
            push.stamp("device", answered - device_ms / 1000)
        push.stamp("answered", answered)
        lane = None
        if session is not None:
            self._stalled(session, push, False)
            _, lane = self._untrack(session, push.id)
            session.not_ready_count = 0
        if delivery == "cancelled":
            d = self._finish(push, j.CANCELLED, error=msg.get("error") if isinstance(
                msg.get("error"), str) else "Cancelled on the agent before delivery")
        elif status >= 400 or delivery == "failed":
            if isinstance(msg.get("error"), str):
                error = msg["error"]
            elif status < 400:  # the device answered no: its answer is the reply, not a log line
                error = f"Device refused the message ({msg.get('detail') or 'negative answer'})"
            else:
                error = body[:500]
            d = self._finish(push, j.FAILED, error=error, reply=(status, content_type, body),
                             in_doubt=msg.get("inDoubt") is True)
        else:
            d = self._finish(push, j.DELIVERED, reply=(status, content_type, body))
        if session is not None:
            # Confirm only once the answer is on disk: until then the agent keeps it.
            d.addCallback(lambda _: self._confirm(session, push.id))
            self._refill(session, lane)

    def _stalled(self, session: Session, push: Push, stalled: bool) -> None:
        """
        The agent reports a push waiting on a retry (its device is down) or answered: such a
        lane only holds its own window, not the agent's.
        """
        lane = session.lanes.get(lane_key(push.remote))
        if lane is None or lane.stalled == stalled:
            return
        lane.stalled = stalled
        if stalled:
            session.stalled.add(lane.key)
            self._serve_blocked(session)  # its pushes no longer count in the agent's window
        else:
            session.stalled.discard(lane.key)

    def _answer_retrying(self, push: Push) -> None:
        """
        The agent's attempt failed and it retries (an "accepted" answer with an error): a
        caller waiting for this push gets its answer now (502, see L{PushService}); the push
        stays open and is retried.
        """
        if self.cluster is not None:
            self.cluster.outcome(push.id)
        for d in self._waiters.pop(push.id, []):
            d.callback(push)

    def _confirm_when_recorded(self, session: Session, push: Push) -> None:
        # the transition was queued just now; a no-op batched call fires after it commits
        self.journal.flushed().addCallback(lambda _: self._confirm(session, push.id))

    def _confirm(self, session: Session, push_id: str) -> None:
        """Tell a durable agent its answer is recorded, so it stops re-sending it."""
        if wire.CAP_DURABLE in session.capabilities:
            session.conn.send_message({"type": wire.TRANSMIT_CONFIRM, "pushId": push_id})

    def _on_agent_error(self, session: Session, msg: Mapping[str, Any]) -> None:
        push_id = self._push_id(msg)
        if push_id and push_id in session.in_flight:
            push, lane = self._untrack(session, push_id)
            assert push is not None
            if wire.error_not_delivered(msg):
                # Nothing reached a device: the push waits again, first on its lane, and the
                # agent gets pushes again after a backoff (or once it has read its config).
                log.info("Push {push_id} not taken by Agent/{agent_id} ({reason}); stays queued",
                         push_id=push.id, agent_id=session.agent_id,
                         reason=str(msg.get("body"))[:100])
                self.journal.transition(push, j.QUEUED, error=str(msg.get("body"))[:200]
                                        + " (not delivered; will be sent again)")
                self._not_ready(session)
                if lane is not None:
                    self._hold(session, lane, push.seq or 1)
                return
            self._finish(push, j.FAILED, error=msg.get("body") or "agent:error",
                         reply=(400, "text/plain", msg.get("body") or ""))
            self._refill(session, lane)
            return
        if self._on_request_response(session, msg, quiet=True):
            return
        log.warn(
            "Error from Agent/{agent_id}: {body}", agent_id=session.agent_id,
            body=str(msg.get("body"))[:200]
        )

    def _refresh_principal(self, session: Session, token: str) -> None:
        """An in-band token (heartbeat): a bad one is ignored, the session re-checks anyway."""
        try:
            principal = self.authority.verify_token(token)
        except FHIRError:
            return
        if session.agent_id is not None and principal.can_act_as(session.agent_id):
            self._keep_fresher(session, principal)

    @staticmethod
    def _keep_fresher(session: Session, principal: Any) -> None:
        """A fresh token of the same client keeps the session alive past the old one's expiry."""
        current = session.principal
        if (current is not None and principal.client_id == current.client_id
                and (principal.expires_at or 0) > (current.expires_at or 0)):
            session.principal = principal

    def snapshot(self, agent_id: str) -> dict[str, Any] | None:
        """For ``$stats``: what is on the agent per device lane, and what waits (no payloads)."""
        session = self.sessions.get(agent_id)
        if session is None:
            return None
        return {
            "ready": session.ready,
            "inFlight": len(session.in_flight),
            "window": self.window,
            "laneWindow": self._lane_limit(session),
            "paused": sorted(_safe(k) for k in session.paused or ()),
            #: our agent (reports lane statistics in agent:stats); Medplum's does not
            "durable": session.ordered_lanes,
            #: pushes of a paused lane already on the agent wait there too
            "holdsOnAgent": wire.CAP_LANE_HOLD in session.capabilities,
            "lanes": {
                _safe(lane.key): {"inFlight": len(lane.in_flight),
                                  "holding": lane.next_seq is not None,
                                  "retrying": lane.stalled}
                for lane in session.lanes.values()
                if lane.in_flight or lane.next_seq is not None
            },
        }

    # -- cancel -----------------------------------------------------------------------------

    def cancel(self, push_id: str, by: str) -> Deferred[Push]:
        """
        Cancel a push that has not reached its device.  Queued on the relay: cancelled here.
        On the agent: asked of the agent (``agent:transmit:cancel``, only if it announced
        "cancel"), which drops it unless it is being delivered.  Anything else is a 409 that
        says why.
        """
        d = self.journal.current(push_id)  # after every write queued so far
        d.addCallback(self._cancel_where_held, by)
        return d

    def _cancel_where_held(self, push: Push, by: str) -> Any:
        """
        On a cluster, a push of an agent another node holds is cancelled by that node (it
        may be sending it this instant; only it can order the two).
        """
        if push.final or push.agent_id in self.sessions or self.cluster is None:
            return self._cancel(self.live_push(push), by)

        def nobody(f: Failure) -> Any:
            f.trap(FHIRError)
            if f.value.status != 503:
                return f
            return self._cancel(self.live_push(push), by)  # no node holds its agent

        def done(answer: Any) -> Deferred[Push]:
            return self.journal.get(push.id)

        return self.call_holder(push.agent_id, {"op": "cancel", "pushId": push.id, "by": by}
                                ).addCallbacks(done, nobody)

    def _cancel(self, push: Push, by: str) -> Any:
        session = self.sessions.get(push.agent_id)
        on_agent = session is not None and push.id in session.in_flight
        if push.final:
            raise FHIRError(409, f"Push {push.id} is {push.state}; nothing to cancel",
                            "conflict")
        if push.state == j.QUEUED and not on_agent:
            return self._finish(push, j.CANCELLED, error=f"Cancelled by {by}")
        # written to an agent (now or over an earlier connection): only the agent can say
        if session is None:
            raise FHIRError(
                409, f"Push {push.id} is {push.state}: it was sent to Agent/{push.agent_id}, "
                "which is not connected now; it can be cancelled once the agent is back",
                "conflict")
        if wire.CAP_CANCEL not in session.capabilities:
            raise FHIRError(
                409, f"Push {push.id} is {push.state}: Agent/{push.agent_id} has it and cannot "
                "cancel pushes it holds (no 'cancel' capability); it will be delivered",
                "conflict")
        d = self.request(push.agent_id, {"type": wire.TRANSMIT_CANCEL, "pushId": push.id})
        return d.addCallback(lambda answer: self._cancel_answered(session, push, by, answer))

    def _cancel_answered(self, session: Session, push: Push, by: str,
                         answer: Mapping[str, Any]) -> Any:
        status = answer.get("statusCode")
        text = answer.get("body") if isinstance(answer.get("body"), str) else ""
        if answer.get("type") == wire.ERROR:
            raise FHIRError(502, f"Agent/{push.agent_id} could not cancel push {push.id}: "
                            f"{str(answer.get('body'))[:200]}", "transient")
        if status == 200:
            live = session.in_flight.get(push.id, push)
            _, lane = self._untrack(session, push.id)
            if live.final:
                return live
            d = self._finish(live, j.CANCELLED, error=f"Cancelled by {by} (dropped by the agent "
                             "before delivery)")

            def confirm(done: Push) -> Push:
                self._confirm(session, push.id)
                return done

            d.addCallback(confirm)
            self._refill(session, lane)
            return d
        if status == 404 and not session.closed and push.id not in session.in_flight \
                and push.state == j.SENT:
            # written over an earlier connection and never stored by the agent: it is only
            # here, and nothing sends it while this runs
            return self._finish(push, j.CANCELLED, error=f"Cancelled by {by}")
        if status == 409:
            raise FHIRError(
                409, f"Push {push.id} cannot be cancelled: Agent/{push.agent_id} is delivering "
                f"it to the device now, or has answered it ({text or 'in flight'}); its outcome "
                "will be recorded", "conflict")
        raise FHIRError(
            409, f"Push {push.id} cannot be cancelled now: Agent/{push.agent_id} does not hold "
            f"it ({text or status}); try again", "conflict")

    # -- inbound (device → cloud) -------------------------------------------------------

    def _on_inbound(self, session: Session, msg: Mapping[str, Any]) -> None:
        agent_id = session.agent_id
        assert agent_id is not None
        try:
            principal = self.authority.verify_token(msg.get("accessToken") or "")
        except FHIRError as e:
            session.conn.send_message(wire.error(e.message, msg.get("callback")))
            return
        if not principal.can_act_as(agent_id):
            session.conn.send_message(wire.error(
                f"This access token cannot act as Agent/{agent_id}", msg.get("callback")))
            return
        self._keep_fresher(session, principal)

        def answer(result: Mapping[str, Any]) -> None:
            if session.closed:
                return
            session.conn.send_message(
                wire.transmit_response(
                    msg,
                    status_code=int(result.get("statusCode", 200)),
                    content_type=result.get("contentType", "text/plain"),
                    body=result.get("body", ""),
                )
            )

        def failed(f: Failure) -> None:
            log.failure("Inbound message from Agent/{agent_id} failed", f, agent_id=agent_id)
            answer({"statusCode": 500, "contentType": "text/plain", "body": "Relay error"})

        self.inbound(agent_id, msg).addCallbacks(answer, failed)

    # -- paused lanes (L{medagent.relay.lanes}) ----------------------------------------------

    def _lane_paused(self, session: Session, lane: _Lane) -> bool:
        """An operator paused this lane: its pushes wait in the journal, in order."""
        return bool(session.paused) and lane.key in (session.paused or ())

    def _load_pauses(self, session: Session, queued_after: int | None) -> None:
        """Read the agent's paused lanes, then scan (nothing is sent before they are known)."""
        session.replaying = True  # (new pushes wait in the journal meanwhile)
        agent_id = session.agent_id
        assert agent_id is not None
        reads = self._pause_reads.get(agent_id)

        def loaded(rows: list[dict[str, Any]]) -> None:
            session.replaying = False
            if session.closed:
                return
            if self._pause_reads.get(agent_id) != reads:  # paused or resumed meanwhile
                self._load_pauses(session, queued_after)
                return
            session.paused = {r["lane"] for r in rows}
            self._send_holds(session)  # (after every connect: the agent may hold old ones)
            if session.paused:
                log.info("Agent/{agent_id}: {n} lane(s) paused by an operator; their pushes "
                         "wait in the journal", agent_id=agent_id, n=len(session.paused))
            self._replay(session, queued_after=queued_after)

        def failed(f: Failure) -> None:
            session.replaying = False
            log.warn("Could not read the paused lanes of Agent/{agent_id} ({error})",
                     agent_id=agent_id, error=f.getErrorMessage())
            self._pause(session, "retry after a storage error")

        self.lane_pauses.list(agent_id).addCallbacks(loaded, failed)

    def apply_pauses(self, agent_id: str, lanes: Iterable[str]) -> None:
        """
        The agent's paused lanes are now C{lanes} (keys): a lane newly paused gets nothing
        more from now on; a resumed one is read from the journal again, from its first
        waiting push, in order.
        """
        session = self.sessions.get(agent_id)
        if session is None or session.closed or session.paused is None:
            return  # read from storage before its first scan
        new = set(lanes)
        resumed = session.paused - new
        changed = new != session.paused
        session.paused = new
        if changed:
            self._send_holds(session)
        for key in sorted(resumed):
            lane = session.lanes.get(key)
            if lane is not None:
                self._pump_lane(session, lane)
        if resumed:
            self._serve_blocked(session)
            if self.cluster is not None:  # (what other nodes journaled for it meanwhile)
                self.wake(agent_id)

    def _send_holds(self, session: Session) -> None:
        """Our agent holds what it has of the paused lanes too (L{wire.LANES_HOLD})."""
        if wire.CAP_LANE_HOLD in session.capabilities and not session.closed:
            session.conn.send_message({"type": wire.LANES_HOLD,
                                       "lanes": sorted(session.paused or ())})

    def reload_pauses(self, agent_id: str) -> Deferred[list[str]]:
        """Read C{agent_id}'s paused lanes from storage and apply them here."""
        if self.lane_pauses is None:
            return succeed([])
        number = self._pause_reads[agent_id] = self._pause_reads.get(agent_id, 0) + 1

        def got(rows: list[dict[str, Any]]) -> list[str]:
            lanes = [r["lane"] for r in rows]
            if self._pause_reads.get(agent_id) == number:  # (else a later read applies)
                self.apply_pauses(agent_id, lanes)
            return lanes

        return self.lane_pauses.list(agent_id).addCallback(got)

    def refresh_pauses(self) -> Deferred[None]:
        """Every paused lane, read again and applied to the agents held here (a poll)."""
        held = [a for a, s in self.sessions.items() if s.paused is not None and not s.closed]
        if not held or self.lane_pauses is None:
            return succeed(None)
        numbers = dict(self._pause_reads)  # an agent read again meanwhile: that read applies

        def got(rows: list[dict[str, Any]]) -> None:
            if len(rows) >= MAX_PAUSES:  # a cut list would read as resumed: apply none
                log.warn("More than {n} paused lanes; not refreshed", n=MAX_PAUSES)
                return
            by_agent: dict[str, set[str]] = {}
            for r in rows:
                by_agent.setdefault(r["agent"], set()).add(r["lane"])
            for agent_id in held:
                if self._pause_reads.get(agent_id) == numbers.get(agent_id):
                    self.apply_pauses(agent_id, by_agent.get(agent_id, set()))

        def failed(f: Failure) -> None:
            log.warn("Could not read the paused lanes ({error})", error=f.getErrorMessage())

        return self.lane_pauses.list(limit=MAX_PAUSES).addCallbacks(got, failed)

    # -- control requests ($reload-config, $fetch-logs, $stats) ---------------------------

    def request(self, agent_id: str, message: dict[str, Any], timeout: float | None = None
                ) -> Deferred[dict[str, Any]]:
        """
        Send a control request and wait for the response carrying its callback; on a
        cluster, through the node holding the agent when that is another one.
        """
        session = self.sessions.get(agent_id)
        if session is None:
            return self.call_holder(agent_id, {"op": "request", "message": message,
                                               "timeout": timeout})
        callback = f"Agent/{agent_id}-{uuid.uuid4()}"
        message = dict(message, callback=callback)

        def cancel(d: Deferred[Any]) -> None:
            self._requests.pop(callback, None)

        d: Deferred[dict[str, Any]] = Deferred(cancel)
        self._requests[callback] = d
        session.conn.send_message(message)
        timer = self.clock.callLater(timeout or self.request_timeout, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            self._requests.pop(callback, None)
            if isinstance(result, Failure) and result.check(CancelledError):
                raise FHIRError(504, f"Agent/{agent_id} did not answer in time", "timeout")
            return result

        return d.addBoth(done)

    # -- calls between relay nodes (L{medagent.relay.cluster}) -------------------------------

    #: what another node may ask this one to send to an agent it holds
    CALLABLE_REQUESTS = frozenset([wire.RELOADCONFIG_REQUEST, wire.LOGS_REQUEST,
                                   wire.STATS_REQUEST])

    def call_holder(self, agent_id: str, call: dict[str, Any]) -> Deferred[Any]:
        """
        Run C{call} (see L{serve_call}) on the node holding C{agent_id}: 503 when no node
        holds it (or only this one, in the instant its session is opening or closing).
        """
        if self.cluster is None or self.agent_sessions is None:
            return fail(FHIRError(503, f"Agent/{agent_id} is not connected", "transient"))
        timeout = (call.get("timeout") or self.request_timeout) + CALL_MARGIN

        def holder(node: str | None) -> Any:
            if node is None or node == self.node_id:
                raise FHIRError(503, f"Agent/{agent_id} is not connected", "transient")
            return self.cluster.call(agent_id, node, call, timeout)

        return self.agent_sessions.holder(agent_id).addCallback(holder)

    def serve_call(self, agent_id: str, call: Mapping[str, Any]) -> Any:
        """
        Another node's call for an agent this node holds: C{request} (a control request,
        L{CALLABLE_REQUESTS} only, answered with the agent's response), C{snapshot}
        (L{snapshot}), C{status} (L{status}) or C{cancel} (L{cancel}; the push's new state).
        """
        if agent_id not in self.sessions:
            raise FHIRError(503, f"Agent/{agent_id} is no longer connected to relay node "
                            f"{self.node_id}", "transient")
        op = call.get("op")
        if op == "request":
            message = call.get("message")
            timeout = call.get("timeout")
            if not isinstance(message, dict) or message.get("type") not in \
                    self.CALLABLE_REQUESTS or not (timeout is None or (
                        isinstance(timeout, (int, float)) and 0 < timeout <= 300)):
                raise FHIRError(400, "Not a request another relay node may send", "invalid")
            return self.request(agent_id, {k: v for k, v in message.items()
                                           if k != "callback"}, timeout)
        if op == "snapshot":
            return self.snapshot(agent_id)
        if op == "pauses":  # a lane of this agent was paused or resumed on another node
            return self.reload_pauses(agent_id).addCallback(lambda lanes: {"paused": lanes})
        if op == "status":
            return self.status(agent_id)
        if op == "cancel" and isinstance(call.get("pushId"), str) \
                and isinstance(call.get("by"), str):
            return self.cancel(call["pushId"], call["by"]).addCallback(
                lambda push: {"id": push.id, "state": push.state})
        raise FHIRError(400, "Unknown call from another relay node", "invalid")

    def status_anywhere(self, agent_id: str) -> Deferred[dict[str, Any]]:
        """L{status}, from the node holding the agent when that is another one."""
        if agent_id in self.sessions or self.cluster is None:
            return succeed(self.status(agent_id))

        def there(failure: Failure) -> dict[str, Any]:
            failure.trap(FHIRError)
            return self.status(agent_id)  # nobody holds it (or its node did not answer)

        return self.call_holder(agent_id, {"op": "status", "timeout": STATUS_TIMEOUT}
                                ).addErrback(there)

    def snapshot_anywhere(self, agent_id: str) -> Deferred[dict[str, Any] | None]:
        """L{snapshot}, from the node holding the agent when that is another one."""
        if agent_id in self.sessions or self.cluster is None:
            return succeed(self.snapshot(agent_id))

        def unavailable(failure: Failure) -> None:
            failure.trap(FHIRError)
            return None

        return self.call_holder(agent_id, {"op": "snapshot", "timeout": STATUS_TIMEOUT}
                                ).addErrback(unavailable)

    def _on_request_response(
        self, session: Session, msg: Mapping[str, Any], quiet: bool = False
    ) -> bool:
        d = self._requests.pop(msg.get("callback") or "", None)
        if d is None:
            if not quiet:
                log.warn("Unsolicited {type} from Agent/{agent_id}", type=msg["type"],
                         agent_id=session.agent_id)
            return False
        d.callback(dict(msg))
        return True

    def close(self) -> None:
        self._closing = True
        for d in list(self._retrying_writes):
            d.cancel()  # the agent keeps its answer and sends it to the next relay
        for session in list(self.sessions.values()):
            session.conn.close("relay shutting down")
            self.connection_lost(session, "relay shutting down")
