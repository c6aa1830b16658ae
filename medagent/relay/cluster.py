"""
What one relay node does with the others on a shared PostgreSQL database, besides the
session table the hub keeps (L{medagent.relay.hub.Hub.agent_sessions}): wake-ups and agent
calls.

Why this shape: the database is the only thing nodes share (no node-to-node addresses, no
broker).  Everything that matters is in its tables: a push is in the journal before anyone
is told about it, a call to another node's agent is a row.  C{LISTEN/NOTIFY} only shortens
the wait (L{medagent.storage.interfaces.ClusterNotices}): a node that misses a notice finds
the same work at its next poll, every L{FALLBACK_POLL} seconds while it listens and every
L{CLUSTER_POLL} seconds while it does not.

Notices (small mappings, ids only, never content):

 - C{{"k": "push", "n": node, "a": agent}}: node C{n} journaled a push for agent C{a} it does
   not hold; the holder reads that agent's open pushes now;
 - C{{"k": "final", "n": node, "p": push}}: push C{p} has an outcome (final, or failing and
   retried): a node with a caller waiting on it reads it now;
 - C{{"k": "call", "to": node, "id": call}} and C{{"k": "answer", "to": node, "id": call}}:
   an agent call for node C{to} to take, or its answer for node C{to} to read
   (L{medagent.storage.interfaces.AgentCalls}).
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from medagent.fhir import FHIRError
from medagent.storage.interfaces import AgentCalls, ClusterNotices

log = Logger()

#: seconds between polls while no notices arrive (the database connection for them is down)
CLUSTER_POLL = 1.0
#: seconds between polls while notices arrive: what a lost notice costs at most
FALLBACK_POLL = 5.0
#: seconds a call to another node's agent waits for its answer unless told otherwise
CALL_TIMEOUT = 10.0
#: calls this node waits on at once, at most (more are refused 503: a bounded table)
MAX_CALLS = 1000


def _failure_answer(f: Failure) -> dict[str, Any]:
    """What a call that failed on the holding node sends back: status and text, no trace."""
    if f.check(FHIRError):
        e = f.value
        return {"error": {"status": e.status, "message": e.message, "code": e.code}}
    log.failure("Agent call failed on this node", f)
    return {"error": {"status": 500, "message": "Relay error on the node holding the agent",
                      "code": "exception"}}


class ClusterLink:
    """
    This node's side of the cluster: tells the others what they should know (pushes for
    agents it does not hold, outcomes), acts on what they tell it (through the hub), and runs
    agent calls both ways.  Created by the relay service when it runs on PostgreSQL; the hub
    calls it through L{Hub.cluster}.
    """

    def __init__(self, hub: Any, notices: ClusterNotices, calls: AgentCalls, clock: Any,
                 node_id: str) -> None:
        self.hub = hub
        self.notices = notices
        self.calls = calls
        self.clock = clock
        self.node_id = node_id
        #: notices arrive (the listening connection is up)
        self.listening = False
        self._last_full_poll: float | None = None
        #: calls this node placed and waits on: call id → (its Deferred, reading its answer)
        self._waiting: dict[str, list[Any]] = {}
        self._taking = False
        hub.cluster = self

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.notices.listen(self.received, self._connected, self._lost)

    def stop(self) -> None:
        self.notices.stop()
        for call_id, (d, _) in list(self._waiting.items()):
            self._waiting.pop(call_id, None)
            d.errback(Failure(FHIRError(503, "Relay node shutting down", "transient")))

    def _connected(self) -> None:
        if not self.listening:
            log.info("Relay node {node}: listening for cluster notices", node=self.node_id)
        self.listening = True
        self.poll(full=True)  # notices sent while not listening are lost: look once

    def _lost(self, why: str) -> None:
        if self.listening:
            log.warn("Relay node {node}: cluster notices lost ({why}); polling every {s} s "
                     "until they are back", node=self.node_id, why=why, s=CLUSTER_POLL)
        self.listening = False

    # -- out ---------------------------------------------------------------------------

    def _notify(self, notice: Mapping[str, Any]) -> None:
        self.notices.notify(notice).addErrback(
            lambda f: log.debug("Cluster notice not sent ({error}); the others poll",
                                error=f.getErrorMessage()))

    def pushed(self, agent_id: str) -> None:
        """A push journaled here for an agent this node does not hold."""
        self._notify({"k": "push", "n": self.node_id, "a": agent_id})

    def outcome(self, push_id: str) -> None:
        """Push C{push_id} has an outcome (final, or failing and retried)."""
        self._notify({"k": "final", "n": self.node_id, "p": push_id})

    # -- in ----------------------------------------------------------------------------

    def received(self, notices: list[dict[str, Any]]) -> None:
        for notice in notices:
            kind = notice.get("k")
            if kind == "push" and notice.get("n") != self.node_id \
                    and isinstance(notice.get("a"), str):
                self.hub.wake(notice["a"])
            elif kind == "final" and notice.get("n") != self.node_id \
                    and isinstance(notice.get("p"), str):
                self.hub.outcome_hint(notice["p"])
            elif kind == "call" and notice.get("to") == self.node_id:
                self._take()
            elif kind == "answer" and notice.get("to") == self.node_id \
                    and isinstance(notice.get("id"), str):
                self._read_answer(notice["id"])

    def poll(self, full: bool = False) -> None:
        """
        Every L{CLUSTER_POLL} seconds (L{medagent.relay.service}): what the notices would
        have said, read from the tables: the hub's rescan (every L{FALLBACK_POLL} seconds
        while notices arrive), calls to take, answers to read.
        """
        now = self.clock.seconds()
        if full or not self.listening or self._last_full_poll is None \
                or now - self._last_full_poll >= FALLBACK_POLL:
            self._last_full_poll = now
            self.hub.poll_cluster()
            self._take()
            for call_id in list(self._waiting):
                self._read_answer(call_id)

    # -- agent calls: asking ------------------------------------------------------------

    def call(self, agent_id: str, node_id: str, request: Mapping[str, Any],
             timeout: float = CALL_TIMEOUT) -> Deferred[Any]:
        """
        Run C{request} on node C{node_id}, which holds C{agent_id}: fires with what the
        hub's method there returned, or fails with the L{FHIRError} it raised there; 504
        when no answer comes in C{timeout} seconds (the call is withdrawn then).
        """
        if len(self._waiting) >= MAX_CALLS:
            raise FHIRError(503, "Too many agent calls under way on this relay node; "
                            "try again", "transient")
        call_id = uuid.uuid4().hex
        d: Deferred[Any] = Deferred()
        self._waiting[call_id] = [d, False]

        def timed_out() -> None:
            if self._waiting.pop(call_id, None) is not None:
                self.calls.forget(call_id).addErrback(lambda f: None)
                d.errback(Failure(FHIRError(
                    504, f"Agent/{agent_id} did not answer in time (through relay node "
                    f"{node_id})", "timeout")))

        timer = self.clock.callLater(timeout, timed_out)

        def placed_failed(f: Failure) -> None:
            if self._waiting.pop(call_id, None) is not None:
                timer.cancel()
                d.errback(Failure(FHIRError(
                    503, f"Could not reach the relay node holding Agent/{agent_id} "
                    f"({f.getErrorMessage()})", "transient")))

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        self.calls.place(call_id, agent_id, node_id, self.node_id, dict(request),
                         timeout).addErrback(placed_failed)
        return d.addBoth(done)

    def _read_answer(self, call_id: str) -> None:
        waiting = self._waiting.get(call_id)
        if waiting is None or waiting[1]:
            return
        waiting[1] = True

        def got(answer: dict[str, Any] | None) -> None:
            waiting[1] = False
            if answer is None or self._waiting.pop(call_id, None) is None:
                return
            self.calls.forget(call_id).addErrback(lambda f: None)
            d = waiting[0]
            error = answer.get("error")
            if isinstance(error, dict):
                d.errback(Failure(FHIRError(int(error.get("status") or 502),
                                            str(error.get("message") or "Agent call failed"),
                                            str(error.get("code") or "exception"))))
            else:
                d.callback(answer.get("ok"))

        def failed(f: Failure) -> None:
            waiting[1] = False
            log.warn("Could not read the answer of agent call {call} ({error}); reading again "
                     "at the next poll", call=call_id, error=f.getErrorMessage())

        self.calls.result(call_id).addCallbacks(got, failed)

    # -- agent calls: answering ----------------------------------------------------------

    def _take(self) -> None:
        if self._taking:
            return
        self._taking = True

        def got(calls: list[dict[str, Any]]) -> None:
            self._taking = False
            for call in calls:
                self._serve(call)

        def failed(f: Failure) -> None:
            self._taking = False
            log.warn("Could not read agent calls for this node ({error})",
                     error=f.getErrorMessage())

        self.calls.take(self.node_id).addCallbacks(got, failed)

    def _serve(self, call: dict[str, Any]) -> None:
        request = call["request"] if isinstance(call.get("request"), dict) else {}
        d = maybeDeferred(self.hub.serve_call, call["agent_id"], request)
        d.addCallbacks(lambda value: {"ok": value}, _failure_answer)
        d.addCallback(lambda answer: self.calls.answer(call["id"], answer))
        d.addErrback(lambda f: log.warn("Could not answer agent call {call} ({error})",
                                        call=call["id"], error=f.getErrorMessage()))

