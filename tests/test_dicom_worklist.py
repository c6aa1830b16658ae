"""
Units for the worklist: C-FIND matching (PS3.4 C.2.2.2), the FHIR -> worklist mapping, the
worklist store (real SQLite driven inline) and the WorklistSender's answers.
"""

from __future__ import annotations

import json

from pydicom.dataset import Dataset
from twisted.trial.unittest import SynchronousTestCase

from medagent.delivery import DeliveryError
from medagent.destination import parse_destination
from medagent.dicom import mapping, matching
from medagent.dicom.worklist import SCHEMA, WorklistChannel, WorklistSender
from tests.fakes import InlineReactor, inline_database


def item(name="DOE^JANE", pid="P1", accession="A1", modality="CT", station="CT01",
         date="20240115", time="093000", status="SCHEDULED") -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, pid, accession
    step = Dataset()
    step.Modality, step.ScheduledStationAETitle = modality, station
    step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime = date, time
    step.ScheduledProcedureStepID, step.ScheduledProcedureStepStatus = accession, status
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def query(**keys) -> Dataset:
    q = Dataset()
    q.PatientName = keys.pop("name", "")
    for k in ("PatientID", "AccessionNumber"):
        if k in keys:
            setattr(q, k, keys.pop(k))
    step = Dataset()
    for k, v in keys.items():
        setattr(step, k, v)
    q.ScheduledProcedureStepSequence = [step] if keys else []
    return q


class MatchingTests(SynchronousTestCase):
    def test_universal_and_single_value(self) -> None:
        self.assertTrue(matching.matches(query(), item()))
        self.assertTrue(matching.matches(query(Modality="CT"), item()))
        self.assertFalse(matching.matches(query(Modality="MR"), item()))
        self.assertTrue(matching.matches(query(PatientID="P1"), item()))
        self.assertFalse(matching.matches(query(AccessionNumber="A2"), item()))

    def test_wildcards_and_person_names(self) -> None:
        self.assertTrue(matching.matches(query(name="DOE*"), item()))
        self.assertTrue(matching.matches(query(name="doe^j?ne"), item()))  # PN: any case
        self.assertFalse(matching.matches(query(name="SMITH*"), item()))
        self.assertTrue(matching.matches(query(PatientID="P*"), item()))

    def test_date_and_time_ranges(self) -> None:
        for q, ok in [("20240101-20240131", True), ("20240116-", False), ("-20240115", True),
                      ("20240115", True), ("20240114", False)]:
            self.assertEqual(matching.matches(query(ScheduledProcedureStepStartDate=q),
                                              item()), ok, q)
        self.assertTrue(matching.matches(query(ScheduledProcedureStepStartTime="0900-1000"),
                                         item()))
        self.assertFalse(matching.matches(query(ScheduledProcedureStepStartTime="1000-"),
                                          item()))

    def test_station_ae_and_missing_attribute(self) -> None:
        self.assertTrue(matching.matches(query(ScheduledStationAETitle="CT01"), item()))
        self.assertFalse(matching.matches(query(ScheduledStationAETitle="CT02"), item()))
        self.assertFalse(matching.matches(query(ScheduledStationAETitle="CT01"),
                                          item(station="")))

    def test_projection_returns_exactly_the_keys_asked(self) -> None:
        q = query(Modality="CT", ScheduledProcedureStepStartDate="")
        out = matching.project(q, item())
        self.assertEqual(sorted(e.keyword for e in out),
                         ["PatientName", "ScheduledProcedureStepSequence"])
        step = out.ScheduledProcedureStepSequence[0]
        self.assertEqual(sorted(e.keyword for e in step),
                         ["Modality", "ScheduledProcedureStepStartDate"])
        self.assertEqual(step.ScheduledProcedureStepStartDate, "20240115")


ORDER = {
    "resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": {
            "resourceType": "Patient", "id": "p",
            "identifier": [{"system": "urn:mrn", "value": "MRN7"}],
            "name": [{"family": "Smith", "given": ["Ann", "B"]}],
            "birthDate": "1980-05-06", "gender": "female"}},
        {"resource": {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "identifier": [{"type": {"coding": [{"code": "ACSN"}]}, "value": "ACC9"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "30746-2",
                                 "display": "Chest X-ray"}]},
            "subject": {"reference": "urn:uuid:p"}, "priority": "urgent",
            "occurrenceDateTime": "2024-03-01T14:05:00+01:00",
            "requester": {"display": "Dr Who"}}},
    ]}


class MappingTests(SynchronousTestCase):
    def test_service_request_to_item(self) -> None:
        requests, resources = mapping.parse_fhir(ORDER)
        ds = mapping.service_request_to_item(requests[0], resources, default_modality="DX",
                                             default_station_ae="DX01")
        self.assertEqual((ds.PatientName, ds.PatientID, ds.IssuerOfPatientID),
                         ("Smith^Ann^B", "MRN7", "urn:mrn"))
        self.assertEqual((ds.PatientBirthDate, ds.PatientSex), ("19800506", "F"))
        self.assertEqual((ds.AccessionNumber, ds.RequestedProcedurePriority), ("ACC9", "HIGH"))
        self.assertEqual(ds.RequestedProcedureCodeSequence[0].CodingSchemeDesignator, "LN")
        step = ds.ScheduledProcedureStepSequence[0]
        self.assertEqual((step.Modality, step.ScheduledStationAETitle), ("DX", "DX01"))
        self.assertEqual((step.ScheduledProcedureStepStartDate,
                          step.ScheduledProcedureStepStartTime), ("20240301", "140500"))
        self.assertEqual(step.ScheduledProcedureStepStatus, "SCHEDULED")
        again = mapping.service_request_to_item(requests[0], resources)
        self.assertEqual(again.StudyInstanceUID, ds.StudyInstanceUID)  # stable per order

    def test_missing_patient(self) -> None:
        sr = dict(ORDER["entry"][1]["resource"])
        with self.assertRaises(mapping.MappingError):
            mapping.service_request_to_item(sr, [sr])


class StoreAndSenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = InlineReactor()
        self.db = inline_database(self, SCHEMA, self.reactor)
        self.channel = WorklistChannel(lambda *a: None, reactor=self.reactor, name="Room1",
                                       ae_title="MWL", db_path=self.db.path, database=self.db)
        self.sender = WorklistSender({"room1": self.channel})
        self.dest = parse_destination("worklist://room1?modality=DX", needs_port=False)

    def push(self, content_type, body):
        out = []
        self.sender.send(self.dest, content_type, json.dumps(body), {}).addBoth(out.append)
        return out[0]

    def test_fhir_push_update_cancel_and_persistence(self) -> None:
        r = self.push("application/fhir+json", ORDER)
        self.assertEqual(json.loads(r.body)["action"], "created")
        r = self.push("application/fhir+json", ORDER)
        self.assertEqual(json.loads(r.body)["action"], "updated")
        self.assertEqual(len(self.channel.find(query(Modality="DX"))), 1)
        # a fresh channel on the same database sees the item (restart)
        again = WorklistChannel(lambda *a: None, reactor=self.reactor, name="room1",
                                ae_title="MWL", db_path=self.db.path, database=self.db)
        again.load()
        self.assertEqual(list(again.items), [("ACC9", "ACC9")])
        revoked = json.loads(json.dumps(ORDER))
        revoked["entry"][1]["resource"]["status"] = "revoked"
        r = self.push("application/fhir+json", revoked)
        self.assertEqual(json.loads(r.body)["removed"], 1)
        self.assertEqual(self.channel.find(query()), [])

    def test_dicom_json_item_and_cancel_by_key(self) -> None:
        r = self.push("application/dicom+json", item(accession="X1").to_json_dict())
        self.assertEqual(json.loads(r.body)["status"], "SCHEDULED")
        r = self.push("application/json", {"cancel": "X1"})
        self.assertEqual(json.loads(r.body)["removed"], 1)

    def test_bad_pushes_are_permanent_errors(self) -> None:
        for ct, body in [("application/dicom+json", Dataset().to_json_dict()),
                         ("application/fhir+json", {"resourceType": "Patient"}),
                         ("text/plain", {"x": 1})]:
            err = self.push(ct, body)
            self.assertIsInstance(err.value, DeliveryError, ct)
            self.assertFalse(err.value.transient)
        out = []
        self.sender.send(parse_destination("worklist://nope", needs_port=False),
                         "application/dicom+json", "{}", {}).addErrback(out.append)
        self.assertIn("no worklist channel", str(out[0].value))
