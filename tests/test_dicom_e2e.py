"""
DICOM through the whole system, with real ``twistd`` relay and agent processes and dcmtk:

- push: an SR (made with pydicom) goes ``$push`` → relay → agent → C-STORE → dcmtk
  ``storescp``; the caller gets the DIMSE status, the file arrives intact;
- receive: dcmtk ``storescu`` → the agent's storage channel (configured as an ``Endpoint``)
  → the instance is uploaded as a ``Binary`` and its metadata runs the channel's Bot.
"""

from __future__ import annotations


import os
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from medagent.client import RelayError
from tests import procs
from tests.test_dicom_peers import _Base, b64, program, run, wait_port

BOT = """

def handler(medplum, event):
    doc = event.input if isinstance(event.input, dict) else json.loads(event.input)
    medplum.create_resource({"resourceType": "Observation", "status": "final",
                             "code": {"text": "dicom-received"},
                             "valueString": doc["binary"]["reference"],
                             "identifier": [{"value": doc["instance"]["sopInstanceUID"]}]})
    return {"ok": True}
"""


class DicomEndToEnd(_Base):
    timeout = 180

    def test_push_sr_to_storescp_and_receive_from_storescu(self) -> Deferred:
        return ensureDeferred(self._go())

    async def _go(self) -> None:
        relay, client = await procs.relay_with_admin(self)
        from tests.test_bots import access

        bot = await client.create({"resourceType": "Bot", "name": "dicom", "code": BOT,
                                   "extension": [access(write=["Observation"])]})
        scp_port = procs.free_port()
        endpoint = await client.create({"resourceType": "Endpoint", "status": "active",
                                        "address": f"dicom://AGENTSCP@127.0.0.1:{scp_port}"})
        agent = await client.create({
            "resourceType": "Agent", "name": "radiology", "status": "active",
            "channel": [{"name": "modalities",
                         "endpoint": {"reference": f"Endpoint/{endpoint['id']}"},
                         "targetReference": {"reference": f"Bot/{bot['id']}"}}]})
        creds = relay.create_client("agent", [agent["id"]])
        agent_proc = procs.agent_process(self, relay.url, creds, agent["id"],
                                         ["--data", tempfile.mkdtemp(prefix="agent-dicom-")])
        await agent_proc.wait_for("Channel modalities: dicom", timeout=30)

        # push: relay an SR to a RIS stand-in (dcmtk storescp)
        sr = await self.make_sr()
        received = os.path.join(self.tmp, "ris")
        ris_port = procs.free_port()
        self.storescp(received, ris_port)
        await wait_port(ris_port)
        reply = await client.push_to_agent(
            agent, f"dicom://STORESCP@127.0.0.1:{ris_port}?calling=MEDAGENT", b64(sr),
            "application/dicom", True, wait_timeout=30000)
        self.assertEqual(reply["status"], "0x0000", reply)
        files = os.listdir(received)
        self.assertEqual(len(files), 1, files)
        out, code = await run([program("dciodvfy"), os.path.join(received, files[0])])
        self.assertNotIn("Error", out)

        # an association the peer rejects for good is the device's answer (502), not a bad
        # request; a body that is no DICOM file is (400)
        with self.assertRaises(RelayError) as e:
            await client.push_to_agent(
                agent, f"dicom://NOTTHEAGENT@127.0.0.1:{scp_port}", b64(sr),
                "application/dicom", True, wait_timeout=30000)
        self.assertEqual(e.exception.status, 502)
        self.assertIn("rejected-permanent", str(e.exception))
        self.assertIn("called AE title not recognized", str(e.exception))
        with self.assertRaises(RelayError) as e:
            await client.push_to_agent(
                agent, f"dicom://STORESCP@127.0.0.1:{ris_port}", "bm90IGRpY29t",
                "application/dicom", True, wait_timeout=30000)
        self.assertEqual(e.exception.status, 400)
        self.assertIn("DICOM file", str(e.exception))

        # receive: a modality stores into the agent's channel
        out, code = await run([program("storescu"), "-aet", "CT01", "-aec", "AGENTSCP",
                               "127.0.0.1", str(scp_port), sr])
        self.assertEqual(code, 0, out)

        async def observed():
            return await client.search("Observation", {"code": "dicom-received"}) or \
                await client.search("Observation", {})

        try:
            found = await procs.wait_until(observed, timeout=30, what="the bot's Observation")
        except AssertionError:
            raise AssertionError(f"agent log:\n{agent_proc.text[-3000:]}\nrelay log:\n"
                                 f"{relay.proc.text[-3000:]}")
        binary_ref = found[0]["valueString"]
        self.assertTrue(binary_ref.startswith("Binary/"))
        binary = await client.read("Binary", binary_ref.split("/", 1)[1])
        self.assertEqual(binary["contentType"], "application/dicom")
        with open(sr, "rb") as f:
            original = f.read()
        import base64

        stored = base64.b64decode(binary["data"])
        # the stored Part 10 file carries the same data set (its meta header may differ)
        self.assertIn(original[-200:], stored)

        # the inbound log has the instance by its UIDs, the push journal the SR pushed
        from pydicom import dcmread

        ds = dcmread(sr, stop_before_pixels=True)
        sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)

        async def logged() -> Any:
            page = await client.request_json("GET", "/fhir/R4/AgentInbound",
                                             params={"sop_uid": sop})
            return page.get("entry")

        [entry] = await procs.wait_until(logged, timeout=20, what="the inbound record")
        record = entry["resource"]
        self.assertEqual((record["channel"], record["studyInstanceUid"], record["outcome"],
                          record["contentType"]), ("modalities", study, "ok", "application/json"))
        page = await client.request_json("GET", "/fhir/R4/AgentPush", params={"study_uid": study})
        self.assertGreaterEqual(page["total"], 1)
        self.assertEqual({e["resource"]["contentType"] for e in page["entry"]},
                         {"application/dicom"})

