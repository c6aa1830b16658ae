"""
DICOM against peers we did not write (installed by ``.ci/peers-dicom.sh``): dcmtk's storescp,
storescu, echoscu, findscu and wlmscpfs, Orthanc, dicom3tools' dciodvfy, and pynetdicom's AE
as an MPPS SCU.  Every peer binds a free port, we only connect to 127.0.0.1, and every process
is killed in cleanup.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Any

import treq
from pydicom import dcmread
from pydicom.dataset import Dataset
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from medagent.delivery import DeliveryError
from medagent.destination import parse_destination
from medagent.dicom.scp import StorageChannel
from medagent.dicom.scu import DICOMSender
from medagent.dicom.worklist import WorklistChannel, WorklistSender
from tests import procs
from tests.peerenv import FIXTURES, need

DICOM_FIXTURES = os.path.join(FIXTURES, "dicom")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"


def program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    need(path is not None, name)
    return path  # type: ignore[return-value]


async def run(argv: list[str], cwd: str | None = None) -> tuple[str, int]:
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=dict(os.environ),
                                                    path=cwd)
    return (out + err).decode("utf-8", "replace"), code


async def wait_port(port: int, timeout: float = 15.0) -> None:
    def can_connect() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    await procs.wait_until(can_connect, timeout=timeout, what=f"port {port}")


def b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


class _Base(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="medagent-dicom-peers-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    async def make_sr(self, name: str = "sr.dcm") -> str:
        path = os.path.join(self.tmp, name)
        out, code = await run([sys.executable, os.path.join(DICOM_FIXTURES, "make_sr.py"),
                               path])
        self.assertEqual(code, 0, out)
        return path

    async def make_ct(self) -> str:
        path = os.path.join(self.tmp, "ct.dcm")
        out, code = await run([program("dump2dcm"), "--write-xfer-little",
                               os.path.join(DICOM_FIXTURES, "ct.dump"), path])
        self.assertEqual(code, 0, out)
        return path

    def sender(self, **kw) -> DICOMSender:
        s = DICOMSender(reactor, ae_title="AGENT", **kw)
        self.addCleanup(s.close)
        return s

    def storescp(self, out_dir: str, port: int, aet: str = "STORESCP",
                 options: tuple[str, ...] = ()) -> procs.Proc:
        os.makedirs(out_dir, exist_ok=True)
        return procs.spawn(self, "storescp", [program("storescp"), "--aetitle", aet, *options,
                                              "-od", out_dir, str(port)],
                           env={"TCP_NODELAY": "1"})

    async def start_orthanc(self, **config) -> tuple[str, int, Any]:
        """
        Orthanc on free loopback ports (C{config} overrides its settings): the REST base URL,
        the DICOM port and a non-persistent HTTP pool for treq.
        """
        from twisted.web.client import HTTPConnectionPool

        orthanc = program("Orthanc")
        http_port, dicom_port = procs.free_port(), procs.free_port()
        folder = tempfile.mkdtemp(prefix="orthanc-", dir=self.tmp)
        settings = {
            "Name": "medagent-test", "StorageDirectory": "db", "IndexDirectory": "db",
            "HttpPort": http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True,
            "DicomAet": "ORTHANC", "DicomPort": dicom_port, "DicomCheckCalledAet": True,
            "DicomModalities": {}, "Plugins": [],
        }
        settings.update(config)
        with open(os.path.join(folder, "orthanc.json"), "w") as f:
            json.dump(settings, f)
        procs.spawn(self, "orthanc", [orthanc, "orthanc.json"], cwd=folder)
        base = f"http://127.0.0.1:{http_port}"
        pool = HTTPConnectionPool(reactor, persistent=False)

        async def up() -> bool:
            try:
                r = await treq.get(base + "/system", pool=pool)
                await r.content()
                return r.code == 200
            except Exception:
                return False

        await procs.wait_until(up, timeout=30, what="Orthanc HTTP")
        return base, dicom_port, pool


class SenderAgainstDcmtk(_Base):
    def test_sr_and_ct_to_storescp(self) -> Deferred:
        return ensureDeferred(self._sr_and_ct())

    async def _sr_and_ct(self) -> None:
        sr = await self.make_sr()
        out, code = await run([program("dciodvfy"), sr])
        self.assertNotIn("Error", out, out)  # the SR we relay is a valid Basic Text SR
        ct = await self.make_ct()
        port = procs.free_port()
        received = os.path.join(self.tmp, "in")
        self.storescp(received, port)
        await wait_port(port)
        sender = self.sender()
        dest = parse_destination(f"dicom://STORESCP@127.0.0.1:{port}?calling=AGENT")

        ping = await sender.ping(dest)
        self.assertEqual(json.loads(ping.body)["status"], "0x0000")

        replies = []
        for path in (sr, ct, sr):
            replies.append(await sender.send(dest, "application/dicom", b64(path), {}))
        for r in replies:
            body = json.loads(r.body)
            self.assertTrue(r.delivered, r.body)
            self.assertEqual((body["status"], body["meaning"]), ("0x0000", "Success"))
        self.assertEqual(json.loads(replies[0].body)["sopInstanceUID"], dcmread(sr).SOPInstanceUID)
        names = sorted(os.listdir(received))
        self.assertEqual(len(names), 2, names)  # the repeated SR overwrote its file
        stored_sr = [n for n in names if n.startswith("SR")][0]
        got = dcmread(os.path.join(received, stored_sr))
        self.assertEqual(got.SOPInstanceUID, dcmread(sr).SOPInstanceUID)
        self.assertEqual(got.ContentSequence[0].TextValue, "No acute findings.")
        out, code = await run([program("dciodvfy"), os.path.join(received, stored_sr)])
        self.assertNotIn("Error", out, out)

    def test_association_kept_for_a_burst(self) -> Deferred:
        return ensureDeferred(self._burst())

    async def _burst(self) -> None:
        paths = [await self.make_sr(f"sr{i}.dcm") for i in range(5)]
        port = procs.free_port()
        received = os.path.join(self.tmp, "in")
        self.storescp(received, port)
        await wait_port(port)
        sender = self.sender(idle_timeout=0.5)
        dest = parse_destination(f"dicom://STORESCP@127.0.0.1:{port}")
        for path in paths:
            r = await sender.send(dest, "application/dicom", b64(path), {})
            self.assertTrue(r.delivered)
        self.assertEqual(sender.associations_opened, 1)
        self.assertEqual(len(os.listdir(received)), 5)
        await procs.wait_until(lambda: not sender._live, timeout=5, what="idle release")
        # DICOM JSON input goes the same way (encoded by pydicom)
        ds = dcmread(paths[0])
        from pydicom.uid import generate_uid

        ds.SOPInstanceUID = generate_uid()
        ds.file_meta = None
        r = await sender.send(dest, "application/dicom+json", json.dumps(ds.to_json_dict()),
                              {})
        self.assertTrue(r.delivered, r.body)
        self.assertEqual(sender.associations_opened, 2)
        self.assertEqual(len(os.listdir(received)), 6)

    def test_connection_refused_is_transient(self) -> Deferred:
        return ensureDeferred(self._refused())

    async def _refused(self) -> None:
        sr = await self.make_sr()
        sender = self.sender(connect_timeout=2)
        port = procs.free_port()
        with self.assertRaises(DeliveryError) as e:
            await sender.send(parse_destination(f"dicom://X@127.0.0.1:{port}"),
                              "application/dicom", b64(sr), {})
        self.assertTrue(e.exception.transient)
        self.assertEqual(e.exception.phase, "connect")


class SenderAgainstOrthanc(_Base):
    def test_store_shows_in_orthanc(self) -> Deferred:
        return ensureDeferred(self._orthanc())

    async def _orthanc(self) -> None:
        sr = await self.make_sr()
        base, dicom_port, pool = await self.start_orthanc()
        sender = self.sender()
        dest = parse_destination(f"dicom://ORTHANC@127.0.0.1:{dicom_port}?calling=AGENT")
        reply = await sender.send(dest, "application/dicom", b64(sr), {})
        self.assertTrue(reply.delivered, reply.body)
        r = await treq.get(base + "/instances", pool=pool)
        ids = await r.json()
        self.assertEqual(len(ids), 1)
        r = await treq.get(f"{base}/instances/{ids[0]}/simplified-tags", pool=pool)
        tags = await r.json()
        self.assertEqual(tags["SOPInstanceUID"], dcmread(sr).SOPInstanceUID)
        self.assertEqual(tags["PatientID"], "12345")

        # Orthanc checks the called AE title: a permanent rejection, in words
        wrong = parse_destination(f"dicom://NOTORTHANC@127.0.0.1:{dicom_port}?calling=AGENT")
        with self.assertRaises(DeliveryError) as e:
            await sender.send(wrong, "application/dicom", b64(sr), {})
        self.assertFalse(e.exception.transient)
        self.assertIn("called AE title not recognized", str(e.exception))
        ping = await sender.ping(dest)
        self.assertEqual(json.loads(ping.body)["status"], "0x0000")


def stored_files(channel) -> list[str]:
    """What is in the channel's folder besides its spare files and journal segments."""
    from medagent.dicom.instance import SpareFiles
    from medagent.dicom.journal import PREFIX

    return [n for n in os.listdir(channel.storage_dir)
            if not n.startswith((SpareFiles.PREFIX, PREFIX))]


class DcmtkToStorageChannel(_Base):
    def channel(self, **kw) -> tuple[StorageChannel, list, int]:
        forwarded: list = []

        def forward(content_type, body, remote):
            forwarded.append(json.loads(body))
            return deferLater(reactor, 0, lambda: None)

        port = procs.free_port()
        ch = StorageChannel(forward, reactor=reactor, ae_title="AGENTSCP",
                            storage_dir=os.path.join(self.tmp, "store"),
                            endpoint=f"tcp:{port}:interface=127.0.0.1", **kw)
        return ch, forwarded, port

    def test_echoscu_and_storescu(self) -> Deferred:
        return ensureDeferred(self._store())

    async def _store(self) -> None:
        sr, ct = await self.make_sr(), await self.make_ct()
        ch, forwarded, port = self.channel(allowed_calling=["MODALITY"])
        await ch.startService()
        self.addCleanup(ch.stopService)
        out, code = await run([program("echoscu"), "-aet", "MODALITY", "-aec", "AGENTSCP",
                               "127.0.0.1", str(port)])
        self.assertEqual(code, 0, out)
        out, code = await run([program("storescu"), "-aet", "MODALITY", "-aec", "AGENTSCP",
                               "127.0.0.1", str(port), sr, ct])
        self.assertEqual(code, 0, out)
        await procs.wait_until(lambda: len(forwarded) == 2 and not ch.forwards, timeout=10,
                               what="forwards")
        by_uid = {f["instance"]["sopInstanceUID"]: f for f in forwarded}
        sr_uid = dcmread(sr).SOPInstanceUID
        stored = by_uid[sr_uid]["instance"]["path"]
        self.assertEqual(dcmread(stored).SOPInstanceUID, sr_uid)
        self.assertEqual(by_uid[sr_uid]["association"]["callingAeTitle"], "MODALITY")
        self.assertNotIn("7FE00010", by_uid["1.2.276.0.7230010.3.1.4.1111.1.1"]["dataset"])
        out, code = await run([program("dciodvfy"), stored])
        self.assertNotIn("Error", out, out)
        self.assertEqual(sorted(stored_files(ch)),
                         sorted([sr_uid + ".dcm", "1.2.276.0.7230010.3.1.4.1111.1.1.dcm"]))

        # unknown calling AE: rejected with the reason code dcmtk prints
        out, code = await run([program("storescu"), "-aet", "STRANGER", "-aec", "AGENTSCP",
                               "127.0.0.1", str(port), sr])
        self.assertNotEqual(code, 0)
        self.assertIn("Calling AE Title Not Recognized", out)
        out, code = await run([program("echoscu"), "-aet", "MODALITY", "-aec", "OTHER",
                               "127.0.0.1", str(port)])
        self.assertIn("Called AE Title Not Recognized", out)

    def test_unsupported_sop_class(self) -> Deferred:
        return ensureDeferred(self._unsupported())

    async def _unsupported(self) -> None:
        ct = await self.make_ct()
        ch, forwarded, port = self.channel(sop_classes=[SR_CLASS])
        await ch.startService()
        self.addCleanup(ch.stopService)
        out, code = await run([program("storescu"), "-aet", "MODALITY", "-aec", "AGENTSCP",
                               "127.0.0.1", str(port), ct])
        self.assertNotEqual(code, 0, out)
        self.assertIn("No presentation context", out)
        self.assertEqual(stored_files(ch), [])
        self.assertEqual(forwarded, [])

    def test_our_sender_to_our_channel(self) -> Deferred:
        return ensureDeferred(self._loop())

    async def _loop(self) -> None:
        sr = await self.make_sr()
        ch, forwarded, port = self.channel()
        await ch.startService()
        self.addCleanup(ch.stopService)
        sender = self.sender()
        dest = parse_destination(f"dicom://AGENTSCP@127.0.0.1:{port}?calling=ELSEWHERE")
        reply = await sender.send(dest, "application/dicom", b64(sr), {})
        self.assertTrue(reply.delivered)
        await procs.wait_until(lambda: forwarded, timeout=10, what="forward")
        self.assertEqual(forwarded[0]["association"]["callingAeTitle"], "ELSEWHERE")


WL_ITEM_DUMP_KEYS = ["PatientName", "PatientID", "AccessionNumber"]


def fhir_order(accession: str, family: str, mrn: str, modality: str, when: str) -> dict:
    return {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "identifier": [{"type": {"coding": [{"system":
                        "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                        "value": accession}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2",
                             "display": "CT Chest"},
                            {"system": "http://dicom.nema.org/resources/ontology/DCM",
                             "code": modality}]},
        "subject": {"reference": "#p"}, "occurrenceDateTime": when,
        "contained": [{"resourceType": "Patient", "id": "p",
                       "identifier": [{"value": mrn}],
                       "name": [{"family": family, "given": ["Test"]}],
                       "birthDate": "1970-01-01", "gender": "female"}],
    }


def pending_names(findscu_output: str) -> list[str]:
    """Patient names in the pending responses (findscu -v also echoes the request)."""
    names = []
    in_response = False
    for line in findscu_output.splitlines():
        if "Find Response" in line:
            in_response = "(Pending)" in line
        elif "Request" in line:
            in_response = False
        elif in_response and "(0010,0010) PN [" in line:
            names.append(line.split("[", 1)[1].split("]", 1)[0].strip())
    return sorted(names)


class WorklistAgainstDcmtk(_Base):
    def test_findscu_gets_pushed_items_like_wlmscpfs(self) -> Deferred:
        return ensureDeferred(self._worklist())

    async def _worklist(self) -> None:
        findscu = program("findscu")
        forwarded: list = []

        def forward(content_type, body, remote):
            forwarded.append(json.loads(body))
            return deferLater(reactor, 0, lambda: None)

        port = procs.free_port()
        db_path = os.path.join(self.tmp, "wl.sqlite")
        ch = WorklistChannel(forward, reactor=reactor, name="ct1", ae_title="AGENTMWL",
                             db_path=db_path, endpoint=f"tcp:{port}:interface=127.0.0.1")
        await ch.startService()
        self.addCleanup(ch.stopService)
        sender = WorklistSender({"ct1": ch})
        dest = parse_destination("worklist://ct1?station=CT01", needs_port=False)
        pushes = [
            fhir_order("ACC1", "ALPHA", "P1", "CT", "2024-01-15T09:30:00"),
            fhir_order("ACC2", "BETA", "P2", "CT", "2024-01-16T10:00:00"),
            fhir_order("ACC3", "GAMMA", "P3", "MR", "2024-01-15T11:00:00"),
            fhir_order("ACC4", "DELTA", "P4", "CT", "2024-02-20T08:00:00"),
        ]
        for order in pushes:
            r = await sender.send(dest, "application/fhir+json", json.dumps(order), {})
            self.assertEqual(json.loads(r.body)["action"], "created")
        # an update and a cancel
        pushes[1]["contained"][0]["name"][0]["family"] = "BETAUPDATED"
        r = await sender.send(dest, "application/fhir+json", json.dumps(pushes[1]), {})
        self.assertEqual(json.loads(r.body)["action"], "updated")
        r = await sender.send(dest, "application/json", json.dumps({"cancel": "ACC4"}), {})
        self.assertEqual(json.loads(r.body)["removed"], 1)

        queries = {
            "ct-january": ["-k", "PatientName=", "-k", "AccessionNumber=",
                           "-k", "(0040,0100)[0].Modality=CT",
                           "-k", "(0040,0100)[0].ScheduledStationAETitle=CT01",
                           "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate="
                                 "20240101-20240131"],
            "wildcard-name": ["-k", "PatientName=G*", "-k", "PatientID=",
                              "-k", "(0040,0100)[0].Modality="],
            "one-day": ["-k", "PatientName=", "-k",
                        "(0040,0100)[0].ScheduledProcedureStepStartDate=20240115"],
            "accession": ["-k", "PatientName=", "-k", "AccessionNumber=ACC2"],
        }
        ours = {}
        for name, keys in queries.items():
            out, code = await run([findscu, "-v", "-W", "-aet", "CT01", "-aec", "AGENTMWL",
                                   *keys, "127.0.0.1", str(port)])
            self.assertEqual(code, 0, out)
            self.assertIn("Final Find Response (Success)", out)
            ours[name] = pending_names(out)
        self.assertEqual(ours["ct-january"], ["ALPHA^Test", "BETAUPDATED^Test"])
        self.assertEqual(ours["wildcard-name"], ["GAMMA^Test"])
        self.assertEqual(ours["one-day"], ["ALPHA^Test", "GAMMA^Test"])
        self.assertEqual(ours["accession"], ["BETAUPDATED^Test"])

        # the same items, as files, served by dcmtk's wlmscpfs, answer the same queries
        wl_dir = os.path.join(self.tmp, "wlistdb", "WLMSCP")
        os.makedirs(wl_dir)
        open(os.path.join(wl_dir, "lockfile"), "w").close()
        for n, ds in enumerate(list(ch.items.values())):
            item = Dataset()
            item.update(ds)
            from pydicom.dataset import FileMetaDataset
            from pydicom.uid import ExplicitVRLittleEndian

            item.file_meta = FileMetaDataset()
            item.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            item.save_as(os.path.join(wl_dir, f"item{n}.wl"), implicit_vr=False,
                         little_endian=True)
        wl_port = procs.free_port()
        procs.spawn(self, "wlmscpfs", [program("wlmscpfs"), "-dfp",
                                       os.path.join(self.tmp, "wlistdb"), str(wl_port)])
        await wait_port(wl_port)
        for name, keys in queries.items():
            out, code = await run([findscu, "-v", "-W", "-aet", "CT01", "-aec", "WLMSCP",
                                   *keys, "127.0.0.1", str(wl_port)])
            self.assertEqual(code, 0, out)
            self.assertEqual(pending_names(out), ours[name], f"{name}: {out}")

        # items survive a restart of the channel
        await ch.stopService()
        ch2 = WorklistChannel(forward, reactor=reactor, name="ct1", ae_title="AGENTMWL",
                              db_path=db_path, endpoint=f"tcp:{port}:interface=127.0.0.1")
        await ch2.startService()
        self.addCleanup(ch2.stopService)
        self.assertEqual(len(ch2.items), 3)

        # MPPS from pynetdicom (a third-party SCU): IN PROGRESS then COMPLETED
        study_uid = str(ch2.items[("ACC1", "ACC1")].StudyInstanceUID)
        statuses = await deferToThread(_mpps_exchange, port, study_uid)
        self.assertEqual(statuses, [0x0000, 0x0000, 0x0111, 0x0000, 0x0110, 0x0112])
        events = [(f["event"], f["status"]) for f in forwarded]
        self.assertEqual(events, [("N-CREATE", "IN PROGRESS"), ("N-SET", "IN PROGRESS"),
                                  ("N-SET", "COMPLETED")])
        self.assertEqual(forwarded[-1]["worklistItems"],
                         [{"accessionNumber": "ACC1", "scheduledProcedureStepID": "ACC1",
                           "status": "COMPLETED"}])
        out, code = await run([findscu, "-v", "-W", "-aet", "CT01", "-aec", "AGENTMWL",
                               *queries["ct-january"], "127.0.0.1", str(port)])
        self.assertEqual(pending_names(out), ["BETAUPDATED^Test"])  # completed item is gone


def _mpps_exchange(port: int, study_uid: str) -> list[int]:
    """pynetdicom's AE (threaded, third-party) as the modality's MPPS SCU."""
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="AGENTMWL")
    assert assoc.is_established
    uid = generate_uid()
    ds = Dataset()
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.AccessionNumber = "ACC1"
    step.ScheduledProcedureStepID = "ACC1"
    step.RequestedProcedureID = "ACC1"
    ds.ScheduledStepAttributesSequence = [step]
    ds.PatientName = "ALPHA^Test"
    ds.PatientID = "P1"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = "20240115"
    ds.PerformedProcedureStepStartTime = "093000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    statuses = []
    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
    statuses.append(status.Status)
    mod = Dataset()
    mod.PerformedSeriesSequence = []
    status, _ = assoc.send_n_set(mod, ModalityPerformedProcedureStep, uid)
    statuses.append(status.Status)
    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)  # duplicate
    statuses.append(status.Status)
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate = "20240115"
    done.PerformedProcedureStepEndTime = "094500"
    status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
    statuses.append(status.Status)
    status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)  # after final
    statuses.append(status.Status)
    status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, generate_uid())
    statuses.append(status.Status)
    assoc.release()
    return statuses
