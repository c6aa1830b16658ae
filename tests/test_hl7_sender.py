"""MLLPSender (pooled connections, reuse, timeouts, settings) with fake endpoints and Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import HL7_V2
from medagent.delivery import DeliveryError, Reply
from medagent.destination import parse_destination
from medagent.hl7.message import parse_ack
from medagent.hl7.mllp import frame
from medagent.hl7.sender import FIRST_REUSE_GRACE, MLLPSender
from tests.hl7_fakes import (
    FakeEndpoint,
    ack_bytes,
    failure_of,
    frames_written,
    orm,
    result_of,
)


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints: dict[str, FakeEndpoint] = {}
        self.sender = MLLPSender(
            self.clock,
            connect_timeout=10.0,
            ack_timeout=30.0,
            idle_timeout=60.0,
            endpoint_factory=self.endpoint,
        )

    def endpoint(self, destination: Any, settings: Any) -> FakeEndpoint:
        return self.endpoints.setdefault(destination.host, FakeEndpoint())

    def device(self, host: str = "lab") -> FakeEndpoint:
        return self.endpoints.setdefault(host, FakeEndpoint())

    def send(self, url: str = "mllp://lab:2575", body: str | None = None,
             options: dict | None = None) -> Deferred:
        d = self.sender.send(parse_destination(url, needs_port=False), HL7_V2, body or orm(),
                             options or {})
        # Let a reused connection settle (see MLLPSender._connection).
        self.clock.advance(0)
        self.clock.advance(FIRST_REUSE_GRACE)
        return d

    def test_delivers_and_replies_with_the_ack(self) -> None:
        d = self.send(body=orm("C1").replace("\r", "\n"))
        received = self.device().answer("AA")
        self.assertEqual(received, [orm("C1").encode()])  # \n normalised to \r on the wire
        reply = result_of(d)
        self.assertIsInstance(reply, Reply)
        self.assertEqual(reply.content_type, HL7_V2)
        self.assertEqual((reply.status_code, reply.delivered, reply.detail), (200, True, "AA"))
        self.assertEqual(parse_ack(reply.body).control_id, "C1")

    def test_negative_acks_are_not_delivered(self) -> None:
        for code, delivered in [("AE", False), ("AR", False), ("CA", True), ("CR", False)]:
            d = self.send(body=orm(f"N{code}"))
            self.device().answer(code)
            reply = result_of(d)
            self.assertEqual((reply.delivered, reply.detail), (delivered, code))

    def test_persistent_connection_is_reused(self) -> None:
        for i in range(5):
            d = self.send(body=orm(f"C{i}"))
            self.device().answer()
            result_of(d)
        self.assertEqual(self.device().attempts, 1)

    def test_idle_connection_closed_after_idle_timeout(self) -> None:
        d = self.send()
        self.device().answer()
        result_of(d)
        proto, transport = self.device().current
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d = self.send(body=orm("C2"))
        self.device().answer()
        result_of(d)
        self.assertEqual(self.device().attempts, 2)

    def test_idle_timer_restarts_with_each_message(self) -> None:
        for i in range(3):
            d = self.send(body=orm(f"C{i}"))
            self.device().answer()
            result_of(d)
            self.clock.advance(50)
        self.assertFalse(self.device().current[1].disconnecting)
        self.assertEqual(self.device().attempts, 1)

    def test_keepalive_false_closes_after_each_ack(self) -> None:
        url = "mllp://lab:2575?keepAlive=false"
        for i in range(3):
            d = self.send(url, body=orm(f"C{i}"))
            self.device().answer()
            result_of(d)
            self.assertTrue(self.device().current[1].disconnecting)
        self.assertEqual(self.device().attempts, 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_device_closed_idle_connection_reconnects(self) -> None:
        d = self.send()
        self.device().answer()
        result_of(d)
        self.clock.advance(30)
        self.device().device_closes()
        d = self.send(body=orm("C2"))
        self.assertEqual(self.device().answer(), [orm("C2").encode()])
        self.assertEqual(result_of(d).detail, "AA")
        self.assertEqual(self.device().attempts, 2)

    def test_close_during_settle_sends_once_on_new_connection(self) -> None:
        """The device's close arrives in the reactor turns before our write: no failure."""
        d = self.send()
        self.device().answer()
        result_of(d)
        first_proto, first_transport = self.device().current
        d = self.sender.send(parse_destination("mllp://lab:2575"), HL7_V2, orm("C2"), {})
        first_proto.connectionLost(Failure(ConnectionDone()))  # close lands before the write
        self.clock.advance(FIRST_REUSE_GRACE)
        self.assertEqual(first_transport.value(), b"")
        self.assertEqual(self.device().attempts, 2)
        self.assertEqual(self.device().answer(), [orm("C2").encode()])
        self.assertEqual(result_of(d).detail, "AA")

    def test_reuse_waits_once_for_a_close_then_only_two_turns(self) -> None:
        d = self.send(body=orm("C1"))
        self.device().answer()
        result_of(d)
        d = self.sender.send(parse_destination("mllp://lab:2575"), HL7_V2, orm("C2"), {})
        self.clock.advance(FIRST_REUSE_GRACE * 0.9)
        self.assertEqual(self.device().current[1].value(), b"")
        self.clock.advance(FIRST_REUSE_GRACE * 0.1)
        self.assertEqual(self.device().answer(), [orm("C2").encode()])
        result_of(d)
        d = self.sender.send(parse_destination("mllp://lab:2575"), HL7_V2, orm("C3"), {})
        self.assertEqual(self.device().current[1].value(), b"")
        self.clock.advance(0)
        self.assertEqual(self.device().answer(), [orm("C3").encode()])
        result_of(d)
        self.assertEqual(self.device().attempts, 1)

    def test_close_after_write_fails_without_resend(self) -> None:
        d = self.send()
        self.assertEqual(len(frames_written(self.device().current[1])), 1)
        self.device().device_closes()
        f = failure_of(d)
        f.trap(DeliveryError)
        self.assertIn("connection closed by device before ACK", f.value.reason)
        self.assertIn("MLLP lab:2575", f.value.reason)
        self.assertEqual((f.value.phase, f.value.transient), ("ack", True))
        self.assertEqual(self.device().attempts, 1)

    def test_device_that_closes_after_each_ack_gets_fresh_connections(self) -> None:
        """hl7apy-style devices: learned on two connections in a row, then each message has
        its own connection."""
        for i in (1, 2):
            d = self.send(body=orm(f"C{i}"))
            self.device().answer()
            result_of(d)
            self.device().device_closes()  # right after the ACK
        for i in range(3, 6):
            d = self.send(body=orm(f"C{i}"))
            self.device().answer()
            self.assertEqual(result_of(d).detail, "AA")
            # The next message does not race the device's close: a connection of its own.
            previous = self.device().current[1]
            d = self.send(body=orm(f"N{i}"))
            self.assertTrue(previous.disconnecting)  # closed by us, never written to again
            self.assertEqual(previous.value(), b"")
            self.device().answer()
            self.assertEqual(result_of(d).detail, "AA")
            self.device().device_closes()  # as it does after each ACK
        self.assertEqual(self.device().attempts, 8)

    def test_connect_refused(self) -> None:
        self.endpoints["lab"] = FakeEndpoint("refuse")
        f = failure_of(self.send())
        self.assertEqual((f.value.phase, f.value.transient), ("connect", True))
        self.assertIn("cannot connect", f.value.reason)
        self.assertIn("refused", f.value.reason)

    def test_connect_timeout(self) -> None:
        self.endpoints["lab"] = FakeEndpoint("hang")
        d = self.send("mllp://lab:2575?connectTimeout=4")
        self.clock.advance(3.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = failure_of(d)
        self.assertEqual(f.value.reason, "MLLP lab:2575: connect timed out after 4 s")
        self.assertEqual((f.value.phase, f.value.transient), ("connect", True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ack_timeout_per_destination(self) -> None:
        d = self.send("mllp://lab:2575?ackTimeout=5")
        self.clock.advance(5)
        f = failure_of(d)
        self.assertEqual(f.value.reason, "MLLP lab:2575: no ACK within 5 s for control id C1")
        self.assertEqual((f.value.phase, f.value.transient), ("ack", True))
        # The connection is dropped; the next message gets a new one.
        d = self.send("mllp://lab:2575?ackTimeout=5", body=orm("C2"))
        self.device().answer()
        result_of(d)
        self.assertEqual(self.device().attempts, 2)

    def test_wrong_control_id(self) -> None:
        d = self.send()
        proto, transport = self.device().current
        proto.dataReceived(frame(ack_bytes("ZZZ")))
        f = failure_of(d)
        self.assertIn("'ZZZ' while waiting for 'C1'", f.value.reason)
        self.assertTrue(transport.disconnecting)

    def test_return_ack_application_from_url_and_options(self) -> None:
        d = self.send("mllp://lab:2575?returnAck=application")
        proto, _ = self.device().current
        proto.dataReceived(frame(ack_bytes("C1", "CA")))
        self.assertNoResult(d)
        proto.dataReceived(frame(ack_bytes("C1", "AA")))
        self.assertEqual(result_of(d).detail, "AA")
        # The message's option wins over the URL.
        d = self.send("mllp://lab:2575?returnAck=application", body=orm("C2"),
                      options={"returnAck": "first"})
        proto.dataReceived(frame(ack_bytes("C2", "CA")))
        self.assertEqual(result_of(d).detail, "CA")

    def test_invalid_messages_are_permanent_failures(self) -> None:
        cases = [
            ("hello", "must start with MSH"),
            ("MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r", "MSH-10"),
            (orm(msh18="UNICODE UTF-16"), "cannot be carried over MLLP"),
        ]
        for body, why in cases:
            f = failure_of(self.send(body=body))
            self.assertEqual((f.value.transient, f.value.phase), (False, "message"), body)
            self.assertIn(why, f.value.reason)
        f = failure_of(self.send("mllp://lab:2575?encoding=ascii", body=orm(extra="\u00fc")))
        self.assertEqual((f.value.transient, f.value.phase), (False, "message"))
        self.assertIn("cannot be encoded as ascii", f.value.reason)
        self.assertNotIn("\u00fc", f.value.reason)  # no patient data in reasons
        self.assertEqual(self.device().attempts, 0)

    def test_bad_destination_params(self) -> None:
        for url in ("mllp://lab:2575?returnAck=sometimes", "mllp://lab:2575?keepAlive=maybe",
                    "mllp://lab:2575?encoding=klingon", "mllp://lab:2575?ackTimeout=0",
                    "mllp://lab"):
            f = failure_of(self.send(url))
            self.assertEqual((f.value.transient, f.value.phase), (False, "destination"), url)

    def test_msh18_and_explicit_encoding(self) -> None:
        body = orm(extra="M\u00fcller", msh18="8859/1")
        d = self.send(body=body)
        self.assertEqual(self.device().answer(), [body.encode("latin-1")])
        result_of(d)
        d = self.send(body=orm("C9", extra="M\u00fcller"))
        self.assertEqual(self.device().answer(), [orm("C9", extra="M\u00fcller").encode("utf-8")])
        result_of(d)
        url = "mllp://lab:2575?encoding=cp1252"
        d = self.send(url, body=orm("C8", extra="M\u00fcller", msh18="UNICODE UTF-8"))
        self.assertEqual(
            self.device().answer(),
            [orm("C8", extra="M\u00fcller", msh18="UNICODE UTF-8").encode("cp1252")],
        )
        result_of(d)

    def test_a_failing_destination_does_not_affect_another(self) -> None:
        self.endpoints["dead"] = FakeEndpoint("hang")
        stuck = self.send("mllp://dead:2575")
        for i in range(3):
            d = self.send("mllp://lab:2575", body=orm(f"C{i}"))
            self.device("lab").answer()
            self.assertEqual(result_of(d).detail, "AA")
        self.assertNoResult(stuck)
        self.clock.advance(10)
        self.assertEqual(failure_of(stuck).value.phase, "connect")
        refused = self.endpoints["gone"] = FakeEndpoint("refuse")
        self.assertEqual(failure_of(self.send("mllp://gone:2575")).value.phase, "connect")
        d = self.send("mllp://lab:2575", body=orm("C9"))
        self.device("lab").answer()
        result_of(d)
        self.assertEqual(refused.attempts, 1)
        self.assertEqual(self.device("lab").attempts, 1)

    def test_messages_to_one_destination_wait_their_turn(self) -> None:
        """Even without the dispatcher, two sends never overlap on one connection."""
        d1 = self.send(body=orm("C1"))
        d2 = self.send(body=orm("C2"))
        self.assertEqual(self.device().answer(), [orm("C1").encode()])
        result_of(d1)
        self.clock.advance(FIRST_REUSE_GRACE)
        self.assertEqual(self.device().answer(), [orm("C2").encode()])
        result_of(d2)

    def test_close_fails_in_flight_and_cancels_timers(self) -> None:
        d = self.send()
        idle = self.send("mllp://other:2575", body=orm("C7"))
        self.device("other").answer()
        result_of(idle)
        closed = self.sender.close()
        f = failure_of(d)
        self.assertIn("MLLP sender closed before ACK", f.value.reason)
        self.assertIsNone(result_of(closed))
        self.assertTrue(self.device("lab").current[1].disconnecting)
        self.assertTrue(self.device("other").current[1].disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(failure_of(self.send()).value.phase, "send")

    def test_close_cancels_a_pending_connect(self) -> None:
        self.endpoints["lab"] = FakeEndpoint("hang")
        d = self.send()
        result_of(self.sender.close())
        self.assertEqual(failure_of(d).value.phase, "connect")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ping_without_port(self) -> None:
        f = failure_of(self.sender.ping(parse_destination("mllp://lab?connectTimeout=x",
                                                          needs_port=False)))
        self.assertFalse(f.value.transient)
