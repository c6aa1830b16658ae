"""
The storage channel's write-ahead journal (L{medagent.dicom.journal}) and the channel's use of
it: a small instance is answered after its record is flushed, written out to its file later,
and a record a crash left behind becomes its file and is forwarded on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import pdu_primitives  # noqa: F401  (pynetdicom's PDU classes load first)
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from medagent.dicom import dimse, pdu
from medagent.dicom.journal import PREFIX, InstanceJournal, encode_record, read_records
from medagent.dicom.scp import StorageChannel
from tests.test_dicom_association import (
    SR_CLASS,
    InlineRun,
    instance_files,
    pdata,
    read_pdus,
    sr_dataset,
    transport,
)


def folder(testcase: SynchronousTestCase) -> str:
    path = tempfile.mkdtemp(prefix="medagent-journal-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class JournalTests(SynchronousTestCase):
    def test_records_read_back_up_to_a_torn_one(self) -> None:
        a, b = encode_record({"n": 1}, b"first"), encode_record({"n": 2}, b"second")
        torn = bytearray(encode_record({"n": 3}, b"third"))
        torn[-1] ^= 0xFF  # the crash tore the last write
        data = a + b + bytes(torn) + b"\x00" * 100
        self.assertEqual(list(read_records(data)), [({"n": 1}, b"first"), ({"n": 2}, b"second")])
        self.assertEqual(list(read_records(b"\x00" * 64)), [])
        self.assertEqual(list(read_records(a[:-1])), [])  # cut short

    def test_one_flush_per_append_and_recovery(self) -> None:
        path = folder(self)
        journal = InstanceJournal(path, segment_size=64 * 1024, max_record=8 * 1024)
        journal.prepare()
        refs = journal.append([encode_record({"n": i}, b"x" * 100) for i in range(3)])
        self.assertEqual(journal.flushes, 1)
        self.assertEqual(len(set(map(id, refs))), 1)
        # a new journal on the same folder (the next start) finds the records
        found = InstanceJournal(path).recover()
        self.assertEqual([[h["n"] for h, _ in records] for _, records in found], [[0, 1, 2]])

    def test_full_segment_rotates_and_retired_segments_go(self) -> None:
        path = folder(self)
        journal = InstanceJournal(path, segment_size=16 * 1024, max_record=8 * 1024)
        first = journal.append([encode_record({"n": 0}, b"x" * 7000)])
        second = journal.append([encode_record({"n": 1}, b"y" * 7000),
                                 encode_record({"n": 2}, b"z" * 7000)])
        self.assertIs(second[0], first[0])
        self.assertIsNot(second[1], first[0])  # did not fit: the next segment
        self.assertEqual(len([n for n in os.listdir(path) if n.startswith(PREFIX)]), 2)
        journal.retire(first + second[:1])  # the full segment's records are all written out
        self.assertEqual(len([n for n in os.listdir(path) if n.startswith(PREFIX)]), 1)
        journal.retire(second[1:])
        journal.close()  # the current one, all retired, goes on stop
        self.assertEqual(os.listdir(path), [])

    def test_unretired_records_survive_close(self) -> None:
        path = folder(self)
        journal = InstanceJournal(path, segment_size=16 * 1024, max_record=8 * 1024)
        journal.append([encode_record({"n": 0}, b"x")])
        journal.close()
        self.assertEqual(len(InstanceJournal(path).recover()[0][1]), 1)


class JournaledStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = folder(self)
        self.forwarded: list = []
        self.run = InlineRun()

    def channel(self, **kw) -> StorageChannel:
        return StorageChannel(
            lambda ct, body, remote: (self.forwarded.append(json.loads(body)), succeed(None))[1],
            reactor=self.clock, ae_title="AGENTSCP", storage_dir=self.dir,
            sop_classes=[SR_CLASS], run_blocking=self.run, max_pdu=16384, **kw)

    def association(self, channel: StorageChannel):
        proto = channel.factory().buildProtocol(None)
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

    def statuses(self, tr) -> list[int]:
        assembler = dimse.MessageAssembler()
        return [m.command_set.Status for p in read_pdus(tr.value()) for m in assembler.feed(p)]

    def test_instances_arriving_together_share_one_flush_and_one_write_out(self) -> None:
        channel = self.channel()
        (a, ta), (b, tb) = self.association(channel), self.association(channel)
        datasets = [sr_dataset() for _ in range(3)]
        self.run.hold = True
        self.store(a, datasets[0])
        self.store(b, datasets[1])
        self.store(a, datasets[2], 2)  # queued behind the first on its association
        self.assertEqual((ta.value(), tb.value()), (b"", b""))  # nothing before the flush
        self.run.hold = False
        self.run.release()
        self.assertEqual((self.statuses(ta), self.statuses(tb)), ([0, 0], [0]))
        self.assertEqual(channel.journal.flushes, 2)  # a group of one, then of two
        self.assertEqual(instance_files(self.dir), [])  # not written out yet
        self.clock.advance(channel.write_out_delay)
        self.assertEqual(channel.write_out_groups, 1)
        self.assertEqual(sorted(f["instance"]["sopInstanceUID"] for f in self.forwarded),
                         sorted(ds.SOPInstanceUID for ds in datasets))
        self.assertEqual(self.forwarded[0]["dataset"]["00100010"]["Value"],
                         [{"Alphabetic": "DOE^JOHN"}])
        segment = channel.journal._current
        self.assertEqual((segment.records, segment.retired), (3, 3))

    def test_a_mismatching_instance_is_refused_from_its_bytes(self) -> None:
        channel = self.channel()
        proto, tr = self.association(channel)
        ds = sr_dataset()
        raw = dimse.encode_dataset(ds, ExplicitVRLittleEndian)
        proto.dataReceived(pdata(dimse.c_store_rq(1, SR_CLASS, "1.2.3.999", raw), 1, 16384))
        self.assertEqual(self.statuses(tr), [0xA900])
        self.assertEqual(channel.journal.flushes, 0)

    def test_a_failed_flush_is_a_failure_status(self) -> None:
        channel = self.channel()

        def broken(records):
            raise OSError(5, "Input/output error")

        channel.journal.append = broken  # type: ignore[method-assign]
        proto, tr = self.association(channel)
        self.store(proto, sr_dataset())
        self.assertEqual(self.statuses(tr), [0xA700])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_record_left_by_a_crash_is_written_out_and_forwarded_on_start(self) -> None:
        channel = self.channel()
        proto, tr = self.association(channel)
        ds = sr_dataset()
        self.store(proto, ds)
        self.assertEqual(self.statuses(tr), [0])
        # the process dies here: answered, not yet written out (nothing stopped cleanly)
        self.assertEqual(instance_files(self.dir), [])
        restarted = self.channel()
        restarted.startService()
        self.addCleanup(restarted.stopService)
        self.assertEqual([f["instance"]["sopInstanceUID"] for f in self.forwarded],
                         [ds.SOPInstanceUID])
        self.assertEqual(self.forwarded[0]["association"]["callingAeTitle"], "MODALITY")
        from pydicom import dcmread

        path = os.path.join(self.dir, ds.SOPInstanceUID + ".dcm")
        self.assertEqual(dcmread(path).PatientName, "DOE^JOHN")
        # the recovered segment is gone; the note went when the relay had it
        self.assertEqual([n for n in os.listdir(self.dir) if not n.startswith(".")],
                         [ds.SOPInstanceUID + ".dcm"])
        spare = restarted.journal._spare if restarted.journal is not None else None
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith(PREFIX)],
                         [os.path.basename(spare.path)] if spare is not None else [])

    def test_a_failed_write_out_keeps_the_record(self) -> None:
        channel = self.channel()
        import medagent.dicom.scp as scp

        def no_space(path, chunks, **kw):
            raise OSError(28, "No space left on device")

        self.patch(scp, "atomic_write", no_space)
        proto, tr = self.association(channel)
        self.store(proto, sr_dataset())
        self.assertEqual(self.statuses(tr), [0])
        self.clock.advance(channel.write_out_delay)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.forwarded, [])
        segment = channel.journal._current
        self.assertEqual((segment.records, segment.retired), (1, 0))  # recovered next start

    def test_large_instances_skip_the_journal(self) -> None:
        channel = self.channel(journal_max_bytes=100)
        proto, tr = self.association(channel)
        ds = sr_dataset()
        self.store(proto, ds)
        self.assertEqual(self.statuses(tr), [0])
        self.assertEqual(channel.journal.flushes, 0)
        self.assertTrue(os.path.exists(os.path.join(self.dir, ds.SOPInstanceUID + ".dcm")))
