"""
Trends and bulk retry in a real headless Chromium (the helpers of
L{tests.test_console_browser}), against real ``twistd`` relay and agent processes and a
python-hl7 MLLP device that answers AA.

Three pushes wait for an agent that is away, with a time to live of one second: when the
agent connects they are past it and end ``expired``, never sent.  An operator signs in, sees
them on the trends page (screenshot ``trends.png``, and ``trends-phone.png`` at phone width),
filters the messages to that agent's expired ones, presses "Retry all 3 failed matching this
filter", confirms, gets the result page, and watches the three rows turn ``delivered``
without a reload; the device got each once.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from medagent.contenttypes import HL7_V2
from tests import procs
from tests.peerenv import FIXTURES
from tests.test_console_browser import WAIT, Browser, hl7, need_browser, text_is


class TrendsAndBulkRetryInBrowser(TestCase):
    timeout = 240

    def setUp(self) -> Deferred:
        need_browser()
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.admin = await procs.relay_with_admin_args(self, [])
        self.agent = await self.admin.create({"resourceType": "Agent", "name": "Trend lab",
                                              "status": "active"})
        self.agent_creds = self.relay.create_client("agent", [self.agent["id"]])
        self.operator = self.relay.create_client("operator")
        self.port = procs.free_port()
        self.device = procs.python(self, "device-AA", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.port)])
        await self.device.wait_for("MLLP server on", timeout=20)

    async def start_agent(self) -> procs.Proc:
        proc = procs.agent_process(self, self.relay.url, self.agent_creds, self.agent["id"],
                                   ["--data", tempfile.mkdtemp(prefix="medagent-agent-")])

        async def connected() -> bool:
            params = await self.admin.request_json(
                "GET", f"/fhir/R4/Agent/{self.agent['id']}/$status")
            return params["parameter"][0]["valueCode"] == "connected"

        await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")
        return proc

    async def states(self, ids: list[str]) -> list[str]:
        return [str((await self.admin.request_json("GET", f"/fhir/R4/AgentPush/{i}"))["state"])
                for i in ids]

    def test_operator_reads_trends_and_retries_the_expired_in_bulk(self) -> Deferred:
        async def go() -> None:
            ids = []
            for n in range(3):
                outcome = await self.admin.push_to_agent(
                    self.agent, f"mllp://127.0.0.1:{self.port}", hl7(f"BULKB00{n}"), HL7_V2,
                    ttl=1)
                ids.append(str(outcome["issue"][0]["diagnostics"]).rsplit("/", 1)[1])
            await deferLater(reactor, 1.2, lambda: None)  # (past their time to live)
            await self.start_agent()

            async def expired() -> bool:
                return await self.states(ids) == ["expired"] * 3

            await procs.wait_until(expired, timeout=WAIT, interval=0.2, what="all expired")
            self.assertEqual(self.device.count("RECV from"), 0)

            b = await Browser(self, self.relay.url).start()
            await b.login(self.operator)
            await b.click('nav a[href="/console/trends"]')
            await b.wait(lambda d: d.current_url.endswith("/console/trends"), "the trends")
            desc = await b.do(lambda d: d.execute_script(
                "return document.getElementById('fleet-trends-failed-d').textContent"))
            self.assertIn("3 in all", desc)
            bars = await b.do(lambda d: d.execute_script(
                "return document.querySelectorAll('#fleet-trends svg.chart rect.bar')"
                ".length"))
            # one bucket of pushes, one of failures (two each across an hour's turn)
            self.assertTrue(2 <= bars <= 4, bars)
            self.assertIn("Trend lab", await b.text("#trend-0-h"))
            await b.shot("trends")
            # the numbers behind the charts, folded away until asked for
            def shown(d: object) -> bool:
                return bool(d.find_element(  # type: ignore[attr-defined]
                    "css selector", "#fleet-trends-numbers").is_displayed())

            self.assertFalse(await b.do(shown))
            await b.click("#fleet-trends details summary")
            self.assertTrue(await b.do(shown))
            await b.do(lambda d: d.set_window_size(390, 844))  # a phone
            wide = await b.do(lambda d: d.execute_script(
                "return document.documentElement.scrollWidth"))
            self.assertLessEqual(wide, 390)  # nothing wider than the screen
            await b.shot("trends-phone")
            await b.do(lambda d: d.set_window_size(1280, 900))

            # the agent's expired messages, retried in bulk: confirm, result
            await b.get(f"/console/messages?agent={self.agent['id']}&state=expired")
            await b.wait(text_is("#bulk-retry", "Retry all 3 failed matching this filter"),
                         "the bulk retry link")
            await b.click("#bulk-retry")
            await b.wait(lambda d: d.find_elements("css selector", "#bulk-count"),
                         "the confirm step")
            self.assertIn("3 failed or expired message(s) match", await b.text("#bulk-count"))
            self.assertEqual(await self.states(ids), ["expired"] * 3)  # nothing yet
            await b.click("button[name=bulk-retry]")
            await b.wait(lambda d: d.find_elements("css selector", "#bulk-result"),
                         "the result page")
            self.assertIn("3 retried, 0 skipped", await b.text("#bulk-result"))
            await b.shot("bulk-retry-result")

            # their rows turn delivered (live, for those still on their way)
            await b.get(f"/console/messages?agent={self.agent['id']}")
            await b.wait_live()
            await b.mark()
            for push_id in ids:
                await b.wait(text_is(f"#push-{push_id} [data-field=state]", "delivered"),
                             f"push {push_id} delivered")
            self.assertTrue(await b.still_marked(), "the messages page reloaded")
            self.assertEqual(await self.states(ids), ["delivered"] * 3)
            self.assertEqual(self.device.count("RECV from"), 3)

        return ensureDeferred(go())
