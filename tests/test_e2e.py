"""
End to end on loopback: real ``twistd`` relay and agent processes, a real third-party MLLP
listener (python-hl7's ``hl7.mllp`` server), pushes over HTTP by hand, with our Python client
and with the real ``@medplum/core`` client.
"""

from __future__ import annotations

import json
import os
import tempfile

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase

from medagent.client import MedagentClient, RelayError
from tests import procs
from tests.peerenv import FIXTURES, need_node_module

HL7_TEMPLATE = (
    "MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
    "PID|1||12345^^^MRN||DOE^JANE||19800101|F\r"
    "ORC|NW|{ctrl}\rOBR|1|{ctrl}||GLU^Glucose"
)


def hl7(ctrl: str) -> str:
    return HL7_TEMPLATE.format(ctrl=ctrl)


class _Proxy(portforward.ProxyFactory):
    """A TCP proxy we can cut, to kill the agent's websocket without killing the agent."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.servers: list[portforward.ProxyServer] = []

    def buildProtocol(self, addr):  # noqa: N802 (Twisted name)
        p = super().buildProtocol(addr)
        self.servers.append(p)
        return p

    def cut(self) -> int:
        n = 0
        for p in self.servers:
            if p.transport is not None and p.transport.connected:
                p.transport.abortConnection()
                n += 1
        self.servers = []
        return n


class EndToEnd(TestCase):
    timeout = 120

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.admin = await procs.relay_with_admin(self)
        self.agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                              "status": "active"})
        self.agent_creds = self.relay.create_client("agent", [self.agent["id"]])
        self.mllp_port = procs.free_port()
        self.device_proc = procs.python(
            self, "python-hl7-server",
            [os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.mllp_port)])
        await self.device_proc.wait_for("MLLP server on", timeout=20)
        self.device = await self.admin.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.mllp_port}"})
        # the Agent serves this Device: pushers may push to it (only the Agent's Devices)
        self.agent = await self.admin.update(
            {**self.agent, "device": {"reference": f"Device/{self.device['id']}"}})

    async def start_agent(self, relay_url: str | None = None) -> procs.Proc:
        proc = procs.agent_process(self, relay_url or self.relay.url, self.agent_creds,
                                   self.agent["id"])
        await self.wait_connected()
        return proc

    async def status(self) -> str:
        params = await self.admin.request_json("GET", f"/fhir/R4/Agent/{self.agent['id']}/$status")
        return params["parameter"][0]["valueCode"]

    async def wait_connected(self) -> None:
        async def connected() -> bool:
            return (await self.status()) == "connected"

        await procs.wait_until(connected, timeout=30, interval=0.1, what="agent connected")

    def test_curl_like_push_returns_device_ack(self) -> Deferred:
        async def go() -> None:
            await self.start_agent()
            token = await self.admin.access_token()
            body = {"destination": f"Device/{self.device['id']}",
                    "contentType": "x-application/hl7-v2+er7", "body": hl7("CURL0001"),
                    "waitForResponse": True}
            response = await treq.post(
                f"{self.relay.url}/fhir/R4/Agent/{self.agent['id']}/$push",
                data=json.dumps(body).encode(),
                headers={"Content-Type": ["application/json"],
                         "Authorization": [f"Bearer {token}"]},
                pool=self.admin.pool,
            )
            text = (await response.content()).decode()
            self.assertEqual(response.code, 200, text)
            self.assertIn("x-application/hl7-v2+er7",
                          response.headers.getRawHeaders("content-type")[0])
            self.assertIn("MSA|AA|CURL0001", text)
            # The device got exactly the bytes pushed, once.
            await self.device_proc.wait_for("CURL0001", timeout=5)
            self.assertEqual(self.device_proc.count("RECV from"), 1)
            self.assertIn(hl7("CURL0001").replace("\r", "\\r"), self.device_proc.text)

        return ensureDeferred(go())

    def test_python_client_waited_and_queued(self) -> Deferred:
        async def go() -> None:
            await self.start_agent()
            pusher = self.relay.create_client("pusher", [self.agent["id"]])
            client = MedagentClient(reactor, self.relay.url, pusher["clientId"],
                                    pusher["clientSecret"])
            self.addCleanup(client.close)
            ack = await client.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                             hl7("PY000001"), "x-application/hl7-v2+er7", True)
            self.assertIn("MSA|AA|PY000001", ack)
            accepted = await client.push_to_agent({"reference": f"Agent/{self.agent['id']}"},
                                                  {"reference": f"Device/{self.device['id']}"},
                                                  hl7("PY000002"), "x-application/hl7-v2+er7")
            status_url = accepted["issue"][0]["diagnostics"]
            path = status_url.split(self.relay.url, 1)[1]

            async def delivered():
                doc = await client.request_json("GET", path)
                return doc if doc["state"] == "delivered" else None

            doc = await procs.wait_until(delivered, timeout=15, what="push delivered")
            self.assertIn("MSA|AA|PY000002", doc["reply"]["body"])
            # A repeat of the same MSH-10 to the same device is answered from the journal.
            again = await client.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                               hl7("PY000001"), "x-application/hl7-v2+er7", True)
            self.assertIn("MSA|AA|PY000001", again)
            self.assertEqual(self.device_proc.count("PY000001|P"), 1)
            # A pusher for other agents is refused.
            stranger = self.relay.create_client("pusher", ["someone-else"])
            other = MedagentClient(reactor, self.relay.url, stranger["clientId"],
                                   stranger["clientSecret"])
            self.addCleanup(other.close)
            with self.assertRaises(RelayError) as e:
                await other.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                          hl7("PY000003"), "x-application/hl7-v2+er7", True)
            self.assertEqual(e.exception.status, 403)

        return ensureDeferred(go())

    def test_medplum_core_client(self) -> Deferred:
        node_modules = need_node_module("@medplum/core")

        async def go() -> None:
            await self.start_agent()
            token = await self.admin.access_token()
            body_file = tempfile.NamedTemporaryFile("w", suffix=".hl7", delete=False)
            body_file.write(hl7("MEDPLUM1"))
            body_file.close()
            self.addCleanup(os.unlink, body_file.name)
            proc = procs.spawn(
                self, "medplum-core",
                ["/usr/bin/env", "node", os.path.join(FIXTURES, "node", "medplum_push.js"),
                 self.relay.url + "/", token, self.agent["id"], f"Device/{self.device['id']}",
                 body_file.name, "true"],
                env={"NODE_PATH": node_modules},
            )
            await proc.wait_for("RESULT", timeout=30)
            self.assertIn("MSA|AA|MEDPLUM1", proc.text)
            self.assertEqual(self.device_proc.count("MEDPLUM1|P"), 1)

        return ensureDeferred(go())

    def test_websocket_cut_reconnects(self) -> Deferred:
        async def go() -> None:
            proxy = _Proxy("127.0.0.1", self.relay.port)
            port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            proxy_url = f"http://127.0.0.1:{port.getHost().port}"
            agent = await self.start_agent(proxy_url)
            ack = await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                                 hl7("CUT00001"), "x-application/hl7-v2+er7",
                                                 True)
            self.assertIn("MSA|AA|CUT00001", ack)
            self.assertGreaterEqual(proxy.cut(), 1)

            async def disconnected() -> bool:
                return (await self.status()) != "connected"

            await procs.wait_until(disconnected, timeout=10, what="relay saw the cut")
            await self.wait_connected()  # by itself, through the backoff policy
            ack = await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                                 hl7("CUT00002"), "x-application/hl7-v2+er7",
                                                 True)
            self.assertIn("MSA|AA|CUT00002", ack)
            self.assertIn("Lost the relay connection", agent.text)
            self.assertEqual(self.device_proc.count("RECV from"), 2)

        return ensureDeferred(go())

    def test_device_down_and_unknown_things(self) -> Deferred:
        async def go() -> None:
            await self.start_agent()
            dead_port = procs.free_port()
            dead = await self.admin.create(
                {"resourceType": "Device",
                 "url": f"mllp://127.0.0.1:{dead_port}?maxAttempts=2"})
            # The first attempt fails: the waited caller gets 502 at once, the push is retried
            # and ends failed after the destination's maxAttempts, visibly.
            with self.assertRaises(RelayError) as e:
                await self.admin.push_to_agent(self.agent, f"Device/{dead['id']}",
                                               hl7("DEAD0001"), "x-application/hl7-v2+er7", True)
            self.assertEqual(e.exception.status, 502)
            self.assertIn("is retried", str(e.exception))
            status_path = "/fhir/R4/AgentPush/" + e.exception.headers[
                "content-location"].rstrip("/").rsplit("/", 1)[1]

            async def gave_up() -> bool:
                doc = await self.admin.request_json("GET", status_path)
                return doc["state"] == "failed" and "gave up after 2 attempts" in doc["error"]

            await procs.wait_until(gave_up, timeout=30, interval=0.2, what="gave up")
            # Without a limit the agent keeps retrying: 502 at once too, and the push stays
            # accepted (delivered when the device comes back).
            forever = await self.admin.create(
                {"resourceType": "Device", "url": f"mllp://127.0.0.1:{dead_port}"})
            with self.assertRaises(RelayError) as e:
                await self.admin.push_to_agent(self.agent, f"Device/{forever['id']}",
                                               hl7("DEAD0002"), "x-application/hl7-v2+er7", True,
                                               wait_timeout=20_000)
            self.assertEqual(e.exception.status, 502)
            self.assertIn("retrying", str(e.exception))
            # The agent keeps serving the good device.
            ack = await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                                 hl7("GOOD0001"), "x-application/hl7-v2+er7",
                                                 True)
            self.assertIn("MSA|AA|GOOD0001", ack)
            with self.assertRaises(RelayError) as e:
                await self.admin.push_to_agent("no-such-agent", f"Device/{self.device['id']}",
                                               hl7("X"), "x-application/hl7-v2+er7", True)
            self.assertEqual(e.exception.status, 404)
            with self.assertRaises(RelayError) as e:
                await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                               "PID|1||no-msh", "x-application/hl7-v2+er7", True)
            self.assertEqual(e.exception.status, 400)
            ping = await self.admin.push_to_agent(self.agent, f"Device/{self.device['id']}",
                                                  "PING", "x-application/ping", True)
            self.assertIn("connected in", ping)

        return ensureDeferred(go())
