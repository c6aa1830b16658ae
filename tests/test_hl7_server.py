"""
MLLPServerProtocol (one inbound device connection: order, back-pressure, oversize frames,
idle and shutdown) through its channel, on StringTransport and Clock.
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import HL7_V2
from medagent.delivery import Reply
from medagent.hl7.channel import MLLPChannel
from medagent.hl7.message import build_ack
from medagent.hl7.mllp import FS, VT, frame
from tests.hl7_fakes import ChannelHarness, orm, result_of


class ServerProtocolTests(ChannelHarness, SynchronousTestCase):
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
