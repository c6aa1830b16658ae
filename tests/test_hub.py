"""
The relay hub and push service, driven with a fake connection and a Clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.auth import Authority
from medagent.relay.hub import Hub
from medagent.relay.push import PushService
from medagent.storage import journal as j
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.store import SQLiteStore
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


class _HubCase(SynchronousTestCase):
    """A hub, its journal and push service on an inline database, a Clock, one agent."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(self, SQLiteStore.schema() + SQLiteClientRegistry.schema()
                             + SQLiteJournal.schema(), self.clock)
        self.store = SQLiteStore(db)
        self.auth = Authority(SQLiteClientRegistry(db), b"k" * 32, clock=_Wall(self.clock))
        self.journal = SQLiteJournal(db, clock=self.clock)
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

    def connect(self, caps: list[str] | None = None, token: str | None = None,
                ready: bool = True):
        """
        Connect a fake agent.  One without "durable" (Medplum's) takes pushes once it has
        read its config: C{ready} makes it do so, as Medplum's agent does right after connect.
        """
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        msg = {"type": wire.CONNECT_REQUEST, "accessToken": token or self.agent_token,
               "agentId": self.agent["id"]}
        if caps is not None:
            msg["capabilities"] = caps
        self.hub.frame_received(session, wire.encode(msg))
        if ready and "durable" not in (caps or []) and session.agent_id is not None:
            self.hub.agent_config_read(self.agent["id"])
            self.clock.advance(self.hub.ready_settle)
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


class HubTests(_HubCase):
    def test_connect(self) -> None:
        conn, session = self.connect()
        self.assertEqual(conn.sent, [{"type": wire.CONNECT_RESPONSE,
                                      "capabilities": ["durable", "batch"],
                                      "batchBytes": wire.BATCH_BYTES}])
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
        # an agent without ordered lanes gets one push per device at a time
        for i in range(3):
            sent = conn.of_type(wire.TRANSMIT_REQUEST)
            self.assertEqual(len(sent), i + 1)
            self.answer(conn, session, sent[-1])
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
        in_flight = [len(session.in_flight)]  # after each answer: never above the window
        for request in sent[:2]:
            self.answer(conn, session, request)
            in_flight.append(len(session.in_flight))
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 6)
        new = self.successResultOf(self.push(HL7.replace("MSG0001", "NEW")))
        in_flight.append(len(session.in_flight))
        for request in conn.of_type(wire.TRANSMIT_REQUEST)[2:]:
            self.answer(conn, session, request)
            in_flight.append(len(session.in_flight))
        for request in conn.of_type(wire.TRANSMIT_REQUEST)[6:]:
            self.answer(conn, session, request)
            in_flight.append(len(session.in_flight))
        order = [m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)]
        self.assertEqual(order, ids + [new.push.id])
        # the window refills while there is a backlog, and is never exceeded
        self.assertEqual(in_flight[0], 4)
        self.assertIn(4, in_flight[1:])
        self.assertLessEqual(max(in_flight), 4)


    def test_caller_gone_while_push_is_written_still_sends_it(self) -> None:
        conn, session = self.connect()
        db = self.store._db
        with db.hold():  # the journal write is in progress
            d = self.push(wait=True)
            d.cancel()  # the HTTP caller disconnects
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



OFF = "Agent.status is currently set to off"


class MedplumAgentTests(_HubCase):
    """
    The hub with an agent that behaves like Medplum's (v5.0.10): no capabilities, refuses
    pushes with C{agent:error} until it has read its Agent resource, and handles transmit
    requests concurrently (no ordered lanes of its own).
    """

    def device_b(self) -> dict[str, Any]:
        return self.successResultOf(self.store.create(
            {"resourceType": "Device", "url": "mllp://127.0.0.1:2576"}))

    def push_to(self, device: dict[str, Any], ctrl: str):
        return self.successResultOf(self.pushes.push(self.admin, (self.agent["id"], None), {
            "destination": f"Device/{device['id']}", "contentType": "x-application/hl7-v2+er7",
            "body": HL7.replace("MSG0001", ctrl)})).push

    def refuse(self, session, request: dict[str, Any]) -> None:
        self.hub.frame_received(session, wire.encode(
            {"type": wire.ERROR, "callback": request["callback"], "body": OFF}))

    def state(self, push_id: str) -> str:
        self.successResultOf(self.journal.flushed())
        return self.successResultOf(self.journal.get(push_id)).state

    def test_not_ready_error_leaves_push_queued_and_retries_with_backoff(self) -> None:
        conn, session = self.connect()
        push = self.push_to(self.device, "R1")
        [request] = conn.of_type(wire.TRANSMIT_REQUEST)
        self.refuse(session, request)
        self.assertEqual(self.state(push.id), j.QUEUED)  # not failed: nothing was delivered
        # bounded backoff, never a hot loop: 1 s, then 2 s
        self.clock.advance(0.9)
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 1)
        self.clock.advance(0.1)
        again = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual([m["pushId"] for m in again], [push.id, push.id])
        self.refuse(session, again[-1])
        self.clock.advance(1.9)
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 2)
        self.clock.advance(0.1)
        third = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual(len(third), 3)
        self.answer(conn, session, third[-1])
        self.assertEqual(self.state(push.id), j.DELIVERED)
        done = self.successResultOf(self.journal.get(push.id))
        self.assertEqual(done.attempts, 3)

    def test_backoff_is_capped(self) -> None:
        conn, session = self.connect()
        self.push_to(self.device, "R1")
        for _ in range(12):
            self.refuse(session, conn.of_type(wire.TRANSMIT_REQUEST)[-1])
            before = len(conn.of_type(wire.TRANSMIT_REQUEST))
            self.clock.advance(self.hub.retry_cap)
            self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), before + 1)

    def test_other_agent_errors_still_fail_the_push(self) -> None:
        conn, session = self.connect()
        push = self.push_to(self.device, "R1")
        [request] = conn.of_type(wire.TRANSMIT_REQUEST)
        self.hub.frame_received(session, wire.encode(
            {"type": wire.ERROR, "callback": request["callback"], "body": "Invalid HL7 message"}))
        self.assertEqual(self.state(push.id), j.FAILED)

    def test_replay_waits_until_the_agent_read_its_config(self) -> None:
        self.hub.ready_timeout = 60  # this test is about another signal
        queued = [self.push_to(self.device, f"Q{i}") for i in range(2)]
        conn, session = self.connect(ready=False)
        self.clock.advance(5)
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.hub.agent_config_read(self.agent["id"])  # GET Agent/{id} with its token
        self.clock.advance(self.hub.ready_settle - 0.01)
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.clock.advance(0.01)
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)],
                         [queued[0].id])

    def test_config_read_before_connect_request_counts(self) -> None:
        queued = self.push_to(self.device, "Q0")
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        self.hub.agent_config_read(self.agent["id"])  # REST read raced ahead of the socket
        self.hub.frame_received(session, wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": self.agent_token,
            "agentId": self.agent["id"]}))
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.clock.advance(self.hub.ready_settle)
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)],
                         [queued.id])

    def test_stale_config_read_does_not_count(self) -> None:
        self.hub.agent_config_read(self.agent["id"])  # by an earlier connection
        self.clock.advance(1)
        self.push_to(self.device, "Q0")
        conn, session = self.connect(ready=False)
        self.clock.advance(self.hub.ready_settle)
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])

    def test_ready_on_first_heartbeat_answer(self) -> None:
        self.hub.ready_timeout = 60  # this test is about another signal
        queued = self.push_to(self.device, "Q0")
        conn, session = self.connect(ready=False)
        self.clock.advance(self.hub.heartbeat_interval)
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.hub.frame_received(session, b'{"type":"agent:heartbeat:response","version":"5"}')
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)],
                         [queued.id])

    def test_ready_after_timeout(self) -> None:
        queued = self.push_to(self.device, "Q0")
        conn, session = self.connect(ready=False)
        self.clock.advance(self.hub.ready_timeout - 0.1)
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.clock.advance(0.1)
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)],
                         [queued.id])

    def test_new_push_waits_while_not_ready(self) -> None:
        conn, session = self.connect(ready=False)
        push = self.push_to(self.device, "N0")
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.clock.advance(self.hub.ready_timeout)
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)], [push.id])

    def test_one_push_per_device_in_flight_order_kept(self) -> None:
        device_b = self.device_b()
        a = [self.push_to(self.device, f"A{i:02d}") for i in range(20)]
        b = [self.push_to(device_b, f"B{i:02d}") for i in range(5)]
        conn, session = self.connect()
        answered: set[str] = set()
        while True:
            open_requests = [m for m in conn.of_type(wire.TRANSMIT_REQUEST)
                             if m["pushId"] not in answered]
            if not open_requests:
                break
            per_device = [m["remote"] for m in open_requests]
            self.assertEqual(len(per_device), len(set(per_device)), per_device)
            # Medplum's agent answers concurrently: the newest request first
            for request in reversed(open_requests):
                answered.add(request["pushId"])
                self.answer(conn, session, request)
        sent = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual([m["pushId"] for m in sent if m["remote"] == self.device["url"]],
                         [p.id for p in a])
        self.assertEqual([m["pushId"] for m in sent if m["remote"] == device_b["url"]],
                         [p.id for p in b])
        self.assertEqual(len(sent), 25)

    def test_twenty_queued_while_refused_arrive_once_in_order(self) -> None:
        self.hub.ready_timeout = 60  # this test is about another signal
        a = [self.push_to(self.device, f"A{i:02d}") for i in range(20)]
        conn, session = self.connect(ready=False)
        # it answered our first heartbeat, but had not read its config yet
        self.clock.advance(self.hub.heartbeat_interval)
        self.hub.frame_received(session, b'{"type":"agent:heartbeat:response","version":"5"}')
        self.refuse(session, conn.of_type(wire.TRANSMIT_REQUEST)[-1])
        self.hub.agent_config_read(self.agent["id"])
        self.clock.advance(self.hub.ready_settle)
        delivered: list[str] = []
        while len(delivered) < 20:
            request = conn.of_type(wire.TRANSMIT_REQUEST)[-1]
            self.assertNotIn(request["pushId"], delivered)
            delivered.append(request["pushId"])
            self.answer(conn, session, request)
        self.assertEqual(delivered, [p.id for p in a])
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 21)


class LaneWindowTests(_HubCase):
    """A device that is down only ever holds up its own lane, never the agent's others."""

    def setUp(self) -> None:
        super().setUp()
        self.devices = {name: self.successResultOf(self.store.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{port}"}))
            for name, port in (("down", 3000), ("b", 3001), ("c", 3002))}
        self.seen: dict[str, int] = {}

    def push_to(self, name: str, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            i = self.seen[name] = self.seen.get(name, 0) + 1
            out.append(self.successResultOf(self.pushes.push(
                self.admin, (self.agent["id"], None), {
                    "destination": f"Device/{self.devices[name]['id']}",
                    "contentType": "x-application/hl7-v2+er7",
                    "body": HL7.replace("MSG0001", f"{name}{i:05d}")})).push)
        return out

    def sent_to(self, conn: FakeConnection, name: str) -> list[dict[str, Any]]:
        url = self.devices[name]["url"]
        return [m for m in conn.of_type(wire.TRANSMIT_REQUEST) if m["remote"] == url]

    def retrying(self, conn: FakeConnection, session, name: str) -> None:
        """Our agent: it has them on disk, the device refuses, it retries."""
        for request in self.sent_to(conn, name):
            self.answer(conn, session, request, statusCode=202, body="accepted",
                        delivery="accepted", error="Connection refused (attempt 1, retrying)")

    def test_device_down_does_not_stall_the_others(self) -> None:
        conn, session = self.connect(caps=["durable", "dedupe"])
        self.push_to("down", 1100)
        self.retrying(conn, session, "down")
        healthy = self.push_to("b", 10)
        self.assertEqual([m["pushId"] for m in self.sent_to(conn, "b")],
                         [p.id for p in healthy])
        self.assertEqual(len(self.sent_to(conn, "down")), self.hub.lane_window)

    def test_device_down_does_not_stall_the_others_after_reconnect(self) -> None:
        conn, session = self.connect(caps=["durable", "dedupe"])
        self.push_to("down", 703)
        self.retrying(conn, session, "down")
        self.hub.connection_lost(session)
        healthy = self.push_to("b", 10)
        conn2, session2 = self.connect(caps=["durable", "dedupe"])
        self.assertEqual([m["pushId"] for m in self.sent_to(conn2, "b")],
                         [p.id for p in healthy])
        self.assertEqual(len(self.sent_to(conn2, "down")), self.hub.lane_window)

    def test_lane_and_agent_windows(self) -> None:
        self.hub.window, self.hub.lane_window = 6, 3
        pushed = {name: self.push_to(name, 5) for name in ("down", "b", "c")}
        conn, session = self.connect(caps=["durable"])
        # three per lane; the agent's window (6) is full, so c waits its turn
        self.assertEqual([len(self.sent_to(conn, n)) for n in ("down", "b", "c")], [3, 3, 0])
        # the agent reports 'down' waiting on a retry: it no longer counts in the window
        self.retrying(conn, session, "down")
        self.assertEqual([len(self.sent_to(conn, n)) for n in ("down", "b", "c")], [3, 3, 3])
        self.assertLessEqual(len(session.in_flight), 9)
        # b and c drain completely; 'down' stays at its lane window
        for _ in range(5):
            for name in ("b", "c"):
                for request in self.sent_to(conn, name):
                    if request["pushId"] in session.in_flight:
                        self.answer(conn, session, request)
        for name in ("b", "c"):
            self.assertEqual([m["pushId"] for m in self.sent_to(conn, name)],
                             [p.id for p in pushed[name]])
        self.assertEqual(len(self.sent_to(conn, "down")), 3)
        # the device is back: the rest of its lane goes, in order
        while len(self.sent_to(conn, "down")) < 5 or session.in_flight:
            request = next(m for m in self.sent_to(conn, "down")
                           if m["pushId"] in session.in_flight)
            self.answer(conn, session, request)
        self.assertEqual([m["pushId"] for m in self.sent_to(conn, "down")],
                         [p.id for p in pushed["down"]])

    def test_snapshot_shows_lanes(self) -> None:
        self.hub.lane_window = 2
        conn, session = self.connect(caps=["durable"])
        self.push_to("down", 3)
        self.retrying(conn, session, "down")
        self.push_to("b", 1)
        snap = self.hub.snapshot(self.agent["id"])
        self.assertEqual((snap["ready"], snap["inFlight"], snap["laneWindow"]), (True, 3, 2))
        self.assertEqual(snap["lanes"], {
            "mllp://127.0.0.1:3000": {"inFlight": 2, "holding": True, "retrying": True},
            "mllp://127.0.0.1:3001": {"inFlight": 1, "holding": False, "retrying": False}})

    def test_memory_bound_holds_with_stalled_lanes(self) -> None:
        self.hub.window, self.hub.lane_window, self.hub.max_tracked = 4, 2, 6
        for name in ("down", "b", "c"):
            self.push_to(name, 3)
        conn, session = self.connect(caps=["durable"])
        self.assertEqual(len(session.in_flight), 4)
        for name in ("down", "b", "c"):
            self.retrying(conn, session, name)
        self.assertEqual([len(self.sent_to(conn, n)) for n in ("down", "b", "c")], [2, 2, 2])
        for name in ("down", "b", "c"):
            self.push_to(name, 3)
        self.assertEqual(len(session.in_flight), 6)  # all stalled, yet memory stays bounded

    def test_lane_holding_back_is_logged_once(self) -> None:
        from twisted.logger import Logger

        from medagent.relay import hub as hub_module

        events: list[dict[str, Any]] = []
        self.patch(hub_module, "log", Logger(observer=events.append))
        conn, session = self.connect(caps=["durable"])
        self.push_to("down", self.hub.lane_window + 50)
        held = [e for e in events if "lane window" in e["log_format"]]
        self.assertEqual(len(held), 1)
        self.assertEqual((held[0]["lane"], held[0]["n"]),
                         ("mllp://127.0.0.1:3000", self.hub.lane_window))


class CancelTests(_HubCase):
    """$cancel of a push the agent already holds (the 'cancel' extension)."""

    def on_agent(self, caps: list[str]):
        conn, session = self.connect(caps=caps)
        push = self.successResultOf(self.push()).push
        [request] = conn.of_type(wire.TRANSMIT_REQUEST)
        self.answer(conn, session, request, statusCode=202, body="accepted", delivery="accepted",
                    error="Connection refused (attempt 1, retrying)")
        return conn, session, push

    def answer_cancel(self, conn: FakeConnection, session, status: int, **extra: Any) -> None:
        [request] = conn.of_type(wire.TRANSMIT_CANCEL)
        self.hub.frame_received(session, wire.encode({
            "type": wire.TRANSMIT_CANCEL_RESPONSE, "callback": request["callback"],
            "pushId": request["pushId"], "statusCode": status, **extra}))

    def test_cancel_on_agent(self) -> None:
        conn, session, push = self.on_agent(["durable", "cancel"])
        d = self.pushes.cancel(self.admin, push.id)
        self.assertNoResult(d)
        [request] = conn.of_type(wire.TRANSMIT_CANCEL)
        self.assertEqual(request["pushId"], push.id)
        self.answer_cancel(conn, session, 200, state="cancelled")
        self.assertEqual(self.successResultOf(d).state, j.CANCELLED)
        self.assertEqual(self.successResultOf(self.journal.get(push.id)).state, j.CANCELLED)
        self.assertEqual(session.in_flight, {})
        self.assertEqual(conn.of_type(wire.TRANSMIT_CONFIRM)[-1]["pushId"], push.id)

    def test_cancel_frees_the_lane(self) -> None:
        self.hub.lane_window = 1
        conn, session, push = self.on_agent(["durable", "cancel"])
        second = self.successResultOf(self.push(HL7.replace("MSG0001", "MSG0002"))).push
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 1)
        self.pushes.cancel(self.admin, push.id)
        self.answer_cancel(conn, session, 200)
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)],
                         [push.id, second.id])

    def test_cancel_while_being_delivered_is_409(self) -> None:
        conn, session, push = self.on_agent(["durable", "cancel"])
        d = self.pushes.cancel(self.admin, push.id)
        self.answer_cancel(conn, session, 409, state="delivering")
        f = self.failureResultOf(d, FHIRError)
        self.assertEqual(f.value.status, 409)
        self.assertIn("delivering it to the device now", f.value.message)
        self.assertEqual(self.hub.live_push(self.successResultOf(
            self.journal.get(push.id))).state, j.ACCEPTED)
        self.assertIn(push.id, session.in_flight)

    def test_agent_without_cancel_capability_is_409(self) -> None:
        conn, session, push = self.on_agent(["durable"])
        f = self.failureResultOf(self.pushes.cancel(self.admin, push.id), FHIRError)
        self.assertEqual(f.value.status, 409)
        self.assertIn("cannot cancel pushes it holds", f.value.message)
        self.assertEqual(conn.of_type(wire.TRANSMIT_CANCEL), [])

    def test_cancel_no_answer_is_504(self) -> None:
        conn, session, push = self.on_agent(["durable", "cancel"])
        d = self.pushes.cancel(self.admin, push.id)
        self.clock.advance(self.hub.request_timeout)
        self.assertEqual(self.failureResultOf(d, FHIRError).value.status, 504)

    def test_cancel_push_held_on_the_relay(self) -> None:
        self.hub.lane_window = 1
        conn, session, first = self.on_agent(["durable"])
        held = self.successResultOf(self.push(HL7.replace("MSG0001", "MSG0002"))).push
        cancelled = self.successResultOf(self.pushes.cancel(self.admin, held.id))
        self.assertEqual(cancelled.state, j.CANCELLED)
        self.answer(conn, session, conn.of_type(wire.TRANSMIT_REQUEST)[0])
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)], [first.id])

    def test_cancelled_answer_replayed_after_reconnect(self) -> None:
        conn, session, push = self.on_agent(["durable", "cancel"])
        self.hub.connection_lost(session)
        conn2, session2 = self.connect(caps=["durable", "cancel"])
        self.answer(conn2, session2, conn.of_type(wire.TRANSMIT_REQUEST)[0], statusCode=200,
                    contentType="text/plain", body="Cancelled", delivery="cancelled")
        self.assertEqual(self.successResultOf(self.journal.get(push.id)).state, j.CANCELLED)


class JournalOutage(_HubCase):
    """A failed journal read holds an agent's pushes for seconds, not the 30 s backoff."""

    def test_a_failed_read_is_tried_again_after_journal_retry(self) -> None:
        from twisted.internet.defer import fail

        from medagent.relay.hub import JOURNAL_RETRY
        from medagent.storage.sqlite.database import DatabaseUnavailable

        self.successResultOf(self.push())  # queued while the agent is away
        real = self.journal.open_pushes
        calls: list[Any] = []

        def flaky(*args: Any, **kw: Any) -> Any:
            calls.append(args)
            if len(calls) == 1:
                return fail(DatabaseUnavailable("down"))
            return real(*args, **kw)

        self.patch(self.journal, "open_pushes", flaky)
        conn, _ = self.connect(caps=["durable"])
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])
        self.clock.advance(JOURNAL_RETRY)
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 1)
        self.assertEqual(len(self.flushLoggedErrors(DatabaseUnavailable)), 1)

    def test_an_outcome_not_written_is_written_again_and_then_confirmed(self) -> None:
        """
        The database went away as the answer came: the outcome is written again every
        JOURNAL_RETRY seconds (it stayed 'sent' for ever before), and the durable agent is
        told its answer is recorded only once it is.
        """
        from twisted.internet.defer import fail

        from medagent.relay.hub import JOURNAL_RETRY
        from medagent.storage.sqlite.database import DatabaseUnavailable

        conn, session = self.connect(caps=["durable"])
        pushed = self.successResultOf(self.push()).push
        [request] = conn.of_type(wire.TRANSMIT_REQUEST)
        real = self.journal.transition
        down = [True]

        def flaky(push: Any, state: str, **kw: Any) -> Any:
            if state == "delivered" and down[0]:
                return fail(DatabaseUnavailable("down"))
            return real(push, state, **kw)

        self.patch(self.journal, "transition", flaky)
        self.answer(conn, session, request)
        self.clock.advance(JOURNAL_RETRY)
        self.assertEqual(conn.of_type(wire.TRANSMIT_CONFIRM), [])
        self.assertEqual(self.successResultOf(self.journal.get(pushed.id)).state, "sent")
        down[0] = False
        self.clock.advance(JOURNAL_RETRY)
        self.assertEqual(self.successResultOf(self.journal.get(pushed.id)).state, "delivered")
        self.assertEqual([m["pushId"] for m in conn.of_type(wire.TRANSMIT_CONFIRM)],
                         [pushed.id])
