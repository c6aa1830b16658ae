"""
The console's Inbound view in a real headless Chromium (the helpers of
L{tests.test_console_browser}), against real ``twistd`` relay and agent processes and a
python-hl7 MLLP device sending to the agent's channel (L{tests.test_inbound_e2e.Site}): an
operator finds the device's message by MSH-10, sees its Bot's ACK and opens its payload (an
audited view); the agent page shows the channel; a viewer sees neither the payload nor the
patient id.  Screenshots ``inbound.png`` and ``inbound-detail.png`` go beside the other
views' (``_trial_temp/screenshots/``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.test_console_browser import Browser, need_browser, text_is
from tests.test_inbound_e2e import Site


def rows(d: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, "#inbound tbody tr[data-inbound]")


class InboundInBrowser(TestCase):
    timeout = 240

    def setUp(self) -> Deferred:
        need_browser()
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.site = await Site.start(self)
        self.operator = self.site.relay.create_client("operator")
        self.viewer = self.site.relay.create_client("viewer")
        for ctrl in ("BRWS0001", "BRWS0002", "REFUSE02"):
            await self.site.send(self, ctrl)
        self.record = await self.site.logged("BRWS0002")
        await self.site.logged("REFUSE02")

    def test_operator_finds_an_inbound_message_by_msh10_and_a_viewer_sees_no_payload(
            self) -> Deferred:
        async def go() -> None:
            b = await Browser(self, self.site.relay.url).start()
            await b.login(self.operator)
            await b.click('nav a[href="/console/inbound"]')
            await b.wait(lambda d: len(rows(d)) == 3, "three inbound messages")
            # live: a message the device sends now appears without a reload
            await b.wait_live()
            await b.mark()
            await self.site.send(self, "LIVE0001")
            await b.wait(lambda d: len(rows(d)) == 4 and "LIVE0001" in rows(d)[0].text,
                         "the new message, live")
            self.assertTrue(await b.still_marked())
            await b.type("#i-control_id", "BRWS0002")
            await b.click("#inbound-search")
            await b.wait(lambda d: len(rows(d)) == 1 and "BRWS0002" in rows(d)[0].text,
                         "the message found by MSH-10")
            row = await b.text(f"#inbound-{self.record['id']}")
            self.assertIn("lab-in", row)
            self.assertIn("200 AA", row)
            self.assertIn("ok", row)
            await b.shot("inbound")
            await b.click(f"#inbound-{self.record['id']} a[data-field=control]")
            await b.wait(text_is("#inbound-answer", "200 AA"), "the message's page")
            await b.click("#show-payload")
            await b.wait(lambda d: "PID|1||123^^^MRN||DOE^JOHN" in d.find_element(
                "css selector", "#payload").text, "the payload")
            await b.shot("inbound-detail")
            # the refused one: its outcome is searchable
            await b.get("/console/inbound?outcome=rejected")
            await b.wait(lambda d: len(rows(d)) == 1 and "REFUSE02" in rows(d)[0].text,
                         "the rejected message")
            # the agent page's Channels section
            await b.get(f"/console/agent/{self.site.agent['id']}")
            await b.wait(lambda d: "lab-in" in d.find_element(
                "css selector", "#channels").text, "the agent's channels")
            channel = await b.text('#channels tr[data-channel="lab-in"]')
            self.assertIn("4", channel)
            self.assertIn("ok 200 AA", channel)  # the last Bot result (LIVE0001's)
            audits = await self.site.client.search("AuditEvent", {"_count": "1000"})
            self.assertEqual(len([a for a in audits if "Inbound message payload viewed"
                                  in a.get("outcomeDesc", "")]), 1)

            viewer = await Browser(self, self.site.relay.url).start()
            await viewer.login(self.viewer)
            await viewer.get("/console/inbound?control_id=BRWS0002")
            await viewer.wait(lambda d: len(rows(d)) == 1, "the viewer's search")
            self.assertFalse(await viewer.exists("#i-patient_id"))
            await viewer.get(f"/console/inbound/{self.record['id']}")
            await viewer.wait(text_is("#inbound-answer", "200 AA"), "the viewer's page")
            self.assertFalse(await viewer.exists("#show-payload"))
            source = await viewer.do(lambda d: d.page_source)
            self.assertNotIn("DOE^JOHN", source)
            self.assertNotIn(">123<", source)  # the patient id
            await viewer.get(f"/console/inbound/{self.record['id']}?payload=1")
            await viewer.wait(lambda d: "may not see message payloads" in d.page_source,
                              "the refusal")
            self.assertNotIn("DOE^JOHN", await viewer.do(lambda d: d.page_source))

        return ensureDeferred(go())
