"""
Units for the DICOM upper layer: PDU framing, P-DATA fragmenting, the requestor and acceptor
state machines on StringTransport + Clock, and the storage channel's custody rules.

The peer side of these exchanges is built with pynetdicom's PDU classes and DIMSE messages
(a codec we did not write), so a mistake in our framing shows up as a decode failure here.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import dimse_messages as pmsgs
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from medagent.dicom import dimse, pdu
from medagent.dicom.association import (
    AssociationAborted,
    AssociationRejected,
    AssociationRequestor,
    AssociationTimeout,
    ConnectionClosed,
)
from medagent.dicom.scp import StorageChannel

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def transport() -> StringTransport:
    return StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))


def read_pdus(raw: bytes) -> list:
    """Split written bytes into PDUs with a fresh decoder (no size limit to speak of)."""
    return pdu.PDUDecoder(pdu.ABSOLUTE_MAX_PDU).feed(raw)


def sr_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SR_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "12345"
    ds.Modality = "SR"
    return ds


def pdata(message, context_id: int, max_pdu: int) -> bytes:
    return b"".join(dimse.message_pdus(message, context_id, max_pdu))


class PDUDecoderTests(SynchronousTestCase):
    def test_split_and_joined_pdus(self) -> None:
        rq = pdu.associate_rq("US", "THEM", pdu.build_contexts(
            [("1.2.840.10008.1.1", [ImplicitVRLittleEndian])]), 16384).encode()
        rel = pdu.release_rq().encode()
        decoder = pdu.PDUDecoder()
        out = []
        stream = rq + rel
        for i in range(0, len(stream), 7):
            out += decoder.feed(stream[i:i + 7])
        self.assertEqual([p.pdu_type for p in out], [1, 5])
        self.assertEqual(out[0].calling_ae_title, "US")
        self.assertEqual(out[0].called_ae_title, "THEM")
        self.assertEqual(decoder.buffered, 0)

    def test_unknown_pdu_type(self) -> None:
        with self.assertRaises(pdu.PDUError) as e:
            pdu.PDUDecoder().feed(b"\x09\x00\x00\x00\x00\x02ab")
        self.assertEqual(e.exception.reason, pdu.REASON_UNRECOGNISED_PDU)

    def test_p_data_over_maximum_is_refused_from_the_header(self) -> None:
        decoder = pdu.PDUDecoder(16384)
        with self.assertRaises(pdu.PDUError) as e:
            decoder.feed(b"\x04\x00" + struct.pack(">I", 16385))
        self.assertEqual(e.exception.reason, pdu.REASON_INVALID_PARAMETER)

    def test_bad_pdv_lengths(self) -> None:
        body = struct.pack(">I", 50) + b"\x01\x03abc"  # item says 50 bytes, has 5
        with self.assertRaises(pdu.PDUError):
            pdu.PDUDecoder().feed(b"\x04\x00" + struct.pack(">I", len(body)) + body)

    def test_abort_with_wrong_length(self) -> None:
        with self.assertRaises(pdu.PDUError):
            pdu.PDUDecoder().feed(b"\x07\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00")

    def test_rejection_words(self) -> None:
        text = pdu.describe_rejection(1, 1, 3)
        self.assertIn("rejected-permanent", text)
        self.assertIn("calling AE title not recognized", text)


class FragmentingTests(SynchronousTestCase):
    def test_fragments_respect_max_pdu_and_reassemble(self) -> None:
        data = os.urandom(100_003)
        message = dimse.c_store_rq(7, CT_CLASS, "1.2.3.4", data)
        pdus = list(dimse.message_pdus(message, 3, 4096))
        self.assertGreater(len(pdus), 20)
        for raw in pdus:
            length = struct.unpack(">I", raw[2:6])[0]
            self.assertLessEqual(length, 4096)
            self.assertEqual(length, len(raw) - 6)
        # flags: command fragment(s) first (bit 0 set), last dataset fragment has bit 1
        flags = [raw[11] for raw in pdus]
        self.assertEqual(flags[0] & 1, 1)
        self.assertEqual(flags[-1], 0x02)
        # reassembled by pynetdicom's own decoder, PDV by PDV
        msg = pmsgs.DIMSEMessage()
        done = False
        for p in read_pdus(b"".join(pdus)):
            done = msg.decode_msg(p.to_primitive())
        self.assertTrue(done)
        self.assertEqual(msg.command_set.AffectedSOPInstanceUID, "1.2.3.4")
        self.assertEqual(msg.data_set.getvalue(), data)

    def test_assembler_bounds_and_order(self) -> None:
        message = dimse.c_store_rq(1, CT_CLASS, "1.2.3", b"\x00" * 10_000)
        pdus = read_pdus(pdata(message, 1, 2048))
        assembler = dimse.MessageAssembler(max_message_bytes=5000)
        with self.assertRaises(dimse.DimseError):
            for p in pdus:
                assembler.feed(p)
        # a data set fragment with no command before it
        data_only = [p for p in pdus if not p.presentation_data_value_items[0]
                     .presentation_data_value[0] & 1]
        with self.assertRaises(dimse.DimseError):
            dimse.MessageAssembler().feed(data_only[0])


def accept(rq_bytes: bytes, supported: list[tuple[str, list[str]]], max_pdu: int = 16384):
    """What a conforming acceptor answers to C{rq_bytes} (pynetdicom negotiation)."""
    rq = read_pdus(rq_bytes)[0]
    primitive = rq.to_primitive()
    contexts = []
    for abstract, syntaxes in supported:
        cx = PresentationContext()
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        contexts.append(cx)
    results, _ = negotiate_as_acceptor(primitive.presentation_context_definition_list,
                                       contexts)
    return pdu.associate_ac(primitive, results, max_pdu).encode(), primitive


class RequestorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = AssociationRequestor(
            self.clock, calling_ae="AGENT", called_ae="PACS",
            contexts=[(SR_CLASS, [ExplicitVRLittleEndian]),
                      ("1.2.840.10008.1.1", [ImplicitVRLittleEndian])],
            acse_timeout=30, dimse_timeout=60, max_pdu=32768)
        self.tr = transport()
        self.proto.makeConnection(self.tr)

    def establish(self, max_pdu: int = 16384):
        ac, primitive = accept(self.tr.value(), [(SR_CLASS, [ExplicitVRLittleEndian])],
                               max_pdu)
        self.tr.clear()
        results = []
        self.proto.established.addCallback(results.append)
        self.proto.dataReceived(ac)
        return results, primitive

    def test_request_pdu(self) -> None:
        rq = read_pdus(self.tr.value())[0]
        self.assertIsInstance(rq, A_ASSOCIATE_RQ)
        primitive = rq.to_primitive()
        self.assertEqual(primitive.calling_ae_title, "AGENT")
        self.assertEqual(primitive.called_ae_title, "PACS")
        self.assertEqual(primitive.maximum_length_received, 32768)
        ids = [cx.context_id for cx in primitive.presentation_context_definition_list]
        self.assertEqual(ids, [1, 3])

    def test_accept_store_release(self) -> None:
        results, _ = self.establish(max_pdu=4096)
        self.assertEqual(results, [self.proto])
        self.assertEqual(self.proto.peer_max_pdu, 4096)
        cx = self.proto.find_context(SR_CLASS, [ExplicitVRLittleEndian])
        self.assertEqual(cx.context_id, 1)
        self.assertIsNone(self.proto.find_context("1.2.840.10008.1.1"))  # rejected
        self.assertEqual(self.proto.rejected[0].result, 3)

        data = os.urandom(20000)
        answers = []
        self.proto.request(dimse.c_store_rq(1, SR_CLASS, "1.2.3", data), 1).addCallback(
            answers.append)
        written = read_pdus(self.tr.value())
        self.assertTrue(all(isinstance(p, P_DATA_TF) for p in written))
        self.assertTrue(all(p.pdu_length <= 4096 for p in written))
        # the peer (pynetdicom's decoder) gets the message whole
        msg = pmsgs.DIMSEMessage()
        for p in written:
            msg.decode_msg(p.to_primitive())
        self.assertEqual(msg.data_set.getvalue(), data)
        self.tr.clear()
        rsp = dimse.c_store_rsp(msg, 0xB000)
        self.proto.dataReceived(pdata(rsp, 1, 16384))
        self.assertEqual(answers[0][-1].command_set.Status, 0xB000)

        released = []
        self.proto.release().addCallback(released.append)
        self.assertEqual(read_pdus(self.tr.value())[0].pdu_type, 0x05)
        self.proto.dataReceived(pdu.release_rp().encode())
        self.assertTrue(self.tr.disconnecting)
        self.proto.connectionLost(None)
        self.assertEqual(released, [None])

    def test_rejected_permanent(self) -> None:
        failures = []
        self.proto.established.addErrback(failures.append)
        self.proto.dataReceived(pdu.associate_rj(1, 1, 7).encode())
        error = failures[0].value
        self.assertIsInstance(error, AssociationRejected)
        self.assertFalse(error.transient)
        self.assertIn("called AE title not recognized", str(error))
        self.assertTrue(self.tr.disconnecting)

    def test_rejected_transient(self) -> None:
        failures = []
        self.proto.established.addErrback(failures.append)
        self.proto.dataReceived(pdu.associate_rj(2, 3, 1).encode())
        self.assertTrue(failures[0].value.transient)
        self.assertIn("temporary congestion", str(failures[0].value))

    def test_acse_timeout(self) -> None:
        failures = []
        self.proto.established.addErrback(failures.append)
        self.clock.advance(29)
        self.assertEqual(failures, [])
        self.clock.advance(1)
        self.assertIsInstance(failures[0].value, AssociationTimeout)
        self.assertEqual(read_pdus(self.tr.value())[-1].pdu_type, 0x07)
        self.assertTrue(self.tr.disconnecting)

    def test_dimse_timeout_aborts(self) -> None:
        self.establish()
        failures = []
        self.proto.request(dimse.c_echo_rq(1), 1).addErrback(failures.append)
        self.tr.clear()
        self.clock.advance(60)
        self.assertIsInstance(failures[0].value, AssociationTimeout)
        abort = read_pdus(self.tr.value())[-1]
        self.assertEqual((abort.pdu_type, abort.source), (0x07, 2))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peer_abort_fails_request(self) -> None:
        self.establish()
        failures = []
        self.proto.request(dimse.c_echo_rq(1), 1).addErrback(failures.append)
        self.proto.dataReceived(pdu.abort(0).encode())
        self.assertIsInstance(failures[0].value, AssociationAborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_fails_everything(self) -> None:
        failures = []
        self.proto.established.addErrback(failures.append)
        self.proto.connectionLost(None)
        self.assertIsInstance(failures[0].value, ConnectionClosed)

    def test_garbage_from_peer_aborts(self) -> None:
        failures = []
        self.proto.established.addErrback(failures.append)
        self.proto.dataReceived(b"\x0a\x00\x00\x00\x00\x00")
        abort = read_pdus(self.tr.value())[-1]
        self.assertEqual((abort.pdu_type, abort.source, abort.reason_diagnostic), (7, 2, 1))
        self.assertIsInstance(failures[0].value, AssociationAborted)


def instance_files(folder: str) -> list[str]:
    """What a channel keeps in its folder, without its journal segments."""
    from medagent.dicom.journal import PREFIX

    return sorted(n for n in os.listdir(folder) if not n.startswith(PREFIX))


class InlineRun:
    """Runs 'blocking' work at once, or holds it until released (to test races)."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list = []

    def __call__(self, fn, *args):
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, fn, args))
            return d
        try:
            return succeed(fn(*args))
        except Exception:
            from twisted.internet.defer import fail

            return fail()

    def release(self) -> None:
        held, self.held = self.held, []
        for d, fn, args in held:
            d.callback(fn(*args))


class StorageChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = tempfile.mkdtemp(prefix="medagent-dicom-test-")
        self.addCleanup(self._rmtree)
        self.forwarded: list = []
        self.run = InlineRun()
        self.channel = StorageChannel(
            self.forward, reactor=self.clock, ae_title="AGENTSCP", storage_dir=self.dir,
            allowed_calling=["MODALITY"], sop_classes=[SR_CLASS], run_blocking=self.run,
            max_pdu=16384)
        self.files_at_answer: list = []

    def _rmtree(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def forward(self, content_type, body, remote):
        self.forwarded.append((content_type, json.loads(body), remote))
        return succeed(None)

    def connect(self, calling="MODALITY", called="AGENTSCP", classes=(SR_CLASS,),
                max_pdu=16384):
        proto = self.channel.factory().buildProtocol(None)
        tr = transport()
        proto.makeConnection(tr)
        contexts = pdu.build_contexts([(c, [ExplicitVRLittleEndian]) for c in classes])
        proto.dataReceived(pdu.associate_rq(calling, called, contexts, max_pdu).encode())
        return proto, tr

    def test_unknown_calling_ae_rejected(self) -> None:
        proto, tr = self.connect(calling="STRANGER")
        rj = read_pdus(tr.value())[0]
        self.assertEqual((rj.pdu_type, rj.result, rj.source, rj.reason_diagnostic),
                         (3, 1, 1, 3))
        self.assertTrue(tr.disconnecting)

    def test_wrong_called_ae_rejected(self) -> None:
        proto, tr = self.connect(called="SOMEONE")
        rj = read_pdus(tr.value())[0]
        self.assertEqual((rj.result, rj.source, rj.reason_diagnostic), (1, 1, 7))

    def test_unsupported_sop_class_context_rejected(self) -> None:
        proto, tr = self.connect(classes=(CT_CLASS, SR_CLASS))
        ac = read_pdus(tr.value())[0]
        self.assertIsInstance(ac, A_ASSOCIATE_AC)
        results = {cx.context_id: cx.result for cx in
                   ac.to_primitive().presentation_context_definition_results_list}
        self.assertEqual(results, {1: 3, 3: 0})

    def test_a_request_seen_before_is_answered_from_memory_with_its_own_ae_titles(self):
        """
        The same proposal again (another association, other AE titles): not decoded or
        negotiated again, the same answer with this request's AE title fields; the calling
        AE title is still checked on each.
        """
        self.channel.policy.allowed_calling = {"MODALITY", "CT2"}
        proto, tr = self.connect(classes=(CT_CLASS, SR_CLASS))
        first = tr.value()
        self.assertEqual(self.channel.policy.answers.hits, 0)
        proto2, tr2 = self.connect(calling="CT2", classes=(CT_CLASS, SR_CLASS))
        self.assertEqual(self.channel.policy.answers.hits, 1)
        again = tr2.value()
        self.assertEqual(again[:10] + again[42:], first[:10] + first[42:])
        ac = read_pdus(again)[0]
        self.assertIsInstance(ac, A_ASSOCIATE_AC)
        self.assertEqual(ac.to_primitive().calling_ae_title, "CT2")
        self.assertEqual(proto2.calling_ae, "CT2")
        self.assertEqual(sorted(proto2.accepted), sorted(proto.accepted))
        self.assertEqual(proto2.state, "established")
        # a stranger with the very same proposal is still turned away
        proto3, tr3 = self.connect(calling="STRANGER", classes=(CT_CLASS, SR_CLASS))
        self.assertEqual(self.channel.policy.answers.hits, 2)
        rj = read_pdus(tr3.value())[0]
        self.assertEqual((rj.pdu_type, rj.result, rj.source, rj.reason_diagnostic),
                         (3, 1, 1, 3))
        # and a store on the remembered association works
        tr2.clear()
        ds = sr_dataset()
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        proto2.dataReceived(pdata(dimse.c_store_rq(1, SR_CLASS, ds.SOPInstanceUID, raw),
                                  3, 16384))
        rsp = pmsgs.DIMSEMessage()
        for p in read_pdus(tr2.value()):
            rsp.decode_msg(p.to_primitive())
        self.assertEqual(rsp.command_set.Status, 0)

    def test_store_writes_before_answering_then_forwards(self) -> None:
        proto, tr = self.connect()
        tr.clear()
        ds = sr_dataset()
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        path = os.path.join(self.dir, ds.SOPInstanceUID + ".dcm")
        self.run.hold = True
        proto.dataReceived(pdata(dimse.c_store_rq(5, SR_CLASS, ds.SOPInstanceUID, raw),
                                 1, 16384))
        self.assertEqual(tr.value(), b"")  # nothing answered while the write is pending
        self.assertFalse(os.path.exists(path))
        self.run.hold = False
        self.run.release()
        # answered once its journal record was flushed; the file comes a moment later
        self.assertEqual(self.channel.journal.flushes, 1)
        self.assertEqual(self.forwarded, [])
        self.assertFalse(os.path.exists(path))
        self.clock.advance(self.channel.write_out_delay)
        self.assertTrue(os.path.exists(path))
        rsp = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            rsp.decode_msg(p.to_primitive())
        self.assertEqual(rsp.command_set.Status, 0)
        self.assertEqual(rsp.command_set.MessageIDBeingRespondedTo, 5)
        # the stored file is a Part 10 file pydicom reads back
        from pydicom import dcmread

        stored = dcmread(path)
        self.assertEqual(stored.PatientName, "DOE^JOHN")
        self.assertEqual(stored.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian)
        ct, body, remote = self.forwarded[0]
        self.assertEqual(ct, "application/json")
        self.assertEqual(body["association"], {"callingAeTitle": "MODALITY",
                                               "calledAeTitle": "AGENTSCP"})
        self.assertEqual(body["instance"]["path"], path)
        self.assertEqual(body["instance"]["size"], os.path.getsize(path))
        self.assertEqual(body["dataset"]["00100020"]["Value"], ["12345"])
        self.assertTrue(remote.startswith("dicom://MODALITY@127.0.0.1"))
        self.assertFalse(os.path.exists(path + ".pending"))  # relay has it

    def test_association_lost_before_answer_keeps_nothing(self) -> None:
        proto, tr = self.connect()
        ds = sr_dataset()
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        self.run.hold = True
        proto.dataReceived(pdata(dimse.c_store_rq(1, SR_CLASS, ds.SOPInstanceUID, raw),
                                 1, 16384))
        proto.dataReceived(pdu.abort(0).encode())
        proto.connectionLost(None)
        self.run.hold = False
        self.run.release()  # the write finishes after the peer is gone
        self.run.release()  # ... and its record is retired
        self.clock.advance(1)
        self.assertEqual(instance_files(self.dir), [])
        self.assertEqual(self.forwarded, [])
        segment = self.channel.journal._current
        self.assertEqual((segment.records, segment.retired), (1, 1))

    def test_abort_mid_transfer_stores_nothing(self) -> None:
        proto, tr = self.connect()
        ds = sr_dataset()
        ds.add_new(0x7FE00010, "OB", b"\x00" * 50000)
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        pdus = list(dimse.message_pdus(dimse.c_store_rq(1, SR_CLASS, ds.SOPInstanceUID, raw),
                                       1, 16384))
        self.assertGreater(len(pdus), 3)
        proto.dataReceived(b"".join(pdus[:2]))  # command + first data fragment, then abort
        proto.dataReceived(pdu.abort(0).encode())
        self.assertTrue(tr.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(instance_files(self.dir), [])
        self.assertEqual(self.forwarded, [])

    def test_pdu_over_negotiated_max_aborts(self) -> None:
        proto, tr = self.connect()
        tr.clear()
        ds = sr_dataset()
        ds.add_new(0x7FE00010, "OB", b"\x00" * 40000)
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        # fragmented for 64 kB although we announced 16 kB
        proto.dataReceived(pdata(dimse.c_store_rq(1, SR_CLASS, ds.SOPInstanceUID, raw),
                                 1, 65536))
        abort = read_pdus(tr.value())[-1]
        self.assertEqual((abort.pdu_type, abort.source, abort.reason_diagnostic), (7, 2, 6))
        self.assertTrue(tr.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(os.listdir(self.dir), [])

    def test_malformed_pdu_aborts(self) -> None:
        proto, tr = self.connect()
        tr.clear()
        body = struct.pack(">I", 3) + b"\x01\x03"  # PDV shorter than its length
        proto.dataReceived(b"\x04\x00" + struct.pack(">I", len(body)) + body)
        abort = read_pdus(tr.value())[-1]
        self.assertEqual((abort.pdu_type, abort.source, abort.reason_diagnostic), (7, 2, 6))

    def test_p_data_on_unaccepted_context_aborts(self) -> None:
        proto, tr = self.connect()
        tr.clear()
        proto.dataReceived(pdata(dimse.c_echo_rq(1), 7, 16384))
        abort = read_pdus(tr.value())[-1]
        self.assertEqual(abort.pdu_type, 7)

    def test_echo_and_release(self) -> None:
        proto, tr = self.connect(classes=("1.2.840.10008.1.1",))
        tr.clear()
        proto.dataReceived(pdata(dimse.c_echo_rq(9), 1, 16384))
        rsp = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            rsp.decode_msg(p.to_primitive())
        self.assertEqual((rsp.command_set.CommandField, rsp.command_set.Status), (0x8030, 0))
        tr.clear()
        proto.dataReceived(pdu.release_rq().encode())
        self.assertEqual(read_pdus(tr.value())[0].pdu_type, 6)
        self.assertTrue(tr.disconnecting)

    def test_artim_closes_silent_connection(self) -> None:
        proto = self.channel.factory().buildProtocol(None)
        tr = transport()
        proto.makeConnection(tr)
        self.clock.advance(30)
        self.assertTrue(tr.disconnecting)

    def test_network_timeout_on_idle_association(self) -> None:
        proto, tr = self.connect()
        self.clock.advance(59)
        self.assertFalse(tr.disconnecting)
        self.clock.advance(1)
        self.assertTrue(tr.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sop_instance_mismatch_refused(self) -> None:
        proto, tr = self.connect()
        tr.clear()
        ds = sr_dataset()
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        proto.dataReceived(pdata(dimse.c_store_rq(1, SR_CLASS, "1.2.3.999", raw), 1, 16384))
        rsp = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            rsp.decode_msg(p.to_primitive())
        self.assertEqual(rsp.command_set.Status, 0xA900)
        self.assertEqual(os.listdir(self.dir), [])

    def test_too_many_associations(self) -> None:
        self.channel._factory.max_associations = 1
        self.connect()
        proto, tr = self.connect()
        rj = read_pdus(tr.value())[0]
        self.assertEqual((rj.result, rj.source, rj.reason_diagnostic), (2, 3, 2))

    def test_recover_forwards_pending_notes(self) -> None:
        note = os.path.join(self.dir, "1.2.3.dcm.pending")
        with open(note, "w") as f:
            json.dump({"body": json.dumps({"instance": {"sopInstanceUID": "1.2.3"}}),
                       "remote": "dicom://X@h:1"}, f)
        self.channel.recover()
        self.assertEqual(self.forwarded[0][1]["instance"]["sopInstanceUID"], "1.2.3")
        self.assertFalse(os.path.exists(note))

    def test_recover_rebuilds_a_note_lost_in_a_crash(self) -> None:
        ds = sr_dataset()
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SR_CLASS
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = os.path.join(self.dir, ds.SOPInstanceUID + ".dcm")
        ds.save_as(path, enforce_file_format=True)
        open(path + ".pending", "w").close()  # the note's content never reached the disk
        self.channel.recover()
        body = self.forwarded[0][1]
        self.assertEqual(body["instance"]["sopInstanceUID"], ds.SOPInstanceUID)
        self.assertEqual(body["instance"]["path"], path)
        self.assertEqual(body["dataset"]["00100010"]["Value"], [{"Alphabetic": "DOE^JOHN"}])
        self.assertFalse(os.path.exists(path + ".pending"))


class StoreGroupTests(SynchronousTestCase):
    """
    The storage channel's group commit on the path of large instances (their own files
    before the answer, no journal): instances arriving while a write is under way are
    written (and the folder fsynced) together, and none is answered before its group is.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = tempfile.mkdtemp(prefix="medagent-dicom-test-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, ignore_errors=True))
        self.run = InlineRun()
        self.channel = StorageChannel(
            lambda ct, body, remote: Deferred(), reactor=self.clock, ae_title="AGENTSCP",
            storage_dir=self.dir, sop_classes=[SR_CLASS], run_blocking=self.run,
            max_pdu=16384, journal_max_bytes=0)
        self.folder_syncs: list = []
        import medagent.dicom.scp as scp

        real = scp.fsync_dir

        def fsync_dir(folder: str) -> None:
            self.folder_syncs.append(sorted(os.listdir(folder)))
            real(folder)

        self.patch(scp, "fsync_dir", fsync_dir)

    def association(self):
        proto = self.channel.factory().buildProtocol(None)
        tr = transport()
        proto.makeConnection(tr)
        contexts = pdu.build_contexts([(SR_CLASS, [ExplicitVRLittleEndian])])
        proto.dataReceived(pdu.associate_rq("MODALITY", "AGENTSCP", contexts, 16384).encode())
        tr.clear()
        return proto, tr

    def store(self, proto, ds, message_id: int = 1) -> None:
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        proto.dataReceived(pdata(dimse.c_store_rq(message_id, SR_CLASS, ds.SOPInstanceUID,
                                                  raw), 1, 16384))

    def status(self, tr) -> int:
        rsp = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            rsp.decode_msg(p.to_primitive())
        return rsp.command_set.Status

    def test_instances_arriving_during_a_write_share_one_folder_fsync(self) -> None:
        (a, ta), (b, tb), (c, tc) = self.association(), self.association(), self.association()
        first, second, third = sr_dataset(), sr_dataset(), sr_dataset()
        self.run.hold = True
        self.store(a, first)  # starts a group of one at once
        self.store(b, second)  # wait for it, then go together
        self.store(c, third)
        self.assertEqual(len(self.run.held), 1)
        self.assertEqual((ta.value(), tb.value(), tc.value()), (b"", b"", b""))
        d, fn, args = self.run.held.pop()
        d.callback(fn(*args))  # the first group: written and fsynced, then answered
        self.assertEqual(self.status(ta), 0)
        self.assertEqual((tb.value(), tc.value()), (b"", b""))
        self.assertEqual(len(self.run.held), 1)  # the second group, both instances
        self.assertEqual(len(args[0]), 1)
        d, fn, args = self.run.held.pop()
        self.assertEqual(len(args[0]), 2)
        d.callback(fn(*args))
        self.assertEqual((self.status(tb), self.status(tc)), (0, 0))
        self.assertEqual(self.channel._commit.groups, 2)
        # one folder fsync per group, each after every file of its group was in place
        self.assertEqual(len(self.folder_syncs), 2)
        for ds in (second, third):
            self.assertIn(ds.SOPInstanceUID + ".dcm", self.folder_syncs[1])
            self.assertIn(ds.SOPInstanceUID + ".dcm.pending", self.folder_syncs[1])

    def test_one_failing_instance_does_not_fail_its_group(self) -> None:
        (a, ta), (b, tb) = self.association(), self.association()
        good, bad = sr_dataset(), sr_dataset()
        import medagent.dicom.scp as scp

        real = scp.atomic_write

        def atomic_write(path: str, chunks, **kw):
            if bad.SOPInstanceUID in path:
                raise OSError(28, "No space left on device")
            return real(path, chunks, **kw)

        self.patch(scp, "atomic_write", atomic_write)
        self.run.hold = True
        self.store(a, sr_dataset())
        self.store(a, good, 2)  # queued behind the first on its association
        self.store(b, bad)
        d, fn, args = self.run.held.pop()
        d.callback(fn(*args))
        d, fn, args = self.run.held.pop()
        self.assertEqual(len(args[0]), 2)  # the bad one and the good one, together
        d.callback(fn(*args))
        self.assertEqual(self.status(tb), 0xA700)
        assembler = dimse.MessageAssembler()
        answers = [m for p in read_pdus(ta.value()) for m in assembler.feed(p)]
        self.assertEqual([m.command_set.Status for m in answers], [0, 0])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(os.path.exists(os.path.join(self.dir, good.SOPInstanceUID + ".dcm")))
        self.assertFalse(os.path.exists(os.path.join(self.dir, bad.SOPInstanceUID + ".dcm")))

    def test_a_failing_folder_fsync_answers_the_whole_group_with_a_failure(self) -> None:
        import medagent.dicom.scp as scp

        def broken(folder: str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(scp, "fsync_dir", broken)
        proto, tr = self.association()
        self.store(proto, sr_dataset())
        self.assertEqual(self.status(tr), 0xA700)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class CommandCodecTests(SynchronousTestCase):
    """
    Our command-set encoder and decoder for C-STORE / C-ECHO against pynetdicom's (which goes
    through pydicom): the same bytes out, the same values in.
    """

    def pynetdicom_pdus(self, message, context_id: int, max_pdu: int) -> bytes:
        return b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu))

    def test_c_store_rq_bytes_are_pynetdicoms(self) -> None:
        from io import BytesIO

        from pynetdicom import dimse_primitives as prims

        for uid, data, max_pdu in (("1.2.3.4", b"\x01" * 999, 16384),
                                   ("1.2.3.45", os.urandom(100_003), 4096),
                                   ("1.2.3", b"\x02" * 10, 0)):
            p = prims.C_STORE()
            p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 7, CT_CLASS, uid
            p.Priority, p.DataSet = 2, BytesIO(data)
            theirs = pmsgs.C_STORE_RQ()
            theirs.primitive_to_message(p)
            ours = dimse.c_store_rq(7, CT_CLASS, uid, data)
            self.assertEqual(b"".join(dimse.message_pdus(ours, 3, max_pdu)),
                             self.pynetdicom_pdus(theirs, 3, max_pdu))
            self.assertEqual(dimse.message_bytes(ours, 3, max_pdu),
                             self.pynetdicom_pdus(theirs, 3, max_pdu))

    def test_c_store_rsp_bytes_are_pynetdicoms(self) -> None:
        from pynetdicom import dimse_primitives as prims

        request = dimse.decode_command(dimse.encode_command({
            "AffectedSOPClassUID": SR_CLASS, "CommandField": 1, "MessageID": 9,
            "Priority": 2, "CommandDataSetType": 1, "AffectedSOPInstanceUID": "1.2.3.4"}))
        assert request is not None
        incoming = dimse.ReceivedMessage(request, 1)
        for status, comment in ((0, None), (0xB000, "odd"), (0xA700, "even")):
            p = prims.C_STORE()
            p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID = 9, SR_CLASS
            p.AffectedSOPInstanceUID, p.Status = "1.2.3.4", status
            if comment:
                p.ErrorComment = comment
            theirs = pmsgs.C_STORE_RSP()
            theirs.primitive_to_message(p)
            ours = dimse.c_store_rsp(incoming, status, comment)
            self.assertEqual(b"".join(dimse.message_pdus(ours, 1, 16384)),
                             self.pynetdicom_pdus(theirs, 1, 16384))
            # the pydicom view, built on demand, encodes to the same command set too
            from pynetdicom.dsutils import encode

            self.assertEqual(encode(ours.command_set, True, True),
                             encode(theirs.command_set, True, True))

    def assemble(self, raw: bytes) -> list:
        assembler = dimse.MessageAssembler()
        out: list = []
        for p in read_pdus(raw):
            out += assembler.feed(p)
        return out

    def test_decoded_like_pynetdicom(self) -> None:
        from io import BytesIO

        from pynetdicom import dimse_primitives as prims

        rq = prims.C_STORE()
        rq.MessageID, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = 7, CT_CLASS, "1.2.3"
        rq.Priority, rq.DataSet = 1, BytesIO(os.urandom(5000))
        rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = "ORTHANC", 3
        rsp = prims.C_STORE()
        rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPClassUID = 7, CT_CLASS
        rsp.AffectedSOPInstanceUID, rsp.Status = "1.2.3", 0xA900
        rsp.ErrorComment, rsp.OffendingElement = "bad thing", [0x00100010, 0x00080018]
        for cls, primitive in ((pmsgs.C_STORE_RQ, rq), (pmsgs.C_STORE_RSP, rsp)):
            message = cls()
            message.primitive_to_message(primitive)
            raw = self.pynetdicom_pdus(message, 1, 1024)
            [ours] = self.assemble(raw)
            self.assertIsInstance(ours, dimse.ReceivedMessage)
            theirs = pmsgs.DIMSEMessage()
            for p in read_pdus(raw):
                theirs.decode_msg(p.to_primitive())
            for keyword, value in ours.command_set.items():
                self.assertEqual(value, theirs.command_set.get(keyword), keyword)
            self.assertEqual({e.keyword for e in theirs.command_set},
                             set(ours.command_set))
            self.assertEqual(ours.data_set.getvalue() if ours.data_set else b"",
                             theirs.data_set.getvalue())
        self.assertEqual(ours.command_set.OffendingElement, [0x00100010, 0x00080018])
        with self.assertRaises(AttributeError):
            ours.command_set.NoSuchKeyword

    def test_other_commands_go_to_pynetdicom(self) -> None:
        query = Dataset()
        query.PatientName = "DOE*"
        message = dimse.c_find_rq(3, "1.2.840.10008.5.1.4.31",
                                  dimse.encode_dataset(query, ImplicitVRLittleEndian))
        [decoded] = self.assemble(b"".join(dimse.message_pdus(message, 1, 16384)))
        self.assertIsInstance(decoded, pmsgs.C_FIND_RQ)
        # an element outside the table, or a wrong group length: not ours to decode
        fields = {"AffectedSOPClassUID": SR_CLASS, "CommandField": 0x8001,
                  "MessageIDBeingRespondedTo": 1, "CommandDataSetType": 0x0101,
                  "Status": 0}
        raw = dimse.encode_command(fields)
        self.assertIsNotNone(dimse.decode_command(raw))
        self.assertIsNone(dimse.decode_command(raw[:12] + b"\x00\x00\x01\x10" + raw[16:]))
        self.assertIsNone(dimse.decode_command(raw[:8] + struct.pack("<I", 1) + raw[12:]))
        self.assertIsNone(dimse.decode_command(raw[:-1]))

    def test_command_fragment_inside_a_data_set_is_refused(self) -> None:
        message = dimse.c_store_rq(1, SR_CLASS, "1.2.3", b"\x00" * 100)
        pdus = list(dimse.message_pdus(message, 1, 16384))
        assembler = dimse.MessageAssembler()
        assembler.feed(read_pdus(pdus[0])[0])
        with self.assertRaises(dimse.DimseError):
            assembler.feed(read_pdus(pdus[0])[0])


class SpareFileTests(SynchronousTestCase):
    """A started channel writes instances and notes through spare files made ahead."""

    def test_spares_made_ahead_taken_and_removed(self) -> None:
        from medagent.dicom.instance import SpareFiles

        folder = tempfile.mkdtemp(prefix="medagent-dicom-test-")
        self.addCleanup(lambda: __import__("shutil").rmtree(folder, ignore_errors=True))
        leftover = os.path.join(folder, SpareFiles.PREFIX + "crashed.part")
        open(leftover, "w").close()
        channel = StorageChannel(lambda ct, body, remote: succeed(None), reactor=Clock(),
                                 ae_title="AGENTSCP", storage_dir=folder,
                                 sop_classes=[SR_CLASS], run_blocking=InlineRun(),
                                 journal_max_bytes=0)  # the path of large instances
        channel.startService()
        spares = sorted(n for n in os.listdir(folder) if n.startswith(SpareFiles.PREFIX))
        self.assertEqual(len(spares), channel.spares.keep)
        self.assertNotIn(os.path.basename(leftover), spares)  # a crash's leftovers go
        proto = channel.factory().buildProtocol(None)
        tr = transport()
        proto.makeConnection(tr)
        contexts = pdu.build_contexts([(SR_CLASS, [ExplicitVRLittleEndian])])
        proto.dataReceived(pdu.associate_rq("MODALITY", "AGENTSCP", contexts, 16384).encode())
        ds = sr_dataset()
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        proto.dataReceived(pdata(dimse.c_store_rq(1, SR_CLASS, ds.SOPInstanceUID, raw),
                                 1, 16384))
        names = set(os.listdir(folder))
        # two spares became the instance and its note (forwarded and removed since); the
        # channel made new ones
        self.assertTrue(os.path.exists(os.path.join(folder, ds.SOPInstanceUID + ".dcm")))
        self.assertEqual(len(set(spares) & names), channel.spares.keep - 2)
        self.assertEqual(len([n for n in names if n.startswith(SpareFiles.PREFIX)]),
                         channel.spares.keep)
        from pydicom import dcmread

        self.assertEqual(dcmread(os.path.join(folder, ds.SOPInstanceUID + ".dcm"))
                         .SOPInstanceUID, ds.SOPInstanceUID)
        channel.stopService()
        self.assertEqual(sorted(os.listdir(folder)), [ds.SOPInstanceUID + ".dcm"])
