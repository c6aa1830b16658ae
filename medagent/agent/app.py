"""
The agent's side of the agent protocol, without a transport: log in, say who we are, answer
heartbeats, deliver pushes through the L{Dispatcher}, and send results back up.

A push the agent already answered (same push id, e.g. re-sent by the relay after a
reconnect) is answered from its record instead of being delivered again.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent import wire
from medagent.agent.dispatch import DeliveryError, Dispatcher, Reply
from medagent.relay.hub import CAP_DEDUPE

log = Logger()

#: How many answered pushes the agent remembers (for re-sent requests).
RECORD_SIZE = 20_000
#: Responses waiting for the relay while the link is down.
MAX_OUTBOX = 10_000


class RelayConnection(Protocol):
    """What the app needs from the websocket."""

    def send_message(self, message: Mapping[str, Any]) -> None: ...

    def close(self, reason: str) -> None: ...


class TokenSource(Protocol):
    def access_token(self) -> Deferred[str]: ...


class AgentApp:
    def __init__(
        self,
        clock: Any,
        agent_id: str,
        tokens: TokenSource,
        dispatcher: Dispatcher,
        *,
        heartbeat_interval: float = 10.0,
        max_missed_heartbeats: int = 1,
        max_not_live_ticks: int = 3,
        capabilities: tuple[str, ...] = (),
        log_buffer: Callable[[int], list[dict[str, Any]]] | None = None,
        reload_config: Callable[[], Deferred[Any]] | None = None,
        max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.clock = clock
        self.agent_id = agent_id
        self.tokens = tokens
        self.dispatcher = dispatcher
        self.heartbeat_interval = heartbeat_interval
        self.max_missed_heartbeats = max_missed_heartbeats
        self.max_not_live_ticks = max_not_live_ticks
        self.capabilities = (CAP_DEDUPE, *capabilities)
        self.log_buffer = log_buffer
        self.reload_config = reload_config
        self.max_message_size = max_message_size
        self.conn: RelayConnection | None = None
        self.stopping = False
        self.live = False
        self.outstanding_heartbeats = 0
        self.not_live_ticks = 0
        self.outbox: deque[dict[str, Any]] = deque()
        #: push id → answer (dict) once done, or None while delivering
        self.record: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self.stats = {"received": 0, "delivered": 0, "failed": 0, "duplicates": 0,
                      "connects": 0}
        self.last_ping_ms: float | None = None
        self._heartbeat_sent_at: float | None = None
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self.on_live: list[Callable[[], None]] = []
        #: callbacks of our inbound (device → cloud) requests awaiting the relay's answer
        self.inbound_responses: dict[str, Deferred[dict[str, Any]]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if not self._ticker.running:
            self._ticker.start(self.heartbeat_interval, now=False)

    def stop(self) -> None:
        """Stop heartbeats and say goodbye to the relay with a clean websocket close."""
        self.stopping = True
        if self._ticker.running:
            self._ticker.stop()
        if self.conn is not None:
            self.conn.close("agent shutting down")

    def connection_made(self, conn: RelayConnection) -> None:
        self.conn = conn
        self.live = False
        self.outstanding_heartbeats = 0
        self.not_live_ticks = 0

        def send_connect(token: str) -> None:
            if self.conn is not conn:
                return
            conn.send_message(
                {
                    "type": wire.CONNECT_REQUEST,
                    "accessToken": token,
                    "agentId": self.agent_id,
                    "capabilities": list(self.capabilities),
                }
            )

        def no_token(f: Failure) -> None:
            log.error("Login to the relay failed: {error}; will retry",
                      error=f.getErrorMessage())
            if self.conn is conn:
                conn.close("login failed")

        self.tokens.access_token().addCallbacks(send_connect, no_token)

    def connection_lost(self, reason: str = "closed") -> None:
        if self.stopping:
            log.info("Disconnected from the relay (agent shutting down)")
        elif self.live:
            log.warn("Lost the relay connection ({reason}); reconnecting", reason=reason)
        self.conn = None
        self.live = False

    # -- heartbeats ------------------------------------------------------------------------

    def _tick(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if not self.live:
            self.not_live_ticks += 1
            if self.not_live_ticks > self.max_not_live_ticks:
                log.warn("Relay did not accept our connect request; reconnecting")
                conn.close("connect not answered")
            return
        if self.outstanding_heartbeats > self.max_missed_heartbeats:
            log.warn("Relay missed {n} heartbeats; reconnecting", n=self.outstanding_heartbeats)
            self.outstanding_heartbeats = 0
            conn.close("missed heartbeats")
            return
        self.outstanding_heartbeats += 1
        self._heartbeat_sent_at = time.monotonic()
        conn.send_message({"type": wire.HEARTBEAT_REQUEST})

    # -- frames in -------------------------------------------------------------------------

    def frame_received(self, data: bytes | str) -> None:
        try:
            msg = wire.decode(data, self.max_message_size)
        except wire.WireError as e:
            log.warn("Bad frame from the relay: {reason}", reason=e.reason)
            self._send(wire.error(e.reason, e.callback))
            return
        kind = msg["type"]
        try:
            if kind == wire.CONNECT_RESPONSE:
                self._on_live()
            elif kind == wire.HEARTBEAT_REQUEST:
                self.outstanding_heartbeats = 0
                self._send(wire.heartbeat_response())
            elif kind == wire.HEARTBEAT_RESPONSE:
                self.outstanding_heartbeats = 0
                if self._heartbeat_sent_at is not None:
                    self.last_ping_ms = (time.monotonic() - self._heartbeat_sent_at) * 1000
            elif kind == wire.TRANSMIT_REQUEST:
                self._on_transmit(msg)
            elif kind == wire.TRANSMIT_RESPONSE:
                self._on_transmit_response(msg)
            elif kind == wire.RELOADCONFIG_REQUEST:
                self._on_reload(msg)
            elif kind == wire.LOGS_REQUEST:
                self._on_logs(msg)
            elif kind == wire.STATS_REQUEST:
                self._send({"type": wire.STATS_RESPONSE, "callback": msg.get("callback"),
                            "statusCode": 200, "stats": self.current_stats()})
            elif kind == wire.ERROR:
                log.warn("Relay says: {body}", body=str(msg.get("body"))[:300])
            else:
                self._send(wire.error(f"Unsupported message type: {kind}", msg.get("callback")))
        except Exception:
            log.failure("Error handling {kind} from the relay", kind=kind)
            self._send(wire.error("Agent internal error", msg.get("callback")))

    def _on_live(self) -> None:
        self.live = True
        self.not_live_ticks = 0
        self.outstanding_heartbeats = 0
        self.stats["connects"] += 1
        log.info("Connected to the relay as Agent/{agent_id}", agent_id=self.agent_id)
        while self.outbox and self.live and self.conn is not None:
            self.conn.send_message(self.outbox.popleft())
        for hook in list(self.on_live):
            hook()

    def _send(self, msg: Mapping[str, Any]) -> None:
        if self.conn is not None:
            self.conn.send_message(msg)

    def _send_result(self, msg: dict[str, Any]) -> None:
        """Results wait in a bounded outbox while the link is down."""
        if self.live and self.conn is not None:
            self.conn.send_message(msg)
            return
        if len(self.outbox) >= MAX_OUTBOX:
            dropped = self.outbox.popleft()
            log.error("Outbox full; dropped the answer for push {push_id} (the relay will "
                      "re-send it and get the answer from our record)",
                      push_id=dropped.get("pushId"))
        self.outbox.append(msg)

    # -- pushes ----------------------------------------------------------------------------

    @staticmethod
    def _push_id(msg: Mapping[str, Any]) -> str | None:
        push_id = msg.get("pushId")
        if isinstance(push_id, str) and push_id:
            return push_id
        return None

    def _on_transmit(self, msg: Mapping[str, Any]) -> None:
        push_id = self._push_id(msg)
        self.stats["received"] += 1
        if push_id is not None and push_id in self.record:
            self.stats["duplicates"] += 1
            answer = self.record[push_id]
            log.info("Push {push_id} was already {state}; answering from our record",
                     push_id=push_id, state="answered" if answer else "in progress")
            if answer is not None:
                self._send_result(dict(answer, callback=msg.get("callback")))
            return
        if push_id is not None:
            self._remember(push_id, None)
        remote = msg["remote"]
        content_type = msg["contentType"]
        options = {k: msg[k] for k in ("returnAck", "waitTimeout") if k in msg}
        d = maybeDeferred(self.dispatcher.dispatch, remote, content_type, msg["body"], options)
        d.addCallbacks(
            lambda reply: self._answer(msg, push_id, reply),
            lambda f: self._answer_failure(msg, push_id, f),
        )

    def _remember(self, push_id: str, answer: dict[str, Any] | None) -> None:
        self.record[push_id] = answer
        self.record.move_to_end(push_id)
        while len(self.record) > RECORD_SIZE:
            self.record.popitem(last=False)

    def _answer(self, msg: Mapping[str, Any], push_id: str | None, reply: Reply) -> None:
        self.stats["delivered" if reply.delivered else "failed"] += 1
        answer = wire.transmit_response(
            msg,
            status_code=reply.status_code,
            content_type=reply.content_type,
            body=reply.body,
            pushId=push_id,
            delivery="delivered" if reply.delivered else "failed",
            detail=reply.detail,
        )
        log.info(
            "Push {push_id} to {scheme} {outcome} ({detail})",
            push_id=push_id,
            scheme=str(msg["remote"]).split(":", 1)[0],
            outcome="delivered" if reply.delivered else "refused by device",
            detail=reply.detail or "",
        )
        self._finish(push_id, answer)

    def _answer_failure(self, msg: Mapping[str, Any], push_id: str | None, f: Failure) -> None:
        self.stats["failed"] += 1
        if f.check(DeliveryError):
            err: DeliveryError = f.value
            if not err.transient:
                status = 400
            elif err.phase == "ack" and "timeout" in err.reason.lower():
                status = 504
            else:
                status = 502
            reason = err.reason
            transient = err.transient
        else:
            log.failure("Unexpected error delivering push {push_id}", f, push_id=push_id)
            status, reason, transient = 500, "Agent internal error while delivering", True
        log.warn("Push {push_id} failed: {reason}", push_id=push_id, reason=reason)
        answer = wire.transmit_response(
            msg,
            status_code=status,
            content_type="text/plain",
            body=reason,
            pushId=push_id,
            delivery="failed",
            error=reason,
            transient=transient,
        )
        self._finish(push_id, answer)

    def _finish(self, push_id: str | None, answer: dict[str, Any]) -> None:
        if push_id is not None:
            self._remember(push_id, {k: v for k, v in answer.items() if k != "callback"})
        self._send_result(answer)

    def _on_transmit_response(self, msg: Mapping[str, Any]) -> None:
        """Answers to our own inbound messages are routed by the channel layer."""
        handler = self.inbound_responses.pop(msg.get("callback") or "", None)
        if handler is None:
            log.warn("Response for unknown inbound callback from the relay")
            return
        handler.callback(dict(msg))

    # -- control ---------------------------------------------------------------------------

    def _on_reload(self, msg: Mapping[str, Any]) -> None:
        callback = msg.get("callback")
        if self.reload_config is None:
            self._send({"type": wire.RELOADCONFIG_RESPONSE, "callback": callback,
                        "statusCode": 200})
            return

        def ok(_: Any) -> None:
            self._send({"type": wire.RELOADCONFIG_RESPONSE, "callback": callback,
                        "statusCode": 200})

        def failed(f: Failure) -> None:
            self._send(wire.error(f"Reload failed: {f.getErrorMessage()}", callback))

        maybeDeferred(self.reload_config).addCallbacks(ok, failed)

    def _on_logs(self, msg: Mapping[str, Any]) -> None:
        limit = msg.get("limit", 20)
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            self._send(wire.error("limit must be between 1 and 1000", msg.get("callback")))
            return
        logs = self.log_buffer(limit) if self.log_buffer else []
        self._send({"type": wire.LOGS_RESPONSE, "callback": msg.get("callback"),
                    "statusCode": 200, "logs": logs})

    def current_stats(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "ping": self.last_ping_ms,
            "outstandingHeartbeats": self.outstanding_heartbeats,
            "webSocketQueueDepth": len(self.outbox),
            "pushes": dict(self.stats),
            **self.dispatcher.stats(),
        }
