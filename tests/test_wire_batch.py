"""
The ``batch`` extension: several agent⇄relay messages in one websocket frame
(``agent:batch``), only between peers that announced it; Medplum's agent keeps one message
per frame.  The codec and L{FrameBatcher} on a Clock; the hub and the agent app with fake
connections that batch as the real sockets do.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.agent.app import AgentApp
from medagent.agent.dispatch import Dispatcher
from medagent.agent.outbox import Outbox
from medagent.agent.queue import DurableQueue
from medagent.delivery import Reply
from tests.fakes import InlineReactor, inline_database
from tests.test_agent import FakeSender, Tokens
from tests.test_hub import FakeConnection, _HubCase


def frame_messages(frame: bytes) -> list[dict[str, Any]]:
    msg = wire.decode(frame)
    if msg["type"] != wire.BATCH:
        return [msg]
    items = wire.unbatch(msg)
    assert all(isinstance(i, dict) for i in items)
    return [i for i in items if isinstance(i, dict)]


class FrameBatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.frames: list[bytes] = []
        self.batcher = wire.FrameBatcher(self.clock, self.frames.append)

    def msg(self, i: int, body: str = "x") -> dict[str, Any]:
        return {"type": wire.TRANSMIT_CONFIRM, "pushId": f"p{i}", "body": body}

    def test_off_one_frame_per_message_at_once(self) -> None:
        for i in range(3):
            self.batcher.send(self.msg(i))
        self.assertEqual([json.loads(f)["pushId"] for f in self.frames], ["p0", "p1", "p2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_on_messages_of_one_turn_in_one_frame_in_order(self) -> None:
        self.batcher.enable()
        for i in range(5):
            self.batcher.send(self.msg(i))
        self.assertEqual(self.frames, [])  # written at the end of the turn
        self.clock.advance(0)
        [frame] = self.frames
        self.assertEqual(json.loads(frame)["type"], wire.BATCH)
        self.assertEqual([m["pushId"] for m in frame_messages(frame)],
                         [f"p{i}" for i in range(5)])
        self.assertEqual((self.batcher.frames, self.batcher.messages), (1, 5))

    def test_a_lone_message_is_a_plain_frame(self) -> None:
        self.batcher.enable()
        self.batcher.send(self.msg(1))
        self.clock.advance(0)
        self.assertEqual([json.loads(f) for f in self.frames],
                         [{"type": wire.TRANSMIT_CONFIRM, "pushId": "p1", "body": "x"}])

    def test_bounded_by_count_and_bytes_order_kept(self) -> None:
        self.batcher.enable()
        n = wire.MAX_BATCH + 3
        for i in range(n):
            self.batcher.send(self.msg(i))
        big = "B" * wire.BATCH_BYTES  # bigger than a batch may be: alone in its frame
        self.batcher.send(self.msg(n, big))
        self.batcher.send(self.msg(n + 1))
        self.clock.advance(0)
        sizes = [len(frame_messages(f)) for f in self.frames]
        self.assertEqual(sizes, [wire.MAX_BATCH, 3, 1, 1])
        self.assertTrue(all(len(f) <= wire.BATCH_BYTES for f in self.frames[:2]))
        order = [m["pushId"] for f in self.frames for m in frame_messages(f)]
        self.assertEqual(order, [f"p{i}" for i in range(n + 2)])

    def test_flush_writes_now_and_discard_drops(self) -> None:
        self.batcher.enable()
        self.batcher.send(self.msg(1))
        self.batcher.send(self.msg(2))
        self.batcher.flush()  # (before a close)
        self.assertEqual(len(self.frames), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.batcher.send(self.msg(3))
        self.batcher.discard()  # the connection is gone
        self.clock.advance(0)
        self.assertEqual(len(self.frames), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnbatchTests(SynchronousTestCase):
    def test_each_message_checked_as_a_frame(self) -> None:
        frame = wire.encode_batch([
            wire.encode({"type": wire.TRANSMIT_CONFIRM, "pushId": "p1"}),
            b'"not an object"',
            wire.encode({"type": "agent:nope", "callback": "c2"}),
            wire.encode({"type": wire.TRANSMIT_REQUEST, "callback": "c3"}),  # no remote
            wire.encode_batch([wire.encode({"type": wire.TRANSMIT_CONFIRM, "pushId": "p"})]),
            wire.encode({"type": wire.TRANSMIT_CONFIRM, "pushId": "p6"}),
        ])
        items = wire.unbatch(wire.decode(frame))
        self.assertEqual(items[0], {"type": wire.TRANSMIT_CONFIRM, "pushId": "p1"})
        errors = items[1:5]
        self.assertTrue(all(isinstance(e, wire.WireError) for e in errors))
        self.assertEqual([getattr(e, "callback", None) for e in errors], [None, "c2", "c3", None])
        self.assertIn("inside agent:batch", str(errors[3]))
        self.assertEqual(items[5], {"type": wire.TRANSMIT_CONFIRM, "pushId": "p6"})

    def test_bad_batches_refused_whole(self) -> None:
        for bad, why in (({"type": wire.BATCH}, "non-empty list"),
                         ({"type": wire.BATCH, "messages": []}, "non-empty list"),
                         ({"type": wire.BATCH, "messages": {"a": 1}}, "non-empty list"),
                         ({"type": wire.BATCH, "messages": [{}] * (wire.MAX_BATCH + 1)},
                          "Too many messages")):
            with self.assertRaises(wire.WireError) as e:
                wire.decode(json.dumps(bad))
            self.assertIn(why, e.exception.reason)

    def test_batch_is_a_feature_not_a_scheme(self) -> None:
        self.assertEqual(wire.announced_schemes([wire.CAP_BATCH, "mllp"]), frozenset(["mllp"]))


class BatchingConnection(FakeConnection):
    """A fake socket that batches as L{medagent._autobahn.frames} makes the real ones."""

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.frames: list[bytes] = []
        self.batcher = wire.FrameBatcher(clock, self._frame)
        self.batching = False

    def _frame(self, data: bytes) -> None:
        self.frames.append(data)
        self.sent.extend(frame_messages(data))

    def send_message(self, message: Any) -> None:
        self.batcher.send(message)

    def enable_batching(self, max_bytes: int) -> None:
        self.batching = True
        self.batcher.enable(max_bytes)


class HubBatchTests(_HubCase):
    def connect_batching(self, caps: list[str], limit: Any = wire.BATCH_BYTES
                         ) -> tuple[BatchingConnection, Any]:
        conn = BatchingConnection(self.clock)
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": self.agent_token,
            "agentId": self.agent["id"], "capabilities": caps, "batchBytes": limit}))
        return conn, session

    def test_pushes_of_one_turn_go_in_one_frame_to_an_agent_that_announced_it(self) -> None:
        conn, session = self.connect_batching(["durable", "batch"])
        self.assertTrue(conn.batching)
        [response] = conn.of_type(wire.CONNECT_RESPONSE)
        self.assertIn(wire.CAP_BATCH, response["capabilities"])
        before = len(conn.frames)
        for i in range(3):
            self.push(body=f"MSH|^~\\&|A|B|C|D|20240101||ORM^O01|B{i}|P|2.5\r")
        self.clock.advance(0)
        self.assertEqual(len(conn.frames), before + 1)
        requests = conn.of_type(wire.TRANSMIT_REQUEST)
        self.assertEqual([r["body"].split("|")[9] for r in requests], ["B0", "B1", "B2"])
        # the agent answers all three in one frame: each recorded and confirmed, in order
        answers = [wire.encode({"type": wire.TRANSMIT_RESPONSE, "remote": r["remote"],
                                "callback": r["callback"], "pushId": r["pushId"],
                                "statusCode": 200, "body": "MSH|\rMSA|AA|x",
                                "delivery": "delivered"}) for r in requests]
        self.hub.frame_received(session, wire.encode_batch(answers))
        self.clock.advance(0)
        confirms = [m["pushId"] for m in conn.of_type(wire.TRANSMIT_CONFIRM)]
        self.assertEqual(confirms, [r["pushId"] for r in requests])
        for r in requests:
            self.assertEqual(self.successResultOf(self.journal.get(r["pushId"])).state,
                             "delivered")

    def test_no_batches_to_an_agent_that_did_not_announce_it(self) -> None:
        """Medplum's agent (no capabilities): one message per frame, always."""
        conn, session = self.connect_batching([])
        self.assertFalse(conn.batching)
        self.hub.agent_config_read(self.agent["id"])
        self.clock.advance(self.hub.ready_settle)
        before = len(conn.frames)
        self.push(body="MSH|^~\\&|A|B|C|D|20240101||ORM^O01|M1|P|2.5\r")
        for _ in range(2):  # answered in the same turn
            self.hub.frame_received(session, wire.encode({"type": wire.HEARTBEAT_REQUEST}))
        self.clock.advance(0)
        new = [json.loads(f)["type"] for f in conn.frames[before:]]
        self.assertEqual(new, [wire.TRANSMIT_REQUEST] + [wire.HEARTBEAT_RESPONSE] * 2)

    def test_batches_kept_under_the_limit_the_agent_announced(self) -> None:
        for bogus in (None, "4096", True, 10, wire.BATCH_BYTES + 1, 2.5e4):
            conn, session = self.connect_batching(["durable", "batch"], bogus)
            self.assertFalse(conn.batching, bogus)  # no (usable) limit: no batches
            self.hub.connection_lost(session)
        conn, session = self.connect_batching(["durable", "batch"], wire.MIN_BATCH_BYTES)
        self.assertEqual(conn.batcher.max_bytes, wire.MIN_BATCH_BYTES)
        before = len(conn.frames)
        for i in range(8):
            self.push(body=f"MSH|^~\\&|A|B|C|D|20240101||ORM^O01|L{i}|P|2.5\r" + "X" * 300)
        self.clock.advance(0)
        new = conn.frames[before:]
        self.assertGreater(len(new), 1)
        self.assertTrue(all(len(f) <= wire.MIN_BATCH_BYTES for f in new))
        self.assertEqual(sum(len(frame_messages(f)) for f in new), 8)

    def test_batch_before_connect_is_refused(self) -> None:
        conn = FakeConnection()
        session = self.hub.connection_made(conn)
        self.hub.frame_received(session, wire.encode_batch([wire.encode({
            "type": wire.CONNECT_REQUEST, "accessToken": self.agent_token,
            "agentId": self.agent["id"]})]))
        self.assertIsNone(session.agent_id)
        self.assertEqual([m["body"] for m in conn.of_type(wire.ERROR)], ["Not connected"])

    def test_bad_message_in_a_batch_answered_others_handled(self) -> None:
        conn, session = self.connect_batching(["durable", "batch"])
        self.hub.frame_received(session, wire.encode_batch([
            wire.encode({"type": "agent:nope", "callback": "c1"}),
            wire.encode({"type": wire.HEARTBEAT_REQUEST}),
        ]))
        self.clock.advance(0)
        self.assertEqual(conn.of_type(wire.ERROR)[0]["callback"], "c1")
        self.assertEqual(len(conn.of_type(wire.HEARTBEAT_RESPONSE)), 1)
        self.assertIsNone(conn.closed)


class AgentBatchTests(SynchronousTestCase):
    """The agent app: batches only to a relay that announced it; reads batches."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        db = inline_database(self, DurableQueue.schema() + Outbox.schema(), self.clock)
        self.sender = FakeSender()
        self.app = AgentApp(self.clock, "a1", Tokens(), Dispatcher({"mllp": self.sender}), db,
                            heartbeat_interval=10)
        self.app.start()
        self.addCleanup(self.app.stop)
        self.conn = BatchingConnection(self.clock)
        self.app.connection_made(self.conn)

    def live(self, caps: list[str], limit: Any = wire.BATCH_BYTES) -> None:
        self.app.frame_received(wire.encode({"type": wire.CONNECT_RESPONSE,
                                             "capabilities": caps, "batchBytes": limit}))

    def request(self, push_id: str) -> bytes:
        return wire.encode({"type": wire.TRANSMIT_REQUEST, "remote": "mllp://dev:1",
                            "contentType": "x", "body": f"MSH|{push_id}",
                            "callback": f"Agent/a1-{push_id}", "pushId": push_id})

    def test_announces_batch_and_batches_to_a_relay_that_announced_it(self) -> None:
        self.assertIn(wire.CAP_BATCH, self.conn.sent[0]["capabilities"])
        self.assertEqual(self.conn.sent[0]["batchBytes"], wire.BATCH_BYTES)
        self.live(["durable", "batch"])
        self.assertTrue(self.conn.batching)
        before = len(self.conn.frames)
        # three requests in one frame, to one lane: stored (one commit), accepted, in order
        self.app.frame_received(wire.encode_batch([self.request(f"p{i}") for i in range(3)]))
        self.clock.advance(0)
        accepted = [m["pushId"] for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                    if m.get("delivery") == "accepted"]
        self.assertEqual(accepted, ["p0", "p1", "p2"])
        self.assertEqual(len(self.conn.frames), before + 1)  # one frame for the three
        self.assertEqual([c[1] for c in self.sender.calls], ["MSH|p0"])  # one at a time
        self.sender.calls[0][2].callback(Reply("A0"))
        self.sender.calls[1][2].callback(Reply("A1"))
        self.sender.calls[2][2].callback(Reply("A2"))
        self.clock.advance(0)
        answers = [m["body"] for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                   if m.get("delivery") == "delivered"]
        self.assertEqual(answers, ["A0", "A1", "A2"])

    def test_no_batches_to_a_relay_that_did_not_announce_it(self) -> None:
        """Medplum's server (no "batch" in its answer): one message per frame."""
        self.live(["durable", "batch"], limit=None)  # no limit said: not ours either
        self.assertFalse(self.conn.batching)
        self.live([])
        self.assertFalse(self.conn.batching)
        for i in range(2):
            self.app.frame_received(self.request(f"q{i}"))
        self.assertTrue(all(json.loads(f)["type"] != wire.BATCH for f in self.conn.frames))

    def test_bad_message_in_a_batch_answered_others_handled(self) -> None:
        self.live(["durable", "batch"])
        self.app.frame_received(wire.encode_batch([
            wire.encode({"type": "agent:nope", "callback": "c1"}), self.request("r1")]))
        self.clock.advance(0)
        self.assertEqual(self.conn.of_type(wire.ERROR)[0]["callback"], "c1")
        self.assertEqual([c[1] for c in self.sender.calls], ["MSH|r1"])


class LimitTests(SynchronousTestCase):
    def test_the_limit_announced_follows_the_own_message_limit(self) -> None:
        self.assertEqual(wire.batch_limit(64 * 1024 * 1024), wire.BATCH_BYTES)
        self.assertEqual(wire.batch_limit(100_000), 100_000)
        self.assertEqual(wire.batch_limit(10), wire.MIN_BATCH_BYTES)
