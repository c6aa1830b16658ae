"""
The agent's durable queue: a pushed message is on the agent's disk before the agent says it
has it, is delivered in order on its destination's lane, and its answer is kept until the
relay confirms it.

States of an entry: ``queued`` → ``delivering`` (the bytes may be on their way to the device)
→ ``done`` (with the answer: delivered or failed).  An entry is taken off its lane in memory
first; ``delivering`` is written to disk only when its first byte may be written: right
before the write for senders that call the L{BEFORE_WRITE} hook (MLLP), before the hand-over
for the others.  A message still waiting for its connection when the agent dies is
therefore re-sent after the restart, not reported in doubt.  Only failures that certainly happened
before the device could have received anything (refused, not connected, association
rejected...) are retried, with exponential backoff and jitter, forever by default or up to
the destination's ``maxAttempts``.  Everything else ends the entry, visibly.

The one window nobody can close: the device received the bytes and the agent died (or the
link broke) before its answer was recorded.  An entry found ``delivering`` after a restart is
therefore ended as ``failed`` and in doubt (the default ``inDoubt=fail``: never a silent
duplicate), or re-sent with ``inDoubt=resend`` for devices that de-duplicate by control id.
Every in-doubt ending (restart, link lost or no answer after the write) carries
``inDoubt: true`` and the phrase L{IN_DOUBT_PHRASE}; nothing else does.

Lanes are keyed by the device (L{medagent.destination.lane_key}), not by the URL string:
``mllp://h:1`` and ``mllp://H:1?ackTimeout=60`` are one lane, in push order.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Mapping

import attr
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent import wire
from medagent.agent.dispatch import Dispatcher
from medagent.contenttypes import JSON, PING
from medagent.delivery import (
    BEFORE_WRITE,
    DeliveryError,
    IN_DOUBT_PHRASE,
    NotWritten,
    RETRYABLE_PHASES,
    Reply,
    http_status,
    in_doubt,
)
from medagent.destination import DestinationError, lane_key, parse_destination
from medagent.hl7.acking import ack_code
from medagent.metrics import AgentMetrics
from medagent.storage.sqlite.agent_queue import (  # noqa: F401 (DONE: one of the states)
    DELIVERING, DONE, QUEUED, SQLiteInbox)
from medagent.storage.sqlite.database import Database

log = Logger()

#: ACK latencies kept per lane for its p50/p99 (a ring: the most recent ones)
LATENCY_RING = 256
#: recent errors kept per lane (kind and time, never text from the message or the device)
ERROR_RING = 8
#: lanes whose statistics are kept, at most (the least recently used forgotten first)
MAX_LANE_STATS = 1000


class LaneStats:
    """
    What an operator asks of a device lane besides its depth: the device's last answer (when,
    and its code: MSA-1 for HL7, the DIMSE status for DICOM, else the status code), the ACK
    latency's p50 and p99 over the last L{LATENCY_RING} answers, and the last few errors by
    kind (the failure's phase: ``connect``, ``ack``..., or ``refused``) and time.  Bounded,
    cheap to update (a deque append per answer); percentiles are computed when asked.
    """

    def __init__(self) -> None:
        self.latencies: deque[float] = deque(maxlen=LATENCY_RING)
        self.errors: deque[tuple[float, str]] = deque(maxlen=ERROR_RING)
        self.last_ack: float | None = None
        self.last_code: str | None = None

    def answered(self, at: float, code: str | None, seconds: float | None) -> None:
        self.last_ack = at
        self.last_code = code
        if seconds is not None and seconds >= 0:
            self.latencies.append(seconds)

    def failed(self, at: float, kind: str) -> None:
        self.errors.append((at, kind))

    def view(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "lastAck": self.last_ack,
            "lastAckCode": self.last_code,
            "ackP50Ms": _percentile_ms(ordered, 0.50),
            "ackP99Ms": _percentile_ms(ordered, 0.99),
            "ackSamples": len(ordered),
            "recentErrors": [{"at": at, "kind": kind} for at, kind in reversed(self.errors)],
        }


def _percentile_ms(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile C{q} of sorted seconds, in milliseconds."""
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return round(ordered[rank] * 1000, 1)


def answer_code(reply: Reply) -> str:
    """The short code of a device's answer: MSA-1 (HL7), the DIMSE status (DICOM), else
    the status code.  Only the code is kept, never the answer's text."""
    body = reply.body if isinstance(reply.body, str) else ""
    if body.startswith("MSH"):
        code = ack_code(body)
        if code:
            return code
    if reply.content_type == JSON and body.startswith("{"):
        try:
            status = json.loads(body).get("status")
        except (ValueError, AttributeError):
            status = None
        if isinstance(status, str) and len(status) <= 10:
            return status
    return str(int(reply.status_code))


@attr.s(auto_attribs=True)
class _Lane:
    waiting: deque = attr.ib(factory=deque)  # of (seq, push_id)
    busy: bool = False
    #: messages received for this lane whose insert has not committed yet
    storing: int = 0
    retry_call: Any = None
    failures: int = 0
    #: seq -> (remote, content type) of waiting entries: how each one is to be marked
    kinds: dict = attr.ib(factory=dict)
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None


class DurableQueue:
    def __init__(
        self,
        db: Database,
        dispatcher: Dispatcher,
        clock: Any,
        send: Callable[[dict[str, Any]], None],
        *,
        retry_base: float = 1.0,
        retry_cap: float = 60.0,
        rng: Callable[[], float] = random.random,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        #: the entries on disk (all of the inbox's SQL is in L{medagent.storage.sqlite})
        self.inbox = SQLiteInbox(db)
        self.dispatcher = dispatcher
        self.clock = clock
        self.send = send
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.rng = rng
        self.wall = wall
        self.lanes: dict[str, _Lane] = {}
        self.stats = {"received": 0, "duplicates": 0, "delivered": 0, "failed": 0,
                      "retries": 0, "inDoubt": 0}
        #: delivery counters and latency; a private registry unless the service sets one
        self.metrics = AgentMetrics()
        #: per lane (by its name in L{snapshot}): answers, latency, recent errors; kept when
        #: the lane empties, at most L{MAX_LANE_STATS}
        self.lane_stats: OrderedDict[str, LaneStats] = OrderedDict()
        #: lanes (keys) the relay said to hold (L{hold}): no delivery starts on them
        self.held: set[str] = set()
        self._stopped = False

    @staticmethod
    def schema() -> str:
        return SQLiteInbox.schema()

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """End in-doubt entries (or re-queue them), then rebuild the lanes from disk."""
        now = self.wall()

        def resolve(remote: str, callback: Any, push_id: str) -> Any:
            if _in_doubt_policy(remote) == "resend":
                return None
            reason = (f"Agent restarted while delivering: {IN_DOUBT_PHRASE}; not re-sent "
                      "to avoid a duplicate")
            return reason, _failed_answer(push_id, remote, callback, reason, status=502,
                                          transient=False, doubt=True)

        def rebuilt(result: Any) -> None:
            entries, in_doubt = result
            self.stats["inDoubt"] += in_doubt
            if in_doubt:
                log.warn("{n} message(s) were being delivered when the agent stopped; "
                         "handled per their destination's inDoubt policy", n=in_doubt)
            for seq, push_id, remote, content_type in entries:
                # Keys are recomputed: rows stored under an older key scheme (the whole URL)
                # join their device's lane, still in seq order.
                lane = self._lane(self.dispatcher.lane_key(remote))
                lane.waiting.append((seq, push_id))
                lane.kinds[seq] = (remote, content_type)
            if entries:
                log.info("Resuming {n} queued message(s) on {lanes} lane(s)", n=len(entries),
                         lanes=len(self.lanes))
            for key in list(self.lanes):
                self._pump(key)

        def holds(lanes: list[str]) -> Any:
            self.held = set(lanes)
            if self.held:
                log.info("{n} lane(s) held as the relay last said (paused by an operator)",
                         n=len(self.held))
            return self.inbox.recover(now, resolve)

        # the holds first: a held lane's backlog does not go out before the relay is reached
        return self.inbox.holds().addCallback(holds).addCallback(rebuilt)

    def stop(self) -> None:
        self._stopped = True
        for lane in self.lanes.values():
            if lane.retry_call is not None and lane.retry_call.active():
                lane.retry_call.cancel()

    def _lane(self, key: str) -> _Lane:
        return self.lanes.setdefault(key, _Lane())

    # -- requests in -------------------------------------------------------------------------

    def receive(self, msg: Mapping[str, Any]) -> Deferred[None]:
        """
        An ``agent:transmit:request``: store it (or find it stored), then tell the relay we
        have it.  A request we already hold is answered from the record, never delivered
        again.
        """
        self.stats["received"] += 1
        push_id = msg.get("pushId") or msg.get("callback")
        if not isinstance(push_id, str) or not push_id:
            push_id = f"local-{self.wall():.6f}-{self.rng()}"
        options = {k: msg[k] for k in ("returnAck", "waitTimeout") if k in msg}
        now = self.wall()
        remote = msg["remote"]
        key = self.dispatcher.lane_key(remote)
        lane = self._lane(key)
        # An idle lane takes the message straight to 'delivering' in the same commit that
        # stores it (one write less on the way to the device); the lane is reserved now so
        # that a later message for it waits behind this one.
        direct = not (lane.busy or lane.waiting or lane.storing or lane.retry_call is not None
                      or self._stopped or key in self.held)
        lane.storing += 1  # keeps the lane (and its order) alive until the insert commits
        if direct:
            lane.busy = True
        marks = direct and self._marks_later(remote, msg["contentType"])
        state, attempts = ((QUEUED if marks else DELIVERING), 1) if direct else (QUEUED, 0)
        options_json = json.dumps(options)
        row_values = (push_id, remote, msg["contentType"], msg["body"], options_json,
                      msg.get("callback"), state, attempts, now, now)

        def stored(result: tuple[bool, Any]) -> None:
            lane.storing -= 1
            new, info = result
            if new:
                self._accepted(msg, push_id)
                lane.waiting.append((info, push_id))
                if not direct:
                    lane.kinds[info] = (remote, msg["contentType"])
                if direct:
                    self._dispatch(key, lane, {
                        "seq": info, "push_id": push_id, "remote": remote,
                        "content_type": msg["contentType"], "body": msg["body"],
                        "options": options_json, "callback": msg.get("callback"),
                        "attempts": 1}, marked=not marks, options=options)
                else:
                    self._pump(key)
                return
            if direct:
                lane.busy = False
            self._pump(key)
            self.stats["duplicates"] += 1
            state, answer = info
            log.info("Push {push_id} is already {state} here; answered from our record",
                     push_id=push_id, state=state)
            if answer:
                self.send(dict(json.loads(answer), callback=msg.get("callback")))
            else:
                self._accepted(msg, push_id)

        def failed(f: Failure) -> None:
            lane.storing -= 1
            if direct:
                lane.busy = False
            self._pump(key)
            log.failure("Could not store push {push_id}", f, push_id=push_id)
            self.send(wire.error(f"Agent could not store the message: {f.getErrorMessage()}",
                                 msg.get("callback")))

        return self.inbox.store(row_values).addCallbacks(stored, failed)

    def _accepted(self, msg: Mapping[str, Any], push_id: str) -> None:
        self.send(wire.transmit_response(msg, status_code=202, content_type="text/plain",
                                         body="accepted", pushId=push_id, delivery="accepted"))

    # -- delivery ----------------------------------------------------------------------------

    def _pump(self, key: str) -> None:
        lane = self.lanes.get(key)
        # A lane in backoff waits for its timer, however many pushes arrive meanwhile; a held
        # one (paused by an operator) until the relay releases it.
        if lane is None or lane.busy or self._stopped or lane.retry_call is not None \
                or key in self.held:
            return
        if not lane.waiting:
            if not lane.storing:
                self.lanes.pop(key, None)
            return
        seq, push_id = lane.waiting[0]
        lane.busy = True
        now = self.wall()
        kind = lane.kinds.get(seq)
        # Unknown kind: mark now (pessimistic, never wrong).
        marks = kind is not None and self._marks_later(*kind)

        def claimed(row: Any) -> None:
            lane.kinds.pop(seq, None)
            expected = QUEUED if marks else DELIVERING
            if row is None or row["state"] != expected:
                lane.waiting.popleft()
                lane.busy = False
                self._pump(key)
                return
            self._dispatch(key, lane, row, marked=not marks)

        def claim_failed(f: Failure) -> None:
            lane.busy = False
            log.failure("Queue database error on lane {remote}", f, remote=_safe(key))
            self._schedule_retry(key, lane, self.retry_cap)

        self.inbox.claim(seq, QUEUED if marks else DELIVERING, now).addCallbacks(
            claimed, claim_failed)

    def _marks_later(self, remote: str, content_type: str) -> bool:
        """
        Whether the 'delivering' mark waits for the sender's L{BEFORE_WRITE} hook.  Not when
        the device's connection is up and idle: then the first write follows at once, and the
        mark rides on the claim's (or the store's) own commit — no extra commit on the
        common path.  When a connection must be opened first, the mark waits for it, so that
        a message that never got its connection is not in doubt after a restart.
        """
        return (self.dispatcher.marks_first_write(remote, content_type)
                and not self.dispatcher.ready_to_write(remote))

    def _dispatch(self, key: str, lane: _Lane, row: Mapping[str, Any], *,
                  marked: bool, options: Mapping[str, Any] | None = None) -> None:
        """
        Hand the entry to the dispatcher.  C{marked}: its 'delivering' mark is on disk
        already; otherwise the sender calls the L{BEFORE_WRITE} hook, which writes it (in the
        next group commit) and lets the first byte go once it is durable.  That mark is what
        lets a restart, and the answer, tell "may have been received" from "certainly not".
        """
        attempt = {"marked": marked}
        seq = row["seq"]

        def before_write() -> Deferred[None]:
            if attempt["marked"]:
                return _succeeded()
            attempt["marked"] = True

            def refused() -> Exception:  # no longer ours to send (e.g. cancelled meanwhile)
                return NotWritten("Message is no longer queued; not sent")

            def not_marked(f: Failure) -> Failure:
                attempt["marked"] = False
                if f.check(NotWritten):
                    return f
                log.failure("Could not record push {push_id} as in flight", f,
                            push_id=row["push_id"])
                raise NotWritten("Agent could not record the message as in flight; not sent")

            return self.inbox.mark_delivering(seq, self.wall(), refused).addErrback(not_marked)

        # C{options}: the request's own, on the direct path (not decoded again from the row)
        options = dict(options) if options is not None else json.loads(row["options"] or "{}")
        if not marked:
            options[BEFORE_WRITE] = before_write
        started = self.clock.seconds()
        d = maybeDeferred(self.dispatcher.dispatch, row["remote"], row["content_type"],
                          row["body"], options)
        d.addBoth(lambda outcome: self._delivered(key, lane, row, outcome, attempt["marked"],
                                                  self.clock.seconds() - started))

    def _delivered(self, key: str, lane: _Lane, row: Any, outcome: Reply | Failure,
                   marked: bool = True, seconds: float | None = None) -> None:
        push_id = row["push_id"]
        msg = {"remote": row["remote"], "callback": row["callback"], "channel": None}
        if isinstance(outcome, Failure) and isinstance(outcome.value, DeliveryError) and \
                outcome.value.reply is not None and \
                row["attempts"] >= _attempt_limit(row["remote"], outcome.value):
            # Refused for now by the device, and no retries left: its answer is the outcome.
            outcome = outcome.value.reply
        if isinstance(outcome, Failure):
            err = outcome.value
            doubt = in_doubt(err, marked)
            if isinstance(err, DeliveryError):
                if err.transient and not doubt and \
                        (err.phase in RETRYABLE_PHASES or err.reply is not None) and \
                        row["attempts"] < _attempt_limit(row["remote"], err):
                    self.metrics.delivery(row["remote"], "retrying", seconds, err.phase)
                    self._stats_of(key).failed(self.wall(), err.phase or "error")
                    self._retry_later(key, lane, row, err)
                    return
                reason, transient = err.reason, err.transient
                if err.transient and err.phase in RETRYABLE_PHASES:
                    reason = f"{reason} (gave up after {row['attempts']} attempts)"
            else:
                log.failure("Unexpected error delivering push {push_id}", outcome,
                            push_id=push_id)
                reason, transient = "Agent internal error while delivering", False
            status = http_status(err)
            if doubt:
                reason = f"{reason}: {IN_DOUBT_PHRASE}; not re-sent to avoid a duplicate"
                self.stats["inDoubt"] += 1
            answer = _failed_answer(push_id, row["remote"], row["callback"], reason,
                                    status=status, transient=transient, doubt=doubt)
            self.metrics.delivery(row["remote"], "failed", seconds,
                                  err.phase if isinstance(err, DeliveryError) else "internal")
            self._stats_of(key).failed(
                self.wall(), (err.phase or "error") if isinstance(err, DeliveryError)
                else "internal")
            lane.failed += 1
            lane.last_error = reason
            self.stats["failed"] += 1
            log.warn("Push {push_id} failed: {reason}", push_id=push_id, reason=reason)
        else:
            reply = outcome
            answer = wire.transmit_response(
                msg, status_code=reply.status_code, content_type=reply.content_type,
                body=reply.body, pushId=push_id,
                delivery="delivered" if reply.delivered else "failed", detail=reply.detail,
                **({wire.DEVICE_MS: round(seconds * 1000, 3)} if seconds is not None else {}))
            self.metrics.delivery(row["remote"], "delivered" if reply.delivered else "refused",
                                  seconds)
            if row["content_type"] != PING:  # (a ping's answer is no ACK: not its latency)
                stats = self._stats_of(key)
                stats.answered(self.wall(), answer_code(reply), seconds)
                if not reply.delivered:
                    stats.failed(self.wall(), "refused")
            if reply.delivered:
                lane.delivered += 1
                self.stats["delivered"] += 1
            else:
                lane.failed += 1
                self.stats["failed"] += 1
                log.warn("Push {push_id} refused by the device ({detail}) after {attempts} "
                         "attempt(s)", push_id=push_id, detail=reply.detail or "",
                         attempts=row["attempts"])
            # A delivery is counted (stats, the lane, metrics), not logged: no line per
            # message on the hot path.
        lane.failures = 0
        self._finish(key, lane, row["seq"], answer)

    def _finish(self, key: str, lane: _Lane, seq: int, answer: dict[str, Any]) -> None:
        """
        Record the answer and send it at once: the answer is on its way to disk (ahead of
        the lane's next claim, writes are in order) and is re-sent until the relay confirms
        it.  Should the agent die before the write lands, the restart reports the entry as
        in doubt, and the relay, which may have the answer already, keeps what it has.
        """
        now = self.wall()
        stored = {k: v for k, v in answer.items() if k != "callback" and v is not None}

        # The answer and the claim of the lane's next message go in one commit: one thread
        # hop and one commit per message on a busy lane, not two in a row.
        with self.db.together():
            self.inbox.answer(seq, stored, answer.get("error"), now).addErrback(
                lambda f: log.failure("Could not record the answer of push {push_id}", f,
                                      push_id=answer.get("pushId")))
            if lane.waiting and lane.waiting[0][0] == seq:
                lane.waiting.popleft()
            lane.busy = False
            self.send(answer)
            self._pump(key)

    def retry_delay(self, failures: int) -> float:
        """
        Seconds before the next attempt after C{failures} failed ones: Twisted's
        L{backoffPolicy} doubling from C{retry_base} up to C{retry_cap}, times a jitter of
        0.5x .. 1.5x from C{rng} (injectable; a test sets C{rng = lambda: 0.5} for exact delays).
        The jitter scales the capped delay too, so lanes that failed together spread out.
        """
        exponential = backoffPolicy(initialDelay=self.retry_base, maxDelay=self.retry_cap,
                                    factor=2.0, jitter=lambda: 0.0)
        return exponential(failures - 1) * (0.5 + self.rng())

    def _retry_later(self, key: str, lane: _Lane, row: Any, err: DeliveryError) -> None:
        lane.failures += 1
        lane.last_error = err.reason
        self.stats["retries"] += 1
        delay = self.retry_delay(lane.failures)
        log.warn("Push {push_id} not delivered ({phase}: {reason}); attempt {n}, retrying in "
                 "{delay:.1f}s", push_id=row["push_id"], phase=err.phase, reason=err.reason,
                 n=row["attempts"], delay=delay)

        def requeued(_: Any) -> None:
            lane.busy = False
            lane.kinds[row["seq"]] = (row["remote"], row["content_type"])
            # Let the relay show why it is not delivered yet.
            self.send(wire.transmit_response(
                {"remote": row["remote"], "callback": row["callback"], "channel": None},
                status_code=202, content_type="text/plain", body="accepted",
                pushId=row["push_id"], delivery="accepted",
                error=f"{err.reason} (attempt {row['attempts']}, retrying)"))
            self._schedule_retry(key, lane, delay)

        self.inbox.requeue(row["seq"], err.reason, self.wall()).addBoth(requeued)

    def _schedule_retry(self, key: str, lane: _Lane, delay: float) -> None:
        """One backoff timer per lane: a new one replaces (cancels) the old one."""
        if lane.retry_call is not None:
            if lane.retry_call.active():
                lane.retry_call.cancel()
            lane.retry_call = None
        if self._stopped:
            return

        def fire() -> None:
            lane.retry_call = None
            self._pump(key)

        lane.retry_call = self.clock.callLater(delay, fire)

    # -- holds -------------------------------------------------------------------------------

    def hold(self, lanes: set[str]) -> Deferred[None]:
        """
        The relay's paused lanes (L{medagent.wire.LANES_HOLD}): no delivery starts on them
        from now on (one on its way to the device finishes); a lane left out is released and
        goes on in order.  Recorded on disk, so a restart holds them before the relay is
        reached again.
        """
        released = self.held - lanes
        if lanes != self.held:
            log.info("Relay holds {n} lane(s) (paused by an operator)", n=len(lanes))
        self.held = set(lanes)
        for key in sorted(released):
            self._pump(key)
        return self.inbox.set_holds(sorted(lanes)).addErrback(
            lambda f: log.failure("Could not record the held lanes", f))

    # -- cancel ------------------------------------------------------------------------------

    def cancel(self, push_id: str) -> Deferred[tuple[int, str]]:
        """
        The relay's operator cancels C{push_id}: drop it if it is still only queued here.
        Fires with (200, "cancelled") — its recorded answer then says ``delivery:
        "cancelled"``, so a replay of the request is answered from it —, (409, state) if it is
        being delivered or already answered, (404, "unknown") if we do not hold it.
        """
        for lane in self.lanes.values():
            if lane.busy and lane.waiting and lane.waiting[0][1] == push_id:
                return succeed((409, DELIVERING))  # claimed or on its way to the device
        now = self.wall()

        reason = "Cancelled by the relay before delivery"

        def answer_for(remote: str, callback: Any) -> dict[str, Any]:
            answer = wire.transmit_response(
                {"remote": remote, "callback": callback, "channel": None},
                status_code=200, content_type="text/plain", body=reason, pushId=push_id,
                delivery="cancelled")
            return {k: v for k, v in answer.items() if k != "callback" and v is not None}

        def done(result: tuple[str, Any]) -> tuple[int, str]:
            state, where = result
            status = 200 if where is not None else 404 if state == "unknown" else 409
            if where is not None:
                entry = (where[0], push_id)
                for key, lane in list(self.lanes.items()):
                    if entry in lane.waiting:
                        if not (lane.busy and lane.waiting[0] == entry):
                            # (a claim in progress finds the row done and drops it itself)
                            lane.waiting.remove(entry)
                            self._pump(key)
                        break
                log.info("Push {push_id} cancelled before delivery", push_id=push_id)
            return status, state

        # batched: ordered with the claims, so a message is either claimed or cancelled
        return self.inbox.cancel(push_id, now, reason, answer_for).addCallback(done)

    # -- answers and confirmations -----------------------------------------------------------

    def confirm(self, push_id: str) -> Deferred[None]:
        """The relay has recorded our answer: it need not be sent again."""

        return self.inbox.confirm(push_id)

    def unconfirmed(self, limit: int = 1000) -> Deferred[list[dict[str, Any]]]:
        """Answers the relay has not confirmed yet (re-sent after a reconnect)."""

        return self.inbox.unconfirmed(limit)

    def prune(self, older_than: float) -> Deferred[int]:
        """Forget confirmed answers older than C{older_than} seconds (payloads with them)."""
        cutoff = self.wall() - older_than

        return self.inbox.prune(cutoff)

    def _stats_of(self, key: str) -> LaneStats:
        name = _safe(key)
        stats = self.lane_stats.get(name)
        if stats is None:
            stats = self.lane_stats[name] = LaneStats()
            while len(self.lane_stats) > MAX_LANE_STATS:
                self.lane_stats.popitem(last=False)
        else:
            self.lane_stats.move_to_end(name)
        return stats

    def snapshot(self) -> dict[str, Any]:
        """For ``$stats``: per lane with messages, depth, in flight, failures and the last
        error (C{lanes}); per lane that had answers, L{LaneStats} (C{laneStats}: kept when
        the lane empties)."""
        lanes: dict[str, dict[str, Any]] = {
            _safe(remote): {
                "waiting": len(lane.waiting),
                "inFlight": lane.busy,
                "retrying": lane.retry_call is not None,
                "consecutiveFailures": lane.failures,
                "delivered": lane.delivered,
                "failed": lane.failed,
                "lastError": lane.last_error,
            }
            for remote, lane in self.lanes.items()
        }
        for name, entry in lanes.items():
            entry["held"] = name in self.held
        return {"queue": dict(self.stats), "lanes": lanes, "held": sorted(self.held),
                "laneStats": {name: stats.view() for name, stats in self.lane_stats.items()}}

    def oldest_ages(self) -> Deferred[dict[str, float]]:
        now = self.wall()

        def by_device(rows: list[tuple[str, float]]) -> dict[str, float]:
            ages: dict[str, float] = {}
            for remote, created in rows:
                key = _safe(lane_key(remote))
                ages[key] = max(ages.get(key, 0.0), round(now - created, 3))
            return ages

        return self.inbox.oldest_open().addCallback(by_device)


def _failed_answer(push_id: str, remote: str, callback: str | None, reason: str, *,
                   status: int, transient: bool, doubt: bool = False) -> dict[str, Any]:
    """A failed entry's answer; C{doubt} adds the machine-readable in-doubt marker."""
    extra = {"inDoubt": True} if doubt else {}
    return wire.transmit_response(
        {"remote": remote, "callback": callback, "channel": None},
        status_code=status, content_type="text/plain", body=reason, pushId=push_id,
        delivery="failed", error=reason, transient=transient, **extra)


def _succeeded() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.callback(None)
    return d


def _max_attempts(remote: str) -> int:
    try:
        n = parse_destination(remote, needs_port=False).int_param("maxAttempts", 0)
    except DestinationError:
        return 1
    return n if n > 0 else 2**62


def _attempt_limit(remote: str, err: DeliveryError) -> int:
    """The destination's maxAttempts, or fewer if the error bounds its own retries."""
    limit = _max_attempts(remote)
    return limit if err.max_attempts is None else min(limit, err.max_attempts)


def _in_doubt_policy(remote: str) -> str:
    try:
        policy = parse_destination(remote, needs_port=False).param("inDoubt", "fail")
    except DestinationError:
        return "fail"
    return "resend" if policy == "resend" else "fail"


def _safe(remote: str) -> str:
    """A lane name for logs and stats: the URL without its query (may carry credentials)."""
    return remote.split("?", 1)[0]
