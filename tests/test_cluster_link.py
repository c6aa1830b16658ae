"""
Relay nodes telling each other (issue 11): C{LISTEN/NOTIFY} wake-ups and agent calls between
nodes (L{medagent.relay.cluster.ClusterLink}).  Units: two hubs on one journal and one
session table, their links on an in-memory bus the test delivers (or drops) by hand, a Clock.
The PostgreSQL implementations (L{PgNotices}, L{PgAgentCalls}) against a real server.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.cluster import FALLBACK_POLL, ClusterLink
from medagent.relay.push import PushService
from medagent.storage.postgres import MIGRATIONS, PgAgentCalls, PgDatabase, PgNotices
from tests import pgenv
from tests.test_agent_sessions import _TwoHubs

HL7 = "MSH|^~\\&|S|F|R|F|20240101120000||ADT^A01|{ctrl}|P|2.5\rPID|1"


class FakeBus:
    """Notices and calls of every node in memory; notices wait until L{deliver}."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self.queued: list[dict[str, Any]] = []
        self.drop = False
        self.rows: dict[str, dict[str, Any]] = {}

    def deliver(self) -> None:
        while self.queued:
            notice = self.queued.pop(0)
            for received in list(self.listeners):
                received([json.loads(json.dumps(notice))])

    def _send(self, notice: Mapping[str, Any]) -> None:
        if not self.drop:
            self.queued.append(dict(notice))

    # -- ClusterNotices --
    def notify(self, notice: Mapping[str, Any]) -> Deferred[None]:
        self._send(notice)
        return succeed(None)

    def listen(self, received: Any, connected: Any, lost: Any) -> None:
        self.listeners.append(received)
        connected()

    def stop(self) -> None:
        pass

    # -- AgentCalls --
    def place(self, call_id: str, agent_id: str, node_id: str, from_node: str,
              request: Mapping[str, Any], timeout: float) -> Deferred[None]:
        self.rows[call_id] = {"id": call_id, "agent_id": agent_id, "node_id": node_id,
                              "from_node": from_node, "request": json.loads(json.dumps(request)),
                              "taken": False, "answer": None}
        self._send({"k": "call", "to": node_id, "id": call_id})
        return succeed(None)

    def take(self, node_id: str, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        rows = [r for r in self.rows.values() if r["node_id"] == node_id and not r["taken"]]
        for r in rows:
            r["taken"] = True
        return succeed([{k: r[k] for k in ("id", "agent_id", "from_node", "request")}
                        for r in rows[:limit]])

    def answer(self, call_id: str, answer: Mapping[str, Any]) -> Deferred[None]:
        row = self.rows.get(call_id)
        if row is not None and row["answer"] is None:
            row["answer"] = json.loads(json.dumps(answer))
            self._send({"k": "answer", "to": row["from_node"], "id": call_id})
        return succeed(None)

    def result(self, call_id: str) -> Deferred[dict[str, Any] | None]:
        row = self.rows.get(call_id)
        return succeed(row["answer"] if row is not None else None)

    def forget(self, call_id: str) -> Deferred[None]:
        self.rows.pop(call_id, None)
        return succeed(None)


class Links(_TwoHubs):
    """Nodes A and B with links on one bus; the agent is on node A."""

    def setUp(self) -> None:
        super().setUp()
        self.bus = FakeBus()
        self.link_a = ClusterLink(self.hub_a, self.bus, self.bus, self.clock, "A")
        self.link_b = ClusterLink(self.hub_b, self.bus, self.bus, self.clock, "B")
        self.link_a.start()
        self.link_b.start()
        self.pushes_b = PushService(self.hub_b, self.store, self.journal, self.clock)

    def connect_to(self, hub: Any, caps: list[str] | None = None) -> Any:
        self.hub = hub
        try:
            return self.connect(caps=caps or ["durable"])
        finally:
            self.hub = self.hub_a

    def push_b(self, ctrl: str, wait: bool = False) -> Deferred[Any]:
        payload = {"destination": f"Device/{self.device['id']}",
                   "contentType": "x-application/hl7-v2+er7", "body": HL7.format(ctrl=ctrl),
                   "waitForResponse": wait}
        return self.pushes_b.push(self.admin, (self.agent["id"], None), payload)

    # -- wake-ups --------------------------------------------------------------------

    def test_a_push_on_b_is_sent_by_a_at_its_notice_and_bs_caller_hears_at_its_notice(
            self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a)
        waited = self.push_b("WK1", wait=True)
        self.assertEqual(conn_a.of_type(wire.TRANSMIT_REQUEST), [])
        self.bus.deliver()  # no poll: the notice alone
        [request] = conn_a.of_type(wire.TRANSMIT_REQUEST)
        self.answer(conn_a, session_a, request)
        self.assertNoResult(waited)
        self.bus.deliver()
        result = self.successResultOf(waited)
        self.assertEqual(result.push.state, "delivered")
        self.assertEqual(len(conn_a.of_type(wire.TRANSMIT_REQUEST)), 1)

    def test_a_notice_during_a_scan_is_read_after_it(self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a)
        real = self.journal.open_pushes
        first_page: Deferred[list[Any]] = Deferred()
        calls: list[Any] = []

        def open_pushes(*args: Any, **kw: Any) -> Deferred[list[Any]]:
            calls.append(args)
            return first_page if len(calls) == 1 else real(*args, **kw)

        self.patch(self.journal, "open_pushes", open_pushes)
        self.hub_a.wake(self.agent["id"])  # a scan starts; its read is slow
        self.push_b("WK2")  # journaled after that read's snapshot
        self.bus.deliver()
        self.assertTrue(session_a.rescan)
        first_page.callback([])  # the slow read did not see it
        self.assertEqual(len(conn_a.of_type(wire.TRANSMIT_REQUEST)), 1)
        self.assertFalse(session_a.rescan)

    def test_a_lost_notice_costs_one_fallback_poll_never_the_push(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        self.link_a.poll()  # the first full poll
        self.bus.drop = True
        self.push_b("WK3")
        self.clock.advance(FALLBACK_POLL - 1)
        self.link_a.poll()
        self.assertEqual(conn_a.of_type(wire.TRANSMIT_REQUEST), [], "not a full poll yet")
        self.clock.advance(1)
        self.link_a.poll()
        self.assertEqual(len(conn_a.of_type(wire.TRANSMIT_REQUEST)), 1)

    def test_without_notices_every_poll_is_full(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        self.link_a.poll()
        self.link_a._lost("OperationalError")
        self.bus.drop = True
        self.push_b("WK4")
        self.link_a.poll()
        self.assertEqual(len(conn_a.of_type(wire.TRANSMIT_REQUEST)), 1)

    # -- agent calls ---------------------------------------------------------------------

    def test_reload_config_asked_on_b_reaches_the_agent_on_a(self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a)
        d = self.hub_b.request(self.agent["id"], {"type": wire.RELOADCONFIG_REQUEST})
        self.bus.deliver()
        [asked] = conn_a.of_type(wire.RELOADCONFIG_REQUEST)
        self.hub_a.frame_received(session_a, wire.encode({
            "type": wire.RELOADCONFIG_RESPONSE, "callback": asked["callback"],
            "statusCode": 200}))
        self.assertNoResult(d)
        self.bus.deliver()
        answer = self.successResultOf(d)
        self.assertEqual((answer["type"], answer["statusCode"]),
                         (wire.RELOADCONFIG_RESPONSE, 200))
        self.assertEqual(self.bus.rows, {}, "the call is removed once answered")

    def test_an_answer_whose_notice_was_lost_is_read_at_the_poll(self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a)
        d = self.hub_b.request(self.agent["id"], {"type": wire.STATS_REQUEST})
        self.bus.deliver()
        [asked] = conn_a.of_type(wire.STATS_REQUEST)
        self.bus.drop = True
        self.hub_a.frame_received(session_a, wire.encode({
            "type": wire.STATS_RESPONSE, "callback": asked["callback"], "stats": {"x": 1}}))
        self.clock.advance(FALLBACK_POLL)
        self.link_b.poll()
        self.assertEqual(self.successResultOf(d)["stats"], {"x": 1})

    def test_a_call_nobody_answers_is_504_and_withdrawn(self) -> None:
        self.connect_to(self.hub_a)
        self.bus.drop = True
        d = self.hub_b.request(self.agent["id"], {"type": wire.RELOADCONFIG_REQUEST})
        self.clock.advance(self.hub_b.request_timeout + 2 + 0.1)
        self.assertEqual(self.failureResultOf(d, FHIRError).value.status, 504)
        self.assertEqual(self.bus.rows, {})
        self.assertEqual(self.link_b._waiting, {})

    def test_an_agent_the_other_node_does_not_answer_for_is_its_504(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        d = self.hub_b.request(self.agent["id"], {"type": wire.RELOADCONFIG_REQUEST})
        self.bus.deliver()
        self.assertEqual(len(conn_a.of_type(wire.RELOADCONFIG_REQUEST)), 1)
        self.clock.advance(self.hub_a.request_timeout)  # the agent never answers A
        self.bus.deliver()
        f = self.failureResultOf(d, FHIRError)
        self.assertEqual(f.value.status, 504)
        self.assertIn("did not answer in time", f.value.message)

    def test_no_node_holds_the_agent_is_503_at_once(self) -> None:
        d = self.hub_b.request(self.agent["id"], {"type": wire.RELOADCONFIG_REQUEST})
        self.assertEqual(self.failureResultOf(d, FHIRError).value.status, 503)
        self.assertEqual(self.bus.rows, {})

    def test_another_node_may_send_only_control_requests(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        for call in ({"op": "request", "message": {"type": wire.TRANSMIT_REQUEST,
                                                   "body": "x", "remote": "mllp://x:1"}},
                     {"op": "request", "message": {"type": wire.RELOADCONFIG_REQUEST},
                      "timeout": 1e9},
                     {"op": "drop-table"}):
            with self.assertRaises(FHIRError) as e:
                self.hub_a.serve_call(self.agent["id"], call)
            self.assertEqual(e.exception.status, 400)
        self.assertEqual([m["type"] for m in conn_a.sent if m["type"] != wire.CONNECT_RESPONSE
                          and m["type"] != wire.HEARTBEAT_REQUEST], [])

    def test_status_and_snapshot_asked_on_b_come_from_a(self) -> None:
        self.connect_to(self.hub_a)
        status = self.hub_b.status_anywhere(self.agent["id"])
        snapshot = self.hub_b.snapshot_anywhere(self.agent["id"])
        self.bus.deliver()
        self.bus.deliver()
        self.assertEqual(self.successResultOf(status)["status"], "connected")
        self.assertEqual(self.successResultOf(snapshot)["ready"], True)
        # nobody holds it: disconnected, no snapshot, at once
        self.hub_a.close()
        self.assertEqual(self.successResultOf(
            self.hub_b.status_anywhere(self.agent["id"]))["status"], "disconnected")
        self.assertIsNone(self.successResultOf(self.hub_b.snapshot_anywhere(self.agent["id"])))

    def test_cancel_asked_on_b_is_done_by_a_which_holds_the_agent(self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a, caps=["durable", "cancel"])
        pushed = self.successResultOf(self.push_b("CN1"))
        self.bus.deliver()
        [request] = conn_a.of_type(wire.TRANSMIT_REQUEST)
        cancelled = self.hub_b.cancel(pushed.push.id, "operator-1")
        self.bus.deliver()
        [asked] = conn_a.of_type(wire.TRANSMIT_CANCEL)
        self.assertEqual(asked["pushId"], pushed.push.id)
        self.hub_a.frame_received(session_a, wire.encode({
            "type": wire.TRANSMIT_CANCEL_RESPONSE, "callback": asked["callback"],
            "pushId": pushed.push.id, "statusCode": 200}))
        self.bus.deliver()
        self.assertEqual(self.successResultOf(cancelled).state, "cancelled")
        self.assertIn("operator-1", self.successResultOf(
            self.journal.get(pushed.push.id)).last_error)


_dsn: list[str] = []


class PgNoticesAndCalls(TestCase):
    """L{PgNotices} and L{PgAgentCalls} on a real PostgreSQL: two nodes, two databases."""

    def setUp(self) -> Deferred[None]:
        def prepare() -> str:
            if not _dsn:
                dsn = pgenv.fresh_database("medagent_cluster_link")
                PgDatabase(reactor, dsn, migrations=MIGRATIONS).migrate_sync()
                _dsn.append(dsn)
            import psycopg

            with psycopg.connect(_dsn[0], autocommit=True) as conn:
                conn.execute("DELETE FROM agent_calls")
            return _dsn[0]

        def ready(dsn: str) -> None:
            self.dsn = dsn

        return deferToThread(prepare).addCallback(ready)

    def database(self) -> PgDatabase:
        db = PgDatabase(reactor, self.dsn, migrations=MIGRATIONS, size=2)
        self.addCleanup(db.stop)
        return db

    async def test_a_notice_sent_by_one_node_reaches_the_other(self) -> None:
        sender, receiver = PgNotices(self.database(), reactor), PgNotices(self.database(),
                                                                          reactor)
        got: Deferred[list[dict[str, Any]]] = Deferred()
        listening: Deferred[None] = Deferred()
        receiver.listen(lambda batch: got.called or got.callback(batch),
                        lambda: listening.called or listening.callback(None), lambda why: None)
        self.addCleanup(receiver.stop)
        await listening.addTimeout(10, reactor)
        await sender.notify({"k": "push", "n": "A", "a": "agent-1"})
        batch = await got.addTimeout(10, reactor)
        self.assertEqual(batch, [{"k": "push", "n": "A", "a": "agent-1"}])

    async def test_a_call_is_taken_once_answered_once_and_forgotten(self) -> None:
        a, b = PgAgentCalls(self.database()), PgAgentCalls(self.database())
        await b.place("c1", "agent-1", "A", "B", {"op": "status"}, 10)
        await b.place("c2", "agent-1", "OTHER", "B", {"op": "status"}, 10)
        taken = await a.take("A")
        self.assertEqual(taken, [{"id": "c1", "agent_id": "agent-1", "from_node": "B",
                                  "request": {"op": "status"}}])
        self.assertEqual(await a.take("A"), [], "taken once")
        self.assertIsNone(await b.result("c1"))
        await a.answer("c1", {"ok": {"status": "connected"}})
        await a.answer("c1", {"ok": "second answer ignored"})
        self.assertEqual(await b.result("c1"), {"ok": {"status": "connected"}})
        await b.forget("c1")
        self.assertIsNone(await b.result("c1"))

    async def test_a_call_past_its_deadline_is_not_taken(self) -> None:
        a = PgAgentCalls(self.database())
        await a.place("late", "agent-1", "A", "B", {"op": "status"}, -1)  # deadline passed
        self.assertEqual(await a.take("A"), [])

