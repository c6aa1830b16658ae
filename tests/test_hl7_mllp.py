"""MLLP framing codec: frames split and merged across reads, junk, leniency, limits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from medagent.hl7.mllp import (
    CR,
    FS,
    VT,
    FrameTooLarge,
    FramingError,
    MLLPDecoder,
    frame,
)

MSG1 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|MSG00001|P|2.5\rPID|1||123\r"
MSG2 = MSG1.replace(b"MSG00001", b"MSG00002")


class FrameTests(SynchronousTestCase):
    def test_constants(self) -> None:
        self.assertEqual((VT, FS, CR), (b"\x0b", b"\x1c", b"\r"))

    def test_frame(self) -> None:
        self.assertEqual(frame(b"MSH|x\r"), b"\x0bMSH|x\r\x1c\r")

    def test_frame_refuses_block_bytes(self) -> None:
        """UTF-16 text or pasted binary would cut the frame short at the receiver."""
        self.assertRaises(FramingError, frame, b"MSH|\x0b|")
        self.assertRaises(FramingError, frame, b"MSH|\x1c|")
        self.assertRaises(ValueError, frame, "MSH|\u0b05".encode("utf-16-le"))


class DecoderTests(SynchronousTestCase):
    def test_one_frame(self) -> None:
        d = MLLPDecoder()
        self.assertEqual(d.feed(frame(MSG1)), [MSG1])
        self.assertEqual((d.skipped, d.buffered, d.in_frame), (0, 0, False))

    def test_split_at_every_byte(self) -> None:
        """A frame delivered one byte per read comes out once, whole."""
        d = MLLPDecoder()
        out: list[bytes] = []
        wire = frame(MSG1) + frame(MSG2)
        for i in range(len(wire)):
            out += d.feed(wire[i : i + 1])
        self.assertEqual(out, [MSG1, MSG2])
        self.assertEqual(d.skipped, 0)

    def test_split_between_fs_and_cr(self) -> None:
        d = MLLPDecoder()
        wire = frame(MSG1)
        self.assertEqual(d.feed(wire[:-1]), [MSG1])
        self.assertEqual(d.feed(b"\r"), [])
        self.assertEqual(d.skipped, 0)
        self.assertEqual(d.feed(frame(MSG2)), [MSG2])

    def test_several_frames_in_one_chunk(self) -> None:
        d = MLLPDecoder()
        self.assertEqual(d.feed(frame(MSG1) + frame(MSG2) + frame(MSG1)), [MSG1, MSG2, MSG1])

    def test_frames_and_a_half(self) -> None:
        d = MLLPDecoder()
        wire = frame(MSG1) + frame(MSG2)
        self.assertEqual(d.feed(wire[: len(frame(MSG1)) + 10]), [MSG1])
        self.assertTrue(d.in_frame)
        self.assertEqual(d.buffered, 9)
        self.assertEqual(d.feed(wire[len(frame(MSG1)) + 10 :]), [MSG2])

    def test_junk_before_vt_is_skipped_and_counted(self) -> None:
        d = MLLPDecoder()
        wire = b"\r\n\x00junk" + frame(MSG1) + b"\n\n" + frame(MSG2)
        self.assertEqual(d.feed(wire), [MSG1, MSG2])
        self.assertEqual(d.skipped, 7 + 2)

    def test_fs_without_cr(self) -> None:
        """Some senders end with FS only; the next frame follows directly."""
        d = MLLPDecoder()
        wire = VT + MSG1 + FS + VT + MSG2 + FS
        self.assertEqual(d.feed(wire), [MSG1, MSG2])
        self.assertEqual(d.skipped, 0)

    def test_fs_followed_by_other_byte(self) -> None:
        d = MLLPDecoder()
        self.assertEqual(d.feed(VT + MSG1 + FS + b"\n" + VT + MSG2 + FS + CR), [MSG1, MSG2])
        self.assertEqual(d.skipped, 1)

    def test_empty_frame(self) -> None:
        d = MLLPDecoder()
        self.assertEqual(d.feed(VT + FS + CR), [b""])

    def test_new_vt_inside_frame_restarts(self) -> None:
        """A sender that gave up mid-frame and started again: keep only the complete frame."""
        d = MLLPDecoder()
        self.assertEqual(d.feed(VT + b"MSH|half"), [])
        self.assertEqual(d.feed(frame(MSG2)), [MSG2])
        self.assertEqual(d.truncated, 1)
        self.assertEqual(d.skipped, 1 + len(b"MSH|half"))

    def test_oversize_raises_and_resynchronises(self) -> None:
        d = MLLPDecoder(max_size=100)
        big = b"x" * 101
        with self.assertRaises(FrameTooLarge) as cm:
            d.feed(frame(MSG1[:50]) + frame(big) + frame(MSG2[:60]))
        # The complete frames of the chunk are handed over on the exception.
        self.assertEqual(cm.exception.payloads, [MSG1[:50], MSG2[:60]])
        self.assertEqual(cm.exception.max_size, 100)
        self.assertIsInstance(cm.exception, ValueError)
        self.assertEqual(d.oversize, 1)
        self.assertEqual(d.buffered, 0)
        # The decoder works on.
        self.assertEqual(d.feed(frame(MSG2[:70])), [MSG2[:70]])

    def test_exactly_max_size_is_accepted(self) -> None:
        d = MLLPDecoder(max_size=100)
        self.assertEqual(d.feed(frame(b"y" * 100)), [b"y" * 100])

    def test_oversize_streamed_buffer_stays_bounded(self) -> None:
        """A sender streaming an endless frame: memory never exceeds the limit."""
        d = MLLPDecoder(max_size=1000)
        d.feed(VT)
        self.assertRaises(FrameTooLarge, d.feed, b"z" * 1500)
        self.assertEqual(d.buffered, 0)
        for _ in range(100):
            self.assertEqual(d.feed(b"z" * 4096), [])
            self.assertEqual(d.buffered, 0)
        self.assertEqual(d.oversize, 1)
        # The oversize frame finally ends; the next one is decoded.
        self.assertEqual(d.feed(b"zz" + FS + CR + frame(MSG1)), [MSG1])

    def test_oversize_detected_across_reads(self) -> None:
        d = MLLPDecoder(max_size=100)
        self.assertEqual(d.feed(VT + b"a" * 60), [])
        self.assertEqual(d.buffered, 60)
        self.assertRaises(FrameTooLarge, d.feed, b"a" * 41)
        self.assertEqual(d.buffered, 0)

    def test_waiting_for_vt_buffers_nothing(self) -> None:
        d = MLLPDecoder(max_size=10)
        for _ in range(50):
            self.assertEqual(d.feed(b"noise" * 1000), [])
        self.assertEqual(d.buffered, 0)
        self.assertEqual(d.skipped, 250000)

    def test_reset(self) -> None:
        d = MLLPDecoder()
        d.feed(VT + b"partial")
        d.reset()
        self.assertFalse(d.in_frame)
        self.assertEqual(d.feed(b"rest" + FS + CR + frame(MSG1)), [MSG1])

    def test_bad_max_size(self) -> None:
        self.assertRaises(ValueError, MLLPDecoder, 0)

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        payloads=st.lists(
            st.binary(max_size=300).map(lambda b: b.replace(VT, b"v").replace(FS, b"f")),
            max_size=6,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
        junk=st.binary(max_size=20).map(lambda b: b.replace(VT, b"")),
    )
    def test_any_split_gives_the_same_payloads(self, payloads, cuts, junk) -> None:
        wire = junk + b"".join(frame(p) for p in payloads)
        points = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
        d = MLLPDecoder()
        out: list[bytes] = []
        for a, b in zip(points, points[1:]):
            out += d.feed(wire[a:b])
        self.assertEqual(out, payloads)
        self.assertEqual(d.skipped, len(junk))
        self.assertFalse(d.in_frame)
