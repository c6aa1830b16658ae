"""
The agent's side of the agent protocol, without a transport: log in, say who we are, answer
heartbeats, hand pushes to the L{DurableQueue}, and send answers back up.

A push the agent already holds (same push id, e.g. re-sent by the relay after a reconnect) is
answered from the queue's record instead of being delivered again.  Answers stay on disk
until the relay confirms them, and are re-sent after every reconnect until then.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent import wire
from medagent.agent.dispatch import Dispatcher
from medagent.agent.outbox import Outbox
from medagent.agent.queue import DurableQueue
from medagent.storage.sqlite.database import Database

log = Logger()

#: Unconfirmed answers re-sent per page after a reconnect.
RESEND_PAGE = 500


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
        queue_db: Database,
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
        self.capabilities = (wire.CAP_DEDUPE, wire.CAP_DURABLE, wire.CAP_TOKEN_REFRESH,
                             wire.CAP_CANCEL, wire.CAP_LANE_HOLD, wire.CAP_BATCH,
                             *capabilities)
        self.log_buffer = log_buffer
        self.reload_config = reload_config
        self.max_message_size = max_message_size
        self.conn: RelayConnection | None = None
        self.stopping = False
        self.live = False
        self.outstanding_heartbeats = 0
        self.not_live_ticks = 0
        self.relay_durable = False
        self.queue = DurableQueue(queue_db, dispatcher, clock, self._send_answer)
        self.outbox = Outbox(queue_db, clock, agent_id, self._send_inbound)
        self.connects = 0
        self.last_ping_ms: float | None = None
        self._heartbeat_sent_at: float | None = None
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self.on_live: list[Callable[[], None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        if not self._ticker.running:
            self._ticker.start(self.heartbeat_interval, now=False)
        return self.queue.start()

    def stop(self) -> None:
        """Stop heartbeats and say goodbye to the relay with a clean websocket close."""
        self.stopping = True
        self.queue.stop()
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
                    wire.BATCH_BYTES_FIELD: wire.batch_limit(self.max_message_size),
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

        def send(token: str | None) -> None:
            # The token rides on the heartbeat (refreshed before it expires), so the relay can
            # keep this session past the expiry of the token it connected with.
            if self.conn is conn:
                conn.send_message({"type": wire.HEARTBEAT_REQUEST,
                                   **({"accessToken": token} if token else {})})

        def no_token(f: Failure) -> None:
            log.warn("Could not refresh the access token: {error}", error=f.getErrorMessage())
            send(None)

        self.tokens.access_token().addCallbacks(send, no_token)

    # -- frames in -------------------------------------------------------------------------

    def frame_received(self, data: bytes | str) -> None:
        try:
            msg = wire.decode(data, self.max_message_size)
        except wire.WireError as e:
            log.warn("Bad frame from the relay: {reason}", reason=e.reason)
            self._send(wire.error(e.reason, e.callback))
            return
        if msg["type"] == wire.BATCH:
            # several messages in one frame: each as if it had come in its own, in order
            for item in wire.unbatch(msg):
                if isinstance(item, wire.WireError):
                    log.warn("Bad message in a batch from the relay: {reason}",
                             reason=item.reason)
                    self._send(wire.error(item.reason, item.callback))
                else:
                    self._message_received(item)
            return
        self._message_received(msg)

    def _message_received(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        try:
            if kind == wire.CONNECT_RESPONSE:
                caps = msg.get("capabilities")
                self.relay_durable = isinstance(caps, list) and wire.CAP_DURABLE in caps
                batching = getattr(self.conn, "enable_batching", None)
                limit = wire.peer_batch_limit(msg)
                if limit is not None and batching is not None:
                    batching(limit)
                self._on_live()
            elif kind == wire.HEARTBEAT_REQUEST:
                self.outstanding_heartbeats = 0
                self._send(wire.heartbeat_response())
            elif kind == wire.HEARTBEAT_RESPONSE:
                self.outstanding_heartbeats = 0
                if self._heartbeat_sent_at is not None:
                    self.last_ping_ms = (time.monotonic() - self._heartbeat_sent_at) * 1000
            elif kind == wire.TRANSMIT_REQUEST:
                self.queue.receive(msg)
            elif kind == wire.TRANSMIT_CONFIRM:
                self.queue.confirm(msg["pushId"])
            elif kind == wire.TRANSMIT_CANCEL:
                self._on_cancel(msg)
            elif kind == wire.LANES_HOLD:
                self._on_hold(msg)
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
                if not self.outbox.failed(msg):
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
        self.connects += 1
        log.info("Connected to the relay as Agent/{agent_id}", agent_id=self.agent_id)
        self._resend_unconfirmed()
        self.outbox.resend_pending().addErrback(
            lambda f: log.failure("Could not read the inbound outbox", f))
        for hook in list(self.on_live):
            hook()

    def _resend_unconfirmed(self) -> None:
        """Answers the relay may not have recorded go again, oldest first."""
        conn = self.conn

        def send(answers: list[dict[str, Any]]) -> None:
            if self.conn is not conn or not self.live:
                return
            for answer in answers:
                self._send_answer(answer)
            if len(answers) == RESEND_PAGE and self.relay_durable:
                # the next page once the relay's confirmations are in
                self.clock.callLater(1.0, self._resend_unconfirmed)

        self.queue.unconfirmed(RESEND_PAGE).addCallbacks(
            send, lambda f: log.failure("Could not read unconfirmed answers", f))

    def _send(self, msg: Mapping[str, Any]) -> None:
        if self.conn is not None:
            self.conn.send_message(msg)

    def _send_inbound(self, msg: dict[str, Any]) -> bool:
        """A device's message up to the relay, with a fresh access token (as Medplum)."""
        conn = self.conn
        if not (self.live and conn is not None):
            return False

        def send(token: str) -> None:
            if self.conn is conn:
                conn.send_message(dict(msg, accessToken=token))

        self.tokens.access_token().addCallbacks(
            send, lambda f: log.error("No access token for an inbound message: {error}",
                                      error=f.getErrorMessage()))
        return True

    def _send_answer(self, msg: dict[str, Any]) -> None:
        """
        An answer (or "accepted") from the queue.  While the link is down nothing is lost:
        answers are on disk until confirmed, and go again after the reconnect.  A relay
        without the durable extension never confirms, so we confirm for it on sending.
        """
        if not (self.live and self.conn is not None):
            return
        self.conn.send_message(msg)
        if not self.relay_durable and msg.get("delivery") in ("delivered", "failed"):
            self.queue.confirm(msg.get("pushId") or "")

    def _on_transmit_response(self, msg: Mapping[str, Any]) -> None:
        """Answers to our own inbound messages are routed by the channel layer."""
        if not self.outbox.answered(msg):
            log.warn("Answer from the relay for an inbound message we no longer hold")

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

    def _on_cancel(self, msg: Mapping[str, Any]) -> None:
        """The relay's operator cancels a push we hold: dropped unless it is under way."""
        push_id, callback = msg["pushId"], msg.get("callback")
        texts = {200: "Cancelled before delivery", 404: "This agent does not hold the push",
                 409: "The push is being delivered or has been answered"}

        def answer(result: tuple[int, str]) -> None:
            status, state = result
            self._send({"type": wire.TRANSMIT_CANCEL_RESPONSE, "callback": callback,
                        "pushId": push_id, "statusCode": status, "state": state,
                        "body": texts.get(status, state)})

        def failed(f: Failure) -> None:
            log.failure("Could not cancel push {push_id}", f, push_id=push_id)
            self._send(wire.error(f"Agent could not cancel the push: {f.getErrorMessage()}",
                                  callback))

        self.queue.cancel(push_id).addCallbacks(answer, failed)

    def _on_hold(self, msg: Mapping[str, Any]) -> None:
        """The relay's paused lanes: a bounded list of lane keys, or an error (nothing held
        changes)."""
        lanes = msg.get("lanes")
        if not isinstance(lanes, list) or len(lanes) > wire.MAX_HELD_LANES or not all(
                isinstance(lane, str) and 0 < len(lane) <= wire.MAX_LANE_KEY
                for lane in lanes):
            self._send(wire.error(f"lanes must be a list of at most {wire.MAX_HELD_LANES} "
                                  "lane keys", msg.get("callback")))
            return
        self.queue.hold(set(lanes))

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
            "connects": self.connects,
            **self.queue.snapshot(),
        }
