"""
One session per agent across relay nodes (issue 11): the session table's contract on a real
PostgreSQL (L{medagent.storage.postgres.PgAgentSessions}) and the hub's use of it (two hubs
sharing one table: the second connection is refused, a released or lapsed session is free
again, a session the table gave away is closed).
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from medagent import wire
from medagent.relay.hub import Hub
from medagent.storage.postgres import MIGRATIONS, PgAgentSessions, PgDatabase
from medagent.storage.sqlite.database import DatabaseUnavailable
from tests import pgenv
from tests.test_hub import _HubCase


class FakeSessions:
    """The session table in memory, leases on the test's clock."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.rows: dict[str, tuple[str, str, float]] = {}
        self.down = False
        #: claims answered only when the test says so (L{answer_claims}); renewals that hang
        self.hold_claims = False
        self.held: list[tuple[Deferred[str | None], tuple[Any, ...]]] = []
        self.hang = False

    def answer_claims(self) -> None:
        held, self.held = self.held, []
        self.hold_claims = False
        for d, args in held:
            self.claim(*args).chainDeferred(d)

    def claim(self, agent_id: str, node_id: str, session_id: str, lease: float
              ) -> Deferred[str | None]:
        if self.down:
            return fail(DatabaseUnavailable("down"))
        if self.hold_claims:
            d: Deferred[str | None] = Deferred()
            self.held.append((d, (agent_id, node_id, session_id, lease)))
            return d
        now = self.clock.seconds()
        row = self.rows.get(agent_id)
        if row is not None and row[2] >= now and row[0] != node_id:
            return succeed(row[0])
        self.rows[agent_id] = (node_id, session_id, now + lease)
        return succeed(None)

    def renew(self, node_id: str, session_ids: Sequence[str], lease: float
              ) -> Deferred[set[str]]:
        if self.down:
            return fail(DatabaseUnavailable("down"))
        if self.hang:
            return Deferred()
        held = set()
        for agent_id, (node, sid, _) in list(self.rows.items()):
            if node == node_id and sid in session_ids:
                self.rows[agent_id] = (node, sid, self.clock.seconds() + lease)
                held.add(sid)
        return succeed(held)

    def release(self, agent_id: str, session_id: str) -> Deferred[None]:
        if self.rows.get(agent_id, ("", "", 0))[1] == session_id:
            del self.rows[agent_id]
        return succeed(None)

    def holder(self, agent_id: str) -> Deferred[str | None]:
        row = self.rows.get(agent_id)
        return succeed(row[0] if row is not None and row[2] >= self.clock.seconds() else None)


class _TwoHubs(_HubCase):
    """Two hubs (nodes A and B) on one session table; the agent connects to either."""

    def setUp(self) -> None:
        super().setUp()
        self.table = FakeSessions(self.clock)
        self.hub.agent_sessions, self.hub.node_id = self.table, "A"
        self.hub_a = self.hub
        self.hub_b = Hub(self.clock, self.auth, self.store, self.journal, heartbeat_interval=10)
        self.hub_b.agent_sessions, self.hub_b.node_id = self.table, "B"
        self.addCleanup(self.hub_b.close)

    def connect_to(self, hub: Hub):
        self.hub = hub
        try:
            return self.connect(caps=["durable"])
        finally:
            self.hub = self.hub_a


class TwoNodes(_TwoHubs):
    def test_second_node_refuses_while_the_first_holds_the_agent(self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a)
        self.assertEqual(len(conn_a.of_type(wire.CONNECT_RESPONSE)), 1)
        conn_b, session_b = self.connect_to(self.hub_b)
        self.assertEqual(conn_b.of_type(wire.CONNECT_RESPONSE), [])
        [error] = conn_b.of_type(wire.ERROR)
        self.assertIn("already connected to relay node A", error["body"])
        self.assertEqual(conn_b.closed, "agent connected to another relay node")
        self.assertFalse(self.hub_b.is_connected(self.agent["id"]))
        self.assertTrue(self.hub_a.is_connected(self.agent["id"]))

    def test_a_released_session_is_taken_by_the_next_node(self) -> None:
        conn_a, session_a = self.connect_to(self.hub_a)
        self.hub_a.connection_lost(session_a, "closed")
        self.assertNotIn(self.agent["id"], self.table.rows)
        conn_b, _ = self.connect_to(self.hub_b)
        self.assertEqual(len(conn_b.of_type(wire.CONNECT_RESPONSE)), 1)
        self.assertEqual(self.table.rows[self.agent["id"]][0], "B")

    def test_a_dead_nodes_lease_lapses_and_another_node_takes_over(self) -> None:
        self.connect_to(self.hub_a)  # then node A dies: nobody renews
        conn_b, _ = self.connect_to(self.hub_b)
        self.assertEqual(conn_b.of_type(wire.CONNECT_RESPONSE), [])
        self.clock.advance(self.hub_a.session_lease + 1)
        conn_b, _ = self.connect_to(self.hub_b)
        self.assertEqual(len(conn_b.of_type(wire.CONNECT_RESPONSE)), 1)

    def test_renewal_keeps_the_lease_and_closes_a_session_given_away(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        for _ in range(5):  # renewed every third of a lease: never free for B
            self.clock.advance(self.hub_a.session_lease / 3)
            self.hub_a.renew_sessions()
        conn_b, _ = self.connect_to(self.hub_b)
        self.assertEqual(conn_b.of_type(wire.CONNECT_RESPONSE), [])
        # the table gave the agent to B meanwhile (A's lease had lapsed): A lets go at once
        row = self.table.rows[self.agent["id"]]
        self.table.rows[self.agent["id"]] = ("B", "other", row[2])
        self.hub_a.renew_sessions()
        self.assertIsNotNone(conn_a.closed)
        self.assertFalse(self.hub_a.is_connected(self.agent["id"]))

    def test_no_renewal_for_a_whole_lease_closes_every_session(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        self.hub_a.renew_sessions()
        self.table.down = True
        self.clock.advance(self.hub_a.session_lease / 2)
        self.hub_a.renew_sessions()
        self.assertIsNone(conn_a.closed, "a short database outage keeps the sessions")
        self.clock.advance(self.hub_a.session_lease / 2)
        self.hub_a.renew_sessions()
        self.assertEqual(conn_a.closed, "session lease lapsed (database unavailable)")

    def test_a_renewal_that_hangs_counts_as_failed(self) -> None:
        conn_a, _ = self.connect_to(self.hub_a)
        self.hub_a.renew_sessions()
        self.table.hang = True
        for _ in range(3):  # each hung renewal gives up after a third of a lease
            self.clock.advance(self.hub_a.session_lease / 3)
            self.hub_a.renew_sessions()
        self.clock.advance(self.hub_a.session_lease / 3)
        self.assertEqual(conn_a.closed, "session lease lapsed (database unavailable)")

    def test_a_client_revoked_while_its_session_is_claimed_is_refused(self) -> None:
        self.table.hold_claims = True
        conn, _ = self.connect_to(self.hub_a)
        self.assertEqual(len(self.table.held), 1)
        agent_client = next(c for c in self.successResultOf(self.auth.list_clients())
                            if c["role"] == "agent")
        self.successResultOf(self.auth.revoke_client(agent_client["clientId"]))
        self.table.answer_claims()
        self.assertEqual(conn.of_type(wire.CONNECT_RESPONSE), [])
        self.assertIn("Access token refused", conn.of_type(wire.ERROR)[-1]["body"])
        self.assertIsNotNone(conn.closed)
        self.assertFalse(self.hub_a.is_connected(self.agent["id"]))
        self.assertEqual(self.table.rows, {}, "the claimed row is given back")

    def test_a_table_that_cannot_be_written_refuses_the_connection(self) -> None:
        self.table.down = True
        conn, _ = self.connect_to(self.hub_a)
        self.assertEqual(conn.of_type(wire.CONNECT_RESPONSE), [])
        [error] = conn.of_type(wire.ERROR)
        self.assertIn("database unavailable", error["body"])
        self.assertEqual(conn.closed, "session table unavailable")

    def test_one_node_without_a_table_is_unchanged(self) -> None:
        hub = Hub(self.clock, self.auth, self.store, self.journal, heartbeat_interval=10)
        self.addCleanup(hub.close)
        conn, _ = self.connect_to(hub)
        self.assertEqual(len(conn.of_type(wire.CONNECT_RESPONSE)), 1)
        self.assertEqual(self.table.rows, {})


class OnPostgres(TestCase):
    """L{PgAgentSessions} against a real PostgreSQL: leases on the database's clock."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        async def go() -> None:
            dsn = await deferToThread(pgenv.fresh_database, "medagent_sessions")
            self.db = PgDatabase(reactor, dsn, migrations=MIGRATIONS)
            await self.db.start()
            self.addCleanup(self.db.stop)
            self.table = PgAgentSessions(self.db)
        return ensureDeferred(go())

    def test_claim_refuse_release_renew(self) -> Deferred[None]:
        async def go() -> None:
            t = self.table
            self.assertIsNone(await t.claim("a1", "A", "s1", 20))
            self.assertEqual(await t.claim("a1", "B", "s2", 20), "A")
            self.assertEqual(await t.holder("a1"), "A")
            self.assertEqual(await t.renew("A", ["s1", "nope"], 20), {"s1"})
            self.assertEqual(await t.renew("B", ["s1"], 20), set(), "only its own node's")
            await t.release("a1", "other-session")  # not the holder's: no effect
            self.assertEqual(await t.holder("a1"), "A")
            await t.release("a1", "s1")
            self.assertIsNone(await t.holder("a1"))
            self.assertIsNone(await t.claim("a1", "B", "s2", 20))
            self.assertEqual(await t.holder("a1"), "B")
            # the same node may take its own row again (it restarted, same node id)
            self.assertIsNone(await t.claim("a1", "B", "s3", 20))
            self.assertEqual(await t.renew("B", ["s2"], 20), set())

        return ensureDeferred(go())

    def test_a_lapsed_lease_is_free_for_another_node(self) -> None:
        async def go() -> None:
            t = self.table
            self.assertIsNone(await t.claim("a2", "A", "s1", 0))  # lapses at once
            self.assertIsNone(await t.holder("a2"))
            self.assertIsNone(await t.claim("a2", "B", "s2", 20))
            self.assertEqual(await t.holder("a2"), "B")
            self.assertEqual(await t.renew("A", ["s1"], 20), set(), "A lost it")

        return ensureDeferred(go())


class AcrossNodes(_TwoHubs):
    """A push accepted by node B for the agent node A holds: A sends it, B's caller hears."""

    def test_a_push_journaled_by_b_is_sent_by_a_and_answered_to_bs_caller(self) -> None:
        from medagent.relay.push import PushService

        conn_a, session_a = self.connect_to(self.hub_a)
        pushes_b = PushService(self.hub_b, self.store, self.journal, self.clock)
        payload = {"destination": f"Device/{self.device['id']}",
                   "contentType": "x-application/hl7-v2+er7",
                   "body": "MSH|^~\\&|S|F|R|F|20240101120000||ADT^A01|XN1|P|2.5\rPID|1",
                   "waitForResponse": True}
        waited = pushes_b.push(self.admin, (self.agent["id"], None), payload)
        self.assertNoResult(waited)
        self.assertEqual(conn_a.of_type(wire.TRANSMIT_REQUEST), [],
                         "node B does not hold the agent: nothing sent yet")
        self.hub_a.poll_cluster()
        [request] = conn_a.of_type(wire.TRANSMIT_REQUEST)
        self.hub_a.poll_cluster()
        self.assertEqual(len(conn_a.of_type(wire.TRANSMIT_REQUEST)), 1, "sent once")
        self.answer(conn_a, session_a, request)
        self.assertNoResult(waited)
        self.hub_b.poll_cluster()
        result = self.successResultOf(waited)
        self.assertEqual(result.push.state, "delivered")
        self.assertIn("MSA|AA", result.push.reply_body)

    def test_a_waited_push_that_times_out_is_forgotten(self) -> None:
        from medagent.relay.push import PushService

        self.connect_to(self.hub_a)
        pushes_b = PushService(self.hub_b, self.store, self.journal, self.clock)
        payload = {"destination": f"Device/{self.device['id']}",
                   "contentType": "x-application/hl7-v2+er7",
                   "body": "MSH|^~\\&|S|F|R|F|20240101120000||ADT^A01|XN3|P|2.5\rPID|1",
                   "waitForResponse": True, "waitTimeout": 2000}
        waited = pushes_b.push(self.admin, (self.agent["id"], None), payload)
        self.clock.advance(2)
        self.assertTrue(self.successResultOf(waited).timed_out)
        self.assertEqual(self.hub_b._waiters, {}, "node B polls it no more")
        self.assertEqual(self.hub_b._pending_pushes, {})

    def test_a_waited_push_to_an_agent_no_node_holds_is_503(self) -> None:
        from medagent.fhir import FHIRError
        from medagent.relay.push import PushService

        pushes_b = PushService(self.hub_b, self.store, self.journal, self.clock)
        payload = {"destination": f"Device/{self.device['id']}",
                   "contentType": "x-application/hl7-v2+er7",
                   "body": "MSH|^~\\&|S|F|R|F|20240101120000||ADT^A01|XN2|P|2.5\rPID|1",
                   "waitForResponse": True}
        f = self.failureResultOf(pushes_b.push(self.admin, (self.agent["id"], None), payload),
                                 FHIRError)
        self.assertEqual(f.value.status, 503)
        self.connect_to(self.hub_a)
        self.assertNoResult(pushes_b.push(self.admin, (self.agent["id"], None),
                                          dict(payload, body=payload["body"] + "X")))
