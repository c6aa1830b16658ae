"""
Units for DICOMSender (the ``dicom://`` Sender): status mapping, association reuse and idle
release, and the errors a caller sees - on StringTransport + Clock, the peer played with
pynetdicom's negotiation and message decoder.
"""

from __future__ import annotations

import base64
import json
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import dimse_messages as pmsgs
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from medagent.delivery import DeliveryError
from medagent.destination import parse_destination
from medagent.dicom import dimse, pdu
from medagent.dicom.scu import DICOMSender
from tests.test_dicom_association import SR_CLASS, accept, pdata, read_pdus, transport


def part10(sop_instance: str | None = None) -> str:
    ds = Dataset()
    ds.SOPClassUID = SR_CLASS
    ds.SOPInstanceUID = sop_instance or generate_uid()
    ds.PatientID = "12345"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SR_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return base64.b64encode(out.getvalue()).decode()


class FakeEndpoint:
    def __init__(self) -> None:
        self.connections: list = []

    def __call__(self, reactor, host, port, timeout):
        self.last = (host, port, timeout)
        return self

    def connect(self, factory):
        proto = factory.buildProtocol(None)
        tr = transport()
        proto.makeConnection(tr)
        self.connections.append((proto, tr))
        return succeed(proto)


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.sender = DICOMSender(self.clock, ae_title="AGENT", idle_timeout=30,
                                  endpoint_factory=self.endpoint)
        self.dest = parse_destination("dicom://PACS@10.0.0.5:104?calling=OURS")

    def answer_association(self, supported=((SR_CLASS, [ExplicitVRLittleEndian]),)):
        proto, tr = self.endpoint.connections[-1]
        ac, primitive = accept(tr.value(), list(supported))
        tr.clear()
        proto.dataReceived(ac)
        return proto, tr, primitive

    def answer_store(self, status: int, **extra):
        proto, tr = self.endpoint.connections[-1]
        msg = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            msg.decode_msg(p.to_primitive())
        tr.clear()
        rsp = dimse.c_store_rsp(msg, status, extra.get("comment"))
        proto.dataReceived(pdata(rsp, msg.context_id, 16384))
        return msg

    def send(self, body=None):
        results = []
        d = self.sender.send(self.dest, "application/dicom", body or part10(), {})
        d.addBoth(results.append)
        return results

    def test_success_then_reuse_then_idle_release(self) -> None:
        uid = generate_uid()
        results = self.send(part10(uid))
        proto, tr, primitive = self.answer_association()
        self.assertEqual(primitive.calling_ae_title, "OURS")
        self.assertEqual(primitive.called_ae_title, "PACS")
        self.assertEqual(self.endpoint.last, ("10.0.0.5", 104, 10))
        offered = [[str(t) for t in cx.transfer_syntax]
                   for cx in primitive.presentation_context_definition_list]
        self.assertEqual(offered, [[ExplicitVRLittleEndian],
                                   [ImplicitVRLittleEndian]])
        msg = self.answer_store(0x0000)
        self.assertEqual(msg.command_set.AffectedSOPInstanceUID, uid)
        reply = results[0]
        body = json.loads(reply.body)
        self.assertEqual((body["status"], body["meaning"], body["sopInstanceUID"]),
                         ("0x0000", "Success", uid))
        self.assertTrue(reply.delivered)
        self.assertEqual(reply.content_type, "application/json")

        results = self.send()
        self.assertEqual(len(self.endpoint.connections), 1)  # same association
        self.answer_store(0x0000)
        self.assertTrue(results[0].delivered)

        self.clock.advance(30)
        self.assertEqual(read_pdus(tr.value())[-1].pdu_type, 0x05)  # A-RELEASE-RQ
        proto.dataReceived(pdu.release_rp().encode())
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_warning_is_delivered_with_detail(self) -> None:
        results = self.send()
        self.answer_association()
        self.answer_store(0xB000)
        self.assertTrue(results[0].delivered)
        self.assertIn("0xB000", results[0].detail)
        self.assertEqual(json.loads(results[0].body)["category"], "Warning")

    def test_failure_is_not_delivered(self) -> None:
        results = self.send()
        self.answer_association()
        self.answer_store(0xA900, comment="wrong class")
        self.assertFalse(results[0].delivered)
        body = json.loads(results[0].body)
        self.assertEqual((body["status"], body["errorComment"]), ("0xA900", "wrong class"))

    def test_out_of_resources_is_transient(self) -> None:
        results = self.send()
        self.answer_association()
        self.answer_store(0xA700, comment="no space")
        error = results[0].value
        self.assertIsInstance(error, DeliveryError)
        self.assertEqual((error.transient, error.phase, error.max_attempts), (True, "store", 4))
        self.assertNotIn("will retry", str(error))
        # the DIMSE reply travels with it, for when the queue stops retrying
        self.assertFalse(error.reply.delivered)
        body = json.loads(error.reply.body)
        self.assertEqual((body["status"], body["errorComment"]), ("0xA700", "no space"))

    def test_out_of_resources_without_retries_is_the_reply(self) -> None:
        self.sender = DICOMSender(self.clock, ae_title="AGENT", refused_attempts=1,
                                  endpoint_factory=self.endpoint)
        results = self.send()
        self.answer_association()
        self.answer_store(0xA702)
        self.assertFalse(results[0].delivered)
        self.assertEqual(json.loads(results[0].body)["status"], "0xA702")

    def test_no_accepted_context_is_permanent(self) -> None:
        results = self.send()
        self.answer_association(supported=(("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),))
        error = results[0].value
        self.assertIsInstance(error, DeliveryError)
        self.assertFalse(error.transient)
        self.assertIn("abstract-syntax-not-supported", str(error))

    def test_implicit_only_peer_gets_converted_data(self) -> None:
        results = self.send()
        self.answer_association(supported=((SR_CLASS, [ImplicitVRLittleEndian]),))
        msg = self.answer_store(0x0000)
        self.assertEqual(msg.context_id, 3)
        ds = dimse.decode_dataset(msg.data_set.getvalue(), ImplicitVRLittleEndian)
        self.assertEqual(ds.PatientID, "12345")
        self.assertEqual(json.loads(results[0].body)["transferSyntaxUID"],
                         ImplicitVRLittleEndian)

    def test_rejection_permanent_in_words(self) -> None:
        results = self.send()
        proto, tr = self.endpoint.connections[-1]
        proto.dataReceived(pdu.associate_rj(1, 1, 3).encode())
        error = results[0].value
        self.assertFalse(error.transient)
        self.assertIn("calling AE title not recognized", str(error))

    def test_bad_input_is_permanent(self) -> None:
        for body in ("not base64 !!", base64.b64encode(b"x" * 200).decode()):
            results = self.send(body)
            self.assertFalse(results[0].value.transient)
            self.assertEqual(results[0].value.phase, "decode")
        results = []
        self.sender.send(parse_destination("dicom://10.0.0.5:104"), "application/dicom",
                         part10(), {}).addErrback(results.append)
        self.assertIn("called", str(results[0].value))
        self.assertEqual(self.endpoint.connections, [])

    def test_ping_runs_c_echo(self) -> None:
        results = []
        self.sender.ping(self.dest).addBoth(results.append)
        proto, tr, primitive = self.answer_association(
            supported=(("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),))
        msg = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            msg.decode_msg(p.to_primitive())
        self.assertEqual(msg.command_set.CommandField, 0x0030)
        tr.clear()
        proto.dataReceived(pdata(dimse.c_echo_rsp(msg), 1, 16384))
        self.assertEqual(read_pdus(tr.value())[-1].pdu_type, 0x05)
        proto.dataReceived(pdu.release_rp().encode())
        proto.connectionLost(None)
        self.assertEqual(json.loads(results[0].body)["status"], "0x0000")

    def test_close_releases_idle_associations(self) -> None:
        self.send()
        proto, tr, _ = self.answer_association()
        self.answer_store(0)
        closed = []
        self.sender.close().addCallback(closed.append)
        self.assertEqual(read_pdus(tr.value())[-1].pdu_type, 0x05)
        proto.dataReceived(pdu.release_rp().encode())
        proto.connectionLost(None)
        self.assertEqual(closed, [None])
        self.assertEqual(self.clock.getDelayedCalls(), [])
