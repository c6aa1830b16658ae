"""
MLLPChannel (the answer modes, rejects, codecs, the two-stage forward) on StringTransport and
Clock, and the client, sender and channel talking to each other over iosim (no sockets).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from medagent.contenttypes import HL7_V2
from medagent.delivery import DeliveryError, Reply
from medagent.destination import parse_destination
from medagent.hl7.channel import MLLPChannel
from medagent.hl7.client import MLLPClientProtocol
from medagent.hl7.message import build_ack, control_id, parse_ack
from medagent.hl7.mllp import MLLPDecoder, frame
from medagent.hl7.sender import FIRST_REUSE_GRACE, MLLPSender
from tests.hl7_fakes import ChannelHarness, Cloud, frames_written, orm, result_of


class ChannelTests(ChannelHarness, SynchronousTestCase):
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
