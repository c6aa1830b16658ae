"""
Medplum compatibility of the agent operations and the inbound answer path.

``MedplumForms``: the forms Medplum's server, agent and CLI use, against an in-process relay
over real HTTP, with a scripted agent socket (so each test decides what the agent answers).
``RealMedplumAgent``: Medplum's own agent (v5.0.10, node) against a real ``twistd`` relay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from typing import Any, Callable

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from medagent import wire
from medagent.agent.dispatch import PING, DeliveryError, Dispatcher
from medagent.relay.service import RelayService
from tests import procs
from tests.test_hub import FakeConnection

HL7 = "x-application/hl7-v2+er7"


class ScriptedConnection(FakeConnection):
    """An agent socket whose answers a test scripts: C{answers[type](message)} -> reply."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {}
        self.feed: Callable[[Any], None] = lambda frame: None

    def send_message(self, message: Any) -> None:
        super().send_message(message)
        sent = self.sent[-1]
        answer = self.answers.get(sent["type"])
        if answer is not None:
            reply = answer(sent)
            if reply is not None:
                reactor.callLater(0, self.feed, wire.encode(reply))


class MedplumForms(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        port = procs.free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.relay = RelayService(reactor, data_dir=tempfile.mkdtemp(prefix="relay-mp-"),
                                  listen=f"tcp:{port}:interface=127.0.0.1", bot_workers=1)
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        self.relay.hub.request_timeout = 0.5
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        admin = await self.relay.authority.create_client("admin")
        self.token = (await self.relay.authority.issue_token(
            admin["clientId"], admin["clientSecret"]))["access_token"]
        self.agents = [await self.relay.store.create(
            {"resourceType": "Agent", "name": f"site {n}", "status": "active"}) for n in "ab"]
        self.conns = [await self.connect(a) for a in self.agents]

    async def connect(self, agent: dict[str, Any]) -> ScriptedConnection:
        creds = await self.relay.authority.create_client("agent", [agent["id"]])
        token = (await self.relay.authority.issue_token(creds["clientId"],
                                                        creds["clientSecret"]))["access_token"]
        conn = ScriptedConnection()
        session = self.relay.hub.connection_made(conn)
        conn.feed = lambda frame: self.relay.hub.frame_received(session, frame)
        self.addCleanup(self.relay.hub.connection_lost, session)
        conn.feed(wire.encode({"type": wire.CONNECT_REQUEST, "accessToken": token,
                               "agentId": agent["id"]}))
        await procs.wait_until(lambda: conn.of_type(wire.CONNECT_RESPONSE), timeout=10,
                               what="connect response")
        return conn

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        r = await treq.request(
            method, self.base + path, pool=self.pool,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": [f"Bearer {self.token}"],
                     "Content-Type": ["application/fhir+json"]})
        content = await r.content()
        try:
            return r.code, json.loads(content)
        except ValueError:
            return r.code, content.decode("utf-8", "replace")

    @staticmethod
    def entries(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """agent id -> result resource of a bulk operation's Bundle."""
        out = {}
        for entry in bundle["entry"]:
            params = {p["name"]: p["resource"] for p in entry["resource"]["parameter"]}
            out[params["agent"]["id"]] = params["result"]
        return out

    def test_ping_to_a_bare_host_is_forwarded_unchanged(self) -> Deferred:
        async def go() -> None:
            agent, conn = self.agents[0], self.conns[0]
            conn.answers[wire.TRANSMIT_REQUEST] = lambda m: {
                "type": wire.TRANSMIT_RESPONSE, "callback": m["callback"], "remote": m["remote"],
                "contentType": PING, "statusCode": 200, "body": "PING ok"}
            for host in ("127.0.0.1", "lab-analyzer.local"):
                code, body = await self.call("POST", f"/fhir/R4/Agent/{agent['id']}/$push", {
                    "destination": host, "contentType": PING, "body": "PING 1",
                    "waitForResponse": True})
                self.assertEqual((code, body), (200, "PING ok"), host)
                self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST)[-1]["remote"], host)
            for bad in ("::1", "a b", "-x.local", "999.1.1.1"):
                code, body = await self.call("POST", f"/fhir/R4/Agent/{agent['id']}/$push", {
                    "destination": bad, "contentType": PING, "body": "PING 1",
                    "waitForResponse": True})
                self.assertEqual(code, 400, bad)
            # a bare host is a ping's destination only
            code, _ = await self.call("POST", f"/fhir/R4/Agent/{agent['id']}/$push", {
                "destination": "127.0.0.1", "contentType": HL7, "body": "MSH|^~\\&|A|B|C|D|||"
                "ADT^A01|X1|P|2.5", "waitForResponse": True})
            self.assertEqual(code, 404)
            self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 2)

        return ensureDeferred(go())

    def test_type_level_operations_with_a_search(self) -> Deferred:
        async def go() -> None:
            (a, b), (ca, cb) = self.agents, self.conns
            ca.answers[wire.RELOADCONFIG_REQUEST] = lambda m: {
                "type": wire.RELOADCONFIG_RESPONSE, "callback": m["callback"], "statusCode": 200}
            cb.answers[wire.RELOADCONFIG_REQUEST] = lambda m: {
                "type": wire.ERROR, "callback": m["callback"], "body": "Invalid agent config"}
            for conn in (ca, cb):
                conn.answers[wire.LOGS_REQUEST] = lambda m: {
                    "type": wire.LOGS_RESPONSE, "callback": m["callback"], "statusCode": 200,
                    "logs": [{"level": "INFO", "msg": "hello"}] * m["limit"]}
            ids = f"{a['id']},{b['id']}"
            code, bundle = await self.call("GET", f"/fhir/R4/Agent/$reload-config?_id={ids}")
            self.assertEqual((code, bundle["resourceType"], bundle["type"]),
                             (200, "Bundle", "collection"))
            results = self.entries(bundle)
            self.assertEqual(results[a["id"]]["resourceType"], "OperationOutcome")
            self.assertEqual(results[a["id"]]["id"], "ok")
            self.assertEqual(results[b["id"]]["issue"][0]["details"]["text"],
                             "Invalid agent config")
            code, bundle = await self.call("GET", f"/fhir/R4/Agent/$fetch-logs?_id={a['id']}"
                                                  "&limit=3")
            logs = self.entries(bundle)[a["id"]]["parameter"][0]["valueString"].split("\n")
            self.assertEqual((code, len(logs)), (200, 3))
            for op in ("$status", "$bulk-status"):
                code, bundle = await self.call("GET", f"/fhir/R4/Agent/{op}?name=site")
                results = self.entries(bundle)
                self.assertEqual(sorted(results), sorted([a["id"], b["id"]]), op)
                self.assertEqual(results[a["id"]]["parameter"][0],
                                 {"name": "status", "valueCode": "connected"})
            code, bundle = await self.call("GET", f"/fhir/R4/Agent/$stats?_id={a['id']}")
            self.assertEqual(list(self.entries(bundle)), [a["id"]])
            code, bundle = await self.call("GET", "/fhir/R4/Agent/$status?name=nobody")
            self.assertEqual((code, bundle["entry"]), (200, []))
            code, _ = await self.call("GET", "/fhir/R4/Agent/$reload-config?_count=101")
            self.assertEqual(code, 400)
            # instance level and ?identifier= alone still name one agent
            code, outcome = await self.call("GET", f"/fhir/R4/Agent/{a['id']}/$reload-config")
            self.assertEqual((code, outcome["id"]), (200, "ok"))

        return ensureDeferred(go())

    def test_stats_of_an_agent_without_agent_stats(self) -> Deferred:
        """Medplum's agent 5.0.10 never answers agent:stats: the relay's counts still come."""
        async def go() -> None:
            agent = self.agents[0]
            code, params = await self.call("GET", f"/fhir/R4/Agent/{agent['id']}/$stats")
            self.assertEqual(code, 200, params)
            stats = json.loads(params["parameter"][0]["valueString"])
            self.assertIn("queued", stats["relay"])
            self.assertIsNone(stats["agent"])
            self.assertIn("did not answer", stats["agentUnavailable"])
            self.conns[0].answers[wire.STATS_REQUEST] = lambda m: {
                "type": wire.STATS_RESPONSE, "callback": m["callback"], "statusCode": 200,
                "stats": {"live": True}}
            code, params = await self.call("GET", f"/fhir/R4/Agent/{agent['id']}/$stats")
            stats = json.loads(params["parameter"][0]["valueString"])
            self.assertEqual((code, stats["agent"]), (200, {"live": True}))
            self.assertNotIn("agentUnavailable", stats)

        return ensureDeferred(go())


class OurAgentPing(SynchronousTestCase):
    def test_bare_host_ping_says_it_needs_a_port(self) -> None:
        d = Dispatcher(reactor, {}).dispatch("127.0.0.1", PING, "PING 1")
        err = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((err.phase, err.transient), ("destination", False))
        self.assertIn("mllp://127.0.0.1:2575", err.reason)
