"""
Lanes per device, backoff, the in-doubt marker and the status of a waited push: the agent's
queue with fake senders on a Clock, the MLLP sender's pool with fake endpoints, and the
relay's side of the same answers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.agent.app import AgentApp
from medagent.agent.dispatch import Dispatcher
from medagent.delivery import (
    BEFORE_WRITE,
    DeliveryError,
    IN_DOUBT_PHRASE,
    NotWritten,
    Reply,
    http_status,
    in_doubt,
)
from medagent.agent.outbox import Outbox
from medagent.agent.queue import DurableQueue
from medagent.destination import lane_key, normalise_host, parse_destination
from medagent.hl7.client import CLOSE_AFTER_ACK_WINDOW, NotSent
from medagent.hl7.sender import FIRST_REUSE_GRACE, MLLPSender
from medagent.storage import journal as j
from medagent.storage.sqlite import journal as sqlite_journal
from tests.fakes import InlineReactor, inline_database
from tests.test_agent import FakeSender, Tokens
from tests.hl7_fakes import FakeEndpoint, failure_of, frames_written, orm, result_of
from tests import test_hub
from tests.test_hub import HL7, FakeConnection

HL7_V2 = "x-application/hl7-v2+er7"


class MarkingSender(FakeSender):
    """A sender that calls the queue's first-write hook when the test says it may write."""

    marks_first_write = True

    def __init__(self) -> None:
        super().__init__()
        self.options: list[dict[str, Any]] = []

    def send(self, destination: Any, content_type: str, body: str, options: Any) -> Deferred:
        self.options.append(options)
        return super().send(destination, content_type, body, options)

    def write(self, i: int = -1) -> None:
        """'Connected': take the in-flight mark (the test then fires the answer)."""
        hook = self.options[i][BEFORE_WRITE]
        result_of(hook())


# --------------------------------------------------------------------------------------------
# Destination keys


class KeyTests(SynchronousTestCase):
    def test_query_case_and_loopback_spellings_are_one_device(self) -> None:
        one = {lane_key(u) for u in (
            "mllp://127.0.0.1:2575",
            "mllp://127.0.0.1:2575?ackTimeout=60",
            "mllp://localhost:2575?returnAck=application",
            "mllp://LocalHost.:2575/",
            "mllps://[::ffff:127.0.0.1]:2575?ca=/x.pem",
            "mllp://127.1:2575?encoding=latin-1",
        )}
        self.assertEqual(one, {"mllp://127.0.0.1:2575"})

    def test_different_devices_stay_apart(self) -> None:
        keys = [lane_key(u) for u in (
            "mllp://127.0.0.1:2575", "mllp://127.0.0.1:2576", "mllp://[::1]:2575",
            "astm://127.0.0.1:2575", "dicom://A@127.0.0.1:104", "dicom://B@127.0.0.1:104",
            "mllp://lab.example:2575")]
        self.assertEqual(len(set(keys)), len(keys))

    def test_names_are_not_resolved(self) -> None:
        self.assertEqual(normalise_host("LIS.Example.ORG."), "lis.example.org")
        self.assertEqual(parse_destination("dicom://PACS@h:104?calling=X").key,
                         "dicom://PACS@h:104")
        self.assertEqual(parse_destination("astm+serial:///dev//ttyS0?baudrate=9600").key,
                         "astm+serial:///dev/ttyS0")

    def test_bad_url_is_its_own_lane(self) -> None:
        self.assertEqual(lane_key("not a url"), "not a url")


# --------------------------------------------------------------------------------------------
# The agent's queue


class QueueBase(SynchronousTestCase):
    sender_class: type = FakeSender

    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.db = inline_database(self, DurableQueue.schema() + Outbox.schema(), self.clock)
        self.sender = self.sender_class()
        self.make_app()

    def make_app(self) -> None:
        self.dispatcher = Dispatcher({"mllp": self.sender, "mllps": self.sender})
        self.app = AgentApp(self.clock, "a1", Tokens(), self.dispatcher, self.db,
                            heartbeat_interval=1000)
        self.app.queue.rng = lambda: 0.5  # no jitter
        self.app.start()
        self.addCleanup(self.app.stop)
        self.conn = FakeConnection()
        self.app.connection_made(self.conn)
        self.app.frame_received(wire.encode({"type": wire.CONNECT_RESPONSE,
                                             "capabilities": ["durable"]}))

    def restart(self) -> None:
        self.app.stop()
        self.sender = self.sender_class()
        self.make_app()

    def push(self, push_id: str, remote: str = "mllp://dev:1", body: str | None = None) -> None:
        self.app.frame_received(wire.encode({
            "type": wire.TRANSMIT_REQUEST, "remote": remote, "contentType": HL7_V2,
            "body": body or push_id, "callback": f"Agent/a1-{push_id}", "pushId": push_id}))

    def answers(self) -> list[dict[str, Any]]:
        return [m for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                if m.get("delivery") in ("delivered", "failed")]

    def answer_of(self, push_id: str) -> dict[str, Any]:
        [a] = [m for m in self.answers() if m["pushId"] == push_id]
        return a

    def state(self, push_id: str) -> str:
        return self.db.run_sync(lambda c: c.execute(
            "SELECT state FROM inbox WHERE push_id=?", (push_id,)).fetchone()[0])

    def queue_timers(self) -> int:
        return sum(1 for lane in self.app.queue.lanes.values()
                   if lane.retry_call is not None and lane.retry_call.active())


VARIANTS = (
    "mllp://127.0.0.1:2575",
    "mllp://127.0.0.1:2575?ackTimeout=60",
    "mllp://localhost:2575?returnAck=application",
    "mllps://LOCALHOST.:2575",
    "mllp://[::ffff:127.0.0.1]:2575",
)


class LaneTests(QueueBase):
    def test_url_variants_of_one_device_keep_push_order(self) -> None:
        for i in range(10):
            self.push(f"p{i}", VARIANTS[i % len(VARIANTS)])
        delivered = []
        for i in range(10):
            self.assertEqual(len(self.sender.calls), i + 1, "one message in flight per device")
            url, body, d = self.sender.calls[i]
            self.assertEqual(url, VARIANTS[i % len(VARIANTS)])  # each with its own options
            delivered.append(body)
            d.callback(Reply("ACK"))
        self.assertEqual(delivered, [f"p{i}" for i in range(10)])
        self.assertEqual(len(self.sender.calls), 10)  # once each
        self.assertEqual([a["pushId"] for a in self.answers()], [f"p{i}" for i in range(10)])

    def test_rows_stored_under_url_keys_resume_in_order_after_upgrade(self) -> None:
        """Rows written by a version that keyed lanes by the whole URL."""
        now = self.clock.seconds()

        def insert(conn: Any) -> None:
            for i in range(6):
                conn.execute(
                    "INSERT INTO inbox (push_id, remote, content_type, body, state, created,"
                    " updated) VALUES (?,?,?,?,?,?,?)",
                    (f"old{i}", VARIANTS[i % 3], HL7_V2, f"old{i}", "queued", now, now))

        self.db.run_sync(insert)
        self.restart()
        for i in range(6):
            self.assertEqual(len(self.sender.calls), i + 1)
            self.assertEqual(self.sender.calls[i][1], f"old{i}")
            self.sender.calls[i][2].callback(Reply("ACK"))


class BackoffTests(QueueBase):
    def test_lane_in_backoff_waits_for_its_timer_however_many_pushes(self) -> None:
        self.push("p0")
        self.sender.calls[0][2].errback(DeliveryError("refused", phase="connect"))
        self.assertEqual(self.queue_timers(), 1)
        for i in range(1, 30):
            self.push(f"p{i}", "mllp://dev:1?ackTimeout=5" if i % 2 else "mllp://dev:1")
        self.clock.advance(0.99)
        self.assertEqual(len(self.sender.calls), 1, "no attempt before the backoff timer")
        self.clock.advance(0.01)
        self.assertEqual([c[1] for c in self.sender.calls], ["p0", "p0"])
        self.sender.calls[1][2].errback(DeliveryError("refused", phase="connect"))
        for i in range(30, 40):
            self.push(f"p{i}")
        self.assertEqual(self.queue_timers(), 1, "one timer per lane")
        self.clock.advance(1.99)
        self.assertEqual(len(self.sender.calls), 2)
        self.clock.advance(0.01)
        self.assertEqual(len(self.sender.calls), 3)
        self.sender.calls[2][2].callback(Reply("ACK"))
        self.assertEqual(self.sender.calls[3][1], "p1")  # then in order
        self.assertEqual(self.queue_timers(), 0)


class InDoubtTests(QueueBase):
    sender_class = MarkingSender

    def test_waiting_for_its_connection_is_not_in_doubt_after_a_restart(self) -> None:
        self.push("p1")
        self.assertEqual(len(self.sender.calls), 1)  # handed to the sender, not yet written
        self.assertEqual(self.state("p1"), "queued")
        self.restart()
        self.assertEqual([c[1] for c in self.sender.calls], ["p1"])  # sent again
        self.sender.write()
        self.assertEqual(self.state("p1"), "delivering")
        self.sender.calls[0][2].callback(Reply("ACK"))
        self.assertEqual(self.answer_of("p1")["delivery"], "delivered")

    def test_written_then_restart_is_in_doubt(self) -> None:
        self.push("p1")
        self.sender.write()
        self.restart()
        self.assertEqual(self.sender.calls, [])
        answer = self.answer_of("p1")
        self.assertEqual((answer["delivery"], answer["statusCode"], answer["inDoubt"]),
                         ("failed", 502, True))
        self.assertIn(IN_DOUBT_PHRASE, answer["error"])

    def test_ack_timeout_and_close_before_ack_are_in_doubt(self) -> None:
        self.push("p1")
        self.push("p2")
        self.sender.write(0)
        self.sender.calls[0][2].errback(DeliveryError("no ACK within 30 s for control id p1",
                                                      phase="ack", timed_out=True))
        self.sender.write(1)
        self.sender.calls[1][2].errback(DeliveryError(
            "connection closed by device before ACK for control id p2", phase="ack"))
        a1, a2 = self.answer_of("p1"), self.answer_of("p2")
        self.assertEqual((a1["statusCode"], a1["inDoubt"]), (504, True))
        self.assertEqual((a2["statusCode"], a2["inDoubt"]), (502, True))
        for a in (a1, a2):
            self.assertIn(IN_DOUBT_PHRASE, a["error"])
        self.assertEqual(self.app.queue.stats["inDoubt"], 2)

    def test_failures_before_the_first_byte_are_not_in_doubt(self) -> None:
        self.push("p1", "mllp://dev:1?maxAttempts=1")
        self.sender.calls[0][2].errback(DeliveryError("refused", phase="connect"))
        self.push("p2", "mllp://dev:1?maxAttempts=1")
        self.sender.write(1)  # the mark was taken, but nothing was written after all
        self.sender.calls[1][2].errback(NotSent("connection closed before the message was sent"))
        self.push("p3")
        self.sender.calls[2][2].errback(DeliveryError("bad message", transient=False,
                                                      phase="message"))
        for push_id, status in (("p1", 502), ("p2", 502), ("p3", 400)):
            answer = self.answer_of(push_id)
            self.assertNotIn("inDoubt", answer)
            self.assertNotIn("may or may not", answer["error"])
            self.assertEqual(answer["statusCode"], status)

    def test_mark_refused_for_an_entry_no_longer_queued(self) -> None:
        """An entry ended meanwhile (e.g. cancelled) is not written: the hook says so."""
        self.push("p1")
        self.db.run_sync(lambda c: c.execute(
            "UPDATE inbox SET state='done', answer='{}' WHERE push_id='p1'"))
        hook = self.sender.options[0][BEFORE_WRITE]
        f = failure_of(hook())
        self.assertIsInstance(f.value, NotWritten)
        self.assertEqual(self.state("p1"), "done")
        self.sender.calls[0][2].errback(f)
        self.assertEqual(self.state("p1"), "done")  # not re-queued
        self.clock.advance(60)
        self.assertEqual(len(self.sender.calls), 1)

    def test_device_out_of_resources_is_retried_not_in_doubt(self) -> None:
        """DICOM 0xA7xx: the device said "not now" (docs/dicom.md: the queue retries)."""
        self.push("p1", "mllp://dev:1?maxAttempts=2")
        self.sender.write()
        self.sender.calls[0][2].errback(DeliveryError("C-STORE refused: 0xA700 (will retry)",
                                                      phase="store"))
        self.clock.advance(1.0)
        self.assertEqual(len(self.sender.calls), 2)
        self.sender.write()
        self.sender.calls[1][2].errback(DeliveryError("C-STORE refused: 0xA700 (will retry)",
                                                      phase="store"))
        answer = self.answer_of("p1")
        self.assertEqual(answer["statusCode"], 502)
        self.assertNotIn("inDoubt", answer)
        self.assertIn("gave up after 2 attempts", answer["error"])

    def test_a_sender_without_the_hook_is_marked_before_the_hand_over(self) -> None:
        plain = FakeSender()
        self.dispatcher.add_sender("mllp", plain)
        self.push("p1")
        self.assertEqual(self.state("p1"), "delivering")
        plain.calls[0][2].errback(DeliveryError("reset", phase="ack"))
        self.assertEqual(self.answer_of("p1")["inDoubt"], True)


class ReadyConnectionTests(QueueBase):
    """With the device's connection up, the mark rides on the store's or claim's commit."""

    class ReadySender(MarkingSender):
        def ready_to_write(self, destination: Any) -> bool:
            return True

    sender_class = ReadySender

    def test_ready_connection_marks_with_the_store_and_the_claim(self) -> None:
        commits: list[str] = []
        run_batched = self.db.run_batched

        def counting(fn: Any, *args: Any) -> Deferred:
            commits.append(fn.__name__)
            return run_batched(fn, *args)

        self.db.run_batched = counting  # type: ignore[method-assign]
        self.push("p1")
        self.push("p2")
        self.assertEqual(self.state("p1"), "delivering")  # stored and marked in one commit
        self.assertNotIn(BEFORE_WRITE, self.sender.options[0])
        self.sender.calls[0][2].callback(Reply("ACK"))
        self.assertEqual(self.state("p2"), "delivering")  # claimed and marked in one commit
        self.assertNotIn(BEFORE_WRITE, self.sender.options[1])
        self.sender.calls[1][2].callback(Reply("ACK"))
        # store p1, store p2, done p1, claim p2, done p2: no commit for a separate mark
        self.assertEqual(len(commits), 5)


class StatusTests(SynchronousTestCase):
    def test_phases_to_statuses(self) -> None:
        cases = [
            (DeliveryError("x", transient=False, phase="destination"), 400),
            (DeliveryError("x", transient=False, phase="decode"), 400),
            (DeliveryError("x", transient=False, phase="encode"), 400),
            (DeliveryError("x", transient=False, phase="message"), 400),
            (DeliveryError("refused", phase="connect"), 502),
            (DeliveryError("connect timed out after 10 s", phase="connect"), 502),
            (DeliveryError("rejected", transient=False, phase="association"), 502),
            (DeliveryError("closed before ACK", phase="ack"), 502),
            (DeliveryError("no ACK within 30 s", phase="ack", timed_out=True), 504),
            (DeliveryError("closed", phase="network"), 502),
            (NotWritten("disk"), 502),
            (RuntimeError("bug"), 500),
        ]
        self.assertEqual([http_status(e) for e, _ in cases], [s for _, s in cases])

    def test_in_doubt_only_after_the_mark(self) -> None:
        after_write = DeliveryError("closed before ACK", phase="ack")
        self.assertFalse(in_doubt(after_write, False))
        self.assertTrue(in_doubt(after_write, True))
        for phase in ("connect", "association", "message", "destination", "send"):
            self.assertFalse(in_doubt(DeliveryError("x", phase=phase), True))
        self.assertFalse(in_doubt(NotSent("gone"), True))


# --------------------------------------------------------------------------------------------
# The MLLP sender's pool


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.device = FakeEndpoint()
        self.sender = MLLPSender(self.clock, endpoint_factory=lambda d, s: self.device)
        self.addCleanup(self.sender.close)

    def send(self, url: str, cid: str, options: dict | None = None) -> Deferred:
        d = self.sender.send(parse_destination(url, needs_port=False), HL7_V2, orm(cid),
                             options or {})
        self.clock.advance(0)
        self.clock.advance(FIRST_REUSE_GRACE)
        return d

    def test_url_variants_share_the_device_connection_with_per_message_options(self) -> None:
        urls = ["mllp://lab:2575", "mllp://LAB:2575?ackTimeout=60",
                "mllp://lab.:2575?returnAck=application", "mllp://lab:2575?encoding=latin-1"]
        for i, url in enumerate(urls):
            d = self.send(url, f"C{i}")
            self.device.answer("AA")
            self.assertEqual(result_of(d).detail, "AA")
        self.assertEqual(self.device.attempts, 1)
        # ackTimeout is per message, on the shared connection
        d = self.send("mllp://lab:2575?ackTimeout=5", "T1")
        self.clock.advance(5)
        f = failure_of(d)
        self.assertTrue(f.value.timed_out)
        self.assertEqual(http_status(f.value), 504)

    def test_persistent_connection_used_again_after_a_device_crash(self) -> None:
        d = self.send("mllp://lab:2575", "C1")
        self.device.answer()
        result_of(d)
        self.device.device_closes()  # the device crashes right after its ACK
        for i in range(2, 12):
            d = self.send("mllp://lab:2575", f"C{i}")
            self.device.answer()
            self.assertEqual(result_of(d).detail, "AA")
        self.assertEqual(self.device.attempts, 2)  # one reconnect, then reused

    def test_learned_close_after_ack_is_given_up_when_the_device_keeps_a_connection(self):
        for i in (1, 2):
            d = self.send("mllp://lab:2575", f"C{i}")
            self.device.answer()
            result_of(d)
            self.device.device_closes()
        d = self.send("mllp://lab:2575", "C3")  # learned: a connection per message
        self.device.answer()
        result_of(d)
        self.device.device_closes()
        self.assertEqual(self.device.attempts, 3)
        d = self.send("mllp://lab:2575", "C4")
        self.device.answer()
        result_of(d)
        self.clock.advance(CLOSE_AFTER_ACK_WINDOW)  # reconfigured: it no longer closes
        for i in range(5, 9):
            d = self.send("mllp://lab:2575", f"C{i}")
            self.device.answer()
            result_of(d)
        self.assertEqual(self.device.attempts, 4)  # C4's connection, persistent again

    def test_ready_to_write_only_with_an_idle_connection_for_the_message(self) -> None:
        dest = parse_destination("mllp://lab:2575")
        self.assertFalse(self.sender.ready_to_write(dest))
        d = self.send("mllp://lab:2575", "C1")
        self.assertFalse(self.sender.ready_to_write(dest))  # busy
        self.device.answer()
        result_of(d)
        self.assertTrue(self.sender.ready_to_write(dest))
        self.assertTrue(self.sender.ready_to_write(parse_destination("mllp://LAB:2575?x=1")))
        self.assertFalse(self.sender.ready_to_write(parse_destination("mllps://lab:2575")))
        self.assertFalse(self.sender.ready_to_write(
            parse_destination("mllp://lab:2575?keepAlive=false")))
        self.device.device_closes()
        self.assertFalse(self.sender.ready_to_write(dest))

    def test_first_byte_waits_for_the_in_flight_mark(self) -> None:
        mark: Deferred[None] = Deferred()
        calls = []

        def before_write() -> Deferred[None]:
            calls.append(1)
            return mark

        d = self.send("mllp://lab:2575", "C1", {BEFORE_WRITE: before_write})
        self.assertEqual((calls, frames_written(self.device.current[1])), ([1], []))
        self.assertNoResult(d)
        mark.callback(None)
        self.assertEqual(len(self.device.answer()), 1)
        self.assertEqual(result_of(d).detail, "AA")

    def test_no_write_when_the_mark_fails_and_no_mark_when_connect_fails(self) -> None:
        d = self.send("mllp://lab:2575", "C1",
                      {BEFORE_WRITE: lambda: fail(NotWritten("disk full"))})
        f = failure_of(d)
        self.assertTrue(f.value.not_written)
        self.assertEqual(frames_written(self.device.current[1]), [])
        self.assertFalse(in_doubt(f.value, True))
        self.device.mode = "refuse"
        self.device.device_closes()
        calls = []
        d = self.send("mllp://lab:2575", "C2", {BEFORE_WRITE: lambda: calls.append(1)})
        self.assertEqual(failure_of(d).value.phase, "connect")
        self.assertEqual(calls, [])


# --------------------------------------------------------------------------------------------
# The relay's side


class RelayAnswerTests(SynchronousTestCase):
    setUp = test_hub.HubTests.setUp
    token = test_hub.HubTests.token
    connect = test_hub.HubTests.connect
    push = test_hub.HubTests.push

    def transmit(self, session: Any, request: dict[str, Any], **fields: Any) -> None:
        msg = {"type": wire.TRANSMIT_RESPONSE, "remote": request["remote"],
               "callback": request["callback"], "pushId": request.get("pushId"),
               "contentType": "text/plain", "statusCode": 202, "body": "accepted", **fields}
        self.hub.frame_received(session, wire.encode(msg))

    def test_waited_push_whose_first_attempt_fails_gets_502_at_once(self) -> None:
        conn, session = self.connect(["durable"])
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.transmit(session, request, delivery="accepted")
        self.assertNoResult(d)
        self.transmit(session, request, delivery="accepted",
                      error="MLLP 127.0.0.1:2575: cannot connect: refused (attempt 1, retrying)")
        result = self.successResultOf(d)
        self.assertTrue(result.retrying)
        self.assertFalse(result.push.final)
        self.assertEqual(result.push.state, j.ACCEPTED)
        # the caller re-POSTs (Medplum does on 5xx): the same answer at once, nothing re-sent
        again = self.successResultOf(self.push(wait=True))
        self.assertEqual((again.duplicate, again.retrying, again.push.id),
                         (True, True, result.push.id))
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 1)

    def test_in_doubt_is_stored_and_shown(self) -> None:
        conn, session = self.connect(["durable"])
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.transmit(session, request, delivery="failed", statusCode=504, inDoubt=True,
                      error=f"no ACK within 30 s: {IN_DOUBT_PHRASE}")
        result = self.successResultOf(d)
        self.assertEqual(result.push.state, j.FAILED)
        self.successResultOf(self.journal.flushed())
        stored = self.successResultOf(self.journal.get(result.push.id))
        self.assertTrue(stored.in_doubt)
        self.assertIs(stored.to_json()["inDoubt"], True)
        listed = self.successResultOf(self.journal.search({"agent": self.agent["id"]}))
        self.assertIs(listed[0].to_json()["inDoubt"], True)

    def test_not_in_doubt_is_not_marked(self) -> None:
        conn, session = self.connect(["durable"])
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.transmit(session, request, delivery="failed", statusCode=502,
                      error="refused (gave up after 3 attempts)")
        push = self.successResultOf(d).push
        self.successResultOf(self.journal.flushed())
        self.assertNotIn("inDoubt", self.successResultOf(self.journal.get(push.id)).to_json())

    def test_same_msh10_to_another_spelling_of_the_device_is_a_repeat(self) -> None:
        conn, session = self.connect(["durable"])
        first = self.successResultOf(self.push())
        again = self.successResultOf(self.push(destination="mllp://localhost:2575?ackTimeout=5"))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.push.id, first.push.id)
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 1)
        other = self.successResultOf(self.push(destination="mllp://127.0.0.1:2576"))
        self.assertFalse(other.duplicate)

    def test_plain_agent_lost_mid_push_is_in_doubt(self) -> None:
        conn, session = self.connect()
        d = self.push(wait=True)
        self.hub.connection_lost(session)
        push = self.successResultOf(d).push
        self.assertTrue(push.in_doubt)
        self.assertIn(IN_DOUBT_PHRASE, push.last_error)


del HL7, json, succeed, ConnectionRefusedError


class ASTMNamesTests(SynchronousTestCase):
    """``maxAttempts`` is the queue's, ``frameAttempts`` E1381's: one name, one meaning."""

    def test_max_attempts_does_not_set_frame_sends(self) -> None:
        from medagent.agent.queue import _max_attempts
        from medagent.astm.link import LinkConfig
        from medagent.astm.settings import link_settings

        url = "astm://127.0.0.1:5000?maxAttempts=2"
        config, _ = link_settings(parse_destination(url), LinkConfig())
        self.assertEqual(config.max_attempts, LinkConfig().max_attempts)
        self.assertEqual(_max_attempts(url), 2)
        config, _ = link_settings(parse_destination(url + "&frameAttempts=3"), LinkConfig())
        self.assertEqual(config.max_attempts, 3)


class JournalUpgradeTests(SynchronousTestCase):
    def test_a_journal_without_the_column_gets_it_when_the_relay_opens_it(self) -> None:
        import os
        import sqlite3
        import tempfile

        from medagent.storage.sqlite.database import Database
        from tests.fakes import InlineThreadPool

        old_schema = sqlite_journal.SCHEMA.replace(",\n    in_doubt INTEGER NOT NULL DEFAULT 0", "")
        self.assertNotIn("in_doubt", old_schema)
        path = os.path.join(tempfile.mkdtemp(prefix="medagent-indoubt-"), "relay.sqlite")
        conn = sqlite3.connect(path)
        conn.executescript(old_schema)
        conn.close()
        clock = InlineReactor()
        db = Database(clock, path, schema=sqlite_journal.SQLiteJournal.schema(),
                      threadpool=InlineThreadPool(),
                      migrations=[sqlite_journal.SQLiteJournal.migrate])
        db.start()
        self.addCleanup(db.stop)
        journal = sqlite_journal.SQLiteJournal(db, clock=clock)
        pushes = [self.successResultOf(journal.create(j.Push(
            id=f"p{i}", agent_id="a1", destination="d", remote="mllp://h:1",
            content_type=HL7_V2, body="x"))) for i in range(2)]
        self.assertFalse(self.successResultOf(journal.get("p0")).in_doubt)  # old rows read
        self.successResultOf(journal.transition(pushes[0], j.FAILED, error="e", in_doubt=True))
        self.successResultOf(journal.transition(pushes[1], j.FAILED, error="e"))
        self.assertTrue(self.successResultOf(journal.get("p0")).in_doubt)
        self.assertFalse(self.successResultOf(journal.get("p1")).in_doubt)
