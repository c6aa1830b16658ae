"""
The inbound log (device → agent → relay → Bot → answer): what L{ChannelRouter} records (after
the answer, never delaying or failing it; a storage failure is a line without the payload and
a count), the search fields (HL7 PID-3, DICOM UIDs read from the header only), the console's
Inbound view and agent Channels (escaped; patient ids and payloads only for operators and
admins, each payload view an AuditEvent without it), the ``AgentInbound`` API (admin only:
the attack of a pusher, an agent and a viewer is refused) and the prune on a clock.

Units on a Clock with inline SQLite; console and API pages from a real relay in this process
(L{procs.in_process_relay}) with treq, as L{tests.test_console}.
"""

from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent import wire
from medagent.metrics import RelayMetrics
from medagent.relay import bots as b
from medagent.relay.auth import ADMIN, OPERATOR, VIEWER
from medagent.relay.channels import ChannelRouter
from medagent.relay.fields import message_fields
from medagent.relay.service import (INBOUND_PRUNE_BATCH, INBOUND_PRUNE_BATCHES,
                                    _InboundHousekeeping)
from medagent.storage.inbound import InboundMessage
from medagent.storage.sqlite import RELAY_SCHEMA
from medagent.storage.sqlite.inbound import SQLiteInboundLog
from medagent.storage.sqlite.store import SQLiteStore
from tests import procs
from tests.fakes import InlineReactor, inline_database
from tests.test_channels_relay import FakeRunner
from tests.test_console import XSS, Browser, open_stream

HL7 = "x-application/hl7-v2+er7"
ORU = ("MSH|^~\\&|LAB|HOSP|LIS|LAB|20240101120000||ORU^R01|{ctrl}|P|2.5.1\r"
       "PID|1||{mrn}^^^MRN~OTHER^^^X||DOE^JANE\rORC|RE|{order}\rOBR|1|{order}||GLU\r"
       "OBX|1|NM|GLU||5.5")
ACK_AA = "MSH|^~\\&|LIS|LAB|LAB|HOSP|20240101120001||ACK|A1|P|2.5.1\rMSA|AA|{ctrl}"
ACK_AE = "MSH|^~\\&|LIS|LAB|LAB|HOSP|20240101120001||ACK|A1|P|2.5.1\rMSA|AE|{ctrl}|no"


def part10(study: str, sop: str, patient: str = "MRN-D1", *, implicit: bool = False,
           sequence: bool = False) -> str:
    """A small DICOM Part 10 file, base64 (what an ``application/dicom`` push carries)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop
    ds.PatientID = patient
    ds.PatientName = "DOE^JANE"
    ds.StudyInstanceUID = study
    if sequence:  # an undefined-length sequence before the Study UID: the scan gives up
        item = Dataset()
        item.ReferencedSOPInstanceUID = "9.9"
        ds.ReferencedStudySequence = [item]
        ds["ReferencedStudySequence"].is_undefined_length = True
    ds.PixelData = b"\0" * 64
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 8
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    raw = out.getvalue()
    assert not sequence or b"\xff\xff\xff\xff" in raw
    return base64.b64encode(raw).decode()


class SearchFieldTests(SynchronousTestCase):
    def test_hl7_fields(self) -> None:
        found = message_fields(HL7, ORU.format(ctrl="C9", mrn="MRN42", order="ACC7"))
        self.assertEqual(found, {"message_type": "ORU^R01", "control_id": "C9",
                                 "patient_id": "MRN42", "accession": "ACC7",
                                 "study_uid": None, "sop_uid": None})
        self.assertEqual(message_fields(HL7, "not hl7")["control_id"], None)
        self.assertEqual(message_fields(HL7, "MSH|^~\\&|a|b\rPID|1||")["patient_id"], None)
        self.assertEqual(message_fields("text/plain", "x")["control_id"], None)

    def test_dicom_part10_header_only(self) -> None:
        for implicit in (False, True):
            body = part10("1.2.3", "1.2.3.4", implicit=implicit)
            self.assertEqual(message_fields("application/dicom", body),
                             {"message_type": None, "control_id": None,
                              "patient_id": "MRN-D1", "accession": None,
                              "study_uid": "1.2.3", "sop_uid": "1.2.3.4"})
        # a sequence the scan does not follow: pydicom reads the tags instead
        body = part10("1.2.5", "1.2.5.6", sequence=True)
        found = message_fields("application/dicom", body)
        self.assertEqual((found["study_uid"], found["sop_uid"]), ("1.2.5", "1.2.5.6"))
        # base64 with line breaks (MIME)
        wrapped = "\n".join(body[i:i + 76] for i in range(0, len(body), 76))
        self.assertEqual(message_fields("application/dicom", wrapped)["study_uid"], "1.2.5")
        for bad in ("", "!!!!", base64.b64encode(b"x" * 300).decode()):
            self.assertEqual(message_fields("application/dicom", bad)["sop_uid"], None)

    def test_dicom_json_and_a_storage_channels_document(self) -> None:
        ds = {"0020000D": {"vr": "UI", "Value": ["1.2.7"]},
              "00080018": {"vr": "UI", "Value": ["1.2.7.1"]},
              "00100020": {"vr": "LO", "Value": ["MRN-J"]}}
        found = message_fields("application/dicom+json", json.dumps(ds))
        self.assertEqual((found["patient_id"], found["study_uid"], found["sop_uid"]),
                         ("MRN-J", "1.2.7", "1.2.7.1"))
        doc = {"dataset": {"0020000D": ds["0020000D"]},
               "instance": {"sopInstanceUID": "1.2.7.2", "path": "/x"}}
        found = message_fields("application/json", json.dumps(doc))
        self.assertEqual((found["study_uid"], found["sop_uid"]), ("1.2.7", "1.2.7.2"))
        self.assertEqual(message_fields("application/json", '{"a": 1}')["sop_uid"], None)
        self.assertEqual(message_fields("application/json", "[")["sop_uid"], None)


class RecordingTests(SynchronousTestCase):
    """L{ChannelRouter} with an inbound log: the answer first, the record on the next turn."""

    def setUp(self) -> None:
        self.clock = InlineReactor()
        db = inline_database(self, RELAY_SCHEMA, self.clock)
        self.store = SQLiteStore(db)
        self.log = SQLiteInboundLog(db)
        self.runner = FakeRunner()
        self.metrics = RelayMetrics()
        self.router = ChannelRouter(self.store, self.runner, clock=self.clock,
                                    inbound_log=self.log)
        self.router.metrics = self.metrics
        self.agent = self.successResultOf(self.store.create({
            "resourceType": "Agent", "name": "site", "status": "active",
            "channel": [{"name": "oru", "endpoint": {"reference": "Endpoint/e1"},
                         "targetReference": {"reference": "Bot/b1"}}]}))

    def route(self, **msg: Any) -> dict[str, Any]:
        message = {"type": wire.TRANSMIT_REQUEST, "channel": "oru", "remote": "10.0.0.5:5000",
                   "contentType": HL7, "body": ORU.format(ctrl="C1", mrn="MRN1", order="A1"),
                   "callback": "cb", **msg}
        return self.successResultOf(self.router(self.agent["id"], message))

    def all(self) -> list[InboundMessage]:
        return self.successResultOf(self.log.search_page({}, count=100))[0]

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def test_answer_first_then_one_record_with_its_ack(self) -> None:
        self.runner.answer = b.BotRun(bot_id="b1", outcome=b.SUCCESS,
                                      result=ACK_AA.format(ctrl="C1"), result_type="text")
        answer = self.route()
        self.assertIn("MSA|AA|C1", answer["body"])
        self.assertEqual(self.all(), [])  # nothing written before the answer left
        self.clock.advance(0)
        [m] = self.all()
        self.assertEqual(
            (m.agent_id, m.channel, m.remote, m.content_type, m.message_type, m.control_id,
             m.patient_id, m.accession, m.status, m.ack_code, m.outcome, m.bot, m.error_kind),
            (self.agent["id"], "oru", "10.0.0.5:5000", HL7, "ORU^R01", "C1", "MRN1", "A1",
             200, "AA", "ok", "Bot/b1", None))
        self.assertEqual(m.body, ORU.format(ctrl="C1", mrn="MRN1", order="A1"))
        self.assertEqual(m.size, len(m.body))
        self.assertEqual(m.received, self.clock.seconds())
        self.assertGreaterEqual(m.duration_ms, 0)
        self.assertEqual(self.count("medagent_relay_inbound_messages_total", outcome="ok"), 1)

    def test_negative_ack_and_failures_keep_no_bot_text(self) -> None:
        self.runner.answer = b.BotRun(bot_id="b1", outcome=b.SUCCESS,
                                      result=ACK_AE.format(ctrl="C2"), result_type="text")
        self.route(body=ORU.format(ctrl="C2", mrn="M", order="O"))
        self.runner.answer = b.BotRun(bot_id="b1", outcome=b.TIMEOUT,
                                      error="ValueError: DOE^JANE MRN1 unknown")
        self.route(body=ORU.format(ctrl="C3", mrn="M", order="O"))
        self.route(channel="nope", body=ORU.format(ctrl="C4", mrn="M", order="O"))
        self.clock.advance(0)
        found = {m.control_id: m for m in self.all()}
        self.assertEqual((found["C2"].outcome, found["C2"].ack_code, found["C2"].status),
                         ("rejected", "AE", 200))
        # the relay answered the device with its own AE: the record says what failed
        self.assertEqual((found["C3"].outcome, found["C3"].ack_code,
                          found["C3"].error_kind, found["C3"].bot),
                         ("error", "AE", "bot-timeout", "Bot/b1"))
        self.assertEqual((found["C4"].outcome, found["C4"].error_kind, found["C4"].bot),
                         ("error", "no-channel", None))
        stored = json.dumps([m.to_json() for m in found.values()])
        self.assertNotIn("unknown", stored)  # the Bot's error text is never kept
        self.assertEqual(self.count("medagent_relay_inbound_messages_total",
                                    outcome="error"), 2)

    def test_inbound_log_off_keeps_metadata_only(self) -> None:
        self.router.keep_payloads = False
        self.route()
        self.clock.advance(0)
        [m] = self.all()
        self.assertEqual((m.body, m.control_id, m.patient_id), (None, "C1", "MRN1"))
        self.assertFalse(m.to_json(include_body=True)["payloadKept"])

    def test_a_storage_failure_never_fails_the_answer_and_is_counted(self) -> None:
        class Broken(SQLiteInboundLog):
            def add(self, message: InboundMessage) -> Deferred[InboundMessage]:
                return fail(RuntimeError(f"constraint failed: {message.body}"))

        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            from twisted.logger import formatEvent

            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.router.inbound_log = Broken(self.log._db)
        answer = self.route()
        self.assertEqual(answer["statusCode"], 200)
        self.clock.advance(0)
        self.assertEqual(self.count("medagent_relay_inbound_log_errors_total"), 1)
        text = "\n".join(lines)
        self.assertIn("was not recorded: RuntimeError", text)
        self.assertNotIn("DOE^JANE", text)
        self.assertNotIn("MRN1", text)

    def test_a_slow_log_does_not_delay_the_answer(self) -> None:
        pending: list[Deferred[Any]] = []

        class Slow(SQLiteInboundLog):
            def add(self, message: InboundMessage) -> Deferred[InboundMessage]:
                d: Deferred[InboundMessage] = Deferred()
                pending.append(d)
                return d

        self.router.inbound_log = Slow(self.log._db)
        for _ in range(3):
            self.assertEqual(self.route()["statusCode"], 200)
        self.clock.advance(0)
        self.assertEqual(len(pending), 3)  # written meanwhile, answered long before

    def test_no_log_no_record(self) -> None:
        router = ChannelRouter(self.store, self.runner)
        answer = self.successResultOf(router(self.agent["id"], {
            "channel": "oru", "contentType": HL7, "body": ORU.format(ctrl="C", mrn="M",
                                                                     order="O")}))
        self.assertEqual(answer["statusCode"], 200)
        self.clock.advance(0)
        self.assertEqual(self.all(), [])


class PruneTests(SynchronousTestCase):
    def test_prune_every_interval_on_the_clock_by_age_and_count(self) -> None:
        clock = Clock()
        clock.advance(100_000)
        calls: list[tuple[float, int | None]] = []

        deleted = [3]

        class Log:
            def prune(self, before: float, max_rows: int | None = None,
                      limit: int = 0) -> Deferred[int]:
                calls.append((before, max_rows))
                return succeed(deleted.pop(0) if deleted else 0)

        service = _InboundHousekeeping(clock, Log(), retention=7 * 86400, max_rows=50)
        service.startService()
        self.assertEqual(calls, [])
        clock.advance(600)
        self.assertEqual(calls, [(100_600 - 7 * 86400, 50)])  # not a full batch: done
        deleted[:] = [INBOUND_PRUNE_BATCH, INBOUND_PRUNE_BATCH, 7]
        clock.advance(600)
        self.assertEqual(len(calls), 4)  # full batches go on until one is not
        deleted[:] = [INBOUND_PRUNE_BATCH] * (INBOUND_PRUNE_BATCHES + 5)
        clock.advance(600)
        self.assertEqual(len(calls), 4 + INBOUND_PRUNE_BATCHES)  # bounded per run
        service.stopService()
        clock.advance(6000)
        self.assertEqual(len(calls), 4 + INBOUND_PRUNE_BATCHES)
        self.assertEqual(clock.getDelayedCalls(), [])


    def test_stopping_ends_a_prune_after_its_batch_and_waits_for_it(self) -> None:
        """A prune of up to 200 batches must not go on writing while the relay stops (and
        its database closes): stop waits for the batch under way, and no further batch
        starts."""
        clock = Clock()
        batches: list[Deferred[int]] = []

        class Log:
            def prune(self, before: float, max_rows: int | None = None,
                      limit: int = 0) -> Deferred[int]:
                batches.append(Deferred())
                return batches[-1]

        service = _InboundHousekeeping(clock, Log(), retention=60, max_rows=None)
        service.startService()
        clock.advance(600)
        self.assertEqual(len(batches), 1)
        stopped = service.stopService()
        self.assertIsInstance(stopped, Deferred)
        assert stopped is not None
        self.assertNoResult(stopped)
        batches[0].callback(INBOUND_PRUNE_BATCH)  # a full batch: another would follow
        self.successResultOf(stopped)
        self.assertEqual(len(batches), 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class InboundPages(TestCase):
    """The console's Inbound view, the agent's Channels and the ``AgentInbound`` API."""

    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-inbound-")
        auth = self.relay.authority
        self.admin_creds = await auth.create_client(ADMIN)
        self.operator_creds = await auth.create_client(OPERATOR)
        self.viewer_creds = await auth.create_client(VIEWER)
        self.agent = await self.relay.store.create(
            {"resourceType": "Agent", "name": "Lab", "status": "active", "channel": [
                {"name": "silent", "endpoint": {"reference": "Endpoint/e1"},
                 "targetReference": {"reference": "Bot/b1"}},
                {"name": "pacs", "endpoint": {"reference": "Endpoint/e2"},
                 "targetReference": {"reference": "Bot/b2"}}]})
        self.pusher_creds = await auth.create_client("pusher", [self.agent["id"]])
        self.agent_creds = await auth.create_client("agent", [self.agent["id"]])
        log = self.relay.inbound
        now = self.relay.reactor.seconds()
        self.hl7 = await log.add(InboundMessage(
            id=log.new_id(), agent_id=self.agent["id"], channel=f"adt{XSS}",
            received=now - 60, content_type=HL7, size=99, remote="10.0.0.9:4000",
            message_type="ORU^R01", control_id="FIND0001", patient_id="MRN-SECRET",
            accession="ACC-9", status=200, ack_code="AA", outcome="ok", bot="Bot/b1",
            duration_ms=3.2, body=ORU.format(ctrl="FIND0001", mrn="MRN-SECRET",
                                             order="ACC-9") + XSS))
        self.dicom = await log.add(InboundMessage(
            id=log.new_id(), agent_id=self.agent["id"], channel="pacs", received=now - 30,
            content_type="application/json", size=1000, study_uid="1.2.840.5",
            sop_uid="1.2.840.5.1", status=500, outcome="error", error_kind="bot-timeout",
            bot="Bot/b2", body=None))

    def browser(self) -> Browser:
        return Browser(self, self.base, self.pool)

    async def api(self, creds: dict[str, Any], path: str) -> tuple[int, Any]:
        token = await self.relay.authority.issue_token(creds["clientId"],
                                                       creds["clientSecret"])
        r = await treq.get(self.base + path, pool=self.pool, headers={
            "Authorization": [f"Bearer {token['access_token']}"]})
        return r.code, json.loads((await r.content()).decode() or "null")

    async def audits(self) -> list[dict[str, Any]]:
        return await self.relay.store.search("AuditEvent", {"_count": ["100"]})

    def test_operator_finds_by_msh10_and_patient_and_sees_the_payload_audited(self
                                                                           ) -> Deferred:
        async def go() -> None:
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.get("/console/inbound")
            self.assertEqual(code, 200)
            self.assertEqual(text.count('<tr id="inbound-'), 2)
            self.assertIn('href="/console/inbound"', text)  # the nav link
            self.assertNotIn(XSS, text)
            self.assertIn("adt&lt;script&gt;", text)
            for query in ("control_id=FIND0001", "patient_id=MRN-SECRET", "accession=ACC-9",
                          "channel=pacs", "study_uid=1.2.840.5", "sop_uid=1.2.840.5.1",
                          "outcome=error", f"agent={self.agent['id']}"):
                code, text, _ = await b.get(f"/console/inbound?{query}")
                self.assertEqual(code, 200, query)
                want = self.dicom if ("1.2.840" in query or "error" in query
                                      or "pacs" in query) else self.hl7
                if "agent=" in query:
                    self.assertEqual(text.count('<tr id="inbound-'), 2)
                    continue
                self.assertEqual(text.count('<tr id="inbound-'), 1, query)
                self.assertIn(f'id="inbound-{want.id}"', text, query)
            code, text, _ = await b.get("/console/inbound?since=2000-01-01T00:00"
                                        "&until=2000-01-02T00:00")
            self.assertEqual(text.count('<tr id="inbound-'), 0)
            for bad in ("outcome=bogus", "since=yesterday", "cursor=x"):
                code, _, _ = await b.get(f"/console/inbound?{bad}")
                self.assertEqual(code, 400, bad)
            code, text, _ = await b.get(f"/console/inbound/{self.hl7.id}")
            self.assertIn("MRN-SECRET", text)  # (a patient id: operators see it)
            self.assertIn('id="show-payload"', text)
            self.assertNotIn('id="payload"', text)
            self.assertEqual(await self.audits(), [])
            code, text, _ = await b.get(f"/console/inbound/{self.hl7.id}?payload=1")
            self.assertEqual(code, 200)
            self.assertIn('id="payload"', text)
            self.assertIn("OBX|1|NM|GLU||5.5", text)
            self.assertNotIn(XSS, text)
            [audit] = await self.audits()
            self.assertEqual(audit["entity"][0]["what"]["identifier"],
                             {"system": "urn:medagent:inbound", "value": self.hl7.id})
            self.assertEqual(audit["agent"][0]["who"]["reference"],
                             f"ClientApplication/{self.operator_creds['clientId']}")
            self.assertNotIn("MRN-SECRET", json.dumps(audit))
            self.assertNotIn("OBX", json.dumps(audit))
            # a message kept without its payload (--inbound-log off) says so
            code, text, _ = await b.get(f"/console/inbound/{self.dicom.id}?payload=1")
            self.assertIn("--inbound-log off", text)
            self.assertIn("bot-timeout", text)
            self.assertEqual(len(await self.audits()), 1)  # nothing shown, nothing audited
            code, _, _ = await b.get("/console/inbound/nope")
            self.assertEqual(code, 404)

        return ensureDeferred(go())

    def test_viewer_sees_neither_payload_nor_patient_id(self) -> Deferred:
        async def go() -> None:
            b = self.browser()
            self.assertEqual(await b.login(self.viewer_creds), 303)
            code, text, _ = await b.get("/console/inbound?control_id=FIND0001")
            self.assertEqual((code, text.count('<tr id="inbound-')), (200, 1))
            self.assertNotIn("MRN-SECRET", text)
            self.assertNotIn('name="patient_id"', text)
            code, _, _ = await b.get("/console/inbound?patient_id=MRN-SECRET")
            self.assertEqual(code, 403)  # (and no oracle: a viewer cannot test an id)
            code, text, _ = await b.get(f"/console/inbound/{self.hl7.id}")
            self.assertEqual(code, 200)
            self.assertNotIn("MRN-SECRET", text)
            self.assertNotIn("show-payload", text)
            code, text, _ = await b.get(f"/console/inbound/{self.hl7.id}?payload=1")
            self.assertEqual(code, 403)
            self.assertNotIn("OBX", text)
            self.assertEqual(await self.audits(), [])

        return ensureDeferred(go())

    def test_live_stream_carries_each_recorded_message_without_payload_or_patient(
            self) -> Deferred:
        async def go() -> None:
            b = self.browser()
            self.assertEqual(await b.login(self.viewer_creds), 303)
            code, text, _ = await b.get("/console/inbound")
            self.assertIn('data-live="1"', text)
            code, text, _ = await b.get("/console/inbound?channel=pacs")
            self.assertIn('data-live="0"', text)  # a search is not live
            stream = await open_stream(self, self.base, b.cookie)
            await stream.wait_for(b"event: sessions")
            body = ORU.format(ctrl="LIVE0001", mrn="MRN-LIVE", order="O-LIVE")
            answer = await self.relay.channels(self.agent["id"], {
                "channel": "nowhere", "contentType": HL7, "body": body,
                "remote": "10.0.0.1:1"})
            self.assertIn("MSA|AE|LIVE0001", answer["body"])
            await stream.wait_for(b"LIVE0001")
            frame = stream.data[stream.data.index(b"event: inbound"):]
            self.assertIn(b'"outcome":"error"', frame)
            self.assertNotIn(b"MRN-LIVE", stream.data)
            self.assertNotIn(b"OBX", stream.data)
            found, total, _ = await self.relay.inbound.search_page(
                {"control_id": "LIVE0001"}, count=1)
            self.assertEqual((found[0].patient_id, found[0].error_kind),
                             ("MRN-LIVE", "no-channel"))

        return ensureDeferred(go())

    def test_agent_page_has_its_channels(self) -> Deferred:
        async def go() -> None:
            b = self.browser()
            self.assertEqual(await b.login(self.viewer_creds), 303)
            code, text, _ = await b.get(f"/console/agent/{self.agent['id']}")
            self.assertEqual(code, 200)
            self.assertIn('id="channels"', text)
            self.assertIn('data-channel="pacs"', text)
            self.assertEqual(text.count('data-channel="pacs"'), 1)
            # a configured channel that never sent anything: listed, with 0
            self.assertIn('<tr data-channel="silent"><th scope="row">silent</th>'
                          '<td data-field="count">0</td>', text)
            self.assertIn("bot-timeout", text)
            self.assertIn("Bot/b1", text)
            self.assertIn("200 AA", text)
            self.assertNotIn(XSS, text)
            self.assertIn(f"/console/inbound?agent={self.agent['id']}&amp;channel=pacs", text)

        return ensureDeferred(go())

    def test_api_admin_lists_and_reads_the_payload_audited(self) -> Deferred:
        async def go() -> None:
            code, page = await self.api(self.admin_creds,
                                        "/fhir/R4/AgentInbound?control_id=FIND0001")
            self.assertEqual((code, page["total"]), (200, 1))
            doc = page["entry"][0]["resource"]
            self.assertEqual((doc["id"], doc["ackCode"], doc["outcome"], doc["patientId"]),
                             (self.hl7.id, "AA", "ok", "MRN-SECRET"))
            self.assertNotIn("body", doc)
            code, page = await self.api(self.admin_creds, "/fhir/R4/AgentInbound?_count=1")
            self.assertEqual((page["total"], len(page["entry"])), (2, 1))
            self.assertEqual([link["relation"] for link in page["link"]], ["self", "next"])
            code, doc = await self.api(self.admin_creds,
                                       f"/fhir/R4/AgentInbound/{self.hl7.id}")
            self.assertNotIn("body", doc)
            self.assertEqual(await self.audits(), [])
            code, doc = await self.api(self.admin_creds,
                                       f"/fhir/R4/AgentInbound/{self.hl7.id}?_payload=true")
            self.assertEqual(code, 200)
            self.assertIn("OBX|1|NM", doc["body"])
            [audit] = await self.audits()
            self.assertIn("API", audit["outcomeDesc"])
            for bad in ("outcome=x", "since=soon", "_count=5000", "bogus=1"):
                code, doc = await self.api(self.admin_creds, f"/fhir/R4/AgentInbound?{bad}")
                self.assertEqual((code, doc["resourceType"]), (400, "OperationOutcome"), bad)
            code, _ = await self.api(self.admin_creds, "/fhir/R4/AgentInbound/nope")
            self.assertEqual(code, 404)

        return ensureDeferred(go())

    def test_api_attack_a_pusher_agent_or_console_client_reads_nothing(self) -> Deferred:
        """Least privilege: the inbound log is every device's PHI; only admin reads it."""

        async def go() -> None:
            for creds in (self.pusher_creds, self.agent_creds, self.operator_creds,
                          self.viewer_creds):
                for path in ("/fhir/R4/AgentInbound",
                             f"/fhir/R4/AgentInbound?agent={self.agent['id']}",
                             f"/fhir/R4/AgentInbound/{self.hl7.id}?_payload=true",
                             f"/fhir/R4/AgentInbound/{self.hl7.id}",
                             "/fhir/R4/AgentInbound/nope"):
                    code, doc = await self.api(creds, path)
                    self.assertEqual(code, 403, (creds["role"], path))
                    text = json.dumps(doc)
                    self.assertNotIn("OBX", text)
                    self.assertNotIn("MRN-SECRET", text)
                    self.assertNotIn("FIND0001", text)
            self.assertEqual(await self.audits(), [])

        return ensureDeferred(go())

    def test_overlong_search_filters_are_refused_by_the_api(self) -> Deferred:
        """Input from outside is bounded on the server (the form's maxlength is only a hint):
        a filter longer than any stored value is a 400, not a query."""

        async def go() -> None:
            long = "9" * 1001  # (the bound: 1000, medagent.relay.http.pushes.MAX_FILTER)
            for path in (f"/fhir/R4/AgentInbound?control_id={long}",
                         f"/fhir/R4/AgentPush?patient_id={long}",
                         f"/fhir/R4/AgentPush?agent={self.agent['id']}&remote={long}"):
                code, doc = await self.api(self.admin_creds, path)
                self.assertEqual((code, doc["resourceType"]), (400, "OperationOutcome"),
                                 path[:40])
                self.assertNotIn(long, json.dumps(doc))
            token = await self.relay.authority.issue_token(
                self.operator_creds["clientId"], self.operator_creds["clientSecret"])
            r = await treq.post(f"{self.base}/fhir/R4/AgentPush/$retry?destination={long}",
                                pool=self.pool, headers={
                                    "Authorization": [f"Bearer {token['access_token']}"]})
            self.assertEqual(r.code, 400)
            await r.content()
            code, page = await self.api(self.admin_creds,
                                        "/fhir/R4/AgentInbound?control_id=" + "9" * 1000)
            self.assertEqual((code, page["total"]), (200, 0))
            # (the console cuts every query value at 200 characters: ConsoleResource._query)

        return ensureDeferred(go())

    def test_push_search_by_patient_and_dicom_uids(self) -> Deferred:
        async def go() -> None:
            from medagent.relay.auth import Principal

            admin = Principal(self.admin_creds["clientId"], ADMIN)
            result = await self.relay.pushes.push(admin, (self.agent["id"], None), {
                "destination": "dicom://PACS@127.0.0.1:9", "contentType": "application/dicom",
                "body": part10("1.2.826.7", "1.2.826.7.1", patient="MRN-P")})
            dicom = result.push
            result = await self.relay.pushes.push(admin, (self.agent["id"], None), {
                "destination": "mllp://127.0.0.1:9", "contentType": HL7,
                "body": ORU.format(ctrl="PUSH0001", mrn="MRN-P", order="O1")})
            await self.relay.journal.flushed()
            self.assertEqual((dicom.patient_id, dicom.study_uid, dicom.sop_uid),
                             ("MRN-P", "1.2.826.7", "1.2.826.7.1"))
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.get("/console/messages?patient_id=MRN-P")
            self.assertEqual((code, text.count('<tr id="push-')), (200, 2))
            code, text, _ = await b.get("/console/messages?study_uid=1.2.826.7")
            self.assertEqual(text.count('<tr id="push-'), 1)
            self.assertIn(f'id="push-{dicom.id}"', text)
            code, text, _ = await b.get("/console/messages?sop_uid=1.2.826.7.1")
            self.assertEqual(text.count('<tr id="push-'), 1)
            code, page = await self.api(self.admin_creds,
                                        "/fhir/R4/AgentPush?patient_id=MRN-P")
            self.assertEqual(page["total"], 2)
            code, page = await self.api(self.admin_creds,
                                        "/fhir/R4/AgentPush?sop_uid=1.2.826.7.1")
            self.assertEqual([e["resource"]["id"] for e in page["entry"]], [dicom.id])
            self.assertEqual(result.push.patient_id, "MRN-P")

        return ensureDeferred(go())


class TokenWhileStarting(TestCase):
    """A token asked of a node still loading its signing keys (a PostgreSQL node just after
    it listens) is a 503 to retry, not 401 "Invalid client credentials" counted as a failed
    sign-in."""

    def test_503_not_401(self) -> Deferred:
        async def go() -> None:
            relay, base, pool = procs.in_process_relay(self, "relay-token-")
            creds = await relay.authority.create_client(ADMIN)
            key, relay.authority._key = relay.authority._key, None
            form = {"grant_type": "client_credentials", "client_id": creds["clientId"],
                    "client_secret": creds["clientSecret"]}
            for _ in range(5):  # more than a lockout's worth: none is counted
                r = await treq.post(base + "/oauth2/token", data=form, pool=pool)
                self.assertEqual(r.code, 503)
                self.assertEqual(r.headers.getRawHeaders("retry-after"), ["1"])
                await r.content()
            relay.authority._key = key
            r = await treq.post(base + "/oauth2/token", data=form, pool=pool)
            self.assertEqual(r.code, 200)
            await r.content()

        return ensureDeferred(go())


class OptionsTests(SynchronousTestCase):
    def test_inbound_flags(self) -> None:
        from twisted.python import usage

        from medagent.relay.tap import Options

        options = Options()
        options.parseOptions([])
        kw = options.service_kwargs()
        self.assertEqual((kw["inbound_log"], kw["inbound_retention_days"],
                          kw["inbound_max_rows"]), ("on", 7.0, 1_000_000))
        options = Options()
        options.parseOptions(["--inbound-log", "off", "--inbound-retention-days", "0.5",
                              "--inbound-max-rows", "10"])
        kw = options.service_kwargs()
        self.assertEqual((kw["inbound_log"], kw["inbound_retention_days"],
                          kw["inbound_max_rows"]), ("off", 0.5, 10))
        for bad in (["--inbound-log", "payloads"], ["--inbound-retention-days", "0"],
                    ["--inbound-max-rows", "0"], ["--inbound-retention-days", "nan"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)

    def test_inbound_flags_from_the_environment(self) -> None:
        """tac/relay.tac reads the same settings from MEDAGENT_* variables."""
        from medagent.relay.tap import options_from_env

        kw = options_from_env({"MEDAGENT_INBOUND_LOG": "off",
                               "MEDAGENT_INBOUND_RETENTION_DAYS": "3",
                               "MEDAGENT_INBOUND_MAX_ROWS": "500"}).service_kwargs()
        self.assertEqual((kw["inbound_log"], kw["inbound_retention_days"],
                          kw["inbound_max_rows"]), ("off", 3.0, 500))
