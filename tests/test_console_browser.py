"""
The console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium through ``/usr/bin/chromedriver``; nothing is downloaded), against real
``twistd`` relay and agent processes and two python-hl7 MLLP devices (one answers AA, one
AE).  An operator signs in, watches the agent go offline and online without a reload, pushes
and sees the message appear and change state, finds it by MSH-10, retries a failed push and
resends a delivered one; a viewer sees no payload and no action; a form without its CSRF
token is refused.  Screenshots of each view go to ``_trial_temp/screenshots/``.

Selenium blocks, so every browser step runs in a thread (the reactor keeps serving the
processes); every wait is selenium's own, with a timeout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from medagent.contenttypes import HL7_V2
from tests import procs
from tests.peerenv import FIXTURES, need

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0


def hl7(ctrl: str, order: str = "ORD-1") -> str:
    return (f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
            f"PID|1||12345^^^MRN||DOE^JANE||19800101|F\rORC|NW|{order}\r"
            f"OBR|1|{order}||GLU^Glucose")


def screenshots_dir() -> str:
    """``_trial_temp/screenshots`` (trial runs tests inside its temporary folder)."""
    path = os.path.join(os.getcwd(), "screenshots")
    os.makedirs(path, exist_ok=True)
    return path


def need_browser() -> Any:
    need(os.access(CHROMIUM, os.X_OK), "chromium (Debian package chromium; .ci/peers-browser.sh)")
    need(os.access(CHROMEDRIVER, os.X_OK),
         "chromedriver (Debian package chromium-driver; .ci/peers-browser.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        need(False, "selenium (pip install .[test])")
    from selenium import webdriver

    return webdriver


class Browser:
    """One headless Chromium; each call runs in a thread."""

    def __init__(self, testcase: TestCase, base: str) -> None:
        self.testcase = testcase
        self.base = base
        self.driver: Any = None
        self.profile = tempfile.mkdtemp(prefix="medagent-chromium-")

    async def start(self) -> "Browser":
        webdriver = need_browser()
        from selenium.webdriver.chrome.service import Service

        def start() -> Any:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,900",
                        f"--user-data-dir={self.profile}", "--no-first-run",
                        "--disable-extensions", "--disable-background-networking"):
                options.add_argument(arg)
            # the driver named explicitly: selenium-manager (a download) is never asked
            return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                                    options=options)

        self.driver = await deferToThread(start)
        self.testcase.addCleanup(self.stop)
        return self

    def stop(self) -> Deferred[Any]:
        driver, self.driver = self.driver, None

        def quit() -> None:
            if driver is not None:
                driver.quit()
            shutil.rmtree(self.profile, ignore_errors=True)

        return deferToThread(quit)

    async def do(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await deferToThread(fn, self.driver, *args)

    async def get(self, path: str) -> None:
        await self.do(lambda d: d.get(self.base + path))

    async def wait(self, condition: Callable[[Any], Any], what: str,
                   timeout: float = WAIT) -> Any:
        from selenium.common.exceptions import (NoSuchElementException,
                                                StaleElementReferenceException)
        from selenium.webdriver.support.ui import WebDriverWait

        def wait(d: Any) -> Any:
            try:
                # a page being replaced (a form's answer) may drop an element mid-check
                return WebDriverWait(d, timeout, poll_frequency=0.1, ignored_exceptions=(
                    NoSuchElementException, StaleElementReferenceException)).until(condition)
            except Exception as e:
                main = d.find_elements("css selector", "main")
                raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                     f"(at {d.current_url}: "
                                     f"{main[0].text[:300] if main else ''})") from e

        return await self.do(wait)

    async def text(self, css: str) -> str:
        from selenium.webdriver.common.by import By

        return await self.do(lambda d: d.find_element(By.CSS_SELECTOR, css).text)

    async def exists(self, css: str) -> bool:
        from selenium.webdriver.common.by import By

        return await self.do(lambda d: bool(d.find_elements(By.CSS_SELECTOR, css)))

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        await self.do(lambda d: d.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        def type_(d: Any) -> None:
            field = d.find_element(By.CSS_SELECTOR, css)
            field.clear()
            field.send_keys(text)

        await self.do(type_)

    async def shot(self, name: str) -> str:
        path = os.path.join(screenshots_dir(), f"{name}.png")
        await self.do(lambda d: d.save_screenshot(path))
        return path

    async def login(self, creds: dict[str, Any]) -> None:
        await self.get("/console/login")
        await self.type("#client_id", creds["clientId"])
        await self.type("#client_secret", creds["clientSecret"])
        await self.click("form.login button")
        await self.wait(lambda d: d.current_url.endswith("/console/fleet"), "the fleet page")

    async def wait_live(self) -> None:
        """The page's event stream is open (so an event from now on is seen)."""
        await self.wait(lambda d: d.execute_script(
            "return document.getElementById('live').getAttribute('data-state')") == "live",
            "the live stream")

    async def mark(self) -> None:
        """A marker in the page's memory: gone if the page reloads."""
        await self.do(lambda d: d.execute_script("window.__medagentMark = 42;"))

    async def still_marked(self) -> bool:
        return await self.do(lambda d: d.execute_script("return window.__medagentMark") == 42)


def text_is(css: str, wanted: str) -> Callable[[Any], bool]:
    from selenium.webdriver.common.by import By

    def check(d: Any) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        return bool(found) and found[0].text.strip() == wanted

    return check


class ConsoleInBrowser(TestCase):
    timeout = 240

    def setUp(self) -> Deferred:
        need_browser()
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.admin = await procs.relay_with_admin_args(
            self, ["--alert-offline-minutes", "0.05"])
        self.agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                              "status": "active"})
        self.agent_creds = self.relay.create_client("agent", [self.agent["id"]])
        self.operator = self.relay.create_client("operator")
        self.viewer = self.relay.create_client("viewer")
        self.ok_port, self.ae_port = procs.free_port(), procs.free_port()
        self.ok_device = procs.python(self, "device-AA", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.ok_port)])
        self.ae_device = procs.python(self, "device-AE", [
            os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.ae_port), "AE"])
        await self.ok_device.wait_for("MLLP server on", timeout=20)
        await self.ae_device.wait_for("MLLP server on", timeout=20)
        self.agent_data = tempfile.mkdtemp(prefix="medagent-agent-")
        self.agent_proc = await self.start_agent()

    async def start_agent(self) -> procs.Proc:
        proc = procs.agent_process(self, self.relay.url, self.agent_creds, self.agent["id"],
                                   ["--data", self.agent_data])

        async def connected() -> bool:
            params = await self.admin.request_json(
                "GET", f"/fhir/R4/Agent/{self.agent['id']}/$status")
            return params["parameter"][0]["valueCode"] == "connected"

        await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")
        return proc

    async def push(self, ctrl: str, port: int) -> str:
        outcome = await self.admin.push_to_agent(
            self.agent, f"mllp://127.0.0.1:{port}", hl7(ctrl), HL7_V2)
        return str(outcome["issue"][0]["diagnostics"]).rsplit("/", 1)[1]

    async def push_state(self, push_id: str) -> str:
        doc = await self.admin.request_json("GET", f"/fhir/R4/AgentPush/{push_id}")
        return str(doc["state"])

    def test_operator_watches_the_fleet_and_works_the_messages(self) -> Deferred:
        async def go() -> None:
            b = await Browser(self, self.relay.url).start()
            await b.login(self.operator)
            row = f"#agent-{self.agent['id']}"
            await b.wait(text_is(f"{row} [data-field=state]", "online"), "the agent online")
            await b.wait_live()
            await b.mark()
            await b.shot("fleet")

            # offline and back, without a reload
            await self.agent_proc.stop()
            await b.wait(text_is(f"{row} [data-field=state]", "offline"), "the agent offline")
            self.assertTrue(await b.still_marked(), "the fleet page reloaded")
            # offline longer than the threshold (3 s): one alert, counted in the navigation
            await b.wait(lambda d: d.execute_script(
                "var b = document.getElementById('alert-count');"
                "return b && !b.hidden && b.textContent === '1';"), "the offline alert")
            await b.get("/console/alerts")
            self.assertIn("offline", await b.text("#alerts-active"))
            await b.shot("alerts")
            await b.get("/console/fleet")
            await b.wait_live()
            await b.mark()
            self.agent_proc = await self.start_agent()
            await b.wait(text_is(f"{row} [data-field=state]", "online"), "the agent online")
            self.assertTrue(await b.still_marked(), "the fleet page reloaded")
            await b.do(lambda d: d.set_window_size(390, 844))  # a phone
            await b.shot("fleet-phone")
            await b.do(lambda d: d.set_window_size(1280, 900))

            # a push appears and changes state on the messages page, live
            await b.get("/console/messages")
            await b.wait_live()
            await b.mark()
            delivered = await self.push("BRWOK001", self.ok_port)
            await b.wait(text_is(f"#push-{delivered} [data-field=state]", "delivered"),
                         "the new push delivered")
            self.assertTrue(await b.still_marked(), "the messages page reloaded")
            failed = await self.push("BRWAE001", self.ae_port)
            await b.wait(text_is(f"#push-{failed} [data-field=state]", "failed"),
                         "the AE push failed")
            await b.shot("messages")

            # found by MSH-10
            await b.type("#f-control_id", "BRWAE001")
            await b.click("form.search button")
            await b.wait(lambda d: "control_id=BRWAE001" in d.current_url, "the search")
            rows = await b.do(lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('#messages tbody tr'))"
                ".map(function (r) { return r.id; });"))
            self.assertEqual(rows, [f"push-{failed}"])
            await b.click(f"#push-{failed} a[data-field=control]")
            await b.wait(text_is("#detail-state [data-field=state]", "failed"), "the detail")
            self.assertIn("AE", await b.text("dl.facts"))
            await b.click("#show-payload")
            await b.wait(lambda d: d.find_elements("css selector", "#payload"), "the payload")
            self.assertIn("BRWAE001", await b.text("#payload"))
            await b.shot("message-detail")

            # retry: queued again and sent to the agent again.  The agent holds this push id
            # with the device's answer already, so it answers from its record (it never
            # delivers one push id twice): the push ends failed again, the device is not
            # asked again.  A resend (below) is what reaches the device again.
            await b.click("button[name=retry]")
            await b.wait(lambda d: "done=retried" in d.current_url, "the retry")
            await self.agent_proc.wait_for("answered from our record", timeout=WAIT)
            await b.wait(text_is("#detail-state [data-field=state]", "failed"),
                         "the retried push failed again (live)")
            self.assertEqual(await self.push_state(failed), "failed")
            self.assertEqual(self.ae_device.count("RECV from"), 1)

            # resend the delivered one: a new push, linked, delivered again
            await b.get(f"/console/message/{delivered}")
            await b.wait(text_is("#detail-state [data-field=state]", "delivered"), "detail")
            await b.click("button[name=resend]")
            await b.do(lambda d: d.switch_to.alert.accept())  # "Send this message again?"
            await b.wait(lambda d: "done=resent" in d.current_url, "the resend")
            new_id = (await b.do(lambda d: d.current_url)).split("/message/")[1].split("?")[0]
            self.assertNotEqual(new_id, delivered)
            self.assertTrue(await b.exists(f'a[href="/console/message/{delivered}"]'))
            await b.wait(text_is("#detail-state [data-field=state]", "delivered"),
                         "the resent push delivered (live)")
            self.assertEqual(self.ok_device.count("RECV from"), 2)

            await b.get(f"/console/agent/{self.agent['id']}")
            self.assertIn(f"mllp://127.0.0.1:{self.ae_port}", await b.text("#lanes"))
            await b.click("button[name=reload]")
            await b.wait(lambda d: "done=reloaded" in d.current_url, "reload config")
            await b.shot("agent")

        return ensureDeferred(go())

    async def _is(self, push_id: str, state: str) -> bool:
        return (await self.push_state(push_id)) == state

    def test_viewer_sees_no_payload_and_a_form_without_csrf_is_refused(self) -> Deferred:
        async def go() -> None:
            failed = await self.push("BRWV0001", self.ae_port)
            await procs.wait_until(lambda: ensureDeferred(self._is(failed, "failed")),
                                   timeout=WAIT, what="the push failed")
            b = await Browser(self, self.relay.url).start()
            await b.login(self.viewer)
            await b.get(f"/console/message/{failed}")
            await b.wait(text_is("#detail-state [data-field=state]", "failed"), "the detail")
            page = await b.do(lambda d: d.page_source)
            self.assertNotIn("DOE^JANE", page)
            self.assertFalse(await b.exists("#show-payload"))
            self.assertFalse(await b.exists("button[name=retry]"))
            self.assertFalse(await b.exists("button[name=resend]"))
            await b.shot("message-detail-viewer")
            await b.get(f"/console/message/{failed}?payload=1")
            self.assertIn("may not see", await b.text("main"))
            self.assertNotIn("DOE^JANE", await b.do(lambda d: d.page_source))
            await b.click("form.logout button")
            await b.wait(lambda d: d.current_url.endswith("/console/login"), "signed out")

            # an operator's form with its token taken out is refused, and nothing happens
            await b.login(self.operator)
            await b.get(f"/console/message/{failed}")
            await b.do(lambda d: d.execute_script(
                "var f = document.querySelector('button[name=retry]').form;"
                "f.removeChild(f.querySelector('input[name=csrf]'));"))
            await b.click("button[name=retry]")
            await b.wait(lambda d: "security token" in d.find_element(
                "css selector", "main").text, "the refusal")
            await b.shot("csrf-refused")
            self.assertEqual(await self.push_state(failed), "failed")
            self.assertEqual(self.ae_device.count("RECV from"), 1)

        return ensureDeferred(go())


class MissingBrowser(TestCase):
    """With MEDAGENT_REQUIRE_PEERS=1 (CI) a missing browser fails the tests, never skips."""

    def test_missing_chromium_fails_when_peers_are_required(self) -> None:
        import tests.test_console_browser as module
        from twisted.trial.unittest import SkipTest

        self.patch(module, "CHROMIUM", "/nonexistent/chromium")
        self.patch(os, "environ", {**os.environ, "MEDAGENT_REQUIRE_PEERS": "1"})
        self.assertRaises(AssertionError, need_browser)
        self.patch(os, "environ", {**os.environ, "MEDAGENT_REQUIRE_PEERS": "0"})
        self.assertRaises(SkipTest, need_browser)
