"""
MLLP client/server protocols, the pooled sender and the inbound channel, on StringTransport,
Clock and iosim (no sockets).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import HL7_V2
from medagent.delivery import DeliveryError, Reply
from medagent.destination import parse_destination
from medagent.hl7.message import build_ack, control_id, parse_ack
from medagent.hl7.mllp import FS, VT, MLLPDecoder, frame
from medagent.hl7.protocol import (
    MLLPChannel,
    MLLPClientProtocol,
    FIRST_REUSE_GRACE,
    MLLPSender,
    NotSent,
)


def orm(cid: str = "C1", extra: str = "", msh18: str = "") -> str:
    return (
        f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240115103000||ORM^O01|{cid}|P|2.5.1||||||{msh18}\r"
        f"PID|1||12345^^^MRN||DOE^JOHN{extra}\r"
        "ORC|NW|1\r"
    )


def ack_bytes(cid: str, code: str = "AA") -> bytes:
    return build_ack(orm(cid), code).encode("ascii")


def frames_written(transport: StringTransport) -> list[bytes]:
    out = MLLPDecoder().feed(transport.value())
    transport.clear()
    return out


def result_of(d: Deferred) -> Any:
    """The value of a fired Deferred (failing the test if it has not fired or failed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred) -> Failure:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    return results[0]


# --------------------------------------------------------------------------------------------
# MLLPClientProtocol


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


# --------------------------------------------------------------------------------------------
# MLLPSender with fake endpoints


class ClosingTransport(StringTransport):
    """A StringTransport whose close reaches the protocol (as a real one would, later)."""

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.disconnected = True
        self.loseConnection()


class FakeEndpoint:
    """Connects to an in-memory 'device'; can refuse or hang."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.attempts = 0
        self.connections: list[tuple[MLLPClientProtocol, ClosingTransport]] = []

    def connect(self, factory: Any) -> Deferred:
        self.attempts += 1
        if self.mode == "refuse":
            return fail(ConnectionRefusedError("Connection refused"))
        if self.mode == "hang":
            return Deferred()
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2575))
        transport = ClosingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2575))
        transport.protocol = proto
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return succeed(proto)

    @property
    def current(self) -> tuple[MLLPClientProtocol, ClosingTransport]:
        return self.connections[-1]

    def answer(self, code: str = "AA") -> list[bytes]:
        """The device reads what was written on the latest connection and ACKs each message."""
        proto, transport = self.current
        received = frames_written(transport)
        for payload in received:
            proto.dataReceived(frame(build_ack(payload.decode("latin-1"), code).encode("latin-1")))
        return received

    def device_closes(self) -> None:
        proto, transport = self.current
        transport.disconnecting = True
        proto.connectionLost(Failure(ConnectionDone()))


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


# --------------------------------------------------------------------------------------------
# MLLPChannel / MLLPServerProtocol


class Cloud:
    """A fake forward(): records what went up, answers when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.pending: list[Deferred] = []

    def __call__(self, content_type: str, body: str, remote: str) -> Deferred:
        self.calls.append((content_type, body, remote))
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def answer(self, code: str = "AA", index: int = 0, **kw: Any) -> None:
        body = self.calls[index][1]
        self.pending[index].callback(Reply(body=build_ack(body, code, **kw), content_type=HL7_V2))


class ChannelTests(SynchronousTestCase):
    def make(self, **kw: Any) -> tuple[Any, StringTransport]:
        self.clock = Clock()
        self.cloud = Cloud()
        self.channel = MLLPChannel(self.cloud, clock=self.clock, **kw)
        proto = self.channel.buildProtocol(IPv4Address("TCP", "10.0.0.5", 51234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 51234))
        proto.makeConnection(transport)
        return proto, transport

    def acks(self, transport: StringTransport) -> list[tuple[str, str]]:
        out = []
        for payload in frames_written(transport):
            a = parse_ack(payload.decode())
            out.append((a.code, a.control_id))
        return out

    def test_original_mode_returns_the_clouds_ack(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(orm("M1").replace("\r", "\n").encode()))
        self.assertEqual(self.cloud.calls, [(HL7_V2, orm("M1"), "10.0.0.5:51234")])
        self.assertEqual(tr.value(), b"")
        self.cloud.answer("AA", text="from the bot")
        [payload] = frames_written(tr)
        ack = parse_ack(payload.decode())
        self.assertEqual((ack.code, ack.control_id, ack.text), ("AA", "M1", "from the bot"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_strict_fifo(self) -> None:
        """Pipelined messages: forwarded one at a time, answered in arrival order."""
        proto, tr = self.make()
        proto.dataReceived(b"".join(frame(orm(f"M{i}").encode()) for i in range(3)))
        self.assertEqual(len(self.cloud.calls), 1)
        self.cloud.answer("AA", 0)
        self.assertEqual(self.acks(tr), [("AA", "M0")])
        self.assertEqual(len(self.cloud.calls), 2)
        self.cloud.answer("AE", 1)
        self.cloud.answer("AA", 2)
        self.assertEqual(self.acks(tr), [("AE", "M1"), ("AA", "M2")])

    def test_synchronous_forward_many_messages(self) -> None:
        clock = Clock()
        channel = MLLPChannel(
            lambda ct, body, remote: succeed(Reply(build_ack(body, "AA"), HL7_V2)), clock=clock
        )
        proto = channel.buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        proto.dataReceived(b"".join(frame(orm(f"M{i}").encode()) for i in range(2000)))
        self.assertEqual([c for _, c in self.acks(tr)], [f"M{i}" for i in range(2000)])

    def test_original_mode_forward_failure_is_ae(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(orm("M1").encode()))
        self.cloud.pending[0].errback(Failure(DeliveryError("relay unreachable")))
        [payload] = frames_written(tr)
        ack = parse_ack(payload.decode())
        self.assertEqual((ack.code, ack.control_id), ("AE", "M1"))
        self.assertIn("relay unreachable", ack.text)

    def test_original_mode_no_usable_answer_is_ae(self) -> None:
        for reply in (None, Reply("Bot execution logs:\n...", "text/plain"),
                      Reply(build_ack(orm("M1"), "AA"), HL7_V2, status_code=400)):
            proto, tr = self.make()
            proto.dataReceived(frame(orm("M1").encode()))
            self.cloud.pending[0].callback(reply)
            self.assertEqual(self.acks(tr), [("AE", "M1")], reply)
            self.assertFalse(tr.disconnecting)

    def test_original_mode_passes_a_response_without_msa(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(orm("M1").encode()))
        self.cloud.pending[0].callback(Reply(orm("R1"), HL7_V2))
        self.assertEqual(frames_written(tr), [orm("R1").encode()])

    def test_forward_timeout(self) -> None:
        proto, tr = self.make(forward_timeout=20)
        proto.dataReceived(frame(orm("M1").encode()) + frame(orm("M2").encode()))
        self.clock.advance(20)
        [payload] = frames_written(tr)
        ack = parse_ack(payload.decode())
        self.assertEqual((ack.code, ack.control_id), ("AE", "M1"))
        self.assertIn("no answer from the cloud within 20 s", ack.text)
        # The late answer is ignored; the next message is being handled.
        self.cloud.answer("AA", 0)
        self.assertEqual(tr.value(), b"")
        self.assertEqual(len(self.cloud.calls), 2)
        self.cloud.answer("AA", 1)
        self.assertEqual(self.acks(tr), [("AA", "M2")])

    def test_enhanced_mode_commit_then_application_ack(self) -> None:
        proto, tr = self.make(mode="enhanced")
        proto.dataReceived(frame(orm("M1").encode()))
        self.cloud.answer("AA")
        self.assertEqual(self.acks(tr), [("CA", "M1"), ("AA", "M1")])

    def test_enhanced_app_level_ack_rules(self) -> None:
        cases = {
            ("AL", "AA"): [("CA", "M1"), ("AA", "M1")],
            ("AL", "AE"): [("CA", "M1"), ("AE", "M1")],
            ("NE", "AA"): [("CA", "M1")],
            ("NE", "AE"): [("CA", "M1")],
            ("ER", "AA"): [("CA", "M1")],
            ("ER", "AR"): [("CA", "M1"), ("AR", "M1")],
            ("SU", "AA"): [("CA", "M1"), ("AA", "M1")],
            ("SU", "AE"): [("CA", "M1")],
            ("NE", "CE"): [("CA", "M1"), ("CE", "M1")],  # non-AA/AE/AR always goes through
        }
        for (level, code), expected in cases.items():
            proto, tr = self.make(mode="enhanced", app_level_ack=level)
            proto.dataReceived(frame(orm("M1").encode()))
            self.cloud.answer(code)
            self.assertEqual(self.acks(tr), expected, (level, code))

    def test_enhanced_mode_forward_failure_is_ce(self) -> None:
        proto, tr = self.make(mode="enhanced")
        proto.dataReceived(frame(orm("M1").encode()))
        self.cloud.pending[0].errback(Failure(DeliveryError("disk full")))
        self.assertEqual(self.acks(tr), [("CE", "M1")])

    def test_enhanced_mode_no_answer_only_commits(self) -> None:
        proto, tr = self.make(mode="enhanced")
        proto.dataReceived(frame(orm("M1").encode()))
        self.cloud.pending[0].callback(None)
        self.assertEqual(self.acks(tr), [("CA", "M1")])

    def test_aa_mode(self) -> None:
        proto, tr = self.make(mode="aa")
        proto.dataReceived(frame(orm("M1").encode()))
        self.assertEqual(tr.value(), b"")
        self.cloud.answer("AE")
        self.assertEqual(self.acks(tr), [("AA", "M1")])

    def test_aa_mode_failure_is_ae(self) -> None:
        proto, tr = self.make(mode="aa")
        proto.dataReceived(frame(orm("M1").encode()))
        self.cloud.pending[0].errback(Failure(RuntimeError("boom")))
        self.assertEqual(self.acks(tr), [("AE", "M1")])

    def test_unparsable_frames_get_a_nak_and_the_connection_stays(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(b"this is not hl7"))
        proto.dataReceived(frame(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\rPID|1\r"))
        proto.dataReceived(frame(orm("M9").encode("utf-8").replace(b"JOHN", b"J\xf6HN")))
        acks = [parse_ack(p.decode("latin-1")) for p in frames_written(tr)]
        self.assertEqual([(a.code, a.control_id) for a in acks], [("AR", ""), ("AR", ""),
                                                                  ("AR", "M9")])
        self.assertIn("must start with MSH", acks[0].text)
        self.assertIn("MSH-10", acks[1].text)
        self.assertIn("not valid utf-8", acks[2].text)
        self.assertEqual(self.cloud.calls, [])
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(frame(orm("M10").encode()))
        self.cloud.answer("AA")
        self.assertEqual(self.acks(tr), [("AA", "M10")])
        self.assertEqual(self.channel.rejected, 3)

    def test_unparsable_in_enhanced_mode_is_cr(self) -> None:
        proto, tr = self.make(mode="enhanced")
        proto.dataReceived(frame(b"garbage"))
        self.assertEqual(self.acks(tr), [("CR", "")])

    def test_nak_uses_the_senders_separators(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(b"MSH#$*@!#A#B#C#D#2024##ADT$A01##P#2.3\r"))
        [payload] = frames_written(tr)
        self.assertTrue(payload.startswith(b"MSH#$*@!#C#D#A#B#"))

    def test_oversize_frame_answered_in_order_then_closed(self) -> None:
        proto, tr = self.make(max_message_size=1000)
        proto.dataReceived(frame(orm("M1").encode()) + VT + b"x" * 2000)
        self.assertFalse(tr.disconnecting)
        proto.dataReceived(b"more" + FS + b"\r" + frame(orm("M2").encode()))
        self.cloud.answer("AA")
        acks = self.acks(tr)
        self.assertEqual(acks, [("AA", "M1"), ("AR", "")])
        self.assertTrue(tr.disconnecting)
        self.assertEqual(len(self.cloud.calls), 1)

    def test_decoding_per_channel_and_msh18(self) -> None:
        proto, tr = self.make(encoding="cp1252")
        proto.dataReceived(frame(orm("M1", extra="M\u00fcller").encode("cp1252")))
        self.assertEqual(self.cloud.calls[0][1], orm("M1", extra="M\u00fcller"))
        proto2, tr2 = self.make()
        body = orm("M2", extra="M\u00fcller", msh18="8859/1")
        proto2.dataReceived(frame(body.encode("latin-1")))
        self.assertEqual(self.cloud.calls[0][1], body)
        self.cloud.answer("AE", text="Pr\u00fcfung")
        [payload] = frames_written(tr2)
        self.assertIn("Pr\u00fcfung".encode("latin-1"), payload)

    def test_backpressure(self) -> None:
        proto, tr = self.make(max_queued=4)
        proto.dataReceived(b"".join(frame(orm(f"M{i}").encode()) for i in range(6)))
        self.assertEqual(tr.producerState, "paused")
        for i in range(4):
            self.cloud.answer("AA", i)
        self.assertEqual(tr.producerState, "producing")

    def test_connection_lost_while_forwarding(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(orm("M1").encode()) + frame(orm("M2").encode()))
        proto.connectionLost(Failure(ConnectionDone()))
        self.cloud.answer("AA")
        self.assertEqual(tr.value(), b"")
        self.assertEqual(len(self.cloud.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout(self) -> None:
        proto, tr = self.make(idle_timeout=30)
        proto.dataReceived(frame(orm("M1").encode()))
        self.clock.advance(40)  # waiting for the cloud is not idle
        self.assertFalse(tr.disconnecting)
        self.cloud.answer("AA")
        self.clock.advance(29)
        self.assertFalse(tr.disconnecting)
        self.clock.advance(1)
        self.assertTrue(tr.disconnecting)

    def test_close_connections_finishes_the_message_in_hand(self) -> None:
        proto, tr = self.make()
        tr.protocol = proto
        proto.dataReceived(frame(orm("M1").encode()) + frame(orm("M2").encode()))
        self.assertEqual(self.channel.connections, {proto})
        closed = self.channel.close_connections(grace=5)
        self.assertFalse(tr.disconnecting)
        self.cloud.answer("AA")
        self.assertEqual(self.acks(tr), [("AA", "M1")])  # M2 is left for the device to resend
        self.assertTrue(tr.disconnecting)
        self.assertEqual(len(self.cloud.calls), 1)
        self.assertNoResult(closed)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(result_of(closed))
        self.assertEqual(self.channel.connections, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_connections_aborts_after_grace(self) -> None:
        proto, tr = self.make()
        proto.dataReceived(frame(orm("M1").encode()))
        closed = self.channel.close_connections(grace=5)
        self.clock.advance(5)
        self.assertTrue(tr.disconnected)  # aborted
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(result_of(closed))
        self.cloud.answer("AA")  # too late: nothing written, nothing raised
        self.assertEqual(tr.value(), b"")

    def test_bad_configuration(self) -> None:
        clock = Clock()
        self.assertRaises(ValueError, MLLPChannel, Cloud(), mode="fast", clock=clock)
        self.assertRaises(ValueError, MLLPChannel, Cloud(), app_level_ack="XX", clock=clock)
        self.assertRaises(ValueError, MLLPChannel, Cloud(), encoding="klingon", clock=clock)


# --------------------------------------------------------------------------------------------
# Client and server talking to each other (iosim)


class PairTests(SynchronousTestCase):
    def test_client_and_channel(self) -> None:
        clock = Clock()
        seen: list[str] = []

        def forward(content_type: str, body: str, remote: str) -> Deferred:
            seen.append(control_id(body))
            return succeed(Reply(build_ack(body, "AA"), HL7_V2))

        channel = MLLPChannel(forward, clock=clock)
        server = channel.buildProtocol(None)
        client = MLLPClientProtocol(clock)
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), clock=clock)
        for i in range(5):
            d = client.send_message(orm(f"P{i}").encode(), f"P{i}", "first")
            pump.flush()
            self.assertEqual(parse_ack(result_of(d).decode()), parse_ack(build_ack(orm(f"P{i}"))))
        self.assertEqual(seen, [f"P{i}" for i in range(5)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_sender_and_enhanced_channel(self) -> None:
        clock = Clock()
        channel = MLLPChannel(
            lambda ct, body, remote: succeed(Reply(build_ack(body, "AA"), HL7_V2)),
            mode="enhanced",
            clock=clock,
        )
        pumps: list[iosim.IOPump] = []

        class Endpoint:
            def connect(self, factory: Any) -> Deferred:
                client = factory.buildProtocol(None)
                server = channel.buildProtocol(None)
                pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client,
                                           iosim.makeFakeClient(client), clock=clock))
                return succeed(client)

        sender = MLLPSender(clock, endpoint_factory=lambda dest, s: Endpoint())
        first = sender.send(parse_destination("mllp://ris:2575"), HL7_V2, orm("E1"), {})
        pumps[-1].flush()
        self.assertEqual(result_of(first).detail, "CA")
        app = sender.send(parse_destination("mllp://ris:2575?returnAck=application"), HL7_V2,
                          orm("E2"), {})
        clock.advance(FIRST_REUSE_GRACE)
        pumps[-1].flush()
        self.assertEqual(result_of(app).detail, "AA")
        # One device (the URLs differ only in per-message settings), one connection; the late
        # AA for E1 on it was ignored rather than treated as confusion.
        self.assertEqual(len(pumps), 1)
        closed = sender.close()
        for p in pumps:
            p.flush()
        self.assertIsNone(result_of(closed))
        self.assertEqual(clock.getDelayedCalls(), [])


class StoredForwardTests(SynchronousTestCase):
    """Two-stage forward (the agent's outbox): on disk first, the cloud's answer later."""

    def make(self, mode: str, **kw: Any) -> tuple[Any, StringTransport, list[Deferred]]:
        from medagent.agent.outbox import Stored

        answers: list[Deferred] = []

        def forward(ct: str, body: str, remote: str) -> Deferred:
            answers.append(Deferred())
            return succeed(Stored(answers[-1]))

        channel = MLLPChannel(forward, mode=mode, clock=Clock(), **kw)
        proto = channel.buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        return proto, tr, answers

    def codes(self, tr: StringTransport) -> list[tuple[str, str]]:
        """Everything written so far (without clearing, unlike frames_written)."""
        return [(parse_ack(p.decode()).code, parse_ack(p.decode()).control_id)
                for p in MLLPDecoder().feed(tr.value())]

    def test_enhanced_commit_at_once_then_app_ack(self) -> None:
        proto, tr, answers = self.make("enhanced")
        proto.dataReceived(frame(orm("M1").encode()) + frame(orm("M2").encode()))
        # both stored and committed before the cloud answered either
        self.assertEqual(self.codes(tr), [("CA", "M1"), ("CA", "M2")])
        answers[1].callback(Reply(build_ack(orm("M2"), "AA"), HL7_V2))
        answers[0].callback(None)  # the Bot gave nothing: the sender gets an AE
        self.assertEqual(self.codes(tr)[2:], [("AA", "M2"), ("AE", "M1")])

    def test_enhanced_error_only(self) -> None:
        proto, tr, answers = self.make("enhanced", app_level_ack="ER")
        proto.dataReceived(frame(orm("M1").encode()))
        answers[0].callback(Reply(build_ack(orm("M1"), "AA"), HL7_V2))
        self.assertEqual(self.codes(tr), [("CA", "M1")])

    def test_aa_mode_at_once(self) -> None:
        proto, tr, answers = self.make("aa")
        proto.dataReceived(frame(orm("M1").encode()))
        self.assertEqual(self.codes(tr), [("AA", "M1")])
        answers[0].callback(Reply(build_ack(orm("M1"), "AE"), HL7_V2))
        self.assertEqual(self.codes(tr), [("AA", "M1")])

    def test_original_waits_for_the_cloud(self) -> None:
        proto, tr, answers = self.make("original")
        proto.dataReceived(frame(orm("M1").encode()) + frame(orm("M2").encode()))
        self.assertEqual(self.codes(tr), [])
        self.assertEqual(len(answers), 1)  # strict FIFO: M2 waits for M1's answer
        answers[0].errback(Failure(DeliveryError("no answer from the cloud within 55 s")))
        self.assertEqual(self.codes(tr), [("AE", "M1")])
        answers[1].callback(Reply(build_ack(orm("M2"), "AA"), HL7_V2))
        self.assertEqual(self.codes(tr), [("AE", "M1"), ("AA", "M2")])
