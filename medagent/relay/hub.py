"""
The relay's side of the agent protocol, without a transport: which agents are connected,
what was sent to them, and what they answered.

A websocket adapter (L{medagent.relay.ws}) feeds frames in and gives the hub an
L{AgentConnection} to write to; the hub never touches a socket.  Pushes come from the
journal and go back to it: the hub moves them through ``queued → sent → delivered|failed``.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay import journal as j
from medagent.relay.auth import CLIENT_REVOKED, TOKEN_EXPIRED, Authority
from medagent.relay.journal import Journal, Push

log = Logger()

REPLAY_PAGE = 500

class AgentConnection(Protocol):
    """What the hub needs from a transport."""

    peer: str

    def send_message(self, message: Mapping[str, Any]) -> None: ...

    def close(self, reason: str) -> None: ...


class Session:
    """One websocket connection, before and after it says which agent it is."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        self.agent_id: str | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.version: str | None = None
        self.outstanding_heartbeats = 0
        self.heartbeat: LoopingCall | None = None
        #: pushes written to this socket and not yet answered, by push id
        self.in_flight: dict[str, Push] = {}
        self.replaying = False
        #: the send window was full: pushes after this seq wait in the journal
        self.backlog_after: int | None = None
        self.closed = False
        self.connected_at = 0.0
        #: who this session authenticated as (its token's expiry included); re-checked on
        #: every heartbeat tick and when its client is revoked
        self.principal: Any = None

    @property
    def refreshes_token(self) -> bool:
        return wire.CAP_TOKEN_REFRESH in self.capabilities

    @property
    def resends_safely(self) -> bool:
        return wire.CAP_DEDUPE in self.capabilities or wire.CAP_DURABLE in self.capabilities


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
        inbound: InboundHandler = _no_inbound,
    ) -> None:
        self.clock = clock
        self.authority = authority
        self.store = store
        self.journal = journal
        self.heartbeat_interval = heartbeat_interval
        self.max_missed_heartbeats = max_missed_heartbeats
        self.max_message_size = max_message_size
        self.request_timeout = request_timeout
        #: pushes on an agent's wire without a final answer, at most
        self.window = window
        self.inbound = inbound
        self.sessions: dict[str, Session] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._waiters: dict[str, list[Deferred[Push]]] = {}
        self._requests: dict[str, Deferred[dict[str, Any]]] = {}
        #: pushes someone waits on, so a late answer updates the copy the waiter holds
        self._pending_pushes: dict[str, Push] = {}
        authority.revocation_listeners.append(self.close_client)

    # -- connection lifecycle ----------------------------------------------------------

    def connection_made(self, conn: AgentConnection) -> Session:
        return Session(conn)

    def connection_lost(self, session: Session, reason: str = "closed") -> None:
        session.closed = True
        if session.heartbeat is not None and session.heartbeat.running:
            session.heartbeat.stop()
        agent_id = session.agent_id
        if agent_id is None or self.sessions.get(agent_id) is not session:
            return
        del self.sessions[agent_id]
        self._status[agent_id] = {
            "status": "disconnected",
            "version": session.version or "unknown",
            "lastUpdated": self.clock.seconds(),
        }
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
        try:
            msg = wire.decode(data, self.max_message_size)
        except wire.WireError as e:
            log.warn("Bad frame from {peer}: {reason}", peer=session.conn.peer, reason=e.reason)
            session.conn.send_message(wire.error(e.reason, e.callback))
            return
        kind = msg["type"]
        try:
            if kind == wire.CONNECT_REQUEST:
                self._on_connect(session, msg)
            elif session.agent_id is None:
                session.conn.send_message(wire.error("Not connected", msg.get("callback")))
            elif kind == wire.HEARTBEAT_REQUEST:
                session.outstanding_heartbeats = 0
                if msg.get("accessToken"):
                    self._refresh_principal(session, msg["accessToken"])
                session.conn.send_message(wire.heartbeat_response())
            elif kind == wire.HEARTBEAT_RESPONSE:
                session.outstanding_heartbeats = 0
                if isinstance(msg.get("version"), str):
                    session.version = msg["version"]
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
        if not principal.can_act_as(agent_id):
            log.warn(
                "Client {client_id} tried to connect as Agent/{agent_id}",
                client_id=principal.client_id,
                agent_id=agent_id,
            )
            session.conn.send_message(
                wire.error(f"This access token cannot act as Agent/{agent_id}", callback)
            )
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
            caps = msg.get("capabilities")
            session.capabilities = frozenset(
                c for c in (caps if isinstance(caps, list) else []) if isinstance(c, str)
            )
            first = session.agent_id is None
            session.agent_id = agent_id
            session.principal = principal
            session.connected_at = self.clock.seconds()
            self.sessions[agent_id] = session
            session.conn.send_message(
                {"type": wire.CONNECT_RESPONSE, "callback": callback,
                 "capabilities": [wire.CAP_DURABLE]}
            )
            log.info(
                "Agent/{agent_id} connected from {peer} (capabilities: {caps})",
                agent_id=agent_id,
                peer=session.conn.peer,
                caps=",".join(sorted(session.capabilities)) or "none",
            )
            if first:
                session.heartbeat = LoopingCall(self._heartbeat, session)
                session.heartbeat.clock = self.clock
                session.heartbeat.start(self.heartbeat_interval, now=False)
            self._replay(session)

        def missing(f: Failure) -> None:
            text = f.value.message if isinstance(f.value, FHIRError) else "Agent lookup failed"
            session.conn.send_message(wire.error(text, callback))

        self.store.read("Agent", agent_id).addCallbacks(found, missing)

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
        session.conn.send_message({"type": wire.HEARTBEAT_REQUEST})

    def _end_session(self, session: Session, problem: str) -> None:
        """Its credential no longer holds: tell the agent why, close, forget it at once."""
        log.warn("Closing the connection of Agent/{agent_id} from {peer}: {problem}",
                 agent_id=session.agent_id, peer=session.conn.peer, problem=problem)
        session.conn.send_message(wire.error(f"Connection closed: {problem}"))
        session.conn.close(problem)
        self.connection_lost(session, problem)

    def close_client(self, client_id: str) -> int:
        """A client was revoked: close every agent session it authenticated; how many."""
        ended = [s for s in list(self.sessions.values())
                 if s.principal is not None and s.principal.client_id == client_id]
        for session in ended:
            self._end_session(session, CLIENT_REVOKED)
        return len(ended)

    # -- pushes ---------------------------------------------------------------------------

    def submit(self, push: Push) -> None:
        """A journaled push: send it now if its agent is connected and nothing is ahead."""
        session = self.sessions.get(push.agent_id)
        if session is None or session.replaying or session.backlog_after is not None:
            return  # stays queued; the replay picks it up in order
        if len(session.in_flight) >= self.window:
            session.backlog_after = (push.seq or 1) - 1
            return
        self._send(session, push)

    def _maybe_resume(self, session: Session) -> None:
        """Answers came in: refill the send window from the journal."""
        if (session.backlog_after is not None and not session.replaying and not session.closed
                and len(session.in_flight) <= self.window // 2):
            after, session.backlog_after = session.backlog_after, None
            self._replay(session, after)

    def _send(self, session: Session, push: Push) -> None:
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
        session.in_flight[push.id] = push
        session.conn.send_message(msg)
        if push.state != j.ACCEPTED:
            self.journal.transition(push, j.SENT, count_attempt=True)
        log.debug(
            "Push {push_id} sent to Agent/{agent_id} ({size} bytes, {content_type})",
            push_id=push.id,
            agent_id=push.agent_id,
            size=len(push.body),
            content_type=push.content_type,
        )

    def _replay(self, session: Session, after: int = 0) -> None:
        """
        Send what the agent still owes an answer for, oldest first, page by page; new pushes
        wait in the journal meanwhile so order is kept.  At most C{window} pushes are on the
        wire unanswered: a backlog of a million is streamed from disk, never held in memory.
        """
        if session.replaying:
            return
        session.replaying = True
        agent_id = session.agent_id
        assert agent_id is not None
        states = j.OPEN_STATES if session.resends_safely else (j.QUEUED,)

        def page(after: int) -> None:
            if session.closed:
                session.replaying = False
                return
            self.journal.open_for_agent(agent_id, after_seq=after, states=states).addCallbacks(
                lambda pushes: got(pushes, after), failed
            )

        def got(pushes: list[Push], after: int) -> None:
            if session.closed:
                session.replaying = False
                return
            if not pushes:
                session.replaying = False
                return
            for push in pushes:
                live = self.live_push(push)
                if live.final or live.id in session.in_flight:
                    continue
                if len(session.in_flight) >= self.window:
                    session.backlog_after = (push.seq or 1) - 1
                    session.replaying = False
                    return
                self._send(session, live)
            page(pushes[-1].seq or after)

        def failed(f: Failure) -> None:
            session.replaying = False
            log.failure("Replay for Agent/{agent_id} failed", f, agent_id=agent_id)

        page(after)

    def live_push(self, push: Push) -> Push:
        """Prefer the in-memory copy of a push that someone is waiting on."""
        return self._pending_pushes.get(push.id, push)

    def track(self, push: Push) -> None:
        self._pending_pushes[push.id] = push

    def wait_for(self, push: Push) -> Deferred[Push]:
        """Fires with C{push} once it reaches a final state; cancel to stop waiting."""
        if push.final:
            return succeed(push)
        self.track(push)

        def cancel(d: Deferred[Push]) -> None:
            waiters = self._waiters.get(push.id, [])
            if d in waiters:
                waiters.remove(d)

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
        d = self.journal.transition(push, state, error=error, reply=reply, in_doubt=in_doubt)
        self._pending_pushes.pop(push.id, None)
        for d in self._waiters.pop(push.id, []):
            d.callback(push)
        log.info(
            "Push {push_id} to Agent/{agent_id} {state}{why}",
            push_id=push.id,
            agent_id=push.agent_id,
            state=state,
            why=f": {error}" if error else "",
        )
        return d

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
                if not p.final:
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
            if push.state != j.ACCEPTED or error:
                self.journal.transition(push, j.ACCEPTED, error=error)
            if error:
                self._answer_retrying(push)
            return
        if session is not None:
            session.in_flight.pop(push.id, None)
            self._maybe_resume(session)
        if status >= 400 or delivery == "failed":
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

    def _answer_retrying(self, push: Push) -> None:
        """
        The agent's attempt failed and it retries (an "accepted" answer with an error): a
        caller waiting for this push gets its answer now (502, see L{PushService}); the push
        stays open and is retried.
        """
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
            push = session.in_flight.pop(push_id)
            self._finish(push, j.FAILED, error=msg.get("body") or "agent:error",
                         reply=(400, "text/plain", msg.get("body") or ""))
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

    # -- control requests ($reload-config, $fetch-logs, $stats) ---------------------------

    def request(self, agent_id: str, message: dict[str, Any], timeout: float | None = None
                ) -> Deferred[dict[str, Any]]:
        """Send a control request and wait for the response carrying its callback."""
        session = self.sessions.get(agent_id)
        if session is None:
            raise FHIRError(503, f"Agent/{agent_id} is not connected", "transient")
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
        for session in list(self.sessions.values()):
            session.conn.close("relay shutting down")
            self.connection_lost(session, "relay shutting down")
