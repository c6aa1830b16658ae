"""
Tests for L{medagent.astm.codec}: E1381 frames (published checksum vectors, ETB splitting,
the stream decoder) and E1394 records (delimiters from H, escapes, repeats, components).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from medagent.astm import codec
from medagent.astm.codec import (
    ACK, CR, ENQ, EOT, ETB, ETX, LF, NAK, STX, ASTMError, Delimiters, FrameError,
)


class ChecksumTests(SynchronousTestCase):
    """The checksum against vectors published outside this project (protocols.md 2.5.3)."""

    def test_published_vectors(self) -> None:
        self.assertEqual(codec.checksum(b"4L|1|N\r\x03"), b"07")
        self.assertEqual(
            codec.checksum(b"1H|\\^&|||Mini LIS||||||||LIS2-A|20210309142633\r\x03"), b"96")
        self.assertEqual(
            codec.checksum(b"3O|1|SID305||ABO|N|20210309142633|||||N||||CENTBLOOD\r\x03"),
            b"4B")
        self.assertEqual(
            codec.checksum("2P|1|666|||頭いい^素晴らしい|||U\r\x03".encode("utf-8")), b"3D")

    def test_sample_dialogue_frames(self) -> None:
        """The four frames of the worked order example (protocols.md 2.8), byte for byte."""
        records = [
            b"H|\\^&|||LIS|||||ANALYZER1||P|LIS2-A2|20240115103000",
            b"P|1|PID12345|||DOE^JOHN^A||19800101|M",
            b"O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM"
            b"||||||||||O",
            b"L|1|N",
        ]
        sums = [b"F1", b"64", b"F9", b"07"]
        for n, (record, cs) in enumerate(zip(records, sums), start=1):
            frame = codec.build_frame(n, record + CR, final=True)
            self.assertEqual(frame, STX + b"%d" % n + record + CR + ETX + cs + CR + LF)
        self.assertEqual(codec.build_frame(4, b"L|1|N\r").hex(" "),
                         "02 34 4c 7c 31 7c 4e 0d 03 30 37 0d 0a")

    def test_low_eight_bits(self) -> None:
        self.assertEqual(codec.checksum(b"\xff\xff"), b"FE")
        self.assertEqual(codec.checksum(b""), b"00")


class FrameTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for n in range(8):
            for final in (True, False):
                f = codec.parse_frame(codec.build_frame(n, b"R|1|^^^GLU|5.4\r", final))
                self.assertEqual((f.number, f.text, f.final), (n, b"R|1|^^^GLU|5.4\r", final))

    def test_bad_checksum(self) -> None:
        frame = bytearray(codec.build_frame(2, b"P|1||PID1\r"))
        frame[-3] ^= 1
        e = self.assertRaises(FrameError, codec.parse_frame, bytes(frame))
        self.assertIn("checksum mismatch", str(e))

    def test_lowercase_checksum_accepted(self) -> None:
        frame = codec.build_frame(1, b"H|\\^&\r").replace(b"\x03" + b"%s" % codec.checksum(
            b"1H|\\^&\r\x03"), b"\x03" + codec.checksum(b"1H|\\^&\r\x03").lower())
        self.assertEqual(codec.parse_frame(frame).number, 1)

    def test_bad_frame_number_and_missing_end(self) -> None:
        self.assertRaises(FrameError, codec.parse_frame, b"\x028L|1\r\x03" + b"00\r\n")
        self.assertRaises(FrameError, codec.parse_frame, b"\x021L|1\rXX\r\n")
        self.assertRaises(FrameError, codec.parse_frame, b"no stx")
        self.assertRaises(ASTMError, codec.build_frame, 8, b"x")

    def test_garbage_before_stx_ignored(self) -> None:
        self.assertEqual(codec.parse_frame(b"\x00zz" + codec.build_frame(3, b"L|1\r")).number, 3)

    def test_frame_numbers_wrap(self) -> None:
        n, seen = 1, []
        for _ in range(10):
            seen.append(n)
            n = codec.next_frame_number(n)
        self.assertEqual(seen, [1, 2, 3, 4, 5, 6, 7, 0, 1, 2])


class FrameTextsTests(SynchronousTestCase):
    def test_one_record_per_frame(self) -> None:
        texts = codec.frame_texts(b"H|\\^&\rP|1\rL|1|N\r")
        self.assertEqual(texts, [(b"H|\\^&\r", True), (b"P|1\r", True), (b"L|1|N\r", True)])

    def test_long_record_split_into_etb_frames(self) -> None:
        """A 312-byte record: one 240-byte ETB frame (247 on the wire) and one 72-byte end frame."""
        record = b"O|1|" + b"x" * 307 + CR
        self.assertEqual(len(record), 312)
        texts = codec.frame_texts(record)
        self.assertEqual([(len(t), f) for t, f in texts], [(240, False), (72, True)])
        self.assertEqual(b"".join(t for t, _ in texts), record)
        wire = codec.build_frame(1, *texts[0])
        self.assertEqual(len(wire), 247)
        self.assertEqual(wire[-5:-4], ETB)

    def test_exact_multiple(self) -> None:
        texts = codec.frame_texts(b"C|" + b"y" * 477 + CR)
        self.assertEqual([(len(t), f) for t, f in texts], [(240, False), (240, True)])

    def test_packed(self) -> None:
        msg = b"".join(b"R|%d|" % i + b"z" * 100 + CR for i in range(5))
        texts = codec.frame_texts(msg, packed=True)
        self.assertEqual([f for _, f in texts], [False, False, True])
        self.assertEqual(b"".join(t for t, _ in texts), msg)
        self.assertTrue(all(len(t) <= 240 for t, _ in texts))

    def test_missing_final_cr_added(self) -> None:
        self.assertEqual(codec.frame_texts(b"H|\\^&\rL|1"), [(b"H|\\^&\r", True),
                                                            (b"L|1\r", True)])

    def test_prepare_message(self) -> None:
        frames, records = codec.prepare_message("H|\\^&\nP|1\r\nO|1|S1\r\rL|1|N")
        self.assertEqual(records, 4)
        self.assertEqual([t for t, _ in frames], [b"H|\\^&\r", b"P|1\r", b"O|1|S1\r", b"L|1|N\r"])
        self.assertRaises(ASTMError, codec.prepare_message, "")
        self.assertRaises(ASTMError, codec.prepare_message, "\r\n")
        e = self.assertRaises(ASTMError, codec.prepare_message, "H|\\^&\rP|1|\x02x\rL|1")
        self.assertIn("STX", str(e))
        self.assertRaises(ASTMError, codec.prepare_message, "H|\\^&\r|bad\r")
        e = self.assertRaises(ASTMError, codec.prepare_message, "H|\\^&\rP|1|||頭\r")
        self.assertIn("latin-1", str(e))
        frames, _ = codec.prepare_message("H|\\^&\rP|1|||頭\r", encoding="utf-8")
        self.assertEqual(frames[1][0], "P|1|||頭\r".encode("utf-8"))


class DecoderTests(SynchronousTestCase):
    def events(self, decoder: codec.FrameDecoder, data: bytes) -> list:
        decoder.feed(data)
        return list(decoder.events())

    def test_controls_and_frames(self) -> None:
        d = codec.FrameDecoder()
        wire = ENQ + codec.build_frame(1, b"H|\\^&\r") + codec.build_frame(
            2, b"L|1|N\r") + EOT
        evs = self.events(d, wire)
        self.assertEqual([k for k, _ in evs], ["control", "frame", "frame", "control"])
        self.assertEqual(evs[0][1], ENQ)
        self.assertEqual(evs[1][1], codec.Frame(1, b"H|\\^&\r", True))
        self.assertEqual(evs[3][1], EOT)

    def test_byte_at_a_time(self) -> None:
        """A frame split at every offset decodes the same."""
        wire = codec.build_frame(5, b"R|1|^^^GLU|5.4|mmol/L\r", False) + EOT
        d = codec.FrameDecoder()
        evs = []
        for i in range(len(wire)):
            evs += self.events(d, wire[i:i + 1])
        self.assertEqual(evs, [("frame", codec.Frame(5, b"R|1|^^^GLU|5.4|mmol/L\r", False)),
                               ("control", EOT)])
        self.assertEqual(d.ignored, 0)

    def test_bad_checksum_reported(self) -> None:
        frame = bytearray(codec.build_frame(1, b"H|\\^&\r"))
        frame[-4] = ord("0") if frame[-4] != ord("0") else ord("1")
        evs = self.events(codec.FrameDecoder(), bytes(frame))
        self.assertEqual(evs[0][0], "bad")
        self.assertIn("checksum", evs[0][1])

    def test_bounded(self) -> None:
        d = codec.FrameDecoder(max_text=100)
        evs = self.events(d, STX + b"1" + b"a" * 5000)
        self.assertEqual(evs, [("bad", "frame longer than 100 text bytes")])
        self.assertLess(len(d._body), 200)
        # It recovers on the next frame.
        evs = self.events(d, ETX + b"00\r\n" + codec.build_frame(2, b"L|1\r"))
        self.assertEqual(evs, [("frame", codec.Frame(2, b"L|1\r", True))])

    def test_eot_inside_frame_abandons_it(self) -> None:
        evs = self.events(codec.FrameDecoder(), STX + b"1H|partial" + EOT)
        self.assertEqual(evs, [("control", EOT)])

    def test_stx_restarts_frame(self) -> None:
        evs = self.events(codec.FrameDecoder(), STX + b"1H|lost" + codec.build_frame(
            1, b"H|\\^&\r"))
        self.assertEqual(evs, [("frame", codec.Frame(1, b"H|\\^&\r", True))])

    def test_trailer_optional_and_noise_ignored(self) -> None:
        d = codec.FrameDecoder()
        f = codec.build_frame(1, b"L|1\r")[:-2]  # no CR LF
        evs = self.events(d, b"noise" + f + ACK + NAK)
        self.assertEqual([k for k, _ in evs], ["frame", "control", "control"])
        self.assertEqual(d.ignored, 5)

    def test_rest(self) -> None:
        d = codec.FrameDecoder()
        d.feed(EOT + ENQ + b"abc")
        self.assertEqual(d.next_event(), ("control", EOT))
        self.assertEqual(d.rest(), ENQ + b"abc")
        self.assertIsNone(d.next_event())


class DelimiterTests(SynchronousTestCase):
    def test_from_header(self) -> None:
        self.assertEqual(Delimiters.from_header("H|\\^&|||X"), Delimiters())
        self.assertEqual(Delimiters.from_header("H|@^\\"), Delimiters("|", "@", "^", "\\"))
        self.assertRaises(ASTMError, Delimiters.from_header, "P|1")
        self.assertRaises(ASTMError, Delimiters.from_header, "H||^&")
        self.assertRaises(ASTMError, Delimiters.from_header, "H|a^&")


class RecordTests(SynchronousTestCase):
    def test_decode_sample_order(self) -> None:
        msg = ("H|\\^&|||LIS|||||ANALYZER1||P|LIS2-A2|20240115103000\r"
               "P|1|PID12345|||DOE^JOHN^A||19800101|M\r"
               "O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM"
               "||||||||||O\r"
               "L|1|N\r")
        h, p, o, last = codec.decode_message(msg)
        self.assertEqual(h[:2], ["H", "\\^&"])
        self.assertEqual(codec.get_field(h, 5), "LIS")
        self.assertEqual(codec.get_field(h, 10), "ANALYZER1")
        self.assertEqual(codec.get_field(h, 12), "P")
        self.assertEqual(codec.get_field(h, 14), "20240115103000")
        self.assertEqual(codec.get_field(p, 3), "PID12345")
        self.assertEqual(codec.get_field(p, 6), ["DOE", "JOHN", "A"])
        self.assertEqual(codec.get_field(o, 3), "SID0001")
        self.assertEqual(codec.get_field(o, 5), [["", "", "", "GLU"], ["", "", "", "CREA"]])
        self.assertEqual(codec.get_field(o, 12), "N")
        self.assertEqual(codec.get_field(o, 26), "O")
        self.assertEqual(codec.get_field(o, 40), "")
        self.assertEqual(last, ["L", "1", "N"])
        # And back, byte for byte.
        self.assertEqual(codec.encode_message([h, p, o, last]), msg)

    def test_escapes_round_trip(self) -> None:
        value = "a|b^c\\d&e"
        rec = codec.encode_record(["C", "1", "L", value, "G"])
        self.assertEqual(rec, "C|1|L|a&F&b&S&c&R&d&E&e|G")
        self.assertEqual(codec.decode_record(rec), ["C", "1", "L", value, "G"])

    def test_escapes_with_declared_delimiters(self) -> None:
        """GeneXpert-style header H|@^\\ : repeat @, escape backslash (protocols.md 2.7.1)."""
        msg = "H|@^\\|||GeneXpert\rR|1|^^^FLU@^^^RSV|NEG\\R\\POS\rL|1|N\r"
        h, r, last = codec.decode_message(msg)
        self.assertEqual(h[1], "@^\\")
        self.assertEqual(codec.get_field(r, 3), [["", "", "", "FLU"], ["", "", "", "RSV"]])
        self.assertEqual(codec.get_field(r, 4), "NEG@POS")
        d = Delimiters.from_header(msg)
        self.assertEqual(codec.encode_message([h, r, last], d), msg)

    def test_unknown_and_stray_escapes_kept(self) -> None:
        self.assertEqual(codec.unescape("x&H&y&Xa0&z"), "x&H&y&Xa0&z")
        self.assertEqual(codec.unescape("AT&T"), "AT&T")
        self.assertEqual(codec.unescape("a&|&b"), "a|b")  # vendor form
        self.assertEqual(codec.decode_record("R|1|a&|&b|c"), ["R", "1", "a|b", "c"])

    def test_encode_shapes(self) -> None:
        self.assertEqual(codec.encode_record(["P", 1, None, "ID", None, ["DOE", "JOHN"]]),
                         "P|1||ID||DOE^JOHN")
        self.assertEqual(codec.encode_record(["O", "1", "S", None, [["", "", "", "A"],
                                                                    ["", "", "", "B"]]]),
                         "O|1|S||^^^A\\^^^B")
        self.assertEqual(codec.encode_record(["O", "1", "S", None, [["X"], "Y"]]),
                         "O|1|S||X\\Y")
        self.assertEqual(codec.encode_record(["L", "1", "N", "", None]), "L|1|N")
        self.assertEqual(codec.encode_record(["H", "ignored", None, None, "LIS"]),
                         "H|\\^&|||LIS")
        self.assertEqual(codec.encode_record(["H"]), "H|\\^&")
        self.assertRaises(ASTMError, codec.encode_record, [])
        self.assertRaises(ASTMError, codec.encode_record, ["PP", "1"])
        self.assertRaises(ASTMError, codec.encode_record, ["P", object()])
        self.assertRaises(ASTMError, codec.encode_message, [])

    def test_all_record_types(self) -> None:
        msg = ("H|\\^&|||ANALYZER\rP|1\rO|1|S1\rR|1|^^^GLU|5.4|mmol/L|3.9^6.1|N||F\r"
               "C|1|I|hemolysed|G\rM|1|VENDOR^X\rS|1|x\rQ|1|^SID0001||ALL||||||||O\rL|1|F\r")
        recs = codec.decode_message(msg)
        self.assertEqual([r[0] for r in recs], list("HPORCMSQL"))
        self.assertEqual(codec.get_field(recs[3], 6), ["3.9", "6.1"])
        self.assertEqual(codec.get_field(recs[7], 3), ["", "SID0001"])
        self.assertEqual(codec.encode_message(recs), msg)

    def test_bad_header(self) -> None:
        self.assertRaises(ASTMError, codec.decode_record, "H|\\^&X")
        self.assertRaises(ASTMError, codec.decode_record, "")


class AssemblerTests(SynchronousTestCase):
    def test_groups_messages(self) -> None:
        a = codec.MessageAssembler()
        self.assertEqual(a.add_text("H|\\^&\rP|1\r"), [])
        self.assertEqual(a.add_text("R|1\rL|1|N\rH|\\^&\r"), [["H|\\^&", "P|1", "R|1", "L|1|N"]])
        self.assertEqual(a.add("Q|1"), [])
        self.assertEqual(a.add("H|\\^&"), [["H|\\^&", "Q|1"]])  # new H ends it
        self.assertEqual(a.end_session(False), [])             # abort drops
        a.add("H|\\^&")
        self.assertEqual(a.end_session(True), [["H|\\^&"]])     # EOT keeps

    def test_bounded(self) -> None:
        a = codec.MessageAssembler(max_records=3)
        a.add_text("H|\\^&\rR|1\rR|2\r")
        self.assertRaises(ASTMError, a.add, "R|3")
        self.assertEqual(a.pending, [])
