"""FHIR ServiceRequest -> ORM^O01 / OML^O21 (protocols.md section 5)."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import hl7
from twisted.trial.unittest import SynchronousTestCase

from medagent.hl7.message import control_id, message_type, segments, unescape
from medagent.hl7.orders import (
    OrderError,
    OrderHeader,
    control_id_for,
    order_control,
    order_message,
)
from tests.peerenv import need

NOW = datetime(2024, 1, 15, 10, 30, 0, tzinfo=timezone.utc)
NPI = "http://hl7.org/fhir/sid/us-npi"

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [
        {"system": "urn:oid:2.16.840.1.113883.4.1", "value": "123-45-6789",
         "type": {"coding": [{"code": "SS"}]}},
        {"value": "MRN12345", "type": {"coding": [{"code": "MR"}]},
         "assigner": {"display": "ACME_HOSP"}},
    ],
    "name": [{"use": "official", "family": "DOE", "given": ["JOHN", "A"]}],
    "birthDate": "1980-01-01",
    "gender": "male",
    "address": [{"line": ["123 MAIN ST"], "city": "SPRINGFIELD", "state": "IL",
                 "postalCode": "62701", "country": "USA"}],
    "telecom": [{"system": "phone", "use": "home", "value": "2175551234"}],
}
PRACTITIONER = {
    "resourceType": "Practitioner",
    "id": "dr1",
    "identifier": [{"system": NPI, "value": "1234567893"}],
    "name": [{"family": "SMITH", "given": ["JANE"]}],
}
ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "e1",
    "class": {"code": "AMB"},
    "identifier": [{"value": "V0001", "type": {"coding": [{"code": "VN"}]},
                    "assigner": {"display": "ACME_HOSP"}}],
}
SERVICE_REQUEST = {
    "resourceType": "ServiceRequest",
    "id": "SR7f3a",
    "meta": {"versionId": "1"},
    "status": "active",
    "intent": "order",
    "identifier": [{"value": "SR7f3a", "type": {"coding": [{"code": "PLAC"}]},
                    "assigner": {"display": "ACME_EHR"}}],
    "requisition": {"value": "GRP001", "assigner": {"display": "ACME_EHR"}},
    "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "108252007"}]}],
    "priority": "routine",
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7",
                         "display": "Glucose [Mass/volume] in Serum or Plasma"}]},
    "subject": {"reference": "Patient/p1"},
    "occurrenceDateTime": "2024-01-15T11:00:00",
    "authoredOn": "2024-01-15T10:29:55",
    "requester": {"reference": "Practitioner/dr1"},
    "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9",
                                "display": "Type 2 diabetes mellitus without complications"}]}],
    "note": [{"text": "Patient fasting since 22:00"}],
}
SPECIMEN = {
    "resourceType": "Specimen",
    "id": "s1",
    "identifier": [{"value": "SP0001"}],
    "type": {"coding": [{"system": "http://snomed.info/sct", "code": "119364003",
                         "display": "Serum specimen"}]},
    "collection": {"collectedDateTime": "2024-01-15T09:30:00"},
}
HEADER = OrderHeader(
    sending_application="ACME_EHR",
    sending_facility="ACME_HOSP",
    receiving_application="LIS",
    receiving_facility="ACME_LAB",
    version="2.5.1",
    accept_ack="AL",
    application_ack="AL",
)

# protocols.md 5.5, the lines our mapping reproduces exactly.
EXAMPLE_ORM = {
    "MSH": "MSH|^~\\&|ACME_EHR|ACME_HOSP|LIS|ACME_LAB|20240115103000+0000||ORM^O01^ORM_O01|"
           "SR7f3a-v1|P|2.5.1|||AL|AL||UNICODE UTF-8",
    "ORC": "ORC|NW|SR7f3a^ACME_EHR||GRP001^ACME_EHR|||^^^20240115110000^^R||20240115102955|||"
           "1234567893^SMITH^JANE^^^^^^NPI&2.16.840.1.113883.4.6&ISO",
    "OBR": "OBR|1|SR7f3a^ACME_EHR||2345-7^Glucose [Mass/volume] in Serum or Plasma^LN|||||||||||"
           "|1234567893^SMITH^JANE^^^^^^NPI&2.16.840.1.113883.4.6&ISO||||||||LAB|||"
           "^^^20240115110000^^R||||E11.9^Type 2 diabetes mellitus without complications^I10",
    "NTE": "NTE|1|P|Patient fasting since 22:00",
}


def orm(**kw):
    args = dict(patient=PATIENT, encounter=ENCOUNTER, requester=PRACTITIONER, header=HEADER,
                control_id="SR7f3a-v1", now=NOW)
    args.update(kw)
    sr = args.pop("service_request", SERVICE_REQUEST)
    return order_message(sr, **args)


def by_name(text: str) -> dict[str, list[str]]:
    return {s[0]: s for s in segments(text)}


class ORMTests(SynchronousTestCase):
    def test_worked_example(self) -> None:
        text = orm()
        lines = {line[:3]: line for line in text.split("\r") if line}
        for name, expected in EXAMPLE_ORM.items():
            self.assertEqual(lines[name], expected, name)
        self.assertEqual(list(lines), ["MSH", "PID", "PV1", "ORC", "OBR", "NTE"])
        self.assertTrue(text.endswith("\r"))

    def test_patient_and_visit(self) -> None:
        seg = by_name(orm())
        pid = seg["PID"]
        # MR first, then the other identifiers, with assigning authority and type.
        self.assertEqual(
            pid[3], "MRN12345^^^ACME_HOSP^MR~123-45-6789^^^&2.16.840.1.113883.4.1&ISO^SS"
        )
        self.assertEqual(pid[5], "DOE^JOHN^A^^^^L")
        self.assertEqual((pid[7], pid[8]), ("19800101", "M"))
        self.assertEqual(pid[11], "123 MAIN ST^^SPRINGFIELD^IL^62701^USA")
        self.assertEqual(pid[13], "2175551234^PRN^PH")
        pv1 = seg["PV1"]
        self.assertEqual((pv1[2], pv1[19]), ("O", "V0001^^^ACME_HOSP^VN"))

    def test_python_hl7_reads_it(self) -> None:
        parsed = hl7.parse(orm())
        self.assertEqual(str(parsed.segment("MSH")(9)), "ORM^O01^ORM_O01")
        self.assertEqual(parsed["OBR.F4.R1.C1"], "2345-7")
        self.assertEqual(parsed["PID.F5.R1.C1"], "DOE")
        self.assertEqual(parsed["ORC.F12.R1.C9.S2"], "2.16.840.1.113883.4.6")

    def test_hl7apy_validates_the_structure(self) -> None:
        try:
            from hl7apy.consts import VALIDATION_LEVEL
            from hl7apy.parser import parse_message
        except ImportError:
            need(False, "hl7apy (pip hl7apy; .ci/peers-hl7.sh)")

        # OML^O21 v2.5.1 passes hl7apy's strict validation (structure, types, tables).
        text = orm(structure="OML", specimens=[SPECIMEN])
        oml = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        self.assertTrue(oml.validate())
        # hl7apy models ORM's OBR|RQD|RQ1|RXO|ODS|ODT choice as all-required, so for ORM
        # we check that it finds the groups where the standard puts them.
        orm_ = parse_message(orm(), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        self.assertEqual([c.name for c in orm_.children],
                         ["MSH", "ORM_O01_PATIENT", "ORM_O01_ORDER"])
        patient, order = orm_.children[1], orm_.children[2]
        self.assertEqual([c.name for c in patient.children], ["PID", "ORM_O01_PATIENT_VISIT"])
        self.assertEqual([c.name for c in order.children], ["ORC", "ORM_O01_ORDER_DETAIL"])
        detail = order.children[1]
        self.assertEqual([c.name for c in detail.children][:2],
                         ["ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP", "NTE"])

    def test_old_version_message_type_and_no_nte_ordering_change(self) -> None:
        text = orm(header=OrderHeader(version="2.3"))
        self.assertEqual(message_type(text), "ORM^O01")
        self.assertEqual(by_name(text)["MSH"][9], "ORM^O01")

    def test_escaping_of_free_text(self) -> None:
        sr = copy.deepcopy(SERVICE_REQUEST)
        sr["note"] = [{"text": "a|b^c&d~e\\f\nsecond line"}]
        patient = copy.deepcopy(PATIENT)
        patient["name"][0]["family"] = "O'NEIL|X"
        text = orm(service_request=sr, patient=patient)
        seg = by_name(text)
        self.assertEqual(unescape(seg["NTE"][3]), "a|b^c&d~e\\f\rsecond line")
        self.assertEqual(unescape(seg["PID"][5].split("^")[0]), "O'NEIL|X")
        self.assertEqual(len(text.split("\r")), 7)  # no segment was split by the newline

    def test_contained_references(self) -> None:
        sr = copy.deepcopy(SERVICE_REQUEST)
        sr["contained"] = [dict(PATIENT, id="pat"), dict(PRACTITIONER, id="doc"),
                           dict(ENCOUNTER, id="enc")]
        sr["subject"] = {"reference": "#pat"}
        sr["requester"] = {"reference": "#doc"}
        sr["encounter"] = {"reference": "#enc"}
        text = order_message(sr, header=HEADER, control_id="X", now=NOW)
        seg = by_name(text)
        self.assertEqual(seg["PID"][5], "DOE^JOHN^A^^^^L")
        self.assertEqual(seg["ORC"][12].split("^")[0], "1234567893")
        self.assertEqual(seg["PV1"][2], "O")

    def test_requester_display_only_and_no_encounter(self) -> None:
        sr = copy.deepcopy(SERVICE_REQUEST)
        sr["requester"] = {"display": "Dr Who"}
        text = order_message(sr, patient=PATIENT, header=HEADER, now=NOW)
        seg = by_name(text)
        self.assertEqual(seg["ORC"][12], "^Dr Who")
        self.assertEqual(seg["PV1"][:3], ["PV1", "1", "U"])

    def test_cancel_carries_the_original_placer_number_and_reason(self) -> None:
        sr = copy.deepcopy(SERVICE_REQUEST)
        sr["status"] = "revoked"
        sr["meta"] = {"versionId": "2"}
        sr["statusReason"] = {"text": "Ordered in error"}
        text = orm(service_request=sr, previous=SERVICE_REQUEST, control_id=None)
        orc = by_name(text)["ORC"]
        self.assertEqual((orc[1], orc[2], orc[16]), ("CA", "SR7f3a^ACME_EHR", "^Ordered in error"))
        self.assertEqual(control_id(text), control_id_for(sr, "CA"))


class OMLTests(SynchronousTestCase):
    def test_worked_example_segments(self) -> None:
        text = orm(structure="OML", specimens=[SPECIMEN])
        lines = {line[:3]: line for line in text.split("\r") if line}
        self.assertEqual(list(lines), ["MSH", "PID", "PV1", "ORC", "TQ1", "OBR", "NTE", "SPM"])
        self.assertEqual(message_type(text), "OML^O21")
        self.assertEqual(by_name(text)["MSH"][9], "OML^O21^OML_O21")
        self.assertEqual(lines["TQ1"], "TQ1|1||||||20240115110000||R^Routine^HL70485")
        self.assertEqual(lines["SPM"],
                         "SPM|1|SP0001&ACME_EHR||119364003^Serum specimen^SCT|||||||||||||"
                         "20240115093000")
        self.assertEqual(
            lines["ORC"],
            "ORC|NW|SR7f3a^ACME_EHR||GRP001^ACME_EHR|||||20240115102955|||"
            "1234567893^SMITH^JANE^^^^^^NPI&2.16.840.1.113883.4.6&ISO",
        )
        obr = by_name(text)["OBR"]
        # Collected by the placer: OBR-7 collection time, OBR-11 "O" (obtained by others).
        self.assertEqual((obr[7], obr[11], obr[27]), ("20240115093000", "O", ""))

    def test_without_specimen_lab_collects(self) -> None:
        obr = by_name(orm(structure="OML"))["OBR"]
        self.assertEqual((obr[7], obr[11]), ("", "L"))

    def test_needs_v24(self) -> None:
        self.assertRaises(OrderError, orm, structure="OML", header=OrderHeader(version="2.3"))


class ControlTests(SynchronousTestCase):
    def sr(self, status: str) -> dict:
        return dict(SERVICE_REQUEST, status=status)

    def test_order_control(self) -> None:
        self.assertEqual(order_control(self.sr("active")), "NW")
        self.assertEqual(order_control(self.sr("draft")), "NW")
        self.assertEqual(order_control(self.sr("active"), self.sr("active")), "XO")
        self.assertEqual(order_control(self.sr("on-hold"), self.sr("active")), "HD")
        self.assertEqual(order_control(self.sr("active"), self.sr("on-hold")), "RL")
        self.assertEqual(order_control(self.sr("revoked"), self.sr("active")), "CA")
        self.assertEqual(order_control(self.sr("entered-in-error"), self.sr("active")), "CA")
        self.assertEqual(order_control(self.sr("revoked"), self.sr("active"), work_started=True),
                         "DC")
        self.assertRaises(OrderError, order_control, self.sr("revoked"))
        self.assertRaises(OrderError, order_control, self.sr("completed"), self.sr("active"))

    def test_control_id_is_stable_and_versioned(self) -> None:
        a = control_id_for(SERVICE_REQUEST, "NW")
        self.assertEqual(a, control_id_for(copy.deepcopy(SERVICE_REQUEST), "NW"))
        self.assertEqual(len(a), 20)
        self.assertNotEqual(a, control_id_for(SERVICE_REQUEST, "CA"))
        self.assertNotEqual(a, control_id_for(dict(SERVICE_REQUEST, meta={"versionId": "2"}),
                                              "NW"))
        text = order_message(SERVICE_REQUEST, patient=PATIENT, header=HEADER, now=NOW)
        self.assertEqual(control_id(text), a)

    def test_errors(self) -> None:
        no_subject = {k: v for k, v in SERVICE_REQUEST.items() if k != "subject"}
        self.assertRaises(OrderError, order_message, no_subject)
        no_code = {k: v for k, v in SERVICE_REQUEST.items() if k != "code"}
        self.assertRaises(OrderError, order_message, no_code, patient=PATIENT)
        self.assertRaises(OrderError, order_message, {"resourceType": "Patient"})
        self.assertRaises(OrderError, orm, structure="ORU")
        self.assertRaises(OrderError, orm, control="ZZ")
        bad_ref = dict(SERVICE_REQUEST, subject={"reference": "#missing"})
        self.assertRaises(OrderError, order_message, bad_ref)
        bad_time = dict(SERVICE_REQUEST, authoredOn="yesterday at noon")
        self.assertRaises(OrderError, order_message, bad_time, patient=PATIENT)
