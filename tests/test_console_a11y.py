"""
The console checked by a third-party accessibility engine: Deque's axe-core (npm package
``axe-core``, installed by ``.ci/peers-browser.sh`` under ``$MEDAGENT_PEERS/axe``; nothing is
downloaded at run time), injected into a real headless Chromium (the helpers of
L{tests.test_console_browser}) against real ``twistd`` relay and agent processes.

Every main view (login, fleet, trends, an agent page with lanes and channels, after a ping
and with a lane paused, messages with results, a message's page, the bulk retry's
confirmation and result, inbound with results, an inbound message's page, alerts with one
active, an error page; a message's page as a viewer) is run through ``axe.run`` with the
WCAG 2.0/2.1/2.2 A and AA rules and axe's best practices, at desktop and at phone width
(390×844), where the page must not scroll sideways (nor at 320 px, WCAG's reflow width).
Any violation of impact I{serious} or I{critical} fails the test; I{moderate} and I{minor}
ones, and what axe could not decide (I{incomplete}: to review), are written to the test log.
The whole report is kept in ``_trial_temp/axe.json``, each view at phone width in
``_trial_temp/screenshots/a11y-*-phone.png``.

A keyboard check walks the fleet page with Tab: the skip link comes first and shows, every
link and button is reached, and each shows a focus outline (console.css's
``:focus-visible``).  A control page with known faults proves the checker finds them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from medagent.contenttypes import HL7_V2
from tests import procs
from tests.peerenv import FIXTURES, need, peer_path
from tests.test_console_browser import Browser, hl7, need_browser, text_is
from tests.test_inbound_e2e import Site

log = Logger()

#: axe's rules: WCAG 2.0, 2.1 and 2.2 A/AA (2.2's target size matters at phone width), and
#: Deque's best practices (landmarks, headings, table headers)
WCAG_TAGS = ("wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice")
#: what fails the test
BLOCKING = ("serious", "critical")
DESKTOP, PHONE, REFLOW = (1280, 900), (390, 844), (320, 700)


def axe_path() -> str:
    return peer_path("axe", "node_modules", "axe-core", "axe.min.js")


def need_axe() -> str:
    """axe.min.js's text (a missing one skips, or fails under MEDAGENT_REQUIRE_PEERS=1)."""
    path = axe_path()
    need(os.path.isfile(path), "npm axe-core under $MEDAGENT_PEERS/axe (.ci/peers-browser.sh)")
    with open(path, encoding="utf-8") as f:
        return f.read()


#: runs axe on the page: its violations (trimmed to what a report needs), how many rules
#: passed, and what it could not decide (for a person to review; logged)
RUN_AXE = """
var done = arguments[arguments.length - 1];
function trim(list) {
  return list.map(function (v) {
    return {id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(function (n) {
      return {target: n.target.join(' '), summary: n.failureSummary}; })};
  });
}
axe.run(document, arguments[0])
  .then(function (r) {
    var root = document.documentElement;
    done({violations: trim(r.violations), incomplete: trim(r.incomplete),
          passes: r.passes.length, engine: r.testEngine.version,
          overflow: root.scrollWidth - root.clientWidth});
  }, function (e) { done({error: String(e)}); });
"""


class Checker:
    """axe in one browser: runs it on the page shown and keeps every finding."""

    def __init__(self, browser: Browser, script: str) -> None:
        self.browser = browser
        self.script = script
        self.findings: list[dict[str, Any]] = []
        self.checked: list[str] = []
        self.review: list[dict[str, Any]] = []
        self.engine = ""

    async def check(self, view: str) -> list[dict[str, Any]]:
        """The current page at desktop and at phone width."""
        found = []
        for name, (w, hgt) in (("desktop", DESKTOP), ("phone", PHONE)):
            await self.browser.do(lambda d: d.set_window_size(w, hgt))

            def run(d: Any) -> Any:
                if not d.execute_script("return typeof window.axe !== 'undefined'"):
                    d.execute_script(self.script)
                d.set_script_timeout(60)
                return d.execute_async_script(
                    RUN_AXE, {"runOnly": {"type": "tag", "values": list(WCAG_TAGS)}})

            def scrolled(d: Any) -> Any:
                # a wide table's cells off to the side of its box: axe cannot tell their
                # background, so their contrast is checked again with each box scrolled
                d.execute_script("document.querySelectorAll('.scroll').forEach("
                                 "function (e) { e.scrollLeft = e.scrollWidth; });")
                again = d.execute_async_script(
                    RUN_AXE, {"runOnly": {"type": "rule", "values": ["color-contrast"]}})
                d.execute_script("document.querySelectorAll('.scroll').forEach("
                                 "function (e) { e.scrollLeft = 0; });")
                return again

            result = await self.browser.do(run)
            if "error" not in result and any(v["id"] == "color-contrast"
                                             for v in result["incomplete"]):
                again = await self.browser.do(scrolled)
                if "error" in again:
                    raise AssertionError(f"axe failed on {view} ({name}): {again['error']}")
                result["violations"] += again["violations"]
                # undecided: what neither run could decide
                first = {n["target"] for v in result["incomplete"]
                         if v["id"] == "color-contrast" for n in v["nodes"]}
                for v in again["incomplete"]:
                    v["nodes"] = [n for n in v["nodes"] if n["target"] in first]
                result["incomplete"] = [v for v in result["incomplete"]
                                        if v["id"] != "color-contrast"] + [
                    v for v in again["incomplete"] if v["nodes"]]
            if "error" in result:
                raise AssertionError(f"axe failed on {view} ({name}): {result['error']}")
            # a page where axe ran no rule checked nothing
            if result["passes"] < 10:
                raise AssertionError(f"axe passed only {result['passes']} rules on {view}")
            self.engine = result["engine"]
            for v in result["violations"]:
                finding = {"view": view, "width": name, **v}
                found.append(finding)
                if v["impact"] not in BLOCKING:
                    log.info("axe {view} ({width}): {impact} {rule}: {help} ({count} node(s))",
                             view=view, width=name, impact=v["impact"], rule=v["id"],
                             help=v["help"], count=len(v["nodes"]))
            for v in result["incomplete"]:
                self.review.append({"view": view, "width": name, **v})
                log.info("axe {view} ({width}): to review: {rule}: {help} ({count} node(s))",
                         view=view, width=name, rule=v["id"], help=v["help"],
                         count=len(v["nodes"]))
            # works at phone width: the page itself never scrolls sideways (a wide table
            # scrolls in its own box)
            if result["overflow"] > 0:
                found.append({"view": view, "width": name, "id": "page-overflows-x",
                              "impact": "serious", "help": f"the page is {result['overflow']}"
                              "px wider than the window", "nodes": []})
            self.checked.append(f"{view} ({name})")
            if name == "phone":
                slug = "".join(c if c.isalnum() else "-" for c in view).strip("-")
                await self.browser.shot(f"a11y-{slug}-phone")
        # WCAG 1.4.10 (reflow): at 320 CSS px wide, still no sideways scrolling of the page
        await self.browser.do(lambda d: d.set_window_size(*REFLOW))
        overflow = await self.browser.do(lambda d: d.execute_script(
            "var r = document.documentElement; return r.scrollWidth - r.clientWidth;"))
        if overflow > 0:
            found.append({"view": view, "width": "320px", "id": "page-overflows-x",
                          "impact": "serious", "help": f"the page is {overflow}px wider "
                          "than the window (WCAG 1.4.10 reflow)", "nodes": []})
        await self.browser.do(lambda d: d.set_window_size(*DESKTOP))
        self.findings.extend(found)
        return found

    def blocking(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["impact"] in BLOCKING]

    def save(self) -> None:
        with open(os.path.join(os.getcwd(), "axe.json"), "w", encoding="utf-8") as f:
            json.dump({"engine": self.engine, "tags": WCAG_TAGS, "checked": self.checked,
                       "violations": self.findings, "review": self.review}, f, indent=1)

    def report(self, findings: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"{f['view']} ({f['width']}): {f['impact']} {f['id']}: {f['help']}: "
            + "; ".join(n["target"] for n in f["nodes"][:5]) for f in findings)


#: a page with faults axe must find: an image without text, grey on grey, a nameless input
FAULTY = ("data:text/html;charset=utf-8,<html><head><title>faulty</title></head><body>"
          "<main><h1>x</h1><img src='x.png'><p style='color:%23bbb;background:%23ccc'>"
          "faint</p><input id='q'></main></body></html>")


class ConsoleAccessibility(TestCase):
    timeout = 300

    def setUp(self) -> Deferred:
        need_browser()
        self.axe = need_axe()
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        # one relay, one agent with an inbound channel (the inbound view's Site), two
        # python-hl7 devices for its pushes: one answers AA, one AE
        relay, admin = await procs.relay_with_admin_args(
            self, ["--alert-offline-minutes", "0.05"])
        self.site = await Site.start(self, relay, admin)
        self.relay, self.admin, self.agent = self.site.relay, self.site.client, self.site.agent
        # an agent that never connects: offline in the fleet, an active alert after 3 s
        self.spare = await self.admin.create({"resourceType": "Agent", "name": "Spare agent",
                                              "status": "active"})
        self.operator = self.relay.create_client("operator")
        self.viewer = self.relay.create_client("viewer")
        self.ok_port, self.ae_port = procs.free_port(), procs.free_port()
        ok = procs.python(self, "device-AA", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.ok_port)])
        ae = procs.python(self, "device-AE", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.ae_port), "AE"])
        await ok.wait_for("MLLP server on", timeout=20)
        await ae.wait_for("MLLP server on", timeout=20)

    async def push(self, ctrl: str, port: int) -> str:
        outcome = await self.admin.push_to_agent(
            self.agent, f"mllp://127.0.0.1:{port}", hl7(ctrl), HL7_V2)
        return str(outcome["issue"][0]["diagnostics"]).rsplit("/", 1)[1]

    def test_every_view_has_no_serious_or_critical_violation(self) -> Deferred:
        async def go() -> None:
            delivered = await self.push("A11Y0001", self.ok_port)
            failed = await self.push("A11Y0002", self.ae_port)
            for ctrl in ("A11YIN01", "REFUSE01"):
                await self.site.send(self, ctrl)
            inbound = await self.site.logged("A11YIN01")
            await self.site.logged("REFUSE01")

            b = await Browser(self, self.relay.url).start()
            axe = Checker(b, self.axe)
            await b.get("/console/login")
            await axe.check("login")
            await b.type("#client_id", "nobody")
            await b.type("#client_secret", "wrong")
            await b.click("form.login button")
            await b.wait(lambda d: d.find_elements("css selector", "#login-error"),
                         "the sign-in error")
            await axe.check("login (refused)")

            await b.login(self.operator)
            await b.wait(text_is(f"#agent-{self.agent['id']} [data-field=state]", "online"),
                         "the agent online")
            await b.wait_live()
            await axe.check("fleet")
            await b.get("/console/trends")
            await axe.check("trends")
            await b.get(f"/console/agent/{self.agent['id']}")
            await b.wait(lambda d: "127.0.0.1" in d.find_element(
                "css selector", "#lanes").text, "the agent's lanes")
            await b.wait(lambda d: "lab-in" in d.find_element(
                "css selector", "#channels").text, "the agent's channels")
            await axe.check("agent")
            await b.click("button[name=reload]")
            await b.wait(lambda d: d.find_elements("css selector", "p.flash"), "the flash")
            await axe.check("agent (after an action)")
            lane = f'#lanes tr[data-lane="mllp://127.0.0.1:{self.ok_port}"]'
            await b.click(f"{lane} button[name=ping]")
            await b.wait(lambda d: d.find_elements("css selector", "#ping-result"),
                         "the ping's result")
            await axe.check("agent (ping result)")
            await b.click(f"{lane} button[name=pause]")
            await b.do(lambda d: d.switch_to.alert.accept())  # "Pause this lane?"
            await b.wait(text_is(f"{lane} [data-field=lane-state]", "paused"), "paused")
            await axe.check("agent (a lane paused)")
            await b.get("/console/fleet")
            await axe.check("fleet (a lane paused)")
            await b.get("/console/messages")
            await b.wait(text_is(f"#push-{failed} [data-field=state]", "failed"),
                         "the failed push")
            await b.wait(text_is(f"#push-{delivered} [data-field=state]", "delivered"),
                         "the delivered push")
            await axe.check("messages")
            await b.get("/console/messages?state=failed")
            await axe.check("messages (filtered)")
            await b.get("/console/messages/retry?state=failed")
            await axe.check("bulk retry (confirm)")
            await b.get(f"/console/message/{failed}?payload=1")
            await b.wait(lambda d: d.find_elements("css selector", "#payload"), "the payload")
            await axe.check("message detail (operator, payload)")
            await b.get("/console/inbound")
            await b.wait(lambda d: len(d.find_elements(
                "css selector", "#inbound tbody tr[data-inbound]")) == 2, "inbound rows")
            await axe.check("inbound")
            await b.get(f"/console/inbound/{inbound['id']}?payload=1")
            await b.wait(lambda d: d.find_elements("css selector", "#payload"), "the payload")
            await axe.check("inbound detail (operator, payload)")
            await b.get("/console/alerts")
            await b.wait(lambda d: self.spare["id"] in d.find_element(
                "css selector", "#alerts-active").text or d.refresh(), "the offline alert")
            await axe.check("alerts")
            await b.get("/console/message/no-such-message")
            await axe.check("error (404)")

            viewer = await Browser(self, self.relay.url).start()
            vaxe = Checker(viewer, self.axe)
            await viewer.login(self.viewer)
            await viewer.get(f"/console/message/{failed}")
            await viewer.wait(text_is("#detail-state [data-field=state]", "failed"),
                              "the viewer's detail")
            await vaxe.check("message detail (viewer)")

            # the bulk retry's answer (after the viewer: it moves the failed push)
            await b.get("/console/messages/retry?state=failed")
            await b.click("button[name=bulk-retry]")
            await b.wait(lambda d: d.find_elements("css selector", "#bulk-result"),
                         "the bulk retry's result")
            await axe.check("bulk retry (result)")

            axe.findings += vaxe.findings
            axe.checked += vaxe.checked
            axe.review += vaxe.review
            axe.save()
            log.info("axe checked {n} page views: {views}", n=len(axe.checked),
                     views=", ".join(axe.checked))
            self.assertEqual(len(axe.checked), 38)
            blocking = axe.blocking()
            self.assertEqual(blocking, [], "axe found serious or critical violations:\n"
                             + axe.report(blocking))

        return ensureDeferred(go())

    def test_keyboard_reaches_every_control_of_the_fleet_with_a_visible_focus(
            self) -> Deferred:
        async def go() -> None:
            b = await Browser(self, self.relay.url).start()
            await b.login(self.operator)
            await b.wait_live()
            # landmarks: one banner, one navigation, one main, and a skip link to it
            counts = await b.do(lambda d: d.execute_script(
                "return ['header', 'nav', 'main', 'a.skip[href=\"#main\"]', 'main#main', "
                "'h1'].map(function (s) { return document.querySelectorAll(s).length; });"))
            self.assertEqual(counts, [1, 1, 1, 1, 1, 1])
            css = await b.do(lambda d: d.execute_script(
                "return fetch('/console/static/console.css').then("
                "function (r) { return r.text(); });"))
            self.assertRegex(css, r":focus-visible[^{]*\{[^}]*outline:\s*\d+px solid")

            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.keys import Keys

            wanted = await b.do(lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('a[href], button, input, select'))"
                ".filter(function (e) { return e.type !== 'hidden'; }).length;"))

            def walk(d: Any) -> list[dict[str, Any]]:
                d.execute_script("document.activeElement && document.activeElement.blur();"
                                 "window.scrollTo(0, 0);")
                seen = []
                for _ in range(wanted + 5):
                    ActionChains(d).send_keys(Keys.TAB).perform()
                    seen.append(d.execute_script(
                        "var e = document.activeElement, s = getComputedStyle(e),"
                        " r = e.getBoundingClientRect();"
                        "if (!e.dataset.a11yIndex) e.dataset.a11yIndex = "
                        "  String(document.querySelectorAll('[data-a11y-index]').length);"
                        "return {index: e.dataset.a11yIndex, tag: e.tagName,"
                        " text: (e.textContent || e.value || '').trim().slice(0, 40),"
                        " cls: e.className, outline: s.outlineStyle,"
                        " width: parseFloat(s.outlineWidth), left: r.left, top: r.top,"
                        " visible: e.matches(':focus-visible')};"))
                return seen

            seen = await b.do(walk)
            first = seen[0]
            self.assertEqual((first["tag"], first["cls"]), ("A", "skip"), seen[:3])
            self.assertGreaterEqual(first["left"], 0, "the skip link shows when focused")
            reached = {s["index"] for s in seen if s["tag"] != "BODY"}
            self.assertEqual(len(reached), wanted, seen)
            for s in seen:
                if s["tag"] == "BODY":
                    continue
                self.assertTrue(s["visible"], s)
                self.assertNotEqual(s["outline"], "none", s)
                self.assertGreaterEqual(s["width"], 2, s)
            # on a fresh page, the first Tab and Enter move focus to the main content
            await b.get("/console/fleet")
            await b.do(lambda d: ActionChains(d).send_keys(Keys.TAB).perform())
            self.assertEqual(await b.do(lambda d: d.execute_script(
                "return document.activeElement.className;")), "skip")
            await b.do(lambda d: ActionChains(d).send_keys(Keys.ENTER).perform())
            await b.wait(lambda d: d.execute_script(
                "return document.activeElement.id;") == "main", "focus on the main content")

        return ensureDeferred(go())


class AxeIsLive(TestCase):
    """The checker is live: a page with known faults fails it (no relay needed)."""

    timeout = 120

    def test_axe_finds_the_faults_of_a_faulty_page(self) -> Deferred:
        need_browser()
        script = need_axe()

        async def go() -> None:
            b = await Browser(self, "").start()
            await b.do(lambda d: d.get(FAULTY))
            found = await Checker(b, script).check("faulty")
            ids = {f["id"] for f in found if f["impact"] in BLOCKING and f["width"] == "phone"}
            self.assertTrue({"image-alt", "color-contrast", "label"} <= ids, found)

        return ensureDeferred(go())


class MissingAxe(TestCase):
    """With MEDAGENT_REQUIRE_PEERS=1 (CI) a missing axe-core fails the tests, never skips."""

    def test_missing_axe_fails_when_peers_are_required(self) -> None:
        import tests.test_console_a11y as module
        from twisted.trial.unittest import SkipTest

        self.patch(module, "axe_path", lambda: "/nonexistent/axe.min.js")
        self.patch(os, "environ", {**os.environ, "MEDAGENT_REQUIRE_PEERS": "1"})
        self.assertRaises(AssertionError, need_axe)
        self.patch(os, "environ", {**os.environ, "MEDAGENT_REQUIRE_PEERS": "0"})
        self.assertRaises(SkipTest, need_axe)
