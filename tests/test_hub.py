"""
The relay hub and push service, driven with a fake connection and a Clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay import journal as j
from medagent.relay.auth import Authority
from medagent.relay.hub import Hub
from medagent.relay.journal import Journal
from medagent.relay.push import PushService
from medagent.relay.store import SQLiteStore
from tests.fakes import InlineReactor, inline_database

HL7 = "MSH|^~\\&|SEND|FAC|RECV|FAC|20240101120000||ADT^A01|MSG0001|P|2.5\rPID|1||123"


class FakeConnection:
    def __init__(self, peer: str = "tcp:127.0.0.1:5555") -> None:
        self.peer = peer
        self.sent: list[dict[str, Any]] = []
        self.closed: str | None = None

    def send_message(self, message: Any) -> None:
        self.sent.append(json.loads(wire.encode(message)))

    def close(self, reason: str) -> None:
        self.closed = reason

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == kind]


class HubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(self, SQLiteStore.schema() + Authority.schema() + Journal.schema(),
                             self.clock)
        self.store = SQLiteStore(db)
        self.auth = Authority(db, b"k" * 32, clock=_Wall(self.clock))
        self.journal = Journal(db, clock=self.clock)
        self.hub = Hub(self.clock, self.auth, self.store, self.journal, heartbeat_interval=10)
        self.pushes = PushService(self.hub, self.store, self.journal, self.clock)
        self.agent = self.successResultOf(self.store.create({"resourceType": "Agent",
                                                             "name": "lab", "status": "active"}))
        self.device = self.successResultOf(self.store.create(
            {"resourceType": "Device", "url": "mllp://127.0.0.1:2575"}))
        admin = self.successResultOf(self.auth.create_client("admin"))
        self.admin = self.auth.verify_token(self.token(admin))
        agent_client = self.successResultOf(self.auth.create_client("agent", [self.agent["id"]]))
        self.agent_token = self.token(agent_client)
        self.addCleanup(self.hub.close)

    def token(self, client: dict[str, Any]) -> str:
        return self.successResultOf(
            self.auth.issue_token(client["clientId"], client["clientSecret"]))["access_token"]

    def connect(self, caps: list[str] | None = None, token: str | None = None):
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        msg = {"type": wire.CONNECT_REQUEST, "accessToken": token or self.agent_token,
               "agentId": self.agent["id"]}
        if caps is not None:
            msg["capabilities"] = caps
        self.hub.frame_received(session, wire.encode(msg))
        return conn, session

    def push(self, body: str = HL7, wait: bool = False, **extra: Any):
        payload = {"destination": f"Device/{self.device['id']}",
                   "contentType": "x-application/hl7-v2+er7", "body": body,
                   "waitForResponse": wait, **extra}
        return self.pushes.push(self.admin, (self.agent["id"], None), payload)

    def answer(self, conn: FakeConnection, session, request: dict[str, Any], **fields: Any):
        msg = {"type": wire.TRANSMIT_RESPONSE, "remote": request["remote"],
               "callback": request["callback"], "contentType": "x-application/hl7-v2+er7",
               "statusCode": 200, "body": "MSH|...\rMSA|AA|MSG0001", **fields}
        self.hub.frame_received(session, wire.encode(msg))

    def test_connect(self) -> None:
        conn, session = self.connect()
        self.assertEqual(conn.sent, [{"type": wire.CONNECT_RESPONSE, "capabilities": ["durable"]}])
        self.assertTrue(self.hub.is_connected(self.agent["id"]))

    def test_connect_refused_for_other_agent(self) -> None:
        other = self.successResultOf(self.auth.create_client("agent", ["someone-else"]))
        conn, session = self.connect(token=self.token(other))
        self.assertEqual(conn.of_type(wire.ERROR)[0]["body"],
                         f"This access token cannot act as Agent/{self.agent['id']}")
        self.assertFalse(self.hub.is_connected(self.agent["id"]))
        self.assertIsNone(conn.closed)

    def test_bad_frames_answered_not_closed(self) -> None:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        for frame, text in ((b"not json", "not JSON"), (b'{"type":"zzz"}', "Unknown"),
                            (b'{"type":"agent:heartbeat:request"}', "Not connected")):
            self.hub.frame_received(session, frame)
            self.assertIn(text, conn.sent[-1]["body"])
        self.assertIsNone(conn.closed)

    def test_waited_push_delivered(self) -> None:
        conn, session = self.connect()
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.assertEqual((request["remote"], request["body"]), (self.device["url"], HL7))
        self.assertNoResult(d)
        self.answer(conn, session, request)
        result = self.successResultOf(d)
        self.assertEqual(result.push.state, j.DELIVERED)
        self.assertEqual(result.push.reply_body, "MSH|...\rMSA|AA|MSG0001")
        stored = self.successResultOf(self.journal.get(result.push.id))
        self.assertEqual((stored.state, stored.attempts), (j.DELIVERED, 1))

    def test_waited_push_to_offline_agent_fails_at_once(self) -> None:
        f = self.failureResultOf(self.push(wait=True), FHIRError)
        self.assertEqual(f.value.status, 503)
        self.assertEqual(self.successResultOf(self.journal.counts(self.agent["id"]))["queued"], 0)

    def test_queued_while_offline_then_replayed_in_order(self) -> None:
        results = [self.successResultOf(self.push(HL7.replace("MSG0001", f"M{i}")))
                   for i in range(3)]
        self.assertEqual([r.push.state for r in results], [j.QUEUED] * 3)
        conn, session = self.connect()
        sent = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual([m["pushId"] for m in sent], [r.push.id for r in results])

    def test_repeated_msh10_not_sent_twice(self) -> None:
        conn, session = self.connect()
        first = self.push(wait=True)
        second = self.push(wait=True)
        requests = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual(len(requests), 1)
        self.answer(conn, session, requests[0])
        a, b = self.successResultOf(first), self.successResultOf(second)
        self.assertEqual(a.push.id, b.push.id)
        self.assertTrue(b.duplicate)
        self.assertEqual(b.push.state, j.DELIVERED)

    def test_timeout_leaves_push_visible(self) -> None:
        conn, session = self.connect()
        d = self.push(wait=True, waitTimeout=2000)
        self.clock.advance(2.1)
        result = self.successResultOf(d)
        self.assertTrue(result.timed_out)
        self.assertEqual(result.push.state, j.SENT)
        # The late answer still lands in the journal.
        self.answer(conn, session, conn.of_type(wire.TRANSMIT_REQUEST)[0])
        self.assertEqual(self.successResultOf(self.journal.get(result.push.id)).state,
                         j.DELIVERED)

    def test_agent_failure_marks_failed(self) -> None:
        conn, session = self.connect()
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.answer(conn, session, request, statusCode=502, contentType="text/plain",
                    body="connection refused", delivery="failed", error="connection refused")
        push = self.successResultOf(d).push
        self.assertEqual((push.state, push.last_error), (j.FAILED, "connection refused"))

    def test_second_connection_refused(self) -> None:
        self.connect()
        conn2, _ = self.connect()
        self.assertIn("already connected", conn2.of_type(wire.ERROR)[0]["body"])
        self.assertEqual(conn2.closed, "duplicate agent connection")

    def test_heartbeats_and_missed(self) -> None:
        conn, session = self.connect()
        self.clock.advance(10)
        self.assertEqual(len(conn.of_type(wire.HEARTBEAT_REQUEST)), 1)
        self.hub.frame_received(session, b'{"type":"agent:heartbeat:response","version":"v9"}')
        self.assertEqual(self.hub.status(self.agent["id"])["version"], "v9")
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertIsNone(conn.closed)
        self.clock.advance(10)
        self.assertEqual(conn.closed, "missed heartbeats")

    def test_disconnect_plain_agent_fails_in_flight(self) -> None:
        conn, session = self.connect()
        d = self.push(wait=True)
        self.hub.connection_lost(session)
        self.assertEqual(self.successResultOf(d).push.state, j.FAILED)

    def test_disconnect_dedupe_agent_resends(self) -> None:
        conn, session = self.connect(caps=["dedupe"])
        d = self.push(wait=True)
        first = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.hub.connection_lost(session)
        self.assertNoResult(d)
        conn2, session2 = self.connect(caps=["dedupe"])
        again = conn2.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual([m["pushId"] for m in again], [first["pushId"]])
        self.answer(conn2, session2, again[0])
        self.assertEqual(self.successResultOf(d).push.state, j.DELIVERED)

    def test_response_for_other_agents_push_ignored(self) -> None:
        conn, session = self.connect()
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        other = self.successResultOf(self.store.create({"resourceType": "Agent", "name": "x"}))
        oc = self.successResultOf(self.auth.create_client("agent", [other["id"]]))
        conn2 = FakeConnection()
        s2 = self.hub.connection_made(conn2)
        self.hub.frame_received(s2, wire.encode({"type": wire.CONNECT_REQUEST,
                                                 "accessToken": self.token(oc),
                                                 "agentId": other["id"]}))
        self.answer(conn2, s2, request)
        self.assertNoResult(d)
        self.answer(conn, session, request)
        self.assertEqual(self.successResultOf(d).push.state, j.DELIVERED)

    def test_device_errors(self) -> None:
        nourl = self.successResultOf(self.store.create({"resourceType": "Device"}))
        for dest, status, text in (
            ("Device/nope", 404, "not found"),
            (f"Device/{nourl['id']}", 400, "missing url"),
            ("gopher://x:1", 400, "Unsupported destination scheme"),
            ("Device?url=mllp://127.0.0.1:2575", None, None),
        ):
            d = self.pushes.push(self.admin, (self.agent["id"], None), {
                "destination": dest, "contentType": "text/plain", "body": "x"})
            if status is None:
                self.successResultOf(d)
                continue
            f = self.failureResultOf(d, FHIRError)
            self.assertEqual(f.value.status, status)
            self.assertIn(text, f.value.message)

    def test_pusher_scope(self) -> None:
        pusher = self.successResultOf(self.auth.create_client("pusher", ["other-agent"]))
        principal = self.auth.verify_token(self.token(pusher))
        f = self.failureResultOf(self.pushes.push(principal, (self.agent["id"], None), {
            "destination": "mllp://h:1", "contentType": "text/plain", "body": "x"}), FHIRError)
        self.assertEqual(f.value.status, 403)

    def test_agent_off(self) -> None:
        agent = dict(self.agent, status="off")
        self.successResultOf(self.store.update(agent))
        f = self.failureResultOf(self.push(), FHIRError)
        self.assertIn("Agent.status is 'off'", f.value.message)

    # -- the durable extension: accepted state, progress errors, confirmations

    def test_accepted_then_delivered_then_confirmed(self) -> None:
        conn, session = self.connect(caps=["durable"])
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.answer(conn, session, request, statusCode=202, body="accepted",
                    delivery="accepted", error="refused (attempt 1, retrying)")
        result_push = self.hub.live_push(self.successResultOf(
            self.journal.get(request["pushId"])))
        self.assertEqual(result_push.state, j.ACCEPTED)
        self.assertEqual(result_push.last_error, "refused (attempt 1, retrying)")
        self.assertEqual(conn.of_type(wire.TRANSMIT_CONFIRM), [])
        self.answer(conn, session, request, delivery="delivered")
        self.assertEqual(self.successResultOf(d).push.state, j.DELIVERED)
        self.assertEqual(conn.of_type(wire.TRANSMIT_CONFIRM),
                         [{"type": wire.TRANSMIT_CONFIRM, "pushId": request["pushId"]}])

    def test_answer_after_reconnect_is_recorded_and_confirmed(self) -> None:
        conn, session = self.connect(caps=["durable"])
        self.successResultOf(self.push())
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.hub.connection_lost(session)
        conn2 = FakeConnection()
        s2 = self.hub.connection_made(conn2)
        self.hub.frame_received(s2, wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": self.agent_token,
            "agentId": self.agent["id"], "capabilities": ["durable"]}))
        # the agent re-sends its unconfirmed answer before the replayed request is answered
        self.answer(conn2, s2, request, delivery="delivered")
        self.assertEqual(self.successResultOf(self.journal.get(request["pushId"])).state,
                         j.DELIVERED)
        self.assertEqual(len(conn2.of_type(wire.TRANSMIT_CONFIRM)), 1)
        # a repeat of an answer already recorded is confirmed again, not applied twice
        self.answer(conn2, s2, request, delivery="delivered")
        self.assertEqual(len(conn2.of_type(wire.TRANSMIT_CONFIRM)), 2)


    def test_send_window_streams_a_backlog(self) -> None:
        self.hub.window = 4
        ids = [self.successResultOf(self.push(HL7.replace("MSG0001", f"W{i}"))).push.id
               for i in range(10)]
        conn, session = self.connect(caps=["durable"])
        sent = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual([m["pushId"] for m in sent], ids[:4])
        for request in sent[:2]:
            self.answer(conn, session, request)
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 6)
        new = self.successResultOf(self.push(HL7.replace("MSG0001", "NEW")))
        for request in conn.of_type(wire.TRANSMIT_REQUEST)[2:]:
            self.answer(conn, session, request)
        for request in conn.of_type(wire.TRANSMIT_REQUEST)[6:]:
            self.answer(conn, session, request)
        order = [m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)]
        self.assertEqual(order, ids + [new.push.id])
        self.assertLessEqual(max(len(session.in_flight), 0), 4)


    def test_caller_gone_while_push_is_written_still_sends_it(self) -> None:
        conn, session = self.connect()
        db = self.store._db
        db._flushing = True  # the journal write is in progress
        d = self.push(wait=True)
        d.cancel()  # the HTTP caller disconnects
        db._flushing = False
        db._flush()
        self.failureResultOf(d)
        [request] = conn.of_type(wire.TRANSMIT_REQUEST)
        self.answer(conn, session, request)
        self.assertEqual(self.successResultOf(self.journal.get(request["pushId"])).state,
                         j.DELIVERED)


class _Wall:
    def __init__(self, clock: InlineReactor) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.seconds()

