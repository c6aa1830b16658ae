"""MLLPClientProtocol (one device connection) on StringTransport and Clock (no sockets)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from medagent.delivery import DeliveryError
from medagent.hl7.client import MLLPClientProtocol, NotSent
from medagent.hl7.message import parse_ack
from medagent.hl7.mllp import VT, frame
from tests.hl7_fakes import ack_bytes, failure_of, frames_written, orm, result_of


class ClientProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = MLLPClientProtocol(self.clock, ack_timeout=30.0, max_message_size=4096)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, cid: str = "C1", return_ack: str = "first") -> Deferred:
        return self.proto.send_message(orm(cid).encode(), cid, return_ack)

    def test_writes_frame_and_fires_with_matching_ack(self) -> None:
        d = self.send()
        self.assertEqual(frames_written(self.transport), [orm("C1").encode()])
        self.assertNoResult(d)
        self.assertTrue(self.proto.waiting)
        self.proto.dataReceived(frame(ack_bytes("C1")))
        self.assertEqual(parse_ack(result_of(d).decode()).code, "AA")
        self.assertTrue(self.proto.idle)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ack_in_pieces_with_junk(self) -> None:
        d = self.send()
        wire = b"\r\n" + frame(ack_bytes("C1"))
        for i in range(len(wire)):
            self.proto.dataReceived(wire[i : i + 1])
        self.assertEqual(parse_ack(result_of(d).decode()).control_id, "C1")

    def test_ack_for_other_control_id_fails_and_drops(self) -> None:
        d = self.send()
        self.proto.dataReceived(frame(ack_bytes("OTHER")))
        f = failure_of(d)
        f.trap(DeliveryError)
        self.assertIn("'OTHER' while waiting for 'C1'", f.value.reason)
        self.assertEqual((f.value.phase, f.value.transient), ("ack", True))
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.proto.idle)

    def test_first_takes_commit_ack(self) -> None:
        d = self.send(return_ack="first")
        self.proto.dataReceived(frame(ack_bytes("C1", "CA")))
        self.assertEqual(parse_ack(result_of(d).decode()).code, "CA")

    def test_application_waits_past_commit_ack(self) -> None:
        d = self.send(return_ack="application")
        self.proto.dataReceived(frame(ack_bytes("C1", "CA")))
        self.assertNoResult(d)
        self.proto.dataReceived(frame(ack_bytes("C1", "AA")))
        self.assertEqual(parse_ack(result_of(d).decode()).code, "AA")

    def test_application_takes_commit_error(self) -> None:
        d = self.send(return_ack="application")
        self.proto.dataReceived(frame(ack_bytes("C1", "CE")))
        self.assertEqual(parse_ack(result_of(d).decode()).code, "CE")

    def test_late_application_ack_after_first_is_ignored(self) -> None:
        """returnAck=first returned on CA; the AA that follows must not upset the next send."""
        d1 = self.send("C1")
        self.proto.dataReceived(frame(ack_bytes("C1", "CA")))
        result_of(d1)
        d2 = self.send("C2")
        self.proto.dataReceived(frame(ack_bytes("C1", "AA")))
        self.assertNoResult(d2)
        self.proto.dataReceived(frame(ack_bytes("C2", "AA")))
        self.assertEqual(parse_ack(result_of(d2).decode()).control_id, "C2")
        self.assertFalse(self.transport.disconnecting)

    def test_timeout(self) -> None:
        d = self.send()
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        f = failure_of(d)
        self.assertEqual(f.value.reason, "no ACK within 30 s for control id C1")
        self.assertEqual(f.value.phase, "ack")
        self.assertTrue(f.value.transient)
        self.assertTrue(self.transport.disconnecting)

    def test_per_call_timeout(self) -> None:
        d = self.proto.send_message(orm().encode(), "C1", "first", timeout=2.5)
        self.clock.advance(2.5)
        self.assertIn("within 2.5 s", failure_of(d).value.reason)

    def test_connection_lost_mid_wait(self) -> None:
        d = self.send()
        self.proto.connectionLost(Failure(ConnectionDone()))
        f = failure_of(d)
        self.assertIn("connection closed by device before ACK for control id C1", f.value.reason)
        self.assertEqual(f.value.phase, "ack")
        self.assertTrue(f.value.transient)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbage_fails_and_drops(self) -> None:
        d = self.send()
        self.proto.dataReceived(frame(b"hello there"))
        f = failure_of(d)
        self.assertIn("not an HL7 ACK", f.value.reason)
        self.assertTrue(self.transport.disconnecting)

    def test_hl7_without_msa_fails(self) -> None:
        d = self.send()
        self.proto.dataReceived(frame(orm("C1").encode()))
        self.assertIn("no MSA", failure_of(d).value.reason)

    def test_oversize_fails_and_drops(self) -> None:
        d = self.send()
        self.proto.dataReceived(VT + b"x" * 5000)
        f = failure_of(d)
        self.assertIn("larger than 4096 bytes", f.value.reason)
        self.assertTrue(self.transport.disconnecting)

    def test_ack_before_oversize_frame_in_same_read_counts(self) -> None:
        d = self.send()
        self.proto.dataReceived(frame(ack_bytes("C1")) + VT + b"x" * 5000)
        self.assertEqual(parse_ack(result_of(d).decode()).code, "AA")
        self.assertTrue(self.transport.disconnecting)

    def test_one_message_at_a_time(self) -> None:
        self.send("C1")
        d2 = self.send("C2")
        self.assertIn("already waiting", failure_of(d2).value.reason)
        self.assertEqual(len(frames_written(self.transport)), 1)

    def test_send_on_closed_connection_is_not_sent(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))
        d = self.send()
        failure_of(d).trap(NotSent)
        self.assertEqual(self.transport.value(), b"")

    def test_bad_return_ack(self) -> None:
        d = self.send(return_ack="sometimes")
        self.assertFalse(failure_of(d).value.transient)

    def test_payload_with_block_bytes(self) -> None:
        d = self.proto.send_message(b"MSH|\x1c", "C1", "first")
        self.assertEqual(failure_of(d).value.phase, "message")
        self.assertEqual(self.transport.value(), b"")

    def test_cancel(self) -> None:
        d = self.send()
        d.cancel()
        self.assertIn("cancelled", failure_of(d).value.reason)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unsolicited_unknown_ack_while_idle_drops(self) -> None:
        self.proto.dataReceived(frame(ack_bytes("NOPE")))
        self.assertTrue(self.transport.disconnecting)

    def test_close_fails_in_flight(self) -> None:
        d = self.send()
        closed = self.proto.close("shutting down")
        self.assertIn("shutting down before ACK for control id C1", failure_of(d).value.reason)
        self.assertNoResult(closed)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(result_of(closed))

    def test_close_after_ack_is_noticed(self) -> None:
        d = self.send()
        self.proto.dataReceived(frame(ack_bytes("C1")))
        result_of(d)
        self.clock.advance(0.1)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.proto.closed_after_ack)

    def test_tls_handshake(self) -> None:
        d = self.proto.handshake()
        self.assertNoResult(d)
        self.proto.handshakeCompleted()
        self.assertIsNone(result_of(d))
        self.assertIsNone(result_of(self.proto.handshake()))

    def test_tls_handshake_failure(self) -> None:
        d = self.proto.handshake()
        self.proto.connectionLost(Failure(ConnectionDone("certificate verify failed")))
        f = failure_of(d)
        self.assertEqual(f.value.phase, "connect")
        self.assertIn("TLS handshake failed", f.value.reason)
        self.assertIn("certificate verify failed", f.value.reason)

    def test_idle_close_long_after_ack_is_not_close_after_ack(self) -> None:
        d = self.send()
        self.proto.dataReceived(frame(ack_bytes("C1")))
        result_of(d)
        self.clock.advance(50)
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.proto.closed_after_ack)
