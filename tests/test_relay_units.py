"""
Units for the relay's application objects: wire codec, store, auth, journal, push parsing.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.auth import Authority, Principal
from medagent.relay.push import hl7_control_id, parse_push_body
from medagent.storage import journal as j
from medagent.storage.journal import Push
from medagent.storage.resources import search_one
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.store import SQLiteStore
from tests.fakes import InlineReactor, inline_database


def result_of(testcase: SynchronousTestCase, d):
    return testcase.successResultOf(d)


class WireTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        msg = {"type": wire.TRANSMIT_REQUEST, "remote": "mllp://h:1", "contentType": "x",
               "body": "MSH|ü", "callback": "c1"}
        self.assertEqual(wire.decode(wire.encode(msg)), msg)

    def test_not_json(self) -> None:
        e = self.assertRaises(wire.WireError, wire.decode, b"{nope")
        self.assertIn("not JSON", e.reason)

    def test_not_object(self) -> None:
        self.assertRaises(wire.WireError, wire.decode, b"[1,2]")

    def test_unknown_type_keeps_callback(self) -> None:
        e = self.assertRaises(wire.WireError, wire.decode, b'{"type":"x:y","callback":"cb"}')
        self.assertEqual(e.reason, "Unknown message type: x:y")
        self.assertEqual(e.callback, "cb")

    def test_alias(self) -> None:
        self.assertEqual(wire.decode(b'{"type":"connected"}')["type"], wire.CONNECT_RESPONSE)

    def test_missing_required(self) -> None:
        e = self.assertRaises(wire.WireError, wire.decode,
                              b'{"type":"agent:connect:request","agentId":"a"}')
        self.assertEqual(e.reason, "Missing accessToken")

    def test_too_large(self) -> None:
        e = self.assertRaises(wire.WireError, wire.decode, b"x" * 101, 100)
        self.assertIn("too large", e.reason)

    def test_empty_body_allowed(self) -> None:
        msg = wire.decode(b'{"type":"agent:error","body":""}')
        self.assertEqual(msg["body"], "")


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SQLiteStore(inline_database(self, SQLiteStore.schema()))

    def test_create_read_update_delete(self) -> None:
        created = result_of(self, self.store.create(
            {"resourceType": "Device", "url": "mllp://10.1.2.3:2575",
             "identifier": [{"system": "urn:lab", "value": "cobas-1"}]}))
        self.assertEqual(created["meta"]["versionId"], "1")
        self.assertEqual(result_of(self, self.store.read("Device", created["id"])), created)
        created["url"] = "mllp://10.1.2.4:2575"
        updated = result_of(self, self.store.update(created))
        self.assertEqual(updated["meta"]["versionId"], "2")
        result_of(self, self.store.delete("Device", created["id"]))
        f = self.failureResultOf(self.store.read("Device", created["id"]), FHIRError)
        self.assertEqual(f.value.status, 404)

    def test_if_match_conflict(self) -> None:
        created = result_of(self, self.store.create({"resourceType": "Agent", "name": "A"}))
        f = self.failureResultOf(self.store.update(created, if_match='W/"7"'), FHIRError)
        self.assertEqual(f.value.status, 412)

    def test_search(self) -> None:
        for name, value, status in (("Lab A", "a", "active"), ("Lab B", "b", "off")):
            result_of(self, self.store.create({
                "resourceType": "Agent", "name": name, "status": status,
                "identifier": [{"system": "urn:site", "value": value}]}))
        by_ident = result_of(self, self.store.search("Agent", {"identifier": ["urn:site|b"]}))
        self.assertEqual([a["name"] for a in by_ident], ["Lab B"])
        by_value = result_of(self, self.store.search("Agent", {"identifier": ["a"]}))
        self.assertEqual([a["name"] for a in by_value], ["Lab A"])
        by_name = result_of(self, self.store.search("Agent", {"name": ["lab"]}))
        self.assertEqual(len(by_name), 2)
        by_status = result_of(self, self.store.search("Agent", {"status": ["off,active"],
                                                                 "name": ["lab b"]}))
        self.assertEqual([a["name"] for a in by_status], ["Lab B"])
        f = self.failureResultOf(self.store.search("Agent", {"bogus": ["1"]}), FHIRError)
        self.assertEqual(f.value.status, 400)
        one = self.failureResultOf(search_one(self.store, "Agent", {"name": ["lab"]}), FHIRError)
        self.assertEqual(one.value.status, 400)

    def test_wrong_type(self) -> None:
        self.assertRaises(FHIRError, self.store.create, {"resourceType": "Nope"})


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.db = inline_database(self, SQLiteClientRegistry.schema())
        self.auth = Authority(SQLiteClientRegistry(self.db), b"k" * 32)

    def test_token_round_trip(self) -> None:
        client = result_of(self, self.auth.create_client("pusher", ["a1"]))
        token = result_of(self, self.auth.issue_token(client["clientId"], client["clientSecret"]))
        principal = self.auth.authenticate("Bearer " + token["access_token"])
        self.assertEqual(principal, Principal(client["clientId"], "pusher", frozenset(["a1"])))
        self.assertTrue(principal.can_push("a1"))
        self.assertFalse(principal.can_push("a2"))
        self.assertFalse(principal.can_act_as("a1"))

    def test_secret_not_stored(self) -> None:
        client = result_of(self, self.auth.create_client("admin"))
        rows = self.db.run_sync(lambda c: [tuple(r) for r in c.execute("SELECT * FROM clients")])
        self.assertNotIn(client["clientSecret"], repr(rows))

    def test_wrong_secret(self) -> None:
        client = result_of(self, self.auth.create_client("admin"))
        f = self.failureResultOf(self.auth.issue_token(client["clientId"], "nope"), FHIRError)
        self.assertEqual(f.value.status, 401)

    def test_bad_tokens(self) -> None:
        for header in (None, "", "Basic x", "Bearer ", "Bearer abc"):
            e = self.assertRaises(FHIRError, self.auth.authenticate, header)
            self.assertEqual(e.status, 401)

    def test_expired(self) -> None:
        class Frozen:
            now = 1_000_000.0

            def time(self):
                return self.now

        clock = Frozen()
        auth = Authority(SQLiteClientRegistry(self.db), b"k" * 32, token_lifetime=10, clock=clock)
        client = result_of(self, auth.create_client("admin"))
        token = result_of(self, auth.issue_token(client["clientId"], client["clientSecret"]))
        auth.verify_token(token["access_token"])
        clock.now += 16
        e = self.assertRaises(FHIRError, auth.verify_token, token["access_token"])
        self.assertEqual(e.message, "Access token expired")

    def test_agent_client_needs_one_agent(self) -> None:
        self.failureResultOf(self.auth.create_client("agent", []), FHIRError)
        client = result_of(self, self.auth.create_client("agent", ["x"]))
        token = result_of(self, self.auth.issue_token(client["clientId"], client["clientSecret"]))
        p = self.auth.verify_token(token["access_token"])
        self.assertTrue(p.can_act_as("x"))
        self.assertFalse(p.can_act_as("y"))
        self.assertFalse(p.can_push("x"))

    def _counting_decodes(self) -> list[str]:
        from medagent.relay import auth as auth_module

        decoded: list[str] = []
        real = auth_module.jwt.decode

        def decode(token: str, *args: Any, **kw: Any) -> Any:
            decoded.append(token)
            return real(token, *args, **kw)

        self.patch(auth_module.jwt, "decode", decode)
        return decoded

    def test_verified_token_not_decoded_again(self) -> None:
        """A heartbeat's token (the same each time) costs one signature check, not one each."""
        decoded = self._counting_decodes()
        client = result_of(self, self.auth.create_client("agent", ["x"]))
        token = result_of(self, self.auth.issue_token(client["clientId"],
                                                      client["clientSecret"]))["access_token"]
        first = self.auth.verify_token(token)
        self.assertEqual(self.auth.verify_token(token), first)
        self.assertEqual(self.auth.verify_token(token).expires_at, first.expires_at)
        self.assertEqual(decoded, [token])

    def test_verified_tokens_bounded(self) -> None:
        decoded = self._counting_decodes()
        self.auth.verified_tokens = 2
        tokens = [self.auth.mint_token(Principal(f"c{i}", "agent", frozenset(["x"])), 60)
                  for i in range(3)]
        for token in tokens:
            self.auth.verify_token(token)
        self.auth.verify_token(tokens[2])
        self.auth.verify_token(tokens[0])  # the oldest was forgotten: decoded again
        self.assertEqual(decoded, tokens + [tokens[0]])

    def test_remembered_token_still_expires_and_is_revoked(self) -> None:
        class Frozen:
            now = 1_000_000.0

            def time(self) -> float:
                return self.now

        clock = Frozen()
        auth = Authority(SQLiteClientRegistry(self.db), b"k" * 32, token_lifetime=10,
                         clock=clock)
        client = result_of(self, auth.create_client("agent", ["x"]))
        token = result_of(self, auth.issue_token(client["clientId"],
                                                 client["clientSecret"]))["access_token"]
        auth.verify_token(token)
        auth.verify_token(token)
        clock.now += 16
        e = self.assertRaises(FHIRError, auth.verify_token, token)
        self.assertEqual(e.message, "Access token expired")
        other = result_of(self, auth.create_client("agent", ["y"]))
        token = result_of(self, auth.issue_token(other["clientId"],
                                                 other["clientSecret"]))["access_token"]
        auth.verify_token(token)
        result_of(self, auth.revoke_client(other["clientId"]))
        e = self.assertRaises(FHIRError, auth.verify_token, token)
        self.assertEqual(e.message, "Access token revoked")

    def test_remembered_token_of_a_retired_key_refused(self) -> None:
        self.auth.set_keys({"old": b"o" * 32, "new": b"n" * 32}, "old")
        token = self.auth.mint_token(Principal("c1", "agent", frozenset(["x"])), 60)
        self.auth.verify_token(token)
        self.auth.set_keys({"new": b"n" * 32}, "new")
        e = self.assertRaises(FHIRError, self.auth.verify_token, token)
        self.assertEqual(e.status, 401)

    def test_revoked(self) -> None:
        client = result_of(self, self.auth.create_client("admin"))
        result_of(self, self.auth.revoke_client(client["clientId"]))
        self.failureResultOf(self.auth.issue_token(client["clientId"], client["clientSecret"]),
                             FHIRError)


class JournalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = InlineReactor()
        self.reactor.advance(1_700_000_000)
        self.journal = SQLiteJournal(inline_database(self, SQLiteJournal.schema(), self.reactor),
                               clock=self.reactor)

    def push(self, key: str | None = None, agent: str = "a1", requester: str = "c1") -> Push:
        return result_of(self, self.journal.create(Push(
            id=self.journal.new_id(), agent_id=agent, destination="Device/d",
            remote="mllp://h:1", content_type="x", body="b", idempotency_key=key,
            requester=requester)))

    def test_create_and_transition(self) -> None:
        p = self.push()
        self.assertEqual(p.seq, 1)
        result_of(self, self.journal.transition(p, j.SENT, count_attempt=True))
        result_of(self, self.journal.transition(p, j.DELIVERED, reply=(200, "t", "ACK")))
        stored = result_of(self, self.journal.get(p.id))
        self.assertEqual((stored.state, stored.attempts, stored.reply_body),
                         (j.DELIVERED, 1, "ACK"))

    def test_open_pages_in_order(self) -> None:
        pushes = [self.push() for _ in range(5)]
        self.push(agent="other")
        page = result_of(self, self.journal.open_for_agent("a1", limit=3))
        self.assertEqual([p.id for p in page], [p.id for p in pushes[:3]])
        page2 = result_of(self, self.journal.open_for_agent("a1", after_seq=page[-1].seq))
        self.assertEqual([p.id for p in page2], [p.id for p in pushes[3:]])

    def test_idempotency_window(self) -> None:
        p = self.push(key="k1")
        found = result_of(self, self.journal.find_by_key("c1", "k1"))
        self.assertEqual(found.id, p.id)
        # Keys are scoped to the caller who sent them.
        self.assertIsNone(result_of(self, self.journal.find_by_key("c2", "k1")))
        self.reactor.advance(j.IDEMPOTENCY_WINDOW + 1)
        self.assertIsNone(result_of(self, self.journal.find_by_key("c1", "k1")))

    def test_counts(self) -> None:
        self.push()
        p = self.push()
        result_of(self, self.journal.transition(p, j.FAILED, error="x"))
        counts = result_of(self, self.journal.counts("a1"))
        self.assertEqual((counts["queued"], counts["failed"]), (1, 1))

    def test_expire_and_prune(self) -> None:
        p = self.push()
        p.expires_at = None
        q = result_of(self, self.journal.create(Push(
            id=self.journal.new_id(), agent_id="a1", destination="d", remote="r",
            content_type="x", body="b", expires_at=self.reactor.seconds() + 5)))
        self.reactor.advance(6)
        self.assertEqual(result_of(self, self.journal.expire_overdue()), 1)
        self.assertEqual(result_of(self, self.journal.get(q.id)).state, j.EXPIRED)
        self.assertEqual(result_of(self, self.journal.get(p.id)).state, j.QUEUED)
        self.assertEqual(result_of(self, self.journal.prune(10)), 0)
        self.reactor.advance(11)
        self.assertEqual(result_of(self, self.journal.prune(10)), 1)
        self.failureResultOf(self.journal.get(q.id), FHIRError)
        self.assertEqual(result_of(self, self.journal.get(p.id)).state, j.QUEUED)


class PushBodyTests(SynchronousTestCase):
    def test_plain_json(self) -> None:
        r = parse_push_body({"destination": "Device/d", "contentType": "x", "body": "b",
                             "waitForResponse": True, "waitTimeout": 5000})
        self.assertEqual((r.destination, r.wait, r.wait_timeout_ms), ("Device/d", True, 5000))

    def test_parameters_any_value(self) -> None:
        r = parse_push_body({"resourceType": "Parameters", "parameter": [
            {"name": "destination", "valueString": "Device/d"},
            {"name": "contentType", "valueCode": "x-application/hl7-v2+er7"},
            {"name": "body", "valueString": "MSH"},
            {"name": "waitForResponse", "valueBoolean": True},
            {"name": "waitTimeout", "valueInteger": 2000}]})
        self.assertEqual((r.content_type, r.wait, r.wait_timeout_ms),
                         ("x-application/hl7-v2+er7", True, 2000))

    def test_errors(self) -> None:
        base = {"destination": "Device/d", "contentType": "x", "body": "b"}
        cases = [
            ({**base, "body": None}, "Missing body parameter"),
            ({k: v for k, v in base.items() if k != "contentType"}, "Missing contentType"),
            ({k: v for k, v in base.items() if k != "destination"}, "Missing destination"),
            ({**base, "waitTimeout": 60000}, "Invalid wait timeout"),
            ({**base, "waitTimeout": -1}, "Invalid wait timeout"),
            ({**base, "waitTimeout": "soon"}, "Invalid wait timeout"),
            ({**base, "waitForResponse": "maybe"}, "waitForResponse"),
            ({**base, "returnAck": "never"}, "returnAck"),
            ([1], "JSON object"),
        ]
        for payload, text in cases:
            e = self.assertRaises(FHIRError, parse_push_body, payload)
            self.assertEqual(e.status, 400)
            self.assertIn(text, e.message)

    def test_json_body_forwarded_as_text(self) -> None:
        r = parse_push_body({"destination": "d", "contentType": "application/json",
                             "body": {"a": 1}})
        self.assertEqual(json.loads(r.body), {"a": 1})

    def test_hl7_control_id(self) -> None:
        self.assertEqual(hl7_control_id("MSH|^~\\&|A|B|C|D|2024||ADT^A01|CTRL1|P|2.5\nPID|1"),
                         "CTRL1")
        self.assertEqual(hl7_control_id("MSH#^~\\&#A#B#C#D#2024##ADT^A01#X9#P#2.5"), "X9")
        for bad in ("PID|1", "MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5", "MSH|"):
            self.assertRaises(FHIRError, hl7_control_id, bad)

    def test_hl7_control_id_is_the_hl7_packages_msh10(self) -> None:
        """One MSH parser: the relay reads MSH-10 as the agent and the journal do."""
        from medagent.hl7 import message

        for text in ("MSH|^~\\&|A|B|C|D|2024||ADT^A01| CTRL1 |P|2.5\rPID|1",
                     "  MSH|^~\\&|A|B|C|D|2024||ADT^A01|C2\r\nPID|1",
                     "MSH|^~\\&|A|B|C|D|2024||ADT^A01|C3",
                     "MSH*^~\\&*A*B*C*D*2024**ADT^A01*C4*P*2.5\nPID*1"):
            first = text.lstrip().replace("\r\n", "\r").replace("\n", "\r")
            self.assertEqual(hl7_control_id(text), message.control_id(first))
        texts = {"PID|1": "HL7 message must start with an MSH segment",
                 "MSH|": "HL7 MSH segment is too short",
                 "MSH|^~\\&": "HL7 message has no MSH-10 (message control id)",
                 "MSH|^~\\&|A|B": "HL7 message has no MSH-10 (message control id)",
                 "MSH|^~\\&XYZ": "HL7 message has no MSH-10 (message control id)",
                 "MSH|^~\\&|A|B|C|D|2024||ADT^A01|  |P": "HL7 message has no MSH-10 "
                                                        "(message control id)"}
        for bad, text in texts.items():
            e = self.assertRaises(FHIRError, hl7_control_id, bad)
            self.assertEqual((e.status, e.message), (400, text))
        # separators the HL7 package refuses (a letter reads back as other segments) are
        # refused here too, with its reason, rather than journaled for the agent to reject
        e = self.assertRaises(FHIRError, hl7_control_id, "MSHa^~\\&aAaBaCaDa2024aaADTaX1")
        self.assertIn("separators must not be letters", e.message)

