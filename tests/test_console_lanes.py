"""
The agent page's lanes and their actions (issue 12): pause and resume in the console (CSRF and
Origin checked, operators and admins only, audited, shown on the agent and fleet pages), the
ping of a listed lane, and the same pause over HTTP (``$pause-lane``), where a pusher is
refused.  A real relay in this process on a loopback port, fetched with treq.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.relay.auth import ADMIN, OPERATOR, VIEWER, Principal
from medagent.relay.console import html
from medagent.storage import journal as j
from tests import procs
from tests.test_console import XSS, Browser, _location, hl7

LANE = "mllp://127.0.0.1:9"


class ConsoleLanes(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-lanes-")
        auth = self.relay.authority
        self.admin_creds = await auth.create_client(ADMIN)
        self.operator_creds = await auth.create_client(OPERATOR)
        self.viewer_creds = await auth.create_client(VIEWER)
        self.admin = Principal(self.admin_creds["clientId"], ADMIN)
        self.agent = await self.relay.store.create(
            {"resourceType": "Agent", "name": "Lab", "status": "active"})
        self.page = f"/console/agent/{self.agent['id']}"

    async def push(self, ctrl: str, destination: str = LANE) -> j.Push:
        result = await self.relay.pushes.push(
            self.admin, (self.agent["id"], None),
            {"destination": destination, "contentType": "x-application/hl7-v2+er7",
             "body": hl7(ctrl, "SECRET^PATIENT")})
        return result.push

    async def token(self, creds: dict[str, Any]) -> str:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": creds["clientId"],
            "client_secret": creds["clientSecret"]}, pool=self.pool)
        return str((await r.json())["access_token"])

    async def api(self, token: str, method: str, op: str, body: Any = None
                  ) -> tuple[int, Any]:
        headers = {"Authorization": [f"Bearer {token}"], "Content-Type": ["application/json"]}
        r = await treq.request(method, f"{self.base}/fhir/R4/Agent/{self.agent['id']}/{op}",
                               headers=headers, pool=self.pool,
                               data=None if body is None else json.dumps(body).encode())
        return r.code, await r.json()

    def test_operator_pauses_and_resumes_a_lane_shown_on_agent_and_fleet(self) -> Deferred:
        async def go() -> None:
            await self.push("LANE0001")
            b = Browser(self, self.base, self.pool)
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.get(self.page)
            self.assertEqual(code, 200)
            for head in html.LANE_DETAIL_HEADS:
                self.assertIn(head, text)
            self.assertIn('data-field="lane-state">active', text)
            self.assertIn('name="pause"', text)
            self.assertIn('name="ping"', text)
            code, _, headers = await b.post(self.page + "/pause", {"lane": LANE})
            self.assertEqual((code, _location(headers)), (303, self.page + "?done=paused"))
            self.assertEqual([(p["lane"], p["by"]) for p in await self.relay.lanes.paused()],
                             [(LANE, self.operator_creds["clientId"])])
            code, text, _ = await b.get(self.page + "?done=paused")
            self.assertIn('data-field="lane-state">paused', text)
            self.assertIn(f"by {self.operator_creds['clientId']}", text)
            self.assertIn('name="resume"', text)
            self.assertNotIn('name="ping"', text)
            code, text, _ = await b.get("/console/fleet")
            self.assertIn("1 lane(s) paused", text)
            # a ping of a paused lane would wait with it: refused, said why
            code, text, _ = await b.post(self.page + "/ping", {"lane": LANE})
            self.assertEqual(code, 409)
            code, _, headers = await b.post(self.page + "/resume", {"lane": LANE})
            self.assertEqual((code, _location(headers)), (303, self.page + "?done=resumed"))
            self.assertEqual(await self.relay.lanes.paused(), [])
            code, text, _ = await b.get("/console/fleet")
            self.assertNotIn("lane(s) paused", text)
            audits = await self.relay.store.search("AuditEvent", {})
            self.assertEqual(sorted(a["subtype"][0]["code"] for a in audits),
                             ["pause-lane", "resume-lane"])
            self.assertNotIn("SECRET", json.dumps(audits))

        return ensureDeferred(go())

    def test_pause_without_token_from_another_origin_or_as_viewer_is_refused(self
                                                                             ) -> Deferred:
        async def go() -> None:
            await self.push("LANE0002")
            b = Browser(self, self.base, self.pool)
            self.assertEqual(await b.login(self.operator_creds), 303)
            path = self.page + "/pause"
            code, _, _ = await b.post(path, {"lane": LANE}, csrf=False,
                                      origin="http://evil.example")
            self.assertEqual(code, 403)
            code, _, _ = await b.post(path, {"lane": LANE}, csrf=False, origin=None)
            self.assertEqual(code, 403)
            code, text, _ = await b.post(path, {"lane": LANE}, origin="http://evil.example")
            self.assertEqual(code, 403)
            self.assertIn("another site", text)
            viewer = Browser(self, self.base, self.pool)
            self.assertEqual(await viewer.login(self.viewer_creds), 303)
            code, text, _ = await viewer.get(self.page)
            self.assertNotIn('name="pause"', text)
            self.assertNotIn('name="ping"', text)
            for action in ("pause", "resume", "ping"):
                code, _, _ = await viewer.post(f"{self.page}/{action}", {"lane": LANE})
                self.assertEqual(code, 403, action)
            self.assertEqual(await self.relay.lanes.paused(), [])
            # a ping only of a listed lane (no port scanning through the console)
            code, _, _ = await b.post(self.page + "/ping", {"lane": "mllp://10.0.0.1:22"})
            self.assertEqual(code, 400)
            code, _, _ = await b.post(self.page + "/pause", {})
            self.assertEqual(code, 400)

        return ensureDeferred(go())

    def test_a_ping_needs_the_agent_connected_and_is_refused_with_a_page(self) -> Deferred:
        async def go() -> None:
            await self.push("LANE0003")
            b = Browser(self, self.base, self.pool)
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.post(self.page + "/ping", {"lane": LANE})
            self.assertEqual(code, 503)  # not connected: said, nothing queued
            self.assertIn("not connected", text)

        return ensureDeferred(go())

    def test_http_pause_for_operators_and_admins_never_pushers(self) -> Deferred:
        async def go() -> None:
            pusher = await self.relay.authority.create_client("pusher", [self.agent["id"]])
            ptoken = await self.token(pusher)
            for op in ("$pause-lane", "$resume-lane"):
                code, body = await self.api(ptoken, "POST", op, {"destination": LANE})
                self.assertEqual(code, 403, op)
                self.assertEqual(body["resourceType"], "OperationOutcome")
            code, _ = await self.api(ptoken, "GET", "$lanes")
            self.assertEqual(code, 403)
            self.assertEqual(await self.relay.lanes.paused(), [])
            otoken = await self.token(self.operator_creds)
            code, body = await self.api(otoken, "POST", "$pause-lane",
                                        {"destination": LANE + "?ackTimeout=9"})
            self.assertEqual((code, body["lane"], body["paused"], body["changed"]),
                             (200, LANE, True, True))
            atoken = await self.token(self.admin_creds)
            code, body = await self.api(atoken, "GET", "$lanes")
            self.assertEqual([p["lane"] for p in body["paused"]], [LANE])
            code, body = await self.api(atoken, "POST", "$pause-lane", {"destination": XSS})
            self.assertEqual(code, 400)
            code, body = await self.api(atoken, "POST", "$pause-lane", ["x"])
            self.assertEqual(code, 400)
            code, body = await self.api(atoken, "POST", "$resume-lane", {"destination": LANE})
            self.assertEqual((code, body["paused"], body["changed"]), (200, False, True))

        return ensureDeferred(go())


class Rendering(SynchronousTestCase):
    def test_lane_details_escaped_and_agents_without_stats_show_dashes(self) -> None:
        row = {"id": "a1", "connected": True}
        lanes = [{"remote": f"mllp://h:1?x={XSS}", "open": 2}]
        details = {"paused": {}, "relay": {"mllp://h:1": {"inFlight": 3}}, "agent": None}
        text = html.agent_page(row, lanes, 0.0, can_act=True, csrf="t",
                               details=details).decode()
        self.assertNotIn("<script>", text)
        self.assertIn('data-field="in-flight">3', text)
        # last ACK, latency, errors (and the oldest age the journal row lacks)
        self.assertEqual(text.count("<td>—</td>"), 4)
        stats = {"mllp://h:1": {"lastAck": 0.0, "lastAckCode": XSS, "ackP50Ms": 12.04,
                                "ackP99Ms": 80.6, "recentErrors": [{"at": 0, "kind": XSS}]}}
        details = {"paused": {"mllp://h:1": {"by": XSS, "since": 0.0}},
                   "relay": {"mllp://h:1": {"inFlight": 1}}, "agent": stats}
        text = html.agent_page(row, lanes, 0.0, can_act=True, csrf="t",
                               details=details).decode()
        self.assertNotIn("<script>", text)
        self.assertIn("12 ms / 81 ms", text)
        self.assertIn("1 already on the agent", text)
        self.assertIn('name="resume"', text)
        # a paused lane the journal has no push of yet still has its row
        details["paused"]["dicom://PACS@p:104"] = {"by": "op", "since": 0.0}
        text = html.agent_page(row, [], 0.0, can_act=False, csrf="t",
                               details=details).decode()
        self.assertIn("dicom://PACS@p:104", text)
        self.assertNotIn('name="resume"', text)

    def test_alert_rules_listed(self) -> None:
        from twisted.internet.task import Clock

        from medagent.relay.console.alerts import AlertMonitor
        from tests.test_alerts_lanes import FakeOutcomes
        from tests.test_console import FakeHub, FakeStore

        monitor = AlertMonitor(Clock(), FakeHub(), FakeStore([]), offline_after=300,
                               journal=FakeOutcomes(), queue_age_after=900, error_rate=0.5)
        text = html.alerts_page([], [], 300, monitor=monitor).decode()
        self.assertIn("offline for more than 5m 0s", text)
        self.assertIn("a device lane whose oldest push has waited more than 15m 0s", text)
        self.assertIn("failed in 50% or more (at least 5 ended)", text)
