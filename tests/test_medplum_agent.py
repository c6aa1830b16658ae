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
from medagent.agent.dispatch import Dispatcher
from medagent.contenttypes import PING
from medagent.delivery import DeliveryError
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
        d = Dispatcher({}).dispatch("127.0.0.1", PING, "PING 1")
        err = self.failureResultOf(d, DeliveryError).value
        self.assertEqual((err.phase, err.transient), ("destination", False))
        self.assertIn("mllp://127.0.0.1:2575", err.reason)


# -- the real Medplum agent ------------------------------------------------------------------

ORDER = ("MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
         "PID|1||12345^^^MRN||DOE^JANE||19800101|F\rORC|NW|{ctrl}\rOBR|1|{ctrl}||GLU^Glucose")

#: python-hl7's MLLPClient as the device that sends to an inbound channel of the agent.
SEND = r"""
import sys
from hl7.client import MLLPClient
port, ctrl = int(sys.argv[1]), sys.argv[2]
msg = ("MSH|^~\\&|ADT1|HOSP|LIS|LAB|20240101120000||ADT^A01|" + ctrl + "|P|2.5.1"
       "\rPID|1||123^^^MRN||DOE^JOHN\r")
with MLLPClient("127.0.0.1", port) as c:
    c.socket.settimeout(15)
    ack = c.send_message(msg)
print("ACKS", ack.decode().replace("\r", "|CR|"), flush=True)
"""

ACK_BOT = "def handler(medplum, event):\n    return event.build_ack('AA', text='stored')\n"
FAILING_BOT = ("def handler(medplum, event):\n"
               "    raise ValueError('patient DOE^JOHN unknown')\n")

#: what Medplum's agent prints (DEBUG) for frames it gets from the relay
FROM_RELAY = 'Received from WebSocket: {\\"type\\":\\"'
READY = "Medplum service started successfully"


class MedplumAgent:
    """Medplum's own agent process (node), configured by agent.properties in its folder."""

    def __init__(self, testcase: Any, relay_url: str, creds: dict[str, Any],
                 agent_id: str) -> None:
        from tests.peerenv import need, need_program, peer_path

        self.node = need_program("node")
        self.script = peer_path("medplum-agent", "agent.cjs")
        self.shim = peer_path("medplum-agent", "loopback-listen.cjs")
        need(os.path.isfile(self.script) and os.path.isfile(self.shim),
             "Medplum agent bundle (medplum-agent/agent.cjs)")
        self.testcase = testcase
        self.cwd = tempfile.mkdtemp(prefix="medplum-agent-")
        testcase.addCleanup(shutil.rmtree, self.cwd, True)
        with open(os.path.join(self.cwd, "agent.properties"), "w", encoding="utf-8") as f:
            f.write(f"baseUrl={relay_url}\nclientId={creds['clientId']}\n"
                    f"clientSecret={creds['clientSecret']}\nagentId={agent_id}\n"
                    "logLevel=DEBUG\nlogger.main.logDir=./logs\nlogger.channel.logDir=./logs\n")
        self.proc: procs.Proc | None = None

    async def start(self) -> procs.Proc:
        # its pid file lives in os.tmpdir(): one of its own, so no other run's agent counts
        self.proc = procs.spawn(self.testcase, "medplum-agent",
                                [self.node, "-r", self.shim, self.script], cwd=self.cwd,
                                env={"TMPDIR": self.cwd})
        await self.proc.wait_for(READY, timeout=40)
        return self.proc

    def count(self, needle: str) -> int:
        return self.proc.count(needle) if self.proc is not None else 0


class RealMedplumAgent(TestCase):
    """Medplum's agent v5.0.10 against a real ``twistd medagent-relay``, a python-hl7 device."""

    timeout = 180

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.admin = await procs.relay_with_admin(self)
        self.mllp_port = procs.free_port()
        self.device_proc = procs.python(
            self, "python-hl7-server",
            [os.path.join(procs.ROOT, "tests", "peers", "hl7", "pyhl7_server.py"),
             str(self.mllp_port)])
        await self.device_proc.wait_for("MLLP server on", timeout=20)
        self.device = await self.admin.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.mllp_port}"})
        self.bots = {name: await self.admin.create({"resourceType": "Bot", "name": name,
                                                    "code": code})
                     for name, code in (("ack", ACK_BOT), ("failing", FAILING_BOT))}
        self.channel_ports: dict[str, int] = {}
        self.agent = await self.admin.create({"resourceType": "Agent", "name": "Medplum agent",
                                              "status": "active",
                                              "channel": [await self.channel("ack")]})
        creds = self.relay.create_client("agent", [self.agent["id"]])
        self.medplum = MedplumAgent(self, self.relay.url, creds, self.agent["id"])

    async def channel(self, bot: str) -> dict[str, Any]:
        port = self.channel_ports[bot] = procs.free_port()
        endpoint = await self.admin.create({"resourceType": "Endpoint", "status": "active",
                                            "address": f"mllp://127.0.0.1:{port}"})
        return {"name": f"adt-{bot}", "endpoint": {"reference": f"Endpoint/{endpoint['id']}"},
                "targetReference": {"reference": f"Bot/{self.bots[bot]['id']}"}}

    async def op(self, path: str) -> Any:
        return await self.admin.request_json("GET", f"/fhir/R4/Agent/{path}")

    async def status(self) -> dict[str, Any]:
        params = await self.op(f"{self.agent['id']}/$status")
        return {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
                for p in params["parameter"]}

    async def wait_status(self, want: str, timeout: float = 30) -> None:
        async def reached() -> bool:
            return (await self.status())["status"] == want

        await procs.wait_until(reached, timeout=timeout, interval=0.2, what=f"agent {want}")

    async def push(self, ctrl: str, wait: bool = True) -> Any:
        return await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                              ORDER.format(ctrl=ctrl), HL7, wait)

    async def wait_delivered(self, accepted: dict[str, Any], timeout: float = 30) -> Any:
        path = accepted["issue"][0]["diagnostics"].split(self.relay.url, 1)[1]

        async def delivered() -> Any:
            doc = await self.admin.request_json("GET", path)
            self.assertNotIn(doc["state"], ("failed", "expired"), doc)
            return doc if doc["state"] == "delivered" else None

        return await procs.wait_until(delivered, timeout=timeout, interval=0.2,
                                      what="push delivered")

    async def send_inbound(self, bot: str, ctrl: str) -> str:
        proc = procs.python(self, "mllp-client",
                            ["-c", SEND, str(self.channel_ports[bot]), ctrl])
        await proc.wait_for("ACKS", timeout=30)
        return proc.text.replace("|CR|", "\r")

    def test_connected_for_a_minute_serving_everything(self) -> Deferred:
        """
        Connects, exchanges heartbeats both ways and stays on one connection for a minute,
        while it serves pushes, a ping, its inbound channel and every agent operation.
        """
        async def go() -> None:
            started = reactor.seconds()
            await self.medplum.start()
            await self.wait_status("connected")
            # $push, waited and not waited, to python-hl7
            ack = await self.push("MPW00001")
            self.assertIn("MSA|AA|MPW00001", ack)
            accepted = await self.push("MPN00001", wait=False)
            doc = await self.wait_delivered(accepted)
            self.assertIn("MSA|AA|MPN00001", doc["reply"]["body"])
            # ping the way Medplum's CLI does: a bare host; its agent runs the OS ping
            pong = await self.admin.push_to_agent(self.agent, "127.0.0.1", "PING 1", PING, True)
            self.assertIn("1 packets transmitted, 1 received", pong)
            # device -> channel -> Bot -> ACK
            out = await self.send_inbound("ack", "INAA0001")
            self.assertIn("MSA|AA|INAA0001|stored", out)
            # $reload-config: a second channel, whose Bot fails: the device gets an AE
            agent = await self.admin.request_json("GET", f"/fhir/R4/Agent/{self.agent['id']}")
            agent["channel"].append(await self.channel("failing"))
            await self.admin.update(agent)
            outcome = await self.op(f"{self.agent['id']}/$reload-config")
            self.assertEqual(outcome["id"], "ok")
            out = await self.send_inbound("failing", "INAE0001")
            self.assertIn("MSA|AE|INAE0001|", out)
            self.assertNotIn("DOE^JOHN unknown", out)
            audits = await self.admin.request_json("GET", "/fhir/R4/AuditEvent?_count=100")
            outcomes = sorted(e["resource"]["outcome"] for e in audits["entry"])
            self.assertEqual(outcomes, ["0", "4"])  # the failure is on record
            # type-level forms, as @medplum/cli calls them
            bundle = await self.op(f"$reload-config?_id={self.agent['id']}")
            [entry] = bundle["entry"]
            self.assertEqual(entry["resource"]["parameter"][1]["resource"]["id"], "ok")
            bundle = await self.op(f"$bulk-status?_id={self.agent['id']}")
            status = bundle["entry"][0]["resource"]["parameter"][1]["resource"]["parameter"]
            self.assertEqual(status[0], {"name": "status", "valueCode": "connected"})
            logs = await self.op(f"{self.agent['id']}/$fetch-logs?limit=5")
            lines = logs["parameter"][0]["valueString"].split("\n")
            self.assertEqual(len(lines), 5)
            self.assertIn("msg", json.loads(lines[0]))
            stats = await self.op(f"{self.agent['id']}/$stats")
            stats = json.loads(stats["parameter"][0]["valueString"])
            self.assertEqual(stats["relay"]["delivered"], 3)  # two pushes and the ping
            self.assertIsNone(stats["agent"])  # 5.0.10 has no agent:stats
            self.assertIn("agentUnavailable", stats)
            # the rest of the minute: heartbeats keep it on the same connection
            left = 62 - (reactor.seconds() - started)
            if left > 0:
                from twisted.internet.task import deferLater
                await deferLater(reactor, left, lambda: None)
            status = await self.status()
            self.assertEqual(status["status"], "connected")
            self.assertTrue(status["version"].startswith("5.0.10"), status)  # its heartbeats
            self.assertGreaterEqual(self.medplum.count(FROM_RELAY + 'agent:heartbeat:request'), 5)
            self.assertGreaterEqual(
                self.medplum.count(FROM_RELAY + 'agent:heartbeat:response'), 5)
            self.assertEqual(self.medplum.count("Successfully connected to Medplum server"), 1)
            self.assertEqual(self.relay.proc.count(f"Agent/{self.agent['id']} connected from"), 1)
            self.assertEqual(self.device_proc.count("RECV from"), 2)

        return ensureDeferred(go())

    def test_push_queued_while_agent_down_is_delivered_once(self) -> Deferred:
        async def go() -> None:
            accepted = await self.push("MPQ00001", wait=False)
            await self.medplum.start()
            doc = await self.wait_delivered(accepted)
            self.assertIn("MSA|AA|MPQ00001", doc["reply"]["body"])
            ack = await self.push("MPQ00002")  # after it: the first was not sent again
            self.assertIn("MSA|AA|MPQ00002", ack)
            self.assertEqual(self.device_proc.count("MPQ00001|P"), 1)

        return ensureDeferred(go())

    def test_agent_kill_and_relay_restart(self) -> Deferred:
        async def go() -> None:
            await self.medplum.start()
            await self.wait_status("connected")
            self.assertIn("MSA|AA|MPK00001", await self.push("MPK00001"))
            # kill -9: the relay sees the socket close; a new process connects and serves
            first = self.medplum.proc
            first.signal(signal.SIGKILL)
            await first.ended
            await self.wait_status("disconnected")
            await self.medplum.start()
            await self.wait_status("connected")
            self.assertIn("MSA|AA|MPK00002", await self.push("MPK00002"))
            # relay restart on the same data and port: the agent reconnects by itself
            await self.relay.stop()
            await self.relay.start()
            await self.wait_status("connected", timeout=40)
            self.assertIn("MSA|AA|MPK00003", await self.push("MPK00003"))
            self.assertIsNone(self.medplum.proc.exit_code)
            self.assertEqual(self.device_proc.count("RECV from"), 3)

        return ensureDeferred(go())
