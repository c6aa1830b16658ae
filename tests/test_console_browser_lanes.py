"""
The agent page's lanes in a real headless Chromium (the helpers of L{test_console_browser}),
against real ``twistd`` relay and agent processes and a python-hl7 MLLP device: an operator
sees a lane's last ACK and latency, pings it, pauses it (a push then waits on the relay, the
fleet shows the pause), resumes it (the push is delivered).  Screenshot ``agent-lanes.png``
in the same screenshots folder.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from medagent.contenttypes import HL7_V2
from tests import procs
from tests.peerenv import FIXTURES
from tests.test_console_browser import WAIT, Browser, hl7, need_browser, text_is


class LanesInBrowser(TestCase):
    timeout = 240

    def setUp(self) -> Deferred:
        need_browser()
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.admin = await procs.relay_with_admin(self)
        self.agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                              "status": "active"})
        agent_creds = self.relay.create_client("agent", [self.agent["id"]])
        self.operator = self.relay.create_client("operator")
        self.port = procs.free_port()
        self.device = procs.python(self, "device-AA", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.port)])
        await self.device.wait_for("MLLP server on", timeout=20)
        self.lane = f"mllp://127.0.0.1:{self.port}"
        procs.agent_process(self, self.relay.url, agent_creds, self.agent["id"],
                            ["--data", tempfile.mkdtemp(prefix="medagent-agent-")])

        async def connected() -> bool:
            params = await self.admin.request_json(
                "GET", f"/fhir/R4/Agent/{self.agent['id']}/$status")
            return params["parameter"][0]["valueCode"] == "connected"

        await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")

    async def push(self, ctrl: str) -> str:
        outcome = await self.admin.push_to_agent(self.agent, self.lane, hl7(ctrl), HL7_V2)
        return str(outcome["issue"][0]["diagnostics"]).rsplit("/", 1)[1]

    async def state_is(self, push_id: str, state: str) -> bool:
        doc = await self.admin.request_json("GET", f"/fhir/R4/AgentPush/{push_id}")
        return doc["state"] == state

    def test_operator_pings_pauses_and_resumes_a_lane(self) -> Deferred:
        async def go() -> None:
            first = await self.push("LNB00001")
            await procs.wait_until(lambda: ensureDeferred(self.state_is(first, "delivered")),
                                   timeout=WAIT, what="the first push delivered")
            b = await Browser(self, self.relay.url).start()
            await b.login(self.operator)
            page = f"/console/agent/{self.agent['id']}"
            row = f'#lanes tr[data-lane="{self.lane}"]'
            await b.get(page)
            await b.wait(text_is(f"{row} [data-field=lane-state]", "active"), "the lane")
            self.assertIn("AA", await b.text(row))  # its last ACK's code
            self.assertIn(" ms / ", await b.text(row))  # its ACK latency p50 / p99

            await b.click(f"{row} button[name=ping]")
            await b.wait(lambda d: "done=pinged" in d.current_url, "the ping")
            self.assertIn("reachable", await b.text("#ping-result"))

            await b.click(f"{row} button[name=pause]")
            await b.do(lambda d: d.switch_to.alert.accept())  # "Pause this lane?"
            await b.wait(lambda d: "done=paused" in d.current_url, "the pause")
            await b.wait(text_is(f"{row} [data-field=lane-state]", "paused"), "shown paused")
            self.assertIn(self.operator["clientId"], await b.text(row))
            second = await self.push("LNB00002")
            await b.get(page)
            await b.wait(text_is(f"{row} [data-field=lane-state]", "paused"), "still paused")
            self.assertIn("AA", await b.text(row))  # (the ping's answer is not an ACK)
            await b.shot("agent-lanes")
            self.assertTrue(await self.state_is(second, "queued"))
            self.assertEqual(self.device.count("RECV from"), 1)
            await b.get("/console/fleet")
            self.assertIn("1 lane(s) paused", await b.text(f"#agent-{self.agent['id']}"))

            await b.get(page)
            await b.click(f"{row} button[name=resume]")
            await b.wait(lambda d: "done=resumed" in d.current_url, "the resume")
            await b.wait(text_is(f"{row} [data-field=lane-state]", "active"), "shown active")
            await procs.wait_until(lambda: ensureDeferred(self.state_is(second, "delivered")),
                                   timeout=WAIT, what="the held push delivered")
            self.assertEqual(self.device.count("RECV from"), 2)

        return ensureDeferred(go())
