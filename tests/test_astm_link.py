"""
Tests for the E1381 link state machine (L{medagent.astm.link.ASTMLink}) driven byte by byte
with C{StringTransport} and C{Clock}: every timer and retry path, both directions.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionLost
from twisted.trial.unittest import SynchronousTestCase

from medagent.astm import codec
from medagent.astm.codec import ACK, ENQ, EOT, NAK
from medagent.astm.link import (
    BUSY_WAIT, CONTENTION, ESTABLISHING, NEUTRAL, RECEIVING, TRANSFER, ASTMLink, LinkConfig,
    LinkError, SendResult,
)

ORDER = ("H|\\^&|||LIS|||||ANALYZER1||P|LIS2-A2|20240115103000\r"
         "P|1|PID12345|||DOE^JOHN^A||19800101|M\r"
         "O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM||||||||||O\r"
         "L|1|N\r")
RESULT = "H|\\^&|||ANALYZER1\rP|1\rO|1|SID0001\rR|1|^^^GLU|5.4|mmol/L||N||F\rL|1|N\r"


def frames_of(text: str, first: int = 1) -> list[bytes]:
    """Wire frames of a message as a conforming sender would send them."""
    out, n = [], first
    for t, final in codec.frame_texts(text.encode("latin-1")):
        out.append(codec.build_frame(n, t, final))
        n = codec.next_frame_number(n)
    return out


class LinkTestCase(SynchronousTestCase):
    config = LinkConfig()

    def setUp(self) -> None:
        self.clock = Clock()
        self.received: list[str] = []
        self.accepting = True
        self.link = ASTMLink(self.clock, self.config, on_message=self.received.append,
                             accept_inbound=lambda: self.accepting, name="test")
        self.tr = StringTransport()
        self.link.makeConnection(self.tr)

    def tearDown(self) -> None:
        self.link.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def out(self) -> bytes:
        data = self.tr.value()
        self.tr.clear()
        return data

    def send(self, text: str = ORDER):
        results: list = []
        d = self.link.send_message(text)
        d.addBoth(results.append)
        return results

    def ack_all(self, results: list, count: int) -> list[bytes]:
        """Answer ENQ and C{count} frames with ACK; return the frames seen."""
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ACK)
        seen = []
        for _ in range(count):
            seen.append(self.out())
            self.link.dataReceived(ACK)
        return seen


class SendTests(LinkTestCase):
    def test_happy_path(self) -> None:
        """ENQ, ACK, four frames numbered 1..4 each ACKed, EOT, result with the counts."""
        results = self.send()
        seen = self.ack_all(results, 4)
        self.assertEqual(seen, frames_of(ORDER))
        self.assertEqual(self.out(), EOT)
        self.assertEqual(results, [SendResult(frames=4, records=4)])
        self.assertEqual(self.link.state, NEUTRAL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_frame_numbers_wrap_and_long_records(self) -> None:
        """Ten records: frames 1..7, 0, 1, 2; a 300-byte record goes as ETB + ETX frames."""
        text = "H|\\^&\r" + "".join(f"R|{i}|^^^T{i}|1\r" for i in range(1, 8)) + \
            "C|1|L|" + "x" * 300 + "|G\rL|1|N\r"
        results = self.send(text)
        seen = self.ack_all(results, 11)
        self.assertEqual([f[1:2] for f in seen], [b"1", b"2", b"3", b"4", b"5", b"6", b"7",
                                                  b"0", b"1", b"2", b"3"])
        self.assertEqual(codec.parse_frame(seen[8]).final, False)
        self.assertEqual(len(seen[8]), 247)
        self.assertEqual(self.out(), EOT)
        self.assertEqual(results, [SendResult(frames=11, records=10)])

    def test_nak_then_retransmit_same_frame(self) -> None:
        results = self.send()
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ACK)
        first = self.out()
        self.link.dataReceived(NAK)
        self.assertEqual(self.out(), first)  # same frame, same number
        self.link.dataReceived(b"?")         # any other reply counts as NAK
        self.assertEqual(self.out(), first)
        self.link.dataReceived(ACK)
        self.assertEqual(self.out()[1:2], b"2")
        for _ in range(3):
            self.link.dataReceived(ACK)
            self.out()
        self.assertEqual(results[0].retransmissions, 2)
        self.assertEqual(results[0].frames, 4)

    def test_six_naks_abort(self) -> None:
        """A frame is sent at most 6 times; the sixth NAK aborts with EOT and a reason."""
        results = self.send()
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ACK)
        frame = self.out()
        for attempt in range(1, 6):
            self.link.dataReceived(NAK)
            self.assertEqual(self.out(), frame, attempt)
        self.assertEqual(results, [])
        self.link.dataReceived(NAK)
        self.assertEqual(self.out(), EOT)
        [f] = results
        f.trap(LinkError)
        self.assertEqual(f.value.phase, "transfer")
        self.assertIn("refused (NAK) after 6 attempts", f.value.reason)
        self.assertTrue(f.value.transient)
        self.assertEqual(self.link.state, NEUTRAL)

    def test_no_reply_to_enq(self) -> None:
        results = self.send()
        self.assertEqual(self.out(), ENQ)
        self.clock.advance(14.9)
        self.assertEqual(results, [])
        self.clock.advance(0.2)
        self.assertEqual(self.out(), EOT)
        results[0].trap(LinkError)
        self.assertEqual(results[0].value.phase, "establishment")
        self.assertIn("no reply to ENQ within 15 s", results[0].value.reason)

    def test_enq_ignores_other_bytes(self) -> None:
        results = self.send()
        self.out()
        self.link.dataReceived(b"\r\nxyz")
        self.assertEqual(self.link.state, ESTABLISHING)
        self.link.dataReceived(ACK)
        self.assertEqual(self.link.state, TRANSFER)
        self.assertEqual(results, [])

    def test_no_ack_to_frame(self) -> None:
        results = self.send()
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.clock.advance(15)
        self.assertEqual(self.out(), EOT)
        results[0].trap(LinkError)
        self.assertEqual(results[0].value.phase, "transfer")
        self.assertIn("no reply to frame 1 within 15 s", results[0].value.reason)

    def test_busy_nak_retries_after_10s(self) -> None:
        results = self.send()
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(NAK)
        self.assertEqual(self.link.state, BUSY_WAIT)
        self.clock.advance(9.9)
        self.assertEqual(self.out(), b"")
        self.clock.advance(0.1)
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ACK)
        for _ in range(4):
            self.out()
            self.link.dataReceived(ACK)
        self.assertEqual(self.out(), EOT)
        self.assertEqual(results[0].busy, 1)

    def test_busy_gives_up(self) -> None:
        results = self.send()
        for _ in range(5):
            self.assertEqual(self.out(), ENQ)
            self.link.dataReceived(NAK)
            self.clock.advance(10)
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(NAK)
        results[0].trap(LinkError)
        self.assertEqual(results[0].value.phase, "establishment")
        self.assertIn("busy: ENQ answered NAK 6 times", results[0].value.reason)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_receiver_interrupt_resends_whole_message(self) -> None:
        """EOT after frame 2: we terminate, let the instrument send, then start again at H."""
        results = self.send()
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.link.dataReceived(EOT)           # frame 2 accepted, please stop
        self.assertEqual(self.out(), EOT)
        self.assertEqual(self.link.state, NEUTRAL)
        self.clock.advance(5)
        self.assertEqual(self.out(), b"")     # hold-off: no ENQ of ours
        self.link.dataReceived(ENQ)           # the instrument takes the line
        self.assertEqual(self.out(), ACK)
        for f in frames_of(RESULT):
            self.link.dataReceived(f)
            self.assertEqual(self.out(), ACK)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [RESULT])
        self.assertEqual(self.out(), ENQ)     # our turn again, from the start
        seen = []
        self.link.dataReceived(ACK)
        for _ in range(4):
            seen.append(self.out())
            self.link.dataReceived(ACK)
        self.assertEqual(seen, frames_of(ORDER))
        self.assertEqual(self.out(), EOT)
        self.assertEqual(results[0].interrupts, 1)

    def test_receiver_interrupt_holdoff_expires(self) -> None:
        results = self.send()
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.link.dataReceived(EOT)
        self.assertEqual(self.out(), EOT)
        self.clock.advance(14.9)
        self.assertEqual(self.out(), b"")
        self.clock.advance(0.1)
        self.assertEqual(self.out(), ENQ)
        self.assertEqual(results, [])

    def test_receiver_interrupt_on_last_frame_is_success(self) -> None:
        results = self.send("H|\\^&\rL|1|N\r")
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.link.dataReceived(EOT)
        self.assertEqual(self.out(), EOT)
        self.assertEqual(results, [SendResult(frames=2, records=2)])
        # The next message waits for the hold-off.
        results2 = self.send("H|\\^&\rL|1|N\r")
        self.assertEqual(self.out(), b"")
        self.clock.advance(15)
        self.assertEqual(self.out(), ENQ)
        self.assertEqual(results2, [])

    def test_interrupt_ignored_when_configured(self) -> None:
        self.link.config = LinkConfig(honour_interrupt=False)
        results = self.send()
        self.out()
        self.link.dataReceived(ACK)
        self.out()
        self.link.dataReceived(EOT)
        self.assertEqual(self.out()[1:2], b"2")
        for _ in range(3):
            self.link.dataReceived(ACK)
            self.out()
        self.assertEqual(results[0].frames, 4)

    def test_too_many_interrupts(self) -> None:
        results = self.send()
        for _ in range(4):
            self.assertEqual(self.out(), ENQ)
            self.link.dataReceived(ACK)
            self.out()
            self.link.dataReceived(EOT)
            self.assertEqual(self.out(), EOT)
            self.clock.advance(15)
        results[0].trap(LinkError)
        self.assertIn("interrupted 4 times", results[0].value.reason)

    def test_bad_message_fails_without_traffic(self) -> None:
        results = self.send("H|\\^&\rP|1|\x05\r")
        results[0].trap(LinkError)
        self.assertFalse(results[0].value.transient)
        self.assertEqual(self.out(), b"")

    def test_messages_queue_in_order(self) -> None:
        r1 = self.send("H|\\^&\rL|1|N\r")
        r2 = self.send("H|\\^&\rP|1\rL|1|N\r")
        self.ack_all(r1, 2)
        self.assertEqual(self.out(), EOT + ENQ)
        self.link.dataReceived(ACK)
        for _ in range(3):
            self.out()
            self.link.dataReceived(ACK)
        self.assertEqual(self.out(), EOT)
        self.assertEqual([r.records for r in r1 + r2], [2, 3])

    def test_connection_lost_fails_pending(self) -> None:
        r1 = self.send()
        r2 = self.send()
        self.out()
        self.link.dataReceived(ACK)
        self.link.connectionLost(Failure(ConnectionLost()))
        for r in (r1, r2):
            r[0].trap(LinkError)
            self.assertEqual(r[0].value.phase, "connection")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        r3 = self.send()
        r3[0].trap(LinkError)


class ContentionTests(LinkTestCase):
    def test_computer_yields_then_sends(self) -> None:
        """Both send ENQ: we (computer) receive the instrument's message first, then send."""
        results = self.send()
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ENQ)                 # contention
        self.assertEqual(self.out(), b"")
        self.assertEqual(self.link.state, CONTENTION)
        self.clock.advance(1)
        self.link.dataReceived(ENQ)                 # instrument re-sends after >= 1 s
        self.assertEqual(self.out(), ACK)
        self.assertEqual(self.link.state, RECEIVING)
        for f in frames_of(RESULT):
            self.link.dataReceived(f)
            self.assertEqual(self.out(), ACK)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [RESULT])
        self.assertEqual(self.out(), ENQ)           # now ours
        self.link.dataReceived(ACK)
        for _ in range(4):
            self.out()
            self.link.dataReceived(ACK)
        self.assertEqual(self.out(), EOT)
        self.assertEqual(results[0].contentions, 1)

    def test_contention_wait_expires(self) -> None:
        results = self.send()
        self.out()
        self.link.dataReceived(ENQ)
        self.clock.advance(19.9)
        self.assertEqual(self.out(), b"")
        self.clock.advance(0.1)
        self.assertEqual(self.out(), ENQ)
        self.assertEqual(self.link.state, ESTABLISHING)
        self.assertEqual(results, [])

    def test_instrument_role_resends_enq(self) -> None:
        self.link.config = LinkConfig(role="instrument")
        results = self.send()
        self.out()
        self.link.dataReceived(ENQ)
        self.assertEqual(self.out(), b"")
        self.clock.advance(1)
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ACK)
        self.assertEqual(self.link.state, TRANSFER)
        self.assertEqual(results, [])

    def test_contention_without_inbound_handler_naks(self) -> None:
        """No one to take the instrument's message: NAK its ENQ (it keeps it), send ours."""
        self.accepting = False
        results = self.send()
        self.out()
        self.link.dataReceived(ENQ)
        self.clock.advance(1)
        self.link.dataReceived(ENQ)
        self.assertEqual(self.out(), NAK + ENQ)
        self.link.dataReceived(ACK)
        self.assertEqual(self.link.state, TRANSFER)
        self.assertEqual(results, [])

    def test_incoming_while_sending_is_queued_after(self) -> None:
        """A message queued while we receive goes out after the instrument's EOT."""
        self.link.dataReceived(ENQ)
        self.assertEqual(self.out(), ACK)
        results = self.send()
        self.assertEqual(self.out(), b"")
        self.link.dataReceived(frames_of(RESULT)[0])
        self.assertEqual(self.out(), ACK)
        self.link.dataReceived(EOT + ACK)           # EOT, then (coalesced) a stray byte
        self.assertEqual(self.out(), ENQ)
        self.assertEqual(results, [])


class ReceiveTests(LinkTestCase):
    def enq(self) -> None:
        self.link.dataReceived(ENQ)
        self.assertEqual(self.out(), ACK)

    def test_receive_message_in_one_chunk(self) -> None:
        self.link.dataReceived(ENQ + b"".join(frames_of(RESULT)) + EOT)
        self.assertEqual(self.out(), ACK * 6)
        self.assertEqual(self.received, [RESULT])
        self.assertEqual(self.link.state, NEUTRAL)

    def test_eot_not_answered(self) -> None:
        self.enq()
        self.link.dataReceived(EOT)
        self.assertEqual(self.out(), b"")

    def test_bad_checksum_nak_then_retransmit(self) -> None:
        self.enq()
        good = frames_of(RESULT)
        bad = bytearray(good[0])
        bad[-3] ^= 1
        self.link.dataReceived(bytes(bad))
        self.assertEqual(self.out(), NAK)
        for f in good:
            self.link.dataReceived(f)
            self.assertEqual(self.out(), ACK)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [RESULT])
        self.assertEqual(self.link.stats["rejected_frames"], 1)

    def test_wrong_frame_number_nak(self) -> None:
        self.enq()
        f = frames_of(RESULT)
        self.link.dataReceived(f[0])
        self.assertEqual(self.out(), ACK)
        self.link.dataReceived(codec.build_frame(7, b"P|1\r"))
        self.assertEqual(self.out(), NAK)
        for x in f[1:]:
            self.link.dataReceived(x)
            self.assertEqual(self.out(), ACK)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [RESULT])

    def test_repeated_frame_accepted_once(self) -> None:
        self.enq()
        f = frames_of(RESULT)
        self.link.dataReceived(f[0])
        self.link.dataReceived(f[1])
        self.link.dataReceived(f[1])                # our ACK was lost
        self.assertEqual(self.out(), ACK * 3)
        for x in f[2:]:
            self.link.dataReceived(x)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [RESULT])
        self.assertEqual(self.link.stats["duplicate_frames"], 1)

    def test_etb_continuations_joined(self) -> None:
        text = "H|\\^&\rR|1|^^^X|" + "9" * 500 + "\rL|1|N\r"
        self.enq()
        wire = frames_of(text)
        self.assertEqual(len(wire), 5)
        for w in wire:
            self.link.dataReceived(w)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [text])

    def test_packed_message_and_frame_numbers_wrap(self) -> None:
        text = "H|\\^&\r" + "".join(f"R|{i}|^^^T|{i}\r" for i in range(1, 60)) + "L|1|N\r"
        self.enq()
        n = 1
        for t, final in codec.frame_texts(text.encode(), packed=True):
            self.link.dataReceived(codec.build_frame(n, t, final))
            n = codec.next_frame_number(n)
        self.assertEqual(self.out(), ACK * 4)
        self.link.dataReceived(EOT)
        self.assertEqual(self.received, [text])

    def test_receiver_timeout_discards(self) -> None:
        self.enq()
        f = frames_of(RESULT)
        self.link.dataReceived(f[0])
        self.clock.advance(29.9)
        self.link.dataReceived(f[1])                # resets the timer
        self.clock.advance(29.9)
        self.assertEqual(self.link.state, RECEIVING)
        self.clock.advance(0.1)
        self.assertEqual(self.link.state, NEUTRAL)
        self.assertEqual(self.link.stats["discarded_messages"], 1)
        # The instrument starts over; only the full message is delivered.
        self.out()
        self.link.dataReceived(ENQ + b"".join(f) + EOT)
        self.assertEqual(self.received, [RESULT])

    def test_enq_restart_discards_partial(self) -> None:
        self.enq()
        f = frames_of(RESULT)
        self.link.dataReceived(f[0] + f[1])
        self.link.dataReceived(ENQ)
        self.assertEqual(self.out(), ACK * 3)
        self.link.dataReceived(b"".join(f) + EOT)
        self.assertEqual(self.received, [RESULT])

    def test_connection_lost_discards_partial(self) -> None:
        self.enq()
        self.link.dataReceived(frames_of(RESULT)[0])
        self.link.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.received, [])
        self.assertEqual(self.link.stats["discarded_messages"], 1)

    def test_busy_naks_enq(self) -> None:
        self.accepting = False
        self.link.dataReceived(ENQ)
        self.assertEqual(self.out(), NAK)
        self.assertEqual(self.link.state, NEUTRAL)

    def test_two_messages_one_session_and_no_terminator(self) -> None:
        self.enq()
        for w in frames_of(RESULT + "H|\\^&\rQ|1|^SID9||ALL||||||||O\r"):
            self.link.dataReceived(w)
        self.assertEqual(self.received, [RESULT])   # first one as soon as its L arrived
        self.link.dataReceived(EOT)
        self.assertEqual(self.received[1], "H|\\^&\rQ|1|^SID9||ALL||||||||O\r")

    def test_message_bound(self) -> None:
        self.link.config = LinkConfig(max_message_bytes=100)
        self.enq()
        self.link.dataReceived(codec.build_frame(1, b"H|\\^&\r"))
        self.link.dataReceived(codec.build_frame(2, b"C|1|" + b"x" * 120 + b"\r"))
        self.assertEqual(self.out(), ACK + NAK)

    def test_frames_outside_session_ignored(self) -> None:
        self.link.dataReceived(frames_of(RESULT)[0])
        self.assertEqual(self.out(), b"")
        self.assertEqual(self.received, [])

    def test_handler_error_does_not_break_link(self) -> None:
        def boom(text: str) -> None:
            raise RuntimeError("handler bug")
        self.link.on_message = boom
        self.link.dataReceived(ENQ + b"".join(frames_of(RESULT)) + EOT)
        self.assertEqual(self.out(), ACK * 6)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.link.state, NEUTRAL)


class ProbeTests(LinkTestCase):
    def probe(self) -> list:
        results: list = []
        self.link.probe().addBoth(results.append)
        return results

    def test_ack(self) -> None:
        r = self.probe()
        self.assertEqual(self.out(), ENQ)
        self.link.dataReceived(ACK)
        self.assertEqual(self.out(), EOT)
        self.assertEqual(r, ["ACK"])

    def test_nak(self) -> None:
        r = self.probe()
        self.out()
        self.link.dataReceived(NAK)
        self.assertEqual(r, ["NAK"])
        self.assertEqual(self.out(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        r = self.probe()
        self.out()
        self.clock.advance(15)
        r[0].trap(LinkError)
        self.assertEqual(self.out(), EOT)

    def test_contention(self) -> None:
        r = self.probe()
        self.out()
        self.link.dataReceived(ENQ)
        self.assertEqual(r, ["ENQ"])
        self.assertEqual(self.link.state, CONTENTION)
        self.clock.advance(20)
        self.assertEqual(self.link.state, NEUTRAL)

    def test_busy_link(self) -> None:
        self.link.dataReceived(ENQ)
        self.assertEqual(self.probe(), ["BUSY"])
