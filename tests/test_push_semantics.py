"""
What the relay treats as a repeat of a push, and what it does not (README "No duplicates");
the push list's paging; hostile numbers in a push.

The rules under test: a repeat is the same message (same agent, same device, same content type
and body) recognised by the caller's own ``Idempotency-Key`` or, for HL7 v2, by the same MSH-10
with the same body; both rules always apply; the same key with another message is a 409; keys
are scoped to the caller.  Units drive L{PushService} with a fake agent connection and a Clock;
the HTTP tests run the relay's API in-process on loopback; one integration test runs real
``twistd`` relay and agent processes with python-hl7's MLLP listener as the device.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent import destination as destination_module
from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.access import EXT_DEVICE
from medagent.relay.auth import Authority
from medagent.relay.hub import Hub
from medagent.relay.push import MAX_TTL_S, PushService, parse_push_body
from medagent.relay.service import RelayService
from medagent.storage import journal as j
from medagent.storage.journal import Push, message_hash
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.database import Database
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.store import SQLiteStore
from tests import procs
from tests.fakes import InlineReactor, InlineThreadPool, inline_database
from tests.peerenv import FIXTURES
from tests.test_hub import FakeConnection

HL7_V2 = "x-application/hl7-v2+er7"
ASTM = "x-application/astm"


def order(ctrl: str, test: str = "GLU^Glucose", patient: str = "DOE^JANE") -> str:
    """An HL7 ORM; two orders may share a control id and differ in what they ask for."""
    return (f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
            f"PID|1||12345^^^MRN||{patient}||19800101|F\r"
            f"ORC|NW|{ctrl}\rOBR|1|{ctrl}||{test}")


class _Wall:
    def __init__(self, clock: InlineReactor) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.seconds()


class RepeatRules(SynchronousTestCase):
    """L{PushService} with a fake agent connection, synchronous SQLite and a Clock."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(self, SQLiteStore.schema() + SQLiteClientRegistry.schema()
                             + SQLiteJournal.schema(), self.clock)
        self.db = db
        self.store = SQLiteStore(db)
        self.auth = Authority(SQLiteClientRegistry(db), b"k" * 32, clock=_Wall(self.clock))
        self.journal = SQLiteJournal(db, clock=self.clock)
        self.hub = Hub(self.clock, self.auth, self.store, self.journal, heartbeat_interval=10)
        self.addCleanup(self.hub.close)
        self.pushes = PushService(self.hub, self.store, self.journal, self.clock)
        self.device = self.successResultOf(self.store.create(
            {"resourceType": "Device", "url": "mllp://127.0.0.1:2575"}))
        self.other_device = self.successResultOf(self.store.create(
            {"resourceType": "Device", "url": "mllp://127.0.0.1:2576"}))
        self.agent = self.successResultOf(self.store.create(
            {"resourceType": "Agent", "name": "lab", "status": "active",
             "extension": [{"url": EXT_DEVICE, "valueReference": {"reference": f"Device/{d}"}}
                           for d in (self.device["id"], self.other_device["id"])]}))
        self.alice = self.principal("pusher", [self.agent["id"]])
        self.bob = self.principal("pusher", [self.agent["id"]])
        agent_client = self.successResultOf(self.auth.create_client("agent", [self.agent["id"]]))
        self.conn = FakeConnection()
        self.session = self.hub.connection_made(self.conn)
        self.hub.frame_received(self.session, wire.encode({
            "type": wire.CONNECT_REQUEST, "agentId": self.agent["id"],
            "accessToken": self.token(agent_client),
            "capabilities": [wire.CAP_DURABLE]}))  # ready at once (no config read to wait for)
        self.assertTrue(self.hub.is_connected(self.agent["id"]))

    def token(self, client: dict[str, Any]) -> str:
        return self.successResultOf(
            self.auth.issue_token(client["clientId"], client["clientSecret"]))["access_token"]

    def principal(self, role: str, agents: list[str]):
        client = self.successResultOf(self.auth.create_client(role, agents))
        return self.auth.verify_token(self.token(client))

    def push(self, body: str, *, who: Any = None, key: str | None = None, wait: bool = False,
             content_type: str = HL7_V2, destination: str | None = None) -> Deferred:
        payload = {"destination": destination or f"Device/{self.device['id']}",
                   "contentType": content_type, "body": body, "waitForResponse": wait}
        return self.pushes.push(who or self.alice, (self.agent["id"], None), payload, key)

    def sent(self) -> list[dict[str, Any]]:
        return self.conn.of_type(wire.TRANSMIT_REQUEST)

    def answer(self, request: dict[str, Any], body: str) -> None:
        self.hub.frame_received(self.session, wire.encode({
            "type": wire.TRANSMIT_RESPONSE, "remote": request["remote"],
            "callback": request["callback"], "contentType": HL7_V2, "statusCode": 200,
            "body": body}))

    # -- defect 1: same MSH-10, another body, is another message ---------------------------

    def test_same_control_id_other_body_is_delivered(self) -> None:
        glucose, potassium = order("ORD1"), order("ORD1", test="K^Potassium")
        first = self.push(glucose, wait=True)
        second = self.push(potassium, wait=True)
        requests = self.sent()
        self.assertEqual([r["body"] for r in requests], [glucose, potassium])
        self.answer(requests[0], "MSH|^~\\&|LIS\rMSA|AA|ORD1|glucose")
        self.answer(requests[1], "MSH|^~\\&|LIS\rMSA|AA|ORD1|potassium")
        a, b = self.successResultOf(first), self.successResultOf(second)
        self.assertNotEqual(a.push.id, b.push.id)
        self.assertEqual((a.duplicate, b.duplicate), (False, False))
        self.assertIn("glucose", a.push.reply_body)
        self.assertIn("potassium", b.push.reply_body)

    def test_same_control_id_same_body_is_a_repeat(self) -> None:
        first = self.successResultOf(self.push(order("ORD2")))
        # the same message as the agent sends it: \n instead of \r and a trailing newline
        again = self.successResultOf(self.push(order("ORD2").replace("\r", "\n") + "\n"))
        self.assertEqual(len(self.sent()), 1)
        self.assertEqual(again.push.id, first.push.id)
        self.assertTrue(again.duplicate)

    def test_rebuilt_with_a_new_timestamp_is_a_repeat(self) -> None:
        """A sender rebuilding the message for a retry stamps a new MSH-7 (our bots do)."""
        first = self.successResultOf(self.push(order("ORD16")))
        rebuilt = order("ORD16").replace("|20240101120000|", "|20240101120731|", 1)
        self.assertNotEqual(rebuilt, order("ORD16"))
        again = self.successResultOf(self.push(rebuilt))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        # but a changed PID is another message, whatever the timestamp
        other = self.successResultOf(self.push(order("ORD16", patient="ROE^RICHARD")))
        self.assertFalse(other.duplicate)
        self.assertEqual(len(self.sent()), 2)

    def test_same_message_to_another_device_is_delivered(self) -> None:
        self.successResultOf(self.push(order("ORD3")))
        other = self.successResultOf(self.push(
            order("ORD3"), destination=f"Device/{self.other_device['id']}"))
        self.assertFalse(other.duplicate)
        self.assertEqual(len(self.sent()), 2)

    def test_same_message_is_remembered_for_the_window_only(self) -> None:
        self.successResultOf(self.push(order("ORD4")))
        self.clock.advance(j.IDEMPOTENCY_WINDOW + 1)
        later = self.successResultOf(self.push(order("ORD4")))
        self.assertFalse(later.duplicate)
        self.assertEqual(len(self.sent()), 2)

    def test_same_device_is_the_lane_key_not_the_url_text(self) -> None:
        """The rule asks L{Destination.key} which device a URL names (never compares URLs)."""
        def device_only(self: Any) -> str:
            return self.url.split("?", 1)[0]

        self.patch(destination_module.Destination, "key", property(device_only))
        self.successResultOf(self.push(order("ORD5"), destination="mllp://127.0.0.1:2575"))
        again = self.successResultOf(self.push(
            order("ORD5"), destination="mllp://127.0.0.1:2575?ackTimeout=5"))
        self.assertTrue(again.duplicate)
        self.assertEqual(len(self.sent()), 1)

    def test_key_reused_with_another_body_is_409(self) -> None:
        first = self.successResultOf(self.push(order("ORD6"), key="k-1"))
        f = self.failureResultOf(self.push(order("ORD6", test="K^Potassium"), key="k-1"),
                                 FHIRError)
        self.assertEqual((f.value.status, f.value.code), (409, "conflict"))
        self.assertIn("Idempotency-Key", f.value.message)
        self.assertIn("different message", f.value.message)
        self.assertIn(first.push.id, f.value.message)
        self.assertNotIn("Potassium", f.value.message)  # no content in errors
        # not an HL7 message: the same
        self.successResultOf(self.push("H|\\^&\rO|1|S1", key="k-2", content_type=ASTM))
        f = self.failureResultOf(self.push("H|\\^&\rO|1|S2", key="k-2", content_type=ASTM),
                                 FHIRError)
        self.assertEqual(f.value.status, 409)
        # ... and another device under the same key is another message, too
        f = self.failureResultOf(self.push(order("ORD6"), key="k-1",
                                           destination=f"Device/{self.other_device['id']}"),
                                 FHIRError)
        self.assertEqual(f.value.status, 409)
        self.assertIn("another device", f.value.message)
        self.assertEqual(len(self.sent()), 2)

    def test_key_reused_with_the_same_message_is_a_repeat(self) -> None:
        first = self.successResultOf(self.push("H|\\^&\rO|1|S1", key="k", content_type=ASTM))
        again = self.successResultOf(self.push("H|\\^&\rO|1|S1", key="k", content_type=ASTM))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        self.assertEqual(len(self.sent()), 1)

    # -- defect 2: both rules, always --------------------------------------------------------

    def test_same_message_under_two_keys_is_a_repeat(self) -> None:
        first = self.successResultOf(self.push(order("ORD7"), key="attempt-1"))
        again = self.successResultOf(self.push(order("ORD7"), key="attempt-2"))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        self.assertEqual(len(self.sent()), 1)

    def test_key_of_a_repeat_is_bound_to_the_push_it_repeats(self) -> None:
        first = self.successResultOf(self.push(order("ORD14")))
        self.successResultOf(self.push(order("ORD14"), key="retry"))
        again = self.successResultOf(self.push(order("ORD14"), key="retry"))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        f = self.failureResultOf(self.push(order("ORD15"), key="retry"), FHIRError)
        self.assertEqual(f.value.status, 409)
        self.assertIn(first.push.id, f.value.message)
        self.assertEqual(len(self.sent()), 1)
        # bindings end with the window, like keys
        self.clock.advance(j.IDEMPOTENCY_WINDOW + 1)
        self.successResultOf(self.journal.prune(j.IDEMPOTENCY_WINDOW * 2))
        self.assertIsNone(self.successResultOf(self.journal.find_by_key(
            self.alice.client_id, "retry")))
        self.assertEqual(self.db.run_sync(
            lambda conn: conn.execute("SELECT count(*) FROM push_keys").fetchone()[0]), 0)

    def test_same_message_with_a_key_and_without(self) -> None:
        first = self.successResultOf(self.push(order("ORD8"), key="k8"))
        again = self.successResultOf(self.push(order("ORD8")))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        first = self.successResultOf(self.push(order("ORD9")))
        again = self.successResultOf(self.push(order("ORD9"), key="k9"))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        self.assertEqual(len(self.sent()), 2)

    def test_repeat_while_the_first_is_being_written(self) -> None:
        with self.db.hold():  # the first push's journal write is in progress
            first = self.push(order("ORD10"), key="w1")
            other_key = self.push(order("ORD10"), key="w2")
            no_key = self.push(order("ORD10"))
            conflict = self.push(order("ORD10", test="K^Potassium"), key="w1")
        pushed = self.successResultOf(first).push
        for d in (other_key, no_key):
            result = self.successResultOf(d)
            self.assertEqual((result.push.id, result.duplicate), (pushed.id, True))
        self.assertEqual(self.failureResultOf(conflict, FHIRError).value.status, 409)
        self.assertEqual([r["pushId"] for r in self.sent()], [pushed.id])

    def test_waited_repeats_to_a_connected_agent_need_no_lookup(self) -> None:
        """
        A waited push to an agent this node holds skips the repeat lookups (a database round
        trip per push): the journal's insert finds the repeat in its own transaction, with
        the same outcomes — the earlier push for the same message, 409 for a key reused.
        """
        first = self.push(order("ORD20"), key="c-1", wait=True)
        [request] = self.sent()
        self.answer(request, "MSH|^~\\&|LIS\rMSA|AA|ORD20")
        pushed = self.successResultOf(first).push

        def no_lookup(*args: Any) -> Any:
            raise AssertionError("looked up a repeat before the insert")

        self.patch(self.journal, "find_same_message", no_lookup)
        self.patch(self.journal, "find_by_key", no_lookup)
        for key in (None, "c-1", "c-2"):
            again = self.successResultOf(self.push(order("ORD20"), key=key, wait=True))
            self.assertEqual((again.push.id, again.duplicate), (pushed.id, True))
            self.assertIn("MSA|AA|ORD20", again.push.reply_body)
        f = self.failureResultOf(self.push(order("ORD21"), key="c-1", wait=True), FHIRError)
        self.assertEqual(f.value.status, 409)
        self.assertEqual(len(self.sent()), 1)

    def test_waited_repeat_while_the_agent_is_away_is_answered(self) -> None:
        """The agent not connected: a waited repeat is still answered from the journal
        (looked up first), not refused as 503."""
        first = self.push(order("ORD22"), wait=True)
        [request] = self.sent()
        self.answer(request, "MSH|^~\\&|LIS\rMSA|AA|ORD22")
        pushed = self.successResultOf(first).push
        self.hub.connection_lost(self.session)
        self.assertFalse(self.hub.is_connected(self.agent["id"]))
        again = self.successResultOf(self.push(order("ORD22"), wait=True))
        self.assertEqual((again.push.id, again.duplicate), (pushed.id, True))
        f = self.failureResultOf(self.push(order("ORD23"), wait=True), FHIRError)
        self.assertEqual(f.value.status, 503)

    def test_a_delivered_push_shows_where_its_time_went(self) -> None:
        d = self.push(order("ORD40"), wait=True)
        self.clock.advance(0.25)
        [request] = self.sent()
        self.answer(request, "MSH|^~\\&|LIS\rMSA|AA|ORD40")
        push = self.successResultOf(d).push
        self.assertEqual(list(push.timeline), ["received", "journaled", "sent", "answered"])
        self.assertEqual(push.timeline["answered"] - push.timeline["received"], 0.25)
        stored = self.successResultOf(self.journal.current(push.id))
        self.assertEqual(stored.timeline, push.timeline)
        self.assertEqual([s["stage"] for s in stored.to_json()["timeline"]],
                         ["received", "journaled", "sent", "answered"])

    def test_the_agent_says_when_the_device_got_it(self) -> None:
        """
        Our agent's answer carries C{deviceMs} (how long the device took, on the agent's
        clock): the "device" stage is that long before "answered" on the relay's clock.  A
        number that does not fit since the push was sent (or is not a number) is ignored.
        """
        d = self.push(order("ORD41"), wait=True)
        self.clock.advance(0.5)
        [request] = self.sent()
        self.hub.frame_received(self.session, wire.encode({
            "type": wire.TRANSMIT_RESPONSE, "remote": request["remote"],
            "callback": request["callback"], "contentType": HL7_V2, "statusCode": 200,
            "body": "MSH|^~\\&|LIS\rMSA|AA|ORD41", wire.DEVICE_MS: 200}))
        push = self.successResultOf(d).push
        self.assertEqual(list(push.timeline),
                         ["received", "journaled", "sent", "device", "answered"])
        self.assertAlmostEqual(push.timeline["answered"] - push.timeline["device"], 0.2)
        stored = self.successResultOf(self.journal.current(push.id))
        self.assertEqual([s["stage"] for s in stored.to_json()["timeline"]],
                         ["received", "journaled", "sent", "device", "answered"])
        for i, bogus in enumerate((-1, 501, "200", True, None, 1e308)):
            d = self.push(order(f"ORD5{i}"), wait=True)
            self.clock.advance(0.5)
            request = self.sent()[-1]
            self.hub.frame_received(self.session, wire.encode({
                "type": wire.TRANSMIT_RESPONSE, "remote": request["remote"],
                "callback": request["callback"], "contentType": HL7_V2, "statusCode": 200,
                "body": "MSH|^~\\&|LIS\rMSA|AA|x", wire.DEVICE_MS: bogus}))
            self.assertNotIn("device", self.successResultOf(d).push.timeline, bogus)

    def test_a_repeat_journaled_by_another_node_meanwhile(self) -> None:
        """
        Two relay nodes (two L{PushService}s, each with its own in-memory guard) on one
        journal: the second node's lookups run while the first node's write is uncommitted,
        so only the journal's own check at insert can see the repeat.
        """
        node_b = PushService(self.hub, self.store, self.journal, self.clock)

        def push_b(body: str, who: Any, key: str | None) -> Deferred:
            payload = {"destination": f"Device/{self.device['id']}", "contentType": HL7_V2,
                       "body": body, "waitForResponse": False}
            return node_b.push(who, (self.agent["id"], None), payload, key)

        with self.db.hold():
            first = self.push(order("ORD30"), key="n1")
            same_key = push_b(order("ORD30"), self.alice, "n1")
            same_message = push_b(order("ORD30"), self.bob, None)
            conflict = push_b(order("ORD30", test="K^Potassium"), self.alice, "n1")
        pushed = self.successResultOf(first).push
        for d in (same_key, same_message):
            result = self.successResultOf(d)
            self.assertEqual((result.push.id, result.duplicate), (pushed.id, True))
        self.assertEqual(self.failureResultOf(conflict, FHIRError).value.status, 409)
        self.assertEqual([r["pushId"] for r in self.sent()], [pushed.id])
        self.assertEqual([p.id for p in self.successResultOf(self.journal.search({}))],
                         [pushed.id])
        self.assertEqual(self.hub._pending_pushes, {})

    # -- defect 3: callers -------------------------------------------------------------------

    def test_idempotency_keys_are_scoped_to_the_caller(self) -> None:
        d = self.push("H|\\^&\rO|1|ALICE", key="shared-key", content_type=ASTM, wait=True)
        self.answer(self.sent()[0], "alice's answer")
        alice = self.successResultOf(d)
        # Bob guessed Alice's key: he gets a push of his own, never her state or her answer.
        d = self.push("H|\\^&\rO|1|BOB", who=self.bob, key="shared-key", content_type=ASTM,
                      wait=True)
        self.assertEqual(len(self.sent()), 2)
        self.answer(self.sent()[1], "bob's answer")
        bob = self.successResultOf(d)
        self.assertNotEqual(bob.push.id, alice.push.id)
        self.assertFalse(bob.duplicate)
        self.assertEqual(bob.push.reply_body, "bob's answer")
        self.assertEqual(bob.push.requester, self.bob.client_id)
        # the same bytes under "her" key are still his own push (keys are not shared)
        again = self.successResultOf(self.push("H|\\^&\rO|1|ALICE", who=self.bob,
                                               key="shared-key-2", content_type=ASTM))
        self.assertFalse(again.duplicate)
        # and Bob's own key reused for another body is his 409, not hers
        f = self.failureResultOf(self.push("H|\\^&\rO|1|BOB2", who=self.bob, key="shared-key",
                                           content_type=ASTM), FHIRError)
        self.assertIn(bob.push.id, f.value.message)
        self.assertNotIn(alice.push.id, f.value.message)

    def test_same_message_from_two_callers_on_the_agent_is_a_repeat(self) -> None:
        """Documented choice: identical bytes to the same device are one message, whoever sends."""
        first = self.successResultOf(self.push(order("ORD11"), key="alice-1"))
        again = self.successResultOf(self.push(order("ORD11"), who=self.bob, key="bob-1"))
        self.assertEqual((again.push.id, again.duplicate), (first.push.id, True))
        self.assertEqual(len(self.sent()), 1)

    def test_caller_not_allowed_on_the_agent_never_sees_a_push(self) -> None:
        self.successResultOf(self.push(order("ORD12"), key="k12"))
        stranger = self.principal("pusher", ["another-agent"])
        for key in ("k12", None):
            f = self.failureResultOf(self.push(order("ORD12"), who=stranger, key=key),
                                     FHIRError)
            self.assertEqual(f.value.status, 403)
        self.assertEqual(len(self.sent()), 1)

    def test_bad_idempotency_key(self) -> None:
        for key in ("x" * 256, "tab\there", ""):
            f = self.failureResultOf(self.push(order("ORD13"), key=key), FHIRError)
            self.assertEqual(f.value.status, 400)
            self.assertIn("Idempotency-Key", f.value.message)
        self.assertEqual(self.sent(), [])


class HostileNumbers(SynchronousTestCase):
    """Defect 5: every number of a push is finite and within its documented bounds."""

    base = {"destination": "Device/d", "contentType": "x", "body": "b"}

    def refused(self, name: str, value: Any) -> None:
        for payload in ({**self.base, name: value},
                        {"resourceType": "Parameters", "parameter": [
                            {"name": k, "valueString": v} for k, v in self.base.items()]
                         + [{"name": name, "valueDecimal": value}]}):
            e = self.assertRaises(FHIRError, parse_push_body, payload)
            self.assertEqual(e.status, 400, (name, value))

    def test_ttl(self) -> None:
        for value in (json.loads("1e309"), float("nan"), float("-inf"), "NaN", "Infinity",
                      "1e309", -5, 0, MAX_TTL_S + 1, 1e300, 10 ** 400, True, "soon", [1]):
            self.refused("ttl", value)
        self.assertEqual(parse_push_body({**self.base, "ttl": 60.5}).expires_in, 60.5)
        self.assertEqual(parse_push_body({**self.base, "ttl": str(MAX_TTL_S)}).expires_in,
                         MAX_TTL_S)

    def test_wait_timeout(self) -> None:
        for value in (json.loads("1e309"), float("nan"), "NaN", "Infinity", "-Infinity",
                      10 ** 400, 1e300, -1, 55001, 1.5, False):
            self.refused("waitTimeout", value)
        self.assertEqual(parse_push_body({**self.base, "waitTimeout": "2000"}).wait_timeout_ms,
                         2000)
        self.assertEqual(parse_push_body({**self.base, "waitTimeout": 3000.0}).wait_timeout_ms,
                         3000)

    def test_json_body_with_non_finite_numbers(self) -> None:
        e = self.assertRaises(FHIRError, parse_push_body,
                              {**self.base, "body": {"value": float("inf")}})
        self.assertEqual(e.status, 400)

    def test_text_that_is_not_unicode(self) -> None:
        e = self.assertRaises(FHIRError, parse_push_body, {**self.base, "body": "a\ud800b"})
        self.assertEqual((e.status, e.message), (400, "body is not valid Unicode text"))


OLD_SCHEMA = """
CREATE TABLE pushes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    remote TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    reply_status INTEGER,
    reply_content_type TEXT,
    reply_body TEXT
);
CREATE INDEX pushes_open ON pushes (agent_id, state, seq);
CREATE INDEX pushes_agent_seq ON pushes (agent_id, seq);
CREATE INDEX pushes_idem ON pushes (agent_id, remote, idempotency_key);
"""


class JournalMigration(SynchronousTestCase):
    """An existing relay.sqlite of an older relay opens, upgraded, with its pushes intact."""

    def setUp(self) -> None:
        folder = tempfile.mkdtemp(prefix="medagent-migrate-")
        self.path = os.path.join(folder, "relay.sqlite")
        self.now = time.time()
        conn = sqlite3.connect(self.path)
        conn.executescript(OLD_SCHEMA)
        rows = [
            ("old-hl7", HL7_V2, order("OLD1"), "msh10:OLD1", self.now - 60),
            ("old-keyed", ASTM, "H|\\^&", "client-key", self.now - 60),
            ("ancient", HL7_V2, order("OLD2"), "msh10:OLD2", self.now - 3 * 86400),
        ]
        for push_id, ctype, body, key, created in rows:
            conn.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " idempotency_key, state, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (push_id, "a1", "Device/d", "mllp://h:1", ctype, body, key, "delivered",
                 created, created))
        conn.commit()
        conn.close()

    def open(self) -> SQLiteJournal:
        clock = InlineReactor()
        clock.advance(self.now)
        db = Database(clock, self.path, schema=SQLiteJournal.schema(),
                      threadpool=InlineThreadPool(), migrations=[SQLiteJournal.migrate])
        db.start()
        self.addCleanup(db.stop)
        return SQLiteJournal(db, clock=clock)

    def test_upgrade(self) -> None:
        journal = self.open()
        old = self.successResultOf(journal.get("old-hl7"))
        self.assertEqual((old.control_id, old.idempotency_key, old.body_hash),
                         ("OLD1", None, message_hash(HL7_V2, order("OLD1"))))
        found = self.successResultOf(journal.find_same_message(
            "a1", "mllp://h:1", "OLD1", message_hash(HL7_V2, order("OLD1"))))
        self.assertEqual(found.id, "old-hl7")
        keyed = self.successResultOf(journal.get("old-keyed"))
        self.assertEqual((keyed.idempotency_key, keyed.body_hash),
                         ("client-key", message_hash(ASTM, "H|\\^&")))
        # outside the window nothing is rewritten (the upgrade stays cheap)
        ancient = self.successResultOf(journal.get("ancient"))
        self.assertEqual((ancient.idempotency_key, ancient.body_hash), ("msh10:OLD2", None))
        # new pushes are written with the new columns
        p = self.successResultOf(journal.create(Push(
            id="new", agent_id="a1", destination="d", remote="mllp://h:1", content_type=HL7_V2,
            body=order("NEW1"), requester="c1", control_id="NEW1", body_hash="h")))
        self.assertEqual(self.successResultOf(journal.get("new")).control_id, "NEW1")
        self.assertEqual(self.successResultOf(journal.find_by_key("c1", "x")), None)
        self.assertGreater(p.seq, 3)
        conn = sqlite3.connect(self.path)
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(pushes)")}
        conn.close()
        self.assertTrue({"pushes_key", "pushes_message", "pushes_control", "pushes_accession",
                         "pushes_state_updated"} <= indexes, indexes)
        # the console's columns (issue 12): there, empty for old pushes, written for new ones
        self.assertEqual((old.accession, old.resent_from), (None, None))
        self.successResultOf(journal.create(Push(
            id="resent", agent_id="a1", destination="d", remote="mllp://h:1",
            content_type=HL7_V2, body=order("NEW1"), accession="ACC1", resent_from="new")))
        again = self.successResultOf(journal.get("resent"))
        self.assertEqual((again.accession, again.resent_from), ("ACC1", "new"))
        self.assertNotIn("pushes_idem", indexes)

    def test_upgrade_twice_is_harmless(self) -> None:
        self.open()
        journal = self.open()
        self.assertEqual(self.successResultOf(journal.get("old-hl7")).control_id, "OLD1")

    def test_new_file(self) -> None:
        os.unlink(self.path)
        journal = self.open()
        self.assertEqual(self.successResultOf(journal.search({})), [])


class ExistingRelayFile(TestCase):
    """The relay service itself opens a relay.sqlite written by an older relay."""

    timeout = 60

    def test_relay_upgrades_and_recognises_an_old_push(self) -> Deferred:
        async def go() -> None:
            data_dir = tempfile.mkdtemp(prefix="relay-old-")
            conn = sqlite3.connect(os.path.join(data_dir, "relay.sqlite"))
            conn.executescript(OLD_SCHEMA)
            conn.execute(
                "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body,"
                " idempotency_key, state, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                ("before-upgrade", "lab-1", "d", "mllp://127.0.0.1:9", HL7_V2, order("UPG1"),
                 "msh10:UPG1", "delivered", time.time(), time.time()))
            conn.commit()
            conn.close()
            relay = RelayService(reactor, data_dir=data_dir, listen="tcp:0:interface=127.0.0.1")
            relay.startService()
            self.addCleanup(relay.stopService)
            await relay.store.update({"resourceType": "Agent", "id": "lab-1", "name": "A"})
            client = await relay.authority.create_client("admin")
            token = await relay.authority.issue_token(client["clientId"], client["clientSecret"])
            admin = relay.authority.verify_token(token["access_token"])
            body = {"destination": "mllp://127.0.0.1:9", "contentType": HL7_V2,
                    "body": order("UPG1")}
            result = await relay.pushes.push(admin, ("lab-1", None), body)
            self.assertEqual((result.push.id, result.duplicate), ("before-upgrade", True))
            other = await relay.pushes.push(admin, ("lab-1", None),
                                            dict(body, body=order("UPG1", test="K^Potassium")))
            self.assertFalse(other.duplicate)

        return ensureDeferred(go())


class RelayHTTP(TestCase):
    """The HTTP API in-process on loopback (real reactor, real SQLite, no agent connected)."""

    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-push-")
        self.agent = await self.relay.store.create({"resourceType": "Agent", "name": "A"})
        self.device = await self.relay.store.create({"resourceType": "Device",
                                                     "url": "mllp://127.0.0.1:1"})
        self.token = await self.get_token(await self.relay.authority.create_client("admin"))
        self.path = f"/fhir/R4/Agent/{self.agent['id']}/$push"

    async def get_token(self, client: dict[str, Any]) -> str:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": client["clientId"],
            "client_secret": client["clientSecret"]}, pool=self.pool)
        return (await r.json())["access_token"]

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None, token: str | None = None):
        hdrs = {"Content-Type": ["application/fhir+json"],
                "Authorization": [f"Bearer {token or self.token}"]}
        for k, v in (headers or {}).items():
            hdrs[k] = [v]
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        if path.startswith("http"):
            path = path[len(self.base):]
        r = await treq.request(method, self.base + path, data=data, headers=hdrs, pool=self.pool)
        content = await r.content()
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = content.decode("utf-8", "replace")
        return r.code, parsed, r.headers

    def body(self, text: str, **kw: Any) -> dict[str, Any]:
        return {"destination": f"Device/{self.device['id']}", "contentType": HL7_V2,
                "body": text, **kw}

    def test_same_control_id_other_body_and_key_conflict(self) -> Deferred:
        async def go() -> None:
            code, _, h1 = await self.call("POST", self.path, self.body(order("H1")))
            self.assertEqual(code, 202)
            code, _, h2 = await self.call("POST", self.path,
                                          self.body(order("H1", test="K^Potassium")))
            self.assertEqual(code, 202)
            self.assertIsNone(h2.getRawHeaders("x-medagent-duplicate"))
            self.assertNotEqual(h1.getRawHeaders("x-medagent-push-id"),
                                h2.getRawHeaders("x-medagent-push-id"))
            # the same message again (with a key of its own): a repeat
            code, _, h3 = await self.call("POST", self.path, self.body(order("H1")),
                                          headers={"Idempotency-Key": "attempt-2"})
            self.assertEqual(h3.getRawHeaders("x-medagent-duplicate"), ["true"])
            self.assertEqual(h3.getRawHeaders("x-medagent-push-id"),
                             h1.getRawHeaders("x-medagent-push-id"))
            # a key used for a new message, then for another one: 409
            code, outcome, _ = await self.call("POST", self.path, self.body(order("H2")),
                                               headers={"Idempotency-Key": "key-a"})
            self.assertEqual(code, 202)
            code, outcome, _ = await self.call("POST", self.path, self.body(order("H3")),
                                               headers={"Idempotency-Key": "key-a"})
            self.assertEqual(code, 409)
            # the key that came with the repeat now names that push, too
            code, outcome, _ = await self.call("POST", self.path, self.body(order("H4")),
                                               headers={"Idempotency-Key": "attempt-2"})
            self.assertEqual(code, 409)
            self.assertEqual(outcome["resourceType"], "OperationOutcome")
            self.assertEqual(outcome["issue"][0]["code"], "conflict")
            self.assertIn("Idempotency-Key", outcome["issue"][0]["details"]["text"])
            code, bundle, _ = await self.call(
                "GET", f"/fhir/R4/AgentPush?agent={self.agent['id']}")
            self.assertEqual(bundle["total"], 3)

        return ensureDeferred(go())

    def test_hostile_ttl_refused_and_lists_still_work(self) -> Deferred:
        async def go() -> None:
            template = json.dumps(self.body(order("T1")))[:-1]
            for literal in (b"1e309", b"NaN", b"Infinity", b"-Infinity", b"1e300", b"-1",
                            b'"NaN"', b'"Infinity"', b'"1e309"'):
                code, outcome, _ = await self.call(
                    "POST", self.path, raw=template.encode() + b', "ttl": ' + literal + b"}")
                self.assertEqual(code, 400, (literal, outcome))
                self.assertEqual(outcome["resourceType"], "OperationOutcome")
                # refused as a bad ttl, or earlier as JSON that is no JSON number (NaN...)
                text = outcome["issue"][0]["details"]["text"]
                self.assertTrue("ttl" in text or "not a JSON number" in text, text)
            params = {"resourceType": "Parameters", "parameter": [
                {"name": "destination", "valueString": f"Device/{self.device['id']}"},
                {"name": "contentType", "valueString": HL7_V2},
                {"name": "body", "valueString": order("T2")}]}
            raw = json.dumps(params)[:-2].encode()
            for literal in (b"1e309", b"NaN", b"Infinity", b"-Infinity", b'"NaN"'):
                for name in (b"ttl", b"waitTimeout"):
                    code, outcome, _ = await self.call(
                        "POST", self.path,
                        raw=raw + b', {"name": "' + name + b'", "valueDecimal": ' + literal
                        + b"}]}")
                    self.assertEqual(code, 400, (name, literal, outcome))
            code, bundle, _ = await self.call(
                "GET", f"/fhir/R4/AgentPush?agent={self.agent['id']}")
            self.assertEqual((code, bundle["total"]), (200, 0))

        return ensureDeferred(go())

    def test_bad_stored_values_do_not_break_reads(self) -> Deferred:
        async def go() -> None:
            ids = []
            for n in range(3):
                code, _, headers = await self.call("POST", self.path, self.body(order(f"B{n}")))
                ids.append(headers.getRawHeaders("x-medagent-push-id")[0])

            def damage(conn: Any) -> None:
                conn.execute("UPDATE pushes SET expires_at=? WHERE id=?", (math.inf, ids[0]))
                conn.execute("UPDATE pushes SET expires_at=?, created=? WHERE id=?",
                             (1e300, -1e300, ids[1]))
                conn.execute("UPDATE pushes SET options='{not json' WHERE id=?", (ids[2],))

            await self.relay.db.run(damage)
            code, bundle, _ = await self.call(
                "GET", f"/fhir/R4/AgentPush?agent={self.agent['id']}")
            self.assertEqual(code, 200, bundle)
            self.assertEqual(sorted(e["resource"]["id"] for e in bundle["entry"]), sorted(ids))
            for push_id in ids:
                code, doc, _ = await self.call("GET", f"/fhir/R4/AgentPush/{push_id}")
                self.assertEqual((code, doc["state"]), (200, "queued"))
                self.assertNotIn("expiresAt", doc)

        return ensureDeferred(go())

    def test_push_list_pages(self) -> Deferred:
        async def go() -> None:
            ids = []
            for n in range(7):
                code, _, headers = await self.call("POST", self.path, self.body(order(f"P{n}")))
                ids.append(headers.getRawHeaders("x-medagent-push-id")[0])
            newest_first = list(reversed(ids))
            url = f"/fhir/R4/AgentPush?agent=Agent/{self.agent['id']}&state=queued&_count=3"
            seen: list[str] = []
            totals = []
            pages = 0
            while url:
                code, bundle, _ = await self.call("GET", url)
                self.assertEqual(code, 200, bundle)
                pages += 1
                totals.append(bundle["total"])
                seen += [e["resource"]["id"] for e in bundle["entry"]]
                links = {link["relation"]: link["url"] for link in bundle["link"]}
                url = links.get("next")
                if pages == 1:
                    # a push written while the list is walked does not shift the pages
                    await self.call("POST", self.path, self.body(order("LATE")))
                    query = urlsplit(url).query
                    self.assertIn("state=queued", query)
                    self.assertIn("_count=3", query)
            self.assertEqual(seen, newest_first)
            self.assertEqual(pages, 3)
            self.assertEqual(totals, [7, 8, 8])
            code, bundle, _ = await self.call(
                "GET", f"/fhir/R4/AgentPush?agent={self.agent['id']}&_count=0")
            self.assertEqual((bundle["total"], bundle["entry"]), (8, []))
            self.assertNotIn("next", [link["relation"] for link in bundle["link"]])
            code, bundle, _ = await self.call("GET", f"/fhir/R4/AgentPush?agent={self.agent['id']}")
            self.assertEqual(len(bundle["entry"]), 8)

        return ensureDeferred(go())

    def test_push_list_beyond_a_thousand(self) -> Deferred:
        async def go() -> None:
            await gatherResults([self.relay.journal.create(Push(
                id=f"bulk-{n:05d}", agent_id=self.agent["id"], destination="d",
                remote="mllp://127.0.0.1:1", content_type=HL7_V2, body="MSH"))
                for n in range(1001)])
            path = f"/fhir/R4/AgentPush?agent={self.agent['id']}&_count=1000"
            code, bundle, _ = await self.call("GET", path)
            self.assertEqual((code, bundle["total"], len(bundle["entry"])), (200, 1001, 1000))
            links = {link["relation"]: link["url"] for link in bundle["link"]}
            code, rest, _ = await self.call("GET", links["next"])
            self.assertEqual([e["resource"]["id"] for e in rest["entry"]], ["bulk-00000"])
            code, bundle, _ = await self.call("GET", f"/fhir/R4/AgentPush?agent={self.agent['id']}")
            self.assertEqual(len(bundle["entry"]), 100)  # the default page

        return ensureDeferred(go())

    def test_push_list_bad_paging_parameters(self) -> Deferred:
        async def go() -> None:
            base = f"/fhir/R4/AgentPush?agent={self.agent['id']}"
            for query in ("_count=abc", "_count=-1", "_count=1001", "_count=1e3",
                          "_count=%EF%BC%91", "_count=" + "9" * 5000, "_cursor=x", "_cursor=0",
                          "_cursor=-5"):
                code, outcome, _ = await self.call("GET", f"{base}&{query}")
                self.assertEqual(code, 400, (query, outcome))
                self.assertEqual(outcome["resourceType"], "OperationOutcome")

        return ensureDeferred(go())


class DeviceGetsBothOrders(TestCase):
    """
    Real ``twistd`` relay and agent, python-hl7's MLLP listener as the device: two orders with
    one control id both reach the device, once each, in order; the real repeat does not.
    """

    timeout = 120

    def test_two_orders_one_control_id(self) -> Deferred:
        async def go() -> None:
            relay, admin = await procs.relay_with_admin(self)
            agent = await admin.create({"resourceType": "Agent", "name": "Lab agent",
                                        "status": "active"})
            creds = relay.create_client("agent", [agent["id"]])
            port = procs.free_port()
            device_proc = procs.python(
                self, "python-hl7-server",
                [os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(port)])
            await device_proc.wait_for("MLLP server on", timeout=20)
            device = await admin.create({"resourceType": "Device",
                                         "url": f"mllp://127.0.0.1:{port}"})
            procs.agent_process(self, relay.url, creds, agent["id"])

            async def connected() -> bool:
                params = await admin.request_json("GET", f"/fhir/R4/Agent/{agent['id']}/$status")
                return params["parameter"][0]["valueCode"] == "connected"

            await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")
            token = await admin.access_token()

            async def push(body: str, key: str | None = None):
                headers = {"Content-Type": ["application/json"],
                           "Authorization": [f"Bearer {token}"]}
                if key:
                    headers["Idempotency-Key"] = [key]
                r = await treq.post(
                    f"{relay.url}/fhir/R4/Agent/{agent['id']}/$push",
                    data=json.dumps({"destination": f"Device/{device['id']}",
                                     "contentType": HL7_V2, "body": body,
                                     "waitForResponse": True}).encode(),
                    headers=headers, pool=admin.pool)
                return r.code, (await r.content()).decode(), r.headers

            glucose = order("SAME0001", test="GLU^Glucose")
            potassium = order("SAME0001", test="K^Potassium")
            code, text, _ = await push(glucose)
            self.assertEqual(code, 200, text)
            self.assertIn("MSA|AA|SAME0001", text)
            code, text, headers = await push(potassium)
            self.assertEqual(code, 200, text)
            self.assertIsNone(headers.getRawHeaders("x-medagent-duplicate"))
            # the first order again, under a fresh key: recognised, not sent a third time
            code, text, headers = await push(glucose, key="retry-1")
            self.assertEqual((code, headers.getRawHeaders("x-medagent-duplicate")),
                             (200, ["true"]))
            code, text, _ = await push(order("SAME0002"), key="retry-1")
            self.assertEqual(code, 409, text)
            await device_proc.wait_for("K^Potassium", timeout=10)
            log = device_proc.text
            self.assertEqual(device_proc.count("RECV from"), 2)
            self.assertEqual(log.count("GLU^Glucose"), 1)
            self.assertEqual(log.count("K^Potassium"), 1)
            self.assertLess(log.index("GLU^Glucose"), log.index("K^Potassium"))
            self.assertNotIn("SAME0002", log)

        return ensureDeferred(go())
