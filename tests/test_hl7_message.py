"""HL7 message helpers: normalising, header fields, charsets, escapes, ACK parse/build."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import hl7
from twisted.trial.unittest import SynchronousTestCase

from medagent.hl7.message import (
    Ack,
    HL7Error,
    Separators,
    build_ack,
    charset,
    charset_of_bytes,
    control_id,
    decode,
    escape,
    message_type,
    normalise,
    parse_ack,
    segments,
    unescape,
    version,
)

ORM = (
    "MSH|^~\\&|EHR|HOSP|LIS|LAB|20240115103000||ORM^O01^ORM_O01|SR7f3a-v1|P|2.5.1|||AL|NE||"
    "UNICODE UTF-8\r"
    "PID|1||12345^^^MRN~998^^^NHS||DOE^JOHN||19800101|M\r"
    "ORC|NW|SR7f3a\r"
)
# Same message with unusual separators: field '#', component '$', repetition '*',
# escape '@', subcomponent '!'.
ODD = "MSH#$*@!#EHR#HOSP#LIS#LAB#20240115##ADT$A01#CTL-9#T#2.3\rPID#1##A@F@B$C*D\r"
NOW = datetime(2024, 1, 15, 10, 30, 1, tzinfo=timezone.utc)


class NormaliseTests(SynchronousTestCase):
    def test_newlines_become_cr(self) -> None:
        text = "MSH|^~\\&|A|B\nPID|1\r\nPV1|1\n"
        self.assertEqual(normalise(text), "MSH|^~\\&|A|B\rPID|1\rPV1|1\r")

    def test_surrounding_whitespace_and_blank_lines(self) -> None:
        text = "\ufeff \n\r\nMSH|^~\\&|A\n\n\nPID|1\r\r\n  \n"
        self.assertEqual(normalise(text), "MSH|^~\\&|A\rPID|1\r")

    def test_ends_with_one_cr(self) -> None:
        self.assertEqual(normalise(ORM), ORM)
        self.assertEqual(normalise(ORM.rstrip("\r")), ORM)

    def test_must_start_with_msh(self) -> None:
        for bad in ("", "   ", "PID|1\rMSH|^~\\&|", "hello", "MSH"):
            with self.assertRaises(HL7Error) as cm:
                normalise(bad)
            self.assertEqual(str(cm.exception), "HL7 message must start with MSH")

    def test_not_text(self) -> None:
        self.assertRaises(HL7Error, normalise, b"MSH|^~\\&|")


class HeaderTests(SynchronousTestCase):
    def test_fields(self) -> None:
        self.assertEqual(control_id(ORM), "SR7f3a-v1")
        self.assertEqual(message_type(ORM), "ORM^O01")
        self.assertEqual(version(ORM), "2.5.1")

    def test_custom_separators(self) -> None:
        self.assertEqual(control_id(ODD), "CTL-9")
        self.assertEqual(message_type(ODD), "ADT^A01")
        self.assertEqual(version(ODD), "2.3")
        seps = Separators.from_msh(ODD)
        self.assertEqual((seps.field, seps.component, seps.repetition), ("#", "$", "*"))
        self.assertEqual((seps.escape, seps.subcomponent), ("@", "!"))
        self.assertEqual(str(seps), "#$*@!")

    def test_short_encoding_characters_use_defaults(self) -> None:
        seps = Separators.from_msh("MSH|^~|A|B")
        self.assertEqual(str(seps), "|^~\\&")

    def test_missing_control_id(self) -> None:
        for text in ("MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r", "MSH|^~\\&|A|B\r"):
            with self.assertRaises(HL7Error) as cm:
                control_id(text)
            self.assertEqual(
                str(cm.exception), "HL7 message has no MSH-10 (message control id)"
            )

    def test_incomplete_msh(self) -> None:
        self.assertRaises(HL7Error, control_id, "MSH|^~\\&\rPID|1\r")

    def test_message_type_without_trigger(self) -> None:
        self.assertEqual(message_type("MSH|^~\\&|A|B|C|D|2024||ACK|1|P|2.1\r"), "ACK")

    def test_segments_and_repetitions(self) -> None:
        segs = segments(ORM)
        self.assertEqual([s[0] for s in segs], ["MSH", "PID", "ORC"])
        self.assertEqual(segs[0][10], "SR7f3a-v1")
        self.assertEqual(segs[1][3].split("~"), ["12345^^^MRN", "998^^^NHS"])
        # python-hl7 agrees with our field numbering.
        parsed = hl7.parse(ORM)
        self.assertEqual(str(parsed.segment("MSH")(10)), segs[0][10])
        self.assertEqual(str(parsed.segment("PID")(3)), segs[1][3])


class CharsetTests(SynchronousTestCase):
    def msh18(self, value: str) -> str:
        return f"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||{value}\r"

    def test_table_0211(self) -> None:
        cases = {
            "ASCII": "ascii",
            "8859/1": "latin-1",
            "8859/15": "iso8859_15",
            "UNICODE UTF-8": "utf-8",
            "ISO IR87": "iso2022_jp",
            "GB 18030-2000": "gb18030",
            "BIG-5": "big5",
            "KS X 1001": "euc_kr",
            "unicode  utf-8": "utf-8",
            "UNICODE_UTF-8": "utf-8",
            "UTF-8": "utf-8",
        }
        for value, codec in cases.items():
            self.assertEqual(charset(self.msh18(value)), codec, value)

    def test_first_repetition_is_the_default(self) -> None:
        self.assertEqual(charset(self.msh18("8859/1~ISO IR87")), "latin-1")

    def test_empty_or_unknown(self) -> None:
        self.assertIsNone(charset(self.msh18("")))
        self.assertIsNone(charset(self.msh18("KLINGON")))
        self.assertIsNone(charset("MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\r"))
        self.assertIsNone(charset("MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5||||||UNICODE\r"))

    def test_custom_separators(self) -> None:
        text = "MSH#$*@!#A#B#C#D#2024##ADT$A01#1#P#2.5######8859/1*x\r"
        self.assertEqual(charset(text), "latin-1")

    def test_from_bytes_and_decode(self) -> None:
        text = self.msh18("8859/1") + "PID|1||||M\xfcller\r"
        raw = text.encode("latin-1")
        self.assertEqual(charset_of_bytes(raw), "latin-1")
        self.assertEqual(decode(raw), text)
        # An explicit per-endpoint encoding wins over MSH-18.
        self.assertEqual(decode(raw, encoding="cp1252"), text)
        # Without MSH-18: utf-8 by default, and invalid bytes are an HL7Error, not a crash.
        plain = "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1||||M\xfcller\r"
        self.assertEqual(decode(plain.encode("utf-8")), plain)
        self.assertRaises(HL7Error, decode, plain.encode("latin-1"))
        self.assertRaises(HL7Error, decode, plain.encode("utf-8"), encoding="no-such-codec")
        self.assertIsNone(charset_of_bytes(b"\x00\x01garbage"))


class EscapeTests(SynchronousTestCase):
    def test_round_trip_default(self) -> None:
        text = "a|b^c~d\\e&f\rg"
        escaped = escape(text)
        self.assertEqual(escaped, "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\.br\\g")
        self.assertEqual(unescape(escaped), text)

    def test_custom_separators(self) -> None:
        seps = Separators.from_msh(ODD)
        self.assertEqual(escape("x#y$z@", seps), "x@F@y@S@z@E@")
        self.assertEqual(unescape("A@F@B", seps), "A#B")
        self.assertEqual(unescape("A@F@B", "#$*@!"), "A#B")

    def test_non_ascii_is_left_alone(self) -> None:
        self.assertEqual(escape("Müller"), "Müller")

    def test_hex_and_unknown(self) -> None:
        self.assertEqual(unescape("a\\X41\\b\\H\\c\\N\\"), "aAbc")
        self.assertEqual(unescape("a\\Xzz\\b"), "ab")
        self.assertEqual(unescape("lone\\"), "lone\\")

    def test_agrees_with_python_hl7_on_delimiters(self) -> None:
        msg = hl7.parse(ORM)
        text = "x|y^z~w&v\\u"
        self.assertEqual(unescape(escape(text)), msg.unescape(msg.escape(text)))


class ParseAckTests(SynchronousTestCase):
    def test_plain_ack(self) -> None:
        ack = parse_ack(
            "MSH|^~\\&|LIS|LAB|EHR|HOSP|2024||ACK^O01^ACK|9|P|2.5.1\rMSA|AA|SR7f3a-v1\r"
        )
        self.assertEqual(ack, Ack("AA", "SR7f3a-v1", None))
        self.assertTrue(ack.positive)

    def test_newlines_and_msa3(self) -> None:
        ack = parse_ack("MSH|^~\\&|L|L|E|H|2024||ACK|9|P|2.3\nMSA|ae|c1|Bad \\F\\ value\n")
        self.assertEqual(ack, Ack("AE", "c1", "Bad | value"))
        self.assertFalse(ack.positive)

    def test_order_response_with_err(self) -> None:
        text = (
            "MSH|^~\\&|L|L|E|H|2024||ORR^O02|9|P|2.5.1\r"
            "MSA|AR|c2\r"
            "ERR|||204^Unknown key identifier^HL70357|E||||Patient not found\r"
        )
        self.assertEqual(parse_ack(text), Ack("AR", "c2", "Patient not found"))
        no_err8 = text.replace("|E||||Patient not found", "|E")
        self.assertEqual(parse_ack(no_err8).text, "Unknown key identifier")

    def test_v23_err1(self) -> None:
        text = (
            "MSH|^~\\&|L|L|E|H|2024||ACK|9|P|2.3\rMSA|AE|c3\r"
            "ERR|PID^1^3^103&Table value not found\r"
        )
        self.assertEqual(parse_ack(text).text, "Table value not found")

    def test_custom_separators(self) -> None:
        text = "MSH#$*@!#L#L#E#H#2024##ACK#9#P#2.3\rMSA#CA#CTL-9\r"
        self.assertEqual(parse_ack(text), Ack("CA", "CTL-9", None))

    def test_no_msa(self) -> None:
        with self.assertRaises(HL7Error) as cm:
            parse_ack(ORM)
        self.assertIn("no MSA", str(cm.exception))
        self.assertRaises(HL7Error, parse_ack, "MSH|^~\\&|L|L|E|H|2024||ACK|9|P|2.3\rMSA||c\r")
        self.assertRaises(HL7Error, parse_ack, "not hl7")


class BuildAckTests(SynchronousTestCase):
    def test_fields_per_protocols_1_5(self) -> None:
        ack = build_ack(ORM, control_id="LIS000042", now=NOW)
        self.assertEqual(
            ack,
            "MSH|^~\\&|LIS|LAB|EHR|HOSP|20240115103001+0000||ACK^O01^ACK|LIS000042|P|2.5.1"
            "||||||UNICODE UTF-8\r"
            "MSA|AA|SR7f3a-v1\r",
        )
        # An independent parser reads it back the same way.
        parsed = hl7.parse(ack)
        msh = parsed.segment("MSH")
        self.assertEqual(
            [str(msh(i)) for i in (3, 4, 5, 6, 9, 10, 11, 12, 15, 16, 18)],
            ["LIS", "LAB", "EHR", "HOSP", "ACK^O01^ACK", "LIS000042", "P", "2.5.1", "", "",
             "UNICODE UTF-8"],
        )
        self.assertEqual(str(parsed.segment("MSA")(2)), "SR7f3a-v1")

    def test_new_control_id_each_time(self) -> None:
        ids = {control_id(build_ack(ORM)) for _ in range(50)}
        self.assertEqual(len(ids), 50)
        self.assertNotIn("SR7f3a-v1", ids)

    def test_negative_has_text_and_err(self) -> None:
        ack = build_ack(ORM, "AE", error="Order rejected: unknown test ^X", error_code="103")
        parsed = parse_ack(ack)
        self.assertEqual(parsed.code, "AE")
        self.assertEqual(parsed.control_id, "SR7f3a-v1")
        self.assertEqual(parsed.text, "Order rejected: unknown test ^X")
        err = [s for s in segments(ack) if s[0] == "ERR"][0]
        self.assertEqual(err[3], "103^Table value not found^HL70357")
        self.assertEqual(err[4], "E")
        self.assertEqual(unescape(err[8]), "Order rejected: unknown test ^X")

    def test_default_negative_texts(self) -> None:
        for code, text in [("AE", "Application Error"), ("AR", "Application Reject"),
                           ("CE", "Commit Error"), ("CR", "Commit Reject")]:
            self.assertEqual(parse_ack(build_ack(ORM, code)).text, text)
        self.assertIsNone(parse_ack(build_ack(ORM, "CA")).text)
        self.assertEqual(parse_ack(build_ack(ORM, "AA", text="OK")).text, "OK")

    def test_old_version_err1(self) -> None:
        ack = build_ack(ODD, "AR", error="no", error_code="200")
        err = [s for s in segments(ack) if s[0] == "ERR"][0]
        self.assertEqual(err[1], "$$$200!Unsupported message type!HL70357")

    def test_keeps_original_separators(self) -> None:
        ack = build_ack(ODD, "AE", text="bad # value", now=NOW, control_id="A1")
        self.assertTrue(
            ack.startswith("MSH#$*@!#LIS#LAB#EHR#HOSP#20240115103001+0000##ACK$A01$ACK#A1#T#2.3\r")
        )
        self.assertIn("MSA#AE#CTL-9#bad @F@ value\r", ack)
        self.assertEqual(parse_ack(ack), Ack("AE", "CTL-9", "bad # value"))

    def test_trailing_empty_fields_dropped(self) -> None:
        original = "MSH|^~\\&|A|B|C|D|2024||ADT^A01|m1|P|2.5\rEVN|A01\r"
        ack = build_ack(original, now=NOW, control_id="x")
        self.assertEqual(
            ack.split("\r")[0], "MSH|^~\\&|C|D|A|B|20240115103001+0000||ACK^A01^ACK|x|P|2.5"
        )

    def test_no_trigger(self) -> None:
        ack = build_ack("MSH|^~\\&|A|B|C|D|2024||ADT|m1|P|2.1\r", control_id="x")
        self.assertEqual(message_type(ack), "ACK")

    def test_local_time_offset(self) -> None:
        tz = timezone(timedelta(hours=2))
        ack = build_ack(ORM, now=datetime(2024, 1, 15, 12, 0, 0, tzinfo=tz))
        self.assertIn("|20240115120000+0200|", ack)

    def test_newline_input(self) -> None:
        ack = build_ack(ORM.replace("\r", "\n"))
        self.assertEqual(parse_ack(ack).control_id, "SR7f3a-v1")

    def test_bad_code(self) -> None:
        self.assertRaises(ValueError, build_ack, ORM, "XX")

    def test_not_hl7(self) -> None:
        self.assertRaises(HL7Error, build_ack, "hello")
