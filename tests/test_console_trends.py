"""
The console's trends and bulk retry (issue 12).

- the trends' pure parts: bucket alignment, the series from a backend's rows, the fleet's
  sum, the SVG charts (well-formed, labelled, escaped, no script or style attribute) on a
  Clock's time; the trends query's plan (index searches only) on SQLite and PostgreSQL;
- pages and actions on a real relay in this process (treq, loopback): the trends on the
  fleet view and each agent's page; bulk retry: the link and its count, the confirm step,
  the result page, the cap, the audit (without payload), and the attacks (a viewer, no
  CSRF token, another origin); ``POST AgentPush/$retry`` by role;
- ``medagent pushes retry --all`` as a real process: filters, cap, ``--json``, exit codes.
"""

from __future__ import annotations

import json
import re
import sqlite3
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.relay import bulk
from medagent.relay.auth import ADMIN, OPERATOR, VIEWER, Principal
from medagent.relay.console import html
from medagent.storage import journal as j
from medagent.storage.sqlite.journal import SCHEMA
from medagent.storage.sqlite.journal import trend_query as sqlite_trend_query
from tests import procs
from tests.test_cli import _CLI
from tests.test_console import XSS, Browser, hl7

SVG = "{http://www.w3.org/2000/svg}"
HOUR = 3600.0


def _row(agent: str, kind: str, bucket: int, n: int) -> dict[str, Any]:
    return {"agent_id": agent, "kind": kind, "bucket": bucket, "n": n}


class Bucketing(SynchronousTestCase):
    def test_window_is_aligned_and_holds_now(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000 + 1234.5)  # 22:20:34Z
        start = j.trend_window(clock.seconds(), HOUR, 24)
        self.assertEqual(start % HOUR, 0)
        self.assertTrue(start + 23 * HOUR <= clock.seconds() < start + 24 * HOUR)
        quarter = j.trend_window(clock.seconds(), HOUR / 4, 96)
        self.assertTrue(quarter + 95 * 900 <= clock.seconds() < quarter + 96 * 900)
        for width, count in ((0, 24), (-1, 24), (float("nan"), 24), (HOUR, 0),
                             (HOUR, j.MAX_TREND_BUCKETS + 1)):
            self.assertRaises(ValueError, j.trend_window, clock.seconds(), width, count)

    def test_series_from_rows(self) -> None:
        rows = [_row("a", j.TREND_CREATED, -1, 2),   # open at the start
                _row("a", j.TREND_CREATED, 0, 3),
                _row("a", j.TREND_DONE, 0, 1),
                _row("a", j.TREND_FAILED, 1, 2),
                _row("a", j.TREND_CREATED, 7, 1),    # a clock ahead: the last bucket
                _row("b", j.TREND_FAILED, 2, 1)]     # created before, ended failed
        found = j.trends_from_rows(rows, 100.0, 10.0, 3)
        self.assertEqual(found["a"], j.Trend(100.0, 10.0, (3, 0, 1), (0, 2, 0), (4, 2, 3)))
        # b's push was open before the window (its creation row is -1 in a real read: here
        # missing, so the depth would go negative; it is kept at 0)
        self.assertEqual(found["b"].depth, (0, 0, 0))
        self.assertEqual(found["b"].failed, (0, 0, 1))
        total = j.trend_total(found.values(), 100.0, 10.0, 3)
        self.assertEqual((total.created, total.failed, total.depth),
                         ((3, 0, 1), (0, 2, 1), (4, 2, 3)))
        self.assertEqual(j.empty_trend(0.0, 10.0, 2).depth, (0, 0))
        self.assertEqual(found["a"].bucket_start(2), 120.0)


class Charts(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # 2023-11-14 22:13:20Z
        self.now = self.clock.seconds()
        self.start = j.trend_window(self.now, HOUR, 24)
        self.trend = j.Trend(self.start, HOUR, tuple([0] * 22 + [4, 8]),
                             tuple([0] * 23 + [2]), tuple([1] * 22 + [3, 5]))

    def test_chart_is_svg_with_a_title_a_description_and_bars_to_scale(self) -> None:
        text = html.trend_chart(self.trend, "created", "x-created", self.now)
        figure = ET.fromstring(text)
        svg = figure.find(f"{SVG}svg")
        assert svg is not None
        self.assertEqual(svg.get("role"), "img")
        self.assertEqual(svg.get("aria-labelledby"), "x-created-t x-created-d")
        self.assertEqual(svg.find(f"{SVG}title").text, "Pushes")  # type: ignore[union-attr]
        desc = svg.find(f"{SVG}desc").text or ""  # type: ignore[union-attr]
        self.assertIn("12 in all, at most 8", desc)
        self.assertIn("from 23:00Z to 22:13Z", desc)  # the window, on the clock's time
        bars = svg.findall(f"{SVG}rect")
        self.assertEqual(len(bars), 2)  # only non-empty buckets are drawn
        heights = [float(b.get("height") or 0) for b in bars]
        self.assertAlmostEqual(heights[1], 2 * heights[0], places=1)
        self.assertAlmostEqual(heights[1], html.CHART_H - 4, places=1)
        self.assertGreater(float(bars[1].get("x") or 0), float(bars[0].get("x") or 0))
        self.assertNotIn("style=", text)
        self.assertNotIn("<script", text)

    def test_depth_is_a_line_ending_at_now(self) -> None:
        text = html.trend_chart(self.trend, "depth", "x-depth", self.now)
        svg = ET.fromstring(text).find(f"{SVG}svg")
        assert svg is not None
        line = svg.find(f"{SVG}polyline")
        assert line is not None
        points = (line.get("points") or "").split()
        self.assertEqual(len(points), 25)  # the start, then each bucket's end
        self.assertEqual(points[-1], f"{html.CHART_W:.1f},{html.CHART_H - 1 - 44:.1f}")
        self.assertIn("now 5, at most 5", svg.find(f"{SVG}desc").text or "")  # type: ignore

    def test_an_empty_trend_draws_no_bar(self) -> None:
        text = html.trend_chart(j.empty_trend(self.start, HOUR, 24), "failed", "e", self.now)
        svg = ET.fromstring(text).find(f"{SVG}svg")
        assert svg is not None
        self.assertEqual(svg.findall(f"{SVG}rect"), [])
        self.assertIn("0 in all", svg.find(f"{SVG}desc").text or "")  # type: ignore

    def test_trends_page_escapes_names_and_carries_the_numbers(self) -> None:
        agent = {"id": "a-1", "name": XSS}
        body = html.trends_page(self.trend, [(agent, self.trend)], self.now, quiet=3,
                                left_out=0, who=Principal("op", OPERATOR), csrf="t")
        text = body.decode()
        self.assertNotIn(XSS, text)
        self.assertIn("&lt;script&gt;", text)
        self.assertIn('aria-current="page">Trends', text)
        self.assertIn("3 agent(s) had no push", text)
        # the numbers table: one row per bucket, the last one's values
        self.assertEqual(text.count('<details class="numbers">'), 2)
        self.assertIn(f"<th scope=\"row\">{html.when(self.start + 23 * HOUR)}</th>"
                      "<td>8</td><td>2</td><td>5</td>", text)
        self.assertEqual(len(re.findall(r'<svg class="chart"', text)), 6)
        self.assertEqual(len(set(re.findall(r' id="([^"]+)"', text))),
                         len(re.findall(r' id="([^"]+)"', text)))  # ids are unique


class TrendQueryPlans(SynchronousTestCase):
    """The trends read searches indexes: it never scans the journal's old rows."""

    def test_sqlite_plan_uses_only_index_searches(self) -> None:
        conn = sqlite3.connect(":memory:")
        conn.executescript(SCHEMA)
        for agent in (None, "a1"):
            sql, args = sqlite_trend_query(1000.0, HOUR, 24, agent)
            plan = [r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            on_pushes = [p for p in plan if "pushes" in p]
            self.assertEqual(len(on_pushes), 3, plan)
            for step in on_pushes:
                self.assertTrue(step.startswith("SEARCH pushes USING"), (agent, plan))
            # finished pushes: only those updated inside the window are read
            for step in on_pushes[1:]:
                self.assertIn("pushes_state_updated (state=? AND updated>?)", step)
        # (and the check can fail: without the index, the same query scans)
        conn.execute("DROP INDEX pushes_state_updated")
        sql, args = sqlite_trend_query(1000.0, HOUR, 24, None)
        plan = [r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql} ", args)]
        self.assertTrue(any(p.startswith("SCAN pushes") for p in plan), plan)
        conn.close()


class PgTrendQueryPlan(TestCase):
    def test_postgres_plan_has_no_sequential_scan(self) -> Deferred:
        from tests.test_storage_postgres import _Pg

        class Base:
            def setUp(self) -> None:  # noqa: N802
                pass

        class Db(_Pg, Base):
            def addCleanup(self, f: Any) -> None:  # noqa: N802
                outer.addCleanup(f)

        outer = self
        db = Db()

        async def go() -> None:
            await db.setUp()
            from medagent.storage.postgres.journal import trend_query

            database = db.database()
            for agent in (None, "a1"):
                sql, args = trend_query(1000.0, HOUR, 24, agent)

                def plan(c: Any) -> str:
                    c.execute("SET enable_seqscan = off")
                    rows = c.execute(f"EXPLAIN {sql}", args).fetchall()
                    return "\n".join(str(list(r.values())[0]) for r in rows)

                text = await database.run(plan)
                self.assertNotIn("Seq Scan", text)
                self.assertIn("Index", text)

        return ensureDeferred(go())


class TrendsAndBulkRetryPages(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.base, self.pool = procs.in_process_relay(self, "relay-trends-")
        auth = self.relay.authority
        self.admin_creds = await auth.create_client(ADMIN)
        self.operator_creds = await auth.create_client(OPERATOR)
        self.viewer_creds = await auth.create_client(VIEWER)
        self.pusher_creds = await auth.create_client("pusher", ["*"])
        self.admin = Principal(self.admin_creds["clientId"], ADMIN)
        self.agent = await self.relay.store.create(
            {"resourceType": "Agent", "name": f"Lab {XSS}", "status": "active"})
        self.other = await self.relay.store.create(
            {"resourceType": "Agent", "name": "Quiet lab", "status": "active"})

    def browser(self) -> Browser:
        return Browser(self, self.base, self.pool)

    async def push(self, ctrl: str, agent: dict[str, Any] | None = None,
                   name: str = "DOE^JANE") -> j.Push:
        result = await self.relay.pushes.push(
            self.admin, ((agent or self.agent)["id"], None),
            {"destination": "mllp://127.0.0.1:9", "contentType": "x-application/hl7-v2+er7",
             "body": hl7(ctrl, name)})
        return result.push

    async def failed(self, ctrl: str, state: str = j.FAILED, **kw: Any) -> j.Push:
        push = await self.push(ctrl, **kw)
        await self.relay.journal.transition(push, state, error="AE from the device")
        await self.relay.journal.flushed()
        return push

    async def token(self, creds: dict[str, Any]) -> str:
        r = await treq.post(self.base + "/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": creds["clientId"],
            "client_secret": creds["clientSecret"]}, pool=self.pool)
        return str((await r.json())["access_token"])

    # -- trends -----------------------------------------------------------------------

    def test_trends_on_the_fleet_view_and_the_agent_page(self) -> Deferred:
        async def go() -> None:
            await self.push("TRND0001")
            await self.failed("TRND0002")
            await self.relay.journal.flushed()
            b = self.browser()
            self.assertEqual(await b.login(self.viewer_creds), 303)
            code, text, headers = await b.get("/console/trends")
            self.assertEqual(code, 200)
            self.assertIn('href="/console/trends" aria-current="page"', text)
            self.assertNotIn(XSS, text)
            self.assertIn("Lab &lt;script&gt;", text)
            self.assertIn("1 agent(s) had no push", text)  # the quiet one
            # all agents, then this agent: 2 pushes, 1 failure, 1 waiting now
            for ident in ("fleet-trends", "trend-0"):
                desc = re.search(rf'id="{ident}-created-d">([^<]*)<', text)
                assert desc is not None
                self.assertIn("2 in all", desc.group(1))
                desc = re.search(rf'id="{ident}-failed-d">([^<]*)<', text)
                assert desc is not None
                self.assertIn("1 in all", desc.group(1))
                desc = re.search(rf'id="{ident}-depth-d">([^<]*)<', text)
                assert desc is not None
                self.assertIn("now 1,", desc.group(1))
            self.assertNotIn("DOE", text)  # no payload anywhere
            csp = headers.getRawHeaders("content-security-policy")[0]
            self.assertIn("default-src 'none'", csp)
            self.assertNotIn("style=", text)
            code, text, _ = await b.get(f"/console/agent/{self.agent['id']}")
            self.assertEqual(code, 200)
            self.assertIn('id="agent-trends"', text)
            self.assertIn("<svg", text)
            code, text, _ = await b.get(f"/console/agent/{self.other['id']}")
            self.assertIn('id="agent-trends-created-d">pushes received: 0 in all', text)

        return ensureDeferred(go())

    # -- bulk retry in the console ------------------------------------------------------

    def test_operator_retries_a_filtered_set_confirmed_counted_and_audited(self
                                                                         ) -> Deferred:
        async def go() -> None:
            mine = [await self.failed(f"BULK000{i}", name="SECRET^PATIENT") for i in range(3)]
            expired = await self.failed("BULK0009", state=j.EXPIRED)
            elsewhere = await self.failed("BULKX001", agent=self.other)
            delivered = await self.push("BULKD001")
            await self.relay.journal.transition(delivered, j.DELIVERED)
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            query = urlencode({"agent": self.agent["id"]})
            code, text, _ = await b.get(f"/console/messages?{query}")
            self.assertEqual(code, 200)
            self.assertIn("Retry all 4 failed matching this filter", text)
            link = re.search(r'id="bulk-retry" href="([^"]+)"', text)
            assert link is not None
            code, text, _ = await b.get(link.group(1).replace("&amp;", "&"))
            self.assertEqual(code, 200)
            self.assertIn('data-count="4"', text)
            self.assertIn("At most 500 per action", text)
            action = re.search(r'action="(/console/messages/retry[^"]*)"', text)
            assert action is not None
            code, text, _ = await b.post(action.group(1).replace("&amp;", "&"))
            self.assertEqual(code, 200, text)
            self.assertIn('data-retried="4" data-skipped="0"', text)
            self.assertNotIn("SECRET", text)
            for p in [*mine, expired]:
                got = await self.relay.journal.current(p.id)
                self.assertIn(got.state, j.OPEN_STATES)
                self.assertIsNone(got.expires_at)
            self.assertEqual((await self.relay.journal.get(elsewhere.id)).state, j.FAILED)
            self.assertEqual((await self.relay.journal.get(delivered.id)).state, j.DELIVERED)
            audits = await self.relay.store.search("AuditEvent", {"_count": ["100"]})
            retried = sorted(a["entity"][0]["what"]["identifier"]["value"] for a in audits)
            self.assertEqual(retried, sorted(p.id for p in [*mine, expired]))
            for a in audits:
                self.assertEqual(a["agent"][0]["who"]["reference"],
                                 f"ClientApplication/{self.operator_creds['clientId']}")
                self.assertNotIn("SECRET", json.dumps(a))
                self.assertNotIn("MSH", json.dumps(a))
            # nothing left to retry: no link, and the confirm step says so
            code, text, _ = await b.get(f"/console/messages?{query}")
            self.assertNotIn('id="bulk-retry"', text)
            code, text, _ = await b.get(f"/console/messages/retry?{query}")
            self.assertIn("No failed or expired message matches", text)
            # a state that cannot be retried
            code, text, _ = await b.post("/console/messages/retry?state=delivered")
            self.assertEqual(code, 400)

        return ensureDeferred(go())

    def test_the_cap_bounds_one_action_and_a_moved_push_is_skipped(self) -> Deferred:
        async def go() -> None:
            pushes = [await self.failed(f"CAP0000{i}") for i in range(3)]
            self.patch(bulk, "MAX_BULK_RETRY", 2)
            b = self.browser()
            self.assertEqual(await b.login(self.operator_creds), 303)
            code, text, _ = await b.get("/console/messages/retry?state=failed")
            self.assertIn("Only the newest 2 are retried by one action", text)
            self.assertIn("Retry 2 message(s)", text)
            code, text, _ = await b.post("/console/messages/retry?state=failed")
            self.assertIn('data-retried="2" data-skipped="0"', text)
            self.assertIn("1 left over the cap of 2", text)
            states = [(await self.relay.journal.current(p.id)).state for p in pushes]
            self.assertEqual(states[0], j.FAILED)  # the oldest waits for the next action
            # one that moves on between the search and its retry is skipped, not retried
            real = self.relay.pushes.retry
            moved: list[str] = []

            async def racing(principal: Principal, push_id: str) -> j.Push:
                if not moved:
                    moved.append(push_id)
                    live = await self.relay.journal.get(push_id)
                    await self.relay.journal.transition(live, j.DELIVERED)
                return await real(principal, push_id)

            self.patch(self.relay.pushes, "retry", racing)
            await self.failed("CAP00009")
            code, text, _ = await b.post("/console/messages/retry?state=failed")
            self.assertIn('data-retried="1" data-skipped="1"', text)
            self.assertIn("only failed or expired pushes can be retried", text)

        return ensureDeferred(go())

    def test_bulk_retry_attacks_are_refused(self) -> Deferred:
        async def go() -> None:
            push = await self.failed("ATTK0001")
            path = "/console/messages/retry?state=failed"
            viewer = self.browser()
            self.assertEqual(await viewer.login(self.viewer_creds), 303)
            code, text, _ = await viewer.get("/console/messages?state=failed")
            self.assertEqual(code, 200)
            self.assertNotIn("bulk-retry", text)
            self.assertEqual((await viewer.get(path))[0], 403)
            self.assertEqual((await viewer.post(path))[0], 403)
            operator = self.browser()
            self.assertEqual(await operator.login(self.operator_creds), 303)
            code, text, _ = await operator.post(path, csrf=False)
            self.assertEqual(code, 403)
            self.assertIn("security token", text)
            code, text, _ = await operator.post(path, {"csrf": "x" * 43}, csrf=False)
            self.assertEqual(code, 403)
            code, text, _ = await operator.post(path, origin="http://evil.example")
            self.assertEqual(code, 403)
            self.assertIn("another site", text)
            code, _, _ = await self.browser().post(path, {"csrf": operator.csrf or ""})
            self.assertEqual(code, 403)  # no session
            self.assertEqual((await self.relay.journal.current(push.id)).state, j.FAILED)
            self.assertEqual(await self.relay.store.search("AuditEvent", {}), [])

        return ensureDeferred(go())

    # -- POST AgentPush/$retry ----------------------------------------------------------

    def test_bulk_retry_route_by_role_bounded_and_answered_with_counts(self) -> Deferred:
        async def go() -> None:
            pushes = [await self.failed(f"HTTP000{i}") for i in range(3)]
            other = await self.failed("HTTPX001", agent=self.other)

            async def post(creds: dict[str, Any], query: str) -> tuple[int, Any]:
                token = await self.token(creds)
                r = await treq.post(f"{self.base}/fhir/R4/AgentPush/$retry?{query}",
                                    headers={"Authorization": [f"Bearer {token}"]},
                                    pool=self.pool)
                return r.code, await r.json()

            for creds in (self.viewer_creds, self.pusher_creds):
                code, doc = await post(creds, "state=failed")
                self.assertEqual((code, doc["resourceType"]), (403, "OperationOutcome"))
            for query in ("state=delivered", "nope=1", "_count=501", "_count=0",
                          "since=later"):
                code, doc = await post(self.operator_creds, query)
                self.assertEqual((code, doc["resourceType"]), (400, "OperationOutcome"),
                                 query)
            self.assertEqual((await self.relay.journal.get(pushes[0].id)).state, j.FAILED)
            code, doc = await post(self.operator_creds,
                                   urlencode({"agent": f"Agent/{self.agent['id']}",
                                              "_count": "2"}))
            self.assertEqual(code, 200)
            self.assertEqual((doc["matched"], doc["retried"], doc["skipped"],
                              doc["remaining"], doc["limit"]), (3, 2, 0, 1, 2))
            self.assertEqual([p["id"] for p in doc["pushes"]], [pushes[1].id, pushes[2].id])
            code, doc = await post(self.admin_creds, "")
            self.assertEqual((code, doc["matched"], doc["retried"]), (200, 2, 2))
            self.assertEqual((await self.relay.journal.current(other.id)).state, j.QUEUED)
            audits = await self.relay.store.search("AuditEvent", {"_count": ["100"]})
            self.assertEqual(len(audits), 4)
            self.assertIn("AgentPush/$retry", audits[0]["outcomeDesc"])

        return ensureDeferred(go())

    def test_bulk_retry_route_takes_the_console_s_filters_patient_and_dicom_uids(self
                                                                               ) -> Deferred:
        """The console's bulk retry of a messages search by patient id retries that
        patient's pushes; the same search over ``POST AgentPush/$retry`` was refused (400,
        an unknown filter): one set of filters for both."""

        async def go() -> None:
            theirs = await self.failed("PAT00001")
            result = await self.relay.pushes.push(
                self.admin, (self.agent["id"], None),
                {"destination": "mllp://127.0.0.1:9",
                 "contentType": "x-application/hl7-v2+er7",
                 "body": hl7("PAT00002").replace("12345^^^MRN", "777^^^MRN")})
            await self.relay.journal.transition(result.push, j.FAILED, error="AE")
            await self.relay.journal.flushed()
            token = await self.token(self.operator_creds)
            for query in ("patient_id=777", "patient_id=777&study_uid=1.2&sop_uid=1.2.3"):
                r = await treq.post(f"{self.base}/fhir/R4/AgentPush/$retry?{query}",
                                    headers={"Authorization": [f"Bearer {token}"]},
                                    pool=self.pool)
                doc = await r.json()
                self.assertEqual(r.code, 200, (query, doc))
                if "study_uid" in query:
                    self.assertEqual(doc["matched"], 0)
                else:
                    self.assertEqual((doc["matched"], doc["retried"]), (1, 1))
                    self.assertEqual([p["id"] for p in doc["pushes"]], [result.push.id])
            self.assertEqual((await self.relay.journal.current(theirs.id)).state, j.FAILED)
            self.assertEqual((await self.relay.journal.current(result.push.id)).state,
                             j.QUEUED)

        return ensureDeferred(go())


class BulkRetryCommand(TestCase, _CLI):
    """``medagent pushes retry --all`` (a real ``medagent`` process) against a relay."""

    timeout = 90

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.testcase = self
        self.relay, self.base, _ = procs.in_process_relay(self, "relay-cli-bulk-")
        auth = self.relay.authority
        self.admin_creds = await auth.create_client(ADMIN)
        self.operator_creds = await auth.create_client(OPERATOR)
        self.viewer_creds = await auth.create_client(VIEWER)
        self.admin = Principal(self.admin_creds["clientId"], ADMIN)
        self.agent = await self.relay.store.create({"resourceType": "Agent", "name": "Lab"})
        self.other = await self.relay.store.create({"resourceType": "Agent", "name": "Other"})

    async def failed(self, ctrl: str, agent: dict[str, Any]) -> j.Push:
        result = await self.relay.pushes.push(
            self.admin, (agent["id"], None),
            {"destination": "mllp://127.0.0.1:9", "contentType": "x-application/hl7-v2+er7",
             "body": hl7(ctrl)})
        await self.relay.journal.transition(result.push, j.FAILED, error="AE")
        await self.relay.journal.flushed()
        return result.push

    def as_(self, creds: dict[str, Any]) -> dict[str, str]:
        return {"MEDAGENT_CLIENT_ID": creds["clientId"],
                "MEDAGENT_CLIENT_SECRET": creds["clientSecret"]}

    def test_retry_all_with_filters_json_table_and_exit_codes(self) -> Deferred:
        async def go() -> None:
            mine = [await self.failed(f"CLIB000{i}", self.agent) for i in range(3)]
            theirs = await self.failed("CLIBX001", self.other)
            usage = await self.clis(["pushes", "retry"], ["pushes", "retry", "x", "--all"],
                                    ["pushes", "retry", "--all", "--limit", "0"],
                                    ["pushes", "retry", "--all", "--state", "delivered"])
            for proc in usage:
                self.assertEqual(proc.exit_code, 2, proc.text)
            viewer = await self.cli("pushes", "retry", "--all", env=self.as_(self.viewer_creds))
            self.assertEqual(viewer.exit_code, 1, viewer.text)
            self.assertIn("HTTP 403", viewer.text)
            self.assertEqual((await self.relay.journal.get(mine[0].id)).state, j.FAILED)
            # over the cap given: two retried, one left: exit 1 (not everything was retried)
            capped = await self.cli("pushes", "retry", "--all", "--agent", self.agent["id"],
                                    "--state", "failed", "--limit", "2", "--json",
                                    env=self.as_(self.operator_creds))
            self.assertEqual(capped.exit_code, 1, capped.text)
            doc = json.loads(capped.text)
            self.assertEqual((doc["matched"], doc["retried"], doc["skipped"],
                              doc["remaining"]), (3, 2, 0, 1))
            self.assertEqual([p["id"] for p in doc["pushes"]], [mine[1].id, mine[2].id])
            # the rest, as a table: exit 0
            rest = await self.cli("pushes", "retry", "--all", "--agent", self.agent["id"],
                                  env=self.as_(self.operator_creds))
            self.assertEqual(rest.exit_code, 0, rest.text)
            lines = rest.text.splitlines()
            self.assertEqual(lines[0].split(), ["ID", "RESULT", "REASON"])
            self.assertEqual(lines[1].split(), [mine[0].id, "retried", "-"])
            self.assertEqual(lines[-1], "# 1 matched: 1 retried, 0 skipped, 0 left")
            for p in mine:
                self.assertEqual((await self.relay.journal.current(p.id)).state, j.QUEUED)
            self.assertEqual((await self.relay.journal.get(theirs.id)).state, j.FAILED)
            audits = await self.relay.store.search("AuditEvent", {"_count": ["100"]})
            self.assertEqual(len(audits), 3)
            # nothing matches any more: 0 retried, exit 0
            none = await self.cli("pushes", "retry", "--all", "--agent", self.agent["id"],
                                  "--json")
            self.assertEqual((none.exit_code, json.loads(none.text)["matched"]), (0, 0),
                             none.text)

        return ensureDeferred(go())
