"""
A DICOM push through the agent (AgentApp + durable queue + DICOMSender) with the peer played
on StringTransport and the time on a Clock: what the relay is told for association
rejections and aborts, bodies that are not DICOM, and "out of resources" refusals (retried a
bounded number of times, then ended with the DIMSE reply kept).
"""

from __future__ import annotations

import json
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import dimse_messages as pmsgs
from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.agent.app import AgentApp
from medagent.agent.dispatch import Dispatcher
from medagent.agent.outbox import Outbox
from medagent.agent.queue import DurableQueue
from medagent.dicom import dimse, pdu
from medagent.dicom.scu import DICOMSender
from tests.fakes import InlineReactor, inline_database
from tests.test_agent import Tokens
from tests.test_dicom_association import SR_CLASS, accept, pdata, read_pdus
from tests.test_dicom_sender import FakeEndpoint, part10
from tests.test_hub import FakeConnection

REMOTE = "dicom://PACS@10.0.0.5:104?calling=OURS"


class AgentDicomTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.db = inline_database(self, DurableQueue.schema() + Outbox.schema(), self.clock)
        self.endpoint = FakeEndpoint()
        self.sender = DICOMSender(self.clock, ae_title="AGENT", idle_timeout=0,
                                  refused_attempts=3, endpoint_factory=self.endpoint)
        self.app = AgentApp(self.clock, "a1", Tokens(),
                            Dispatcher({"dicom": self.sender}), self.db,
                            heartbeat_interval=10)
        self.app.queue.rng = lambda: 0.5  # no jitter
        self.app.start()
        self.addCleanup(self.app.stop)
        self.conn = FakeConnection()
        self.app.connection_made(self.conn)
        self.app.frame_received(wire.encode({"type": wire.CONNECT_RESPONSE,
                                             "capabilities": ["durable"]}))

    def push(self, body: str | None = None, remote: str = REMOTE) -> None:
        self.app.frame_received(wire.encode({
            "type": wire.TRANSMIT_REQUEST, "remote": remote, "contentType": "application/dicom",
            "body": body or part10(), "callback": "Agent/a1-p1", "pushId": "p1"}))

    def responses(self) -> list[dict[str, Any]]:
        return self.conn.of_type(wire.TRANSMIT_RESPONSE)

    def final(self) -> list[dict[str, Any]]:
        return [m for m in self.responses() if m.get("delivery") in ("delivered", "failed")]

    def retrying(self) -> list[dict[str, Any]]:
        return [m for m in self.responses() if "retrying" in (m.get("error") or "")]

    def peer(self):
        return self.endpoint.connections[-1]

    def reject(self, result: int, source: int, reason: int) -> None:
        proto, tr = self.peer()
        proto.dataReceived(pdu.associate_rj(result, source, reason).encode())
        proto.connectionLost(None)

    def accept_and_answer(self, status: int) -> None:
        proto, tr = self.peer()
        ac, _ = accept(tr.value(), [(SR_CLASS, [ExplicitVRLittleEndian])])
        tr.clear()
        proto.dataReceived(ac)
        msg = pmsgs.DIMSEMessage()
        for p in read_pdus(tr.value()):
            msg.decode_msg(p.to_primitive())
        tr.clear()
        proto.dataReceived(pdata(dimse.c_store_rsp(msg, status), msg.context_id, 16384))

    # -- association rejected / aborted: the device, not the caller ----------------------------

    def test_rejected_permanent_is_502_not_retried(self) -> None:
        self.push()
        self.reject(1, 1, 7)  # rejected-permanent, service-user, called AE not recognized
        [answer] = self.final()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("failed", 502))
        self.assertFalse(answer["transient"])
        self.assertIn("rejected-permanent", answer["error"])
        self.assertIn("called AE title not recognized", answer["error"])
        self.assertIn("(result=1, source=1, reason=7)", answer["error"])
        self.clock.advance(3600)
        self.assertEqual(len(self.endpoint.connections), 1)  # never retried

    def test_rejected_transient_is_retried(self) -> None:
        self.push()
        self.reject(2, 3, 2)  # rejected-transient, presentation provider, local limit
        self.assertEqual(self.final(), [])
        [progress] = self.retrying()
        self.assertIn("rejected-transient", progress["error"])
        self.assertIn("(result=2, source=3, reason=2)", progress["error"])
        self.clock.advance(2)
        self.assertEqual(len(self.endpoint.connections), 2)
        self.accept_and_answer(0x0000)
        [answer] = self.final()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("delivered", 200))

    def test_abort_instead_of_accept_is_retried(self) -> None:
        self.push()
        proto, tr = self.peer()
        proto.dataReceived(pdu.abort(pdu.ABORT_SOURCE_PROVIDER, 0).encode())
        proto.connectionLost(None)
        self.assertEqual(self.final(), [])
        [progress] = self.retrying()
        self.assertIn("A-ABORT from service-provider", progress["error"])
        self.assertIn("(source=2, reason=0)", progress["error"])
        self.clock.advance(2)
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_rejected_permanent_with_max_attempts_still_502(self) -> None:
        self.push(remote=REMOTE + "&maxAttempts=1")
        self.reject(1, 2, 2)  # rejected-permanent, ACSE, protocol version not supported
        [answer] = self.final()
        self.assertEqual(answer["statusCode"], 502)

    def test_not_a_dicom_file_is_400(self) -> None:
        import base64

        self.push(body=base64.b64encode(b"MSH|^~\\&|" * 30).decode())
        [answer] = self.final()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("failed", 400))
        self.assertEqual(self.endpoint.connections, [])

    # -- 0xA7xx out of resources: bounded retries, then the DIMSE reply -----------------------

    def test_out_of_resources_retried_then_reply_kept(self) -> None:
        self.push()
        for attempt in (1, 2, 3):
            self.assertEqual(len(self.endpoint.connections), attempt)
            self.accept_and_answer(0xA700)
            if attempt < 3:
                self.assertEqual(self.final(), [])
                self.assertIn(f"attempt {attempt}, retrying", self.retrying()[-1]["error"])
                self.assertIn("0xA700", self.retrying()[-1]["error"])
                self.clock.advance(2 ** attempt)
        [answer] = self.final()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("failed", 200))
        self.assertEqual(answer["contentType"], "application/json")
        body = json.loads(answer["body"])
        self.assertEqual((body["status"], body["category"]), ("0xA700", "Failure"))
        self.clock.advance(3600)
        self.assertEqual(len(self.endpoint.connections), 3)  # bounded: the lane moves on

    def test_out_of_resources_then_success(self) -> None:
        self.push()
        self.accept_and_answer(0xA701)
        self.clock.advance(1)
        self.accept_and_answer(0x0000)
        [answer] = self.final()
        self.assertEqual(answer["delivery"], "delivered")
        self.assertEqual(json.loads(answer["body"])["status"], "0x0000")

    def test_other_failure_status_not_retried(self) -> None:
        self.push()
        self.accept_and_answer(0xA900)
        [answer] = self.final()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("failed", 200))
        self.assertEqual(json.loads(answer["body"])["status"], "0xA900")
        self.assertEqual(self.retrying(), [])
