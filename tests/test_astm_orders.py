"""Tests for L{medagent.astm.orders}: FHIR ServiceRequest (+ Patient, Specimen) -> H/P/O/L."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from twisted.trial.unittest import SynchronousTestCase

from medagent.astm import codec
from medagent.astm.orders import OrderError, astm_datetime, service_request_to_astm

LAB = "http://lab.example.org/analyzer-tests"

SERVICE_REQUEST = {
    "resourceType": "ServiceRequest",
    "id": "sr1",
    "status": "active",
    "intent": "order",
    "priority": "routine",
    "code": {"coding": [{"system": "http://loinc.org", "code": "24321-2"},
                        {"system": LAB, "code": "GLU"}, {"system": LAB, "code": "CREA"}]},
    "subject": {"reference": "Patient/p1"},
    "authoredOn": "2024-01-15T10:00:00+01:00",
    "requester": {"display": "Dr House"},
}
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "urn:ssn", "value": "123-45"},
                   {"type": {"coding": [{"code": "MR"}]}, "value": "PID12345"}],
    "name": [{"use": "nickname", "given": ["Jo"]},
             {"use": "official", "family": "DOE", "given": ["JOHN", "A"]}],
    "birthDate": "1980-01-01",
    "gender": "male",
}
SPECIMEN = {
    "resourceType": "Specimen",
    "accessionIdentifier": {"value": "SID0001"},
    "type": {"text": "SERUM",
             "coding": [{"system": "http://snomed.info/sct", "code": "119364003"}]},
    "collection": {"collectedDateTime": "2024-01-15T09:30:00+01:00"},
}
NOW = datetime(2024, 1, 15, 10, 30, 0)


class OrderTests(SynchronousTestCase):
    def test_reference_example(self) -> None:
        """The worked example of protocols.md 2.8, byte for byte."""
        text = service_request_to_astm(
            {**SERVICE_REQUEST, "requester": None}, PATIENT, SPECIMEN, sender="LIS",
            receiver="ANALYZER1", test_system=LAB, now=NOW)
        self.assertEqual(text, (
            "H|\\^&|||LIS|||||ANALYZER1||P|LIS2-A2|20240115103000\r"
            "P|1|PID12345|||DOE^JOHN^A||19800101|M\r"
            "O|1|SID0001||^^^GLU\\^^^CREA|R|20240115100000|20240115093000||||N||||SERUM"
            "||||||||||O\r"
            "L|1|N\r"))

    def test_decodes_back(self) -> None:
        text = service_request_to_astm(SERVICE_REQUEST, PATIENT, SPECIMEN, now=NOW,
                                       control_id="sr1")
        h, p, o, lr = codec.decode_message(text)
        self.assertEqual(codec.get_field(h, 3), "sr1")
        self.assertEqual(codec.get_field(h, 5), "MEDAGENT")
        self.assertEqual(codec.get_field(o, 5), ["", "", "", "24321-2"])  # first coding only
        self.assertEqual(codec.get_field(o, 17), "Dr House")
        self.assertEqual(lr, ["L", "1", "N"])
        codec.prepare_message(text)  # pushable as is

    def test_priority_cancel_notes_and_escaping(self) -> None:
        sr = {**SERVICE_REQUEST, "priority": "stat", "status": "revoked",
              "note": [{"text": "fasting | 12h\nno caffeine"}]}
        patient = {**PATIENT, "name": [{"family": "O'BRIEN^X", "given": ["MARY"]}],
                   "gender": "other"}
        h, p, o, c, lr = codec.decode_message(
            service_request_to_astm(sr, patient, SPECIMEN, tests=["NA", "K"], now=NOW))
        self.assertEqual(codec.get_field(p, 6), ["O'BRIEN^X", "MARY"])
        self.assertEqual(codec.get_field(p, 9), "U")
        self.assertEqual(codec.get_field(o, 5), [["", "", "", "NA"], ["", "", "", "K"]])
        self.assertEqual(codec.get_field(o, 6), "S")
        self.assertEqual(codec.get_field(o, 12), "C")
        self.assertEqual(c, ["C", "1", "L", "fasting | 12h no caffeine", "G"])

    def test_minimal_and_fallbacks(self) -> None:
        sr = {"resourceType": "ServiceRequest", "code": {"coding": [{"code": "HBA1C"}]},
              "requisition": {"value": "REQ9"}}
        text = service_request_to_astm(sr, now=NOW, test_component=1)
        self.assertEqual(codec.split_records(text)[1:], [
            "P|1", "O|1|REQ9||HBA1C|R||||||N||||||||||||||O", "L|1|N"])
        spec = {"resourceType": "Specimen", "identifier": [{"value": "TUBE7"}],
                "type": {"coding": [{"code": "URINE"}]}}
        o = codec.decode_message(service_request_to_astm(sr, {"id": "p9"}, spec, now=NOW))[2]
        self.assertEqual((codec.get_field(o, 3), codec.get_field(o, 16)), ("TUBE7", "URINE"))

    def test_missing_essentials(self) -> None:
        self.assertRaises(OrderError, service_request_to_astm, {"resourceType": "Patient"})
        no_specimen = {**SERVICE_REQUEST}
        e = self.assertRaises(OrderError, service_request_to_astm, no_specimen, PATIENT)
        self.assertIn("specimen ID", str(e))
        no_code = {**SERVICE_REQUEST, "code": {"text": "sugar"}}
        self.assertRaises(OrderError, service_request_to_astm, no_code, PATIENT, SPECIMEN)
        self.assertRaises(OrderError, service_request_to_astm, SERVICE_REQUEST, PATIENT,
                          SPECIMEN, test_system="urn:none")
        self.assertRaises(OrderError, service_request_to_astm, SERVICE_REQUEST,
                          {"resourceType": "Specimen"}, SPECIMEN)

    def test_datetimes(self) -> None:
        self.assertEqual(astm_datetime("2024-01-15"), "20240115")
        self.assertEqual(astm_datetime("1980"), "1980")
        self.assertEqual(astm_datetime("2024-01-15T09:30Z"), "202401150930" + "00")
        self.assertEqual(astm_datetime("2024-01-15T09:30:05.123+01:00"), "20240115093005")
        self.assertEqual(astm_datetime("2024-01-15T09:30:05+01:00",
                                       timezone(timedelta(hours=-5))), "20240115033005")
        self.assertEqual(astm_datetime(None), "")
        self.assertRaises(OrderError, astm_datetime, "15/01/2024")


class DocsExampleTests(SynchronousTestCase):
    def test_docs_example_runs_and_matches(self) -> None:
        """The example in docs/astm.md produces the records the doc shows."""
        import os
        import re
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "astm.md")
        with open(path, encoding="utf-8") as f:
            doc = f.read()
        code = re.findall(r"```python\n(.*?)```", doc, re.S)[0]
        shown = re.findall(r"gives.*?```\n(.*?)```", doc, re.S)[0]
        scope: dict = {}
        exec(code, scope)
        self.assertEqual(scope["body"], shown.replace("\n", "\r"))
