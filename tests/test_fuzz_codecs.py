"""
Property tests for every decoder that reads bytes from outside: arbitrary input raises only
the module's documented error type, buffers stay bounded, and a valid value round-trips.

Deterministic (derandomize, no example database) and modest in size, so CI never flakes and
stays quick; a failure prints the shrunk example to add as a regression case.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from medagent import jsonsafe, wire
from medagent.astm import codec as astm
from medagent.dicom import pdu as dicom_pdu
from medagent.fhir import FHIRError
from medagent.hl7 import message as hl7
from medagent.hl7.mllp import FS, VT, FramingError, MLLPDecoder, frame
from medagent.relay.push import MAX_TTL_S, parse_push_body

fuzz = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

#: bytes biased towards the framing characters of the protocols under test
framing_bytes = st.lists(
    st.one_of(st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\n", b"\x02", b"\x03", b"\x04",
                               b"\x05", b"\x06", b"\x15", b"\x17", b"|", b"^", b"&", b"\\",
                               b"MSH", b"H|\\^&", b"0", b"7"]),
              st.binary(max_size=40)),
    max_size=40,
).map(b"".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


class MLLPFuzz(SynchronousTestCase):
    @fuzz
    @given(data=framing_bytes, cuts=st.lists(st.integers(0, 2000), max_size=8),
           max_size=st.integers(1, 64))
    def test_any_bytes(self, data: bytes, cuts: list[int], max_size: int) -> None:
        d = MLLPDecoder(max_size=max_size)
        for chunk in chunks(data, cuts):
            try:
                payloads = d.feed(chunk)
            except FramingError as e:
                payloads = getattr(e, "payloads", [])
            self.assertLessEqual(d.buffered, max_size)
            for p in payloads:
                self.assertLessEqual(len(p), max_size)
                self.assertNotIn(VT[0], p)
                self.assertNotIn(FS[0], p)

    @fuzz
    @given(payloads=st.lists(st.binary(max_size=200).map(
        lambda b: b.replace(VT, b"").replace(FS, b"")), max_size=5),
        cuts=st.lists(st.integers(0, 2000), max_size=8))
    def test_round_trip(self, payloads: list[bytes], cuts: list[int]) -> None:
        d = MLLPDecoder()
        out: list[bytes] = []
        for chunk in chunks(b"".join(frame(p) for p in payloads), cuts):
            out += d.feed(chunk)
        self.assertEqual(out, payloads)
        self.assertEqual(d.buffered, 0)


astm_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                           blacklist_characters="|\\^&"), max_size=12)


class ASTMFuzz(SynchronousTestCase):
    @fuzz
    @given(data=framing_bytes, cuts=st.lists(st.integers(0, 2000), max_size=8),
           max_text=st.integers(1, 80))
    def test_frame_decoder_any_bytes(self, data: bytes, cuts: list[int], max_text: int) -> None:
        d = astm.FrameDecoder(max_text=max_text)
        for chunk in chunks(data, cuts):
            d.feed(chunk)
            for kind, value in d.events():
                self.assertIn(kind, (astm.EVENT_CONTROL, astm.EVENT_FRAME, astm.EVENT_BAD_FRAME))
                if kind == astm.EVENT_FRAME:
                    self.assertLessEqual(len(value.text), max_text)
            self.assertLessEqual(len(d._body), max_text + 1)
            self.assertEqual(len(d._buf) - d._pos, 0)  # drained: nothing kept but state

    @fuzz
    @given(raw=framing_bytes)
    @example(raw=b"\x02")
    @example(raw=b"\x02\x03AB")
    def test_parse_frame_any_bytes(self, raw: bytes) -> None:
        try:
            f = astm.parse_frame(raw)
        except astm.FrameError:
            return
        self.assertTrue(0 <= f.number <= 7)

    @fuzz
    @given(number=st.integers(0, 7), text=st.binary(max_size=240).map(
        lambda b: bytes(c for c in b if c not in astm.RESTRICTED and c != 0x0D)),
        final=st.booleans(), cuts=st.lists(st.integers(0, 300), max_size=6))
    def test_frame_round_trip(self, number: int, text: bytes, final: bool,
                              cuts: list[int]) -> None:
        raw = astm.build_frame(number, text, final)
        self.assertEqual(astm.parse_frame(raw), astm.Frame(number, text, final))
        d = astm.FrameDecoder()
        events = []
        for chunk in chunks(raw, cuts):
            d.feed(chunk)
            events += list(d.events())
        self.assertEqual(events, [(astm.EVENT_FRAME, astm.Frame(number, text, final))])

    @fuzz
    @given(text=st.text(max_size=200))
    @example(text="H")
    @example(text="H|||||")
    @example(text="H|\\^&&")
    def test_records_any_text(self, text: str) -> None:
        try:
            records = astm.decode_message(text)
        except astm.ASTMError:
            return
        for record in records:
            self.assertIsInstance(record, list)
        assembler = astm.MessageAssembler(max_records=5)
        try:
            assembler.add_text(text)
        except astm.ASTMError:
            pass
        self.assertLessEqual(len(assembler.pending), 5)

    @fuzz
    @given(rtype=st.sampled_from("PORCQML"),
           fields=st.lists(st.one_of(st.text(max_size=10).filter(lambda t: "\r" not in t
                                                                 and "\n" not in t),
                                     st.lists(astm_text.filter(bool), min_size=2, max_size=3)),
                           max_size=6))
    def test_record_round_trip(self, rtype: str, fields: list[Any]) -> None:
        record = [rtype] + fields
        while len(record) > 1 and record[-1] in ("", []):
            record.pop()
        text = astm.encode_record(record)
        self.assertEqual(astm.decode_record(text), record)


hl7_field = st.text(alphabet=string.ascii_letters + string.digits + " .-", max_size=10)


class HL7Fuzz(SynchronousTestCase):
    @fuzz
    @given(text=st.one_of(st.text(max_size=200), framing_bytes.map(
        lambda b: b.decode("latin-1"))))
    @example(text="MSH")
    @example(text="MSH|")
    @example(text="MSH||")
    @example(text="MSH\r|^~\\&")
    @example(text="MSH|^~\\&|||||||||\rMSA")
    @example(text="MSHMM")  # a letter as separator: the ACK built from it had no MSA
    def test_any_text(self, text: str) -> None:
        for read in (hl7.normalise, hl7.control_id, hl7.message_type, hl7.version,
                     hl7.charset, hl7.segments, hl7.parse_ack):
            try:
                read(text)
            except hl7.HL7Error:
                pass
        try:
            ack = hl7.build_ack(text, "AE", error="bad")
        except hl7.HL7Error:
            return
        self.assertEqual(hl7.parse_ack(ack).code, "AE")

    @fuzz
    @given(payload=st.binary(max_size=200), encoding=st.sampled_from(
        [None, "utf-8", "latin-1", "cp1252", "no-such-codec"]))
    def test_decode_bytes(self, payload: bytes, encoding: str | None) -> None:
        try:
            self.assertIsInstance(hl7.decode(payload, encoding), str)
        except hl7.HL7Error:
            pass

    @fuzz
    @given(sending=hl7_field, control=hl7_field.filter(lambda t: t.strip()),
           trigger=st.sampled_from(["A01", "O01", "R01"]), extra=st.lists(
               st.text(max_size=30).filter(lambda t: "\r" not in t and "\n" not in t),
               max_size=3))
    def test_round_trip(self, sending: str, control: str, trigger: str,
                        extra: list[str]) -> None:
        nte = "".join(f"\rNTE|{i}||{hl7.escape(t)}" for i, t in enumerate(extra))
        text = (f"MSH|^~\\&|{sending}|FAC|RCV|FAC|20240101||ADT^{trigger}|{control}|P|2.5"
                f"{nte}\r")
        self.assertEqual(hl7.normalise(text), text.strip() + "\r")
        self.assertEqual(hl7.control_id(text), control.strip())
        self.assertEqual(hl7.message_type(text), f"ADT^{trigger}")
        for i, t in enumerate(extra):
            self.assertEqual(hl7.unescape(hl7.segments(text)[1 + i][3]), t)
        ack = hl7.parse_ack(hl7.build_ack(text, "AA"))
        self.assertEqual((ack.code, ack.control_id), ("AA", control.strip()))


def wire_messages() -> st.SearchStrategy[dict[str, Any]]:
    ids = st.text(alphabet=string.ascii_letters + string.digits + "-.", min_size=1,
                  max_size=64)
    texts = st.text(min_size=1, max_size=30)

    def build(kind: str, fields: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        msg = {k: v for k, v in extra.items() if k not in ("type", "callback", "statusCode")}
        msg.update(fields)
        msg["type"] = kind
        return msg

    return st.one_of(
        st.builds(build, st.just(wire.CONNECT_REQUEST),
                  st.fixed_dictionaries({"accessToken": texts, "agentId": ids}),
                  st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
        st.builds(build, st.just(wire.TRANSMIT_REQUEST),
                  st.fixed_dictionaries({"remote": texts, "contentType": texts,
                                         "body": st.text(max_size=50),
                                         "callback": texts}),
                  st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
        st.builds(build, st.just(wire.TRANSMIT_RESPONSE),
                  st.fixed_dictionaries({"remote": texts, "body": st.text(max_size=50),
                                         "statusCode": st.integers(100, 599)}),
                  st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
        st.builds(build, st.sampled_from(sorted(wire.KNOWN_TYPES - set(wire._REQUIRED)
                                                - {wire.BATCH})),
                  st.just({}), st.dictionaries(st.text(max_size=8), json_values,
                                               max_size=3)),
        # a batch must carry 1 to MAX_BATCH messages (checked one by one by unbatch)
        st.builds(build, st.just(wire.BATCH),
                  st.fixed_dictionaries({"messages": st.lists(
                      st.fixed_dictionaries({"type": st.just(wire.HEARTBEAT_REQUEST)}),
                      min_size=1, max_size=wire.MAX_BATCH)}),
                  st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
    )


class WireFuzz(SynchronousTestCase):
    @fuzz
    @given(data=st.one_of(st.binary(max_size=300), json_values.map(
        lambda v: json.dumps(v).encode()), st.dictionaries(
            st.sampled_from(["type", "callback", "agentId", "accessToken", "remote", "body",
                             "contentType", "statusCode", "pushId"]),
            json_values | st.sampled_from(sorted(wire.KNOWN_TYPES)), max_size=6).map(
                lambda d: json.dumps(d).encode())))
    @example(data=b"[" * 5000)
    @example(data=b'{"type":"agent:connect:request","agentId":"","accessToken":"x"}')
    @example(data=b"NaN")
    def test_any_frame(self, data: bytes) -> None:
        try:
            msg = wire.decode(data, max_size=1000)
        except wire.WireError as e:
            self.assertLessEqual(len(e.reason), 300)
            return
        self.assertIn(msg["type"], wire.KNOWN_TYPES)

    @fuzz
    @given(msg=wire_messages())
    def test_round_trip(self, msg: dict[str, Any]) -> None:
        msg = {k: v for k, v in msg.items() if v is not None}
        self.assertEqual(wire.decode(wire.encode(msg)), msg)


class JSONSafeFuzz(SynchronousTestCase):
    @fuzz
    @given(data=st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(
        ["[", "]", "{", "}", '"', "\\", ",", ":", "1", "a", "null"]), max_size=300).map(
            "".join)))
    def test_any_input(self, data: bytes | str) -> None:
        try:
            jsonsafe.loads(data, max_depth=8)
        except jsonsafe.JSONInputError:
            pass

    @fuzz
    @given(value=json_values)
    def test_round_trip(self, value: Any) -> None:
        self.assertEqual(jsonsafe.loads(json.dumps(value)), value)


push_fields = st.fixed_dictionaries(
    {"destination": st.text(min_size=1, max_size=20),
     "contentType": st.text(min_size=1, max_size=20),
     "body": st.text(min_size=1, max_size=50)},
    optional={"waitForResponse": st.booleans(), "waitTimeout": st.integers(0, 55_000),
              "returnAck": st.sampled_from(["first", "application"]),
              "ttl": st.floats(min_value=0.001, max_value=MAX_TTL_S)})


class PushBodyFuzz(SynchronousTestCase):
    @fuzz
    @given(payload=st.one_of(json_values, st.dictionaries(
        st.sampled_from(["destination", "contentType", "body", "waitForResponse",
                         "waitTimeout", "returnAck", "ttl", "resourceType", "parameter"]),
        json_values | st.sampled_from(["Parameters", "first", "true"]), max_size=7)))
    @example(payload={"resourceType": "Parameters", "parameter": 5})  # was a TypeError (500)
    @example(payload={"resourceType": "Parameters", "parameter": [{"name": 1}]})
    def test_any_json(self, payload: Any) -> None:
        # what REST can hand it: a decoded JSON value (no NaN/Infinity, jsonsafe refuses them)
        try:
            parse_push_body(payload)
        except FHIRError as e:
            self.assertEqual(e.status, 400)

    @fuzz
    @given(fields=push_fields, as_parameters=st.booleans())
    def test_round_trip(self, fields: dict[str, Any], as_parameters: bool) -> None:
        payload: dict[str, Any] = dict(fields)
        if as_parameters:
            payload = {"resourceType": "Parameters", "parameter": [
                {"name": k, ("valueBoolean" if isinstance(v, bool) else "valueString"
                             if isinstance(v, str) else "valueDecimal"): v}
                for k, v in fields.items()]}
        request = parse_push_body(payload)
        self.assertEqual((request.destination, request.content_type, request.body),
                         (fields["destination"], fields["contentType"], fields["body"]))
        self.assertEqual(request.wait, fields.get("waitForResponse", False))
        self.assertEqual(request.wait_timeout_ms, fields.get("waitTimeout", 10_000))
        self.assertEqual(request.expires_in, fields.get("ttl"))


class PushBodyRegressions(SynchronousTestCase):
    """Found by fuzzing parse_push_body."""

    def test_huge_wait_timeout_is_400(self) -> None:
        e = self.assertRaises(FHIRError, parse_push_body,
                              {"destination": "d", "contentType": "c", "body": "b",
                               "waitTimeout": 10 ** 400})
        self.assertEqual(e.status, 400)

    def test_parameter_not_a_list_is_400(self) -> None:
        e = self.assertRaises(FHIRError, parse_push_body,
                              {"resourceType": "Parameters", "parameter": 5})
        self.assertEqual(e.status, 400)


def pdu_bytes() -> st.SearchStrategy[bytes]:
    header = st.builds(lambda t, n: bytes([t, 0]) + n.to_bytes(4, "big"),
                       st.integers(0, 9), st.integers(0, 300))
    return st.lists(st.one_of(header, st.binary(max_size=60)), max_size=8).map(b"".join)


class DICOMPDUFuzz(SynchronousTestCase):
    @fuzz
    @given(data=pdu_bytes(), cuts=st.lists(st.integers(0, 600), max_size=6),
           max_length=st.integers(16, 4096))
    @example(data=b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x00", cuts=[],
             max_length=4096)
    @example(data=b"\x01\x00\x00\x00\x00\x00", cuts=[], max_length=4096)
    def test_any_bytes(self, data: bytes, cuts: list[int], max_length: int) -> None:
        d = dicom_pdu.PDUDecoder(max_length=max_length)
        limit = max(max_length, dicom_pdu.MAX_ASSOCIATE_PDU)
        for chunk in chunks(data, cuts):
            try:
                d.feed(chunk)
            except dicom_pdu.PDUError:
                return  # the association is aborted; the decoder is not used again
            self.assertLessEqual(d.buffered, limit + 6)

    @fuzz
    @given(calling=st.text(string.ascii_uppercase + string.digits, min_size=1, max_size=16),
           called=st.text(string.ascii_uppercase + string.digits, min_size=1, max_size=16),
           n_contexts=st.integers(1, 5), max_pdu=st.integers(4096, 1 << 20),
           cuts=st.lists(st.integers(0, 2000), max_size=6))
    def test_associate_rq_round_trip(self, calling: str, called: str, n_contexts: int,
                                     max_pdu: int, cuts: list[int]) -> None:
        contexts = dicom_pdu.build_contexts(
            [(f"1.2.840.10008.5.1.4.1.1.{i + 1}", ["1.2.840.10008.1.2"])
             for i in range(n_contexts)])
        raw = dicom_pdu.associate_rq(calling, called, contexts, max_pdu).encode()
        d = dicom_pdu.PDUDecoder()
        out: list[Any] = []
        for chunk in chunks(raw, cuts):
            out += d.feed(chunk)
        self.assertEqual(len(out), 1)
        self.assertEqual(out[0].encode(), raw)
        self.assertEqual(out[0].calling_ae_title, calling)
        self.assertEqual(out[0].called_ae_title, called)
        self.assertEqual(d.buffered, 0)

    @fuzz
    @given(pdvs=st.lists(st.tuples(st.integers(1, 255).filter(lambda n: n % 2),
                                   st.binary(min_size=1, max_size=300)), min_size=1,
                         max_size=4), cuts=st.lists(st.integers(0, 1500), max_size=6))
    def test_p_data_round_trip(self, pdvs: list[tuple[int, bytes]], cuts: list[int]) -> None:
        items = b"".join((len(v) + 1).to_bytes(4, "big") + bytes([cx]) + v for cx, v in pdvs)
        raw = b"\x04\x00" + len(items).to_bytes(4, "big") + items
        d = dicom_pdu.PDUDecoder(max_length=4096)
        out: list[Any] = []
        for chunk in chunks(raw, cuts):
            out += d.feed(chunk)
        self.assertEqual(len(out), 1)
        self.assertEqual([(i.presentation_context_id, i.presentation_data_value)
                          for i in out[0].presentation_data_value_items], pdvs)
        self.assertEqual(out[0].encode(), raw)

    @fuzz
    @given(source=st.sampled_from([0, 2]), reason=st.integers(0, 6))
    def test_abort_round_trip(self, source: int, reason: int) -> None:
        raw = dicom_pdu.abort(source, reason).encode()
        (pdu,) = dicom_pdu.PDUDecoder().feed(raw)
        self.assertEqual((pdu.source, pdu.reason_diagnostic),
                         (source, reason if source == 2 else 0))
