"""
The console on two ``twistd medagent-relay`` nodes sharing one PostgreSQL database
(L{tests.pgenv}), the agent held by node A: node B's fleet page shows the agent online on
node A, and node B finds node A's delivered push by MSH-10 (the journal is shared; the
MSH-10 index is PostgreSQL migration 5).
"""

from __future__ import annotations

import re
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.client import HTTPConnectionPool

from tests import procs
from tests.test_console import Browser, open_stream
from tests.test_e2e import hl7
from tests.test_postgres_relay import _TwoNodes


class ConsoleOnTwoNodes(_TwoNodes):
    def test_fleet_and_search_on_the_node_without_the_agent(self) -> Deferred:
        async def go() -> None:
            agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
            creds = await self.create_client("agent", [agent["id"]])
            viewer = await self.create_client("viewer")
            node_b = await self.node_b()
            procs.agent_process(self, self.relay.url, creds, agent["id"],
                                ["--data", tempfile.mkdtemp(prefix="agent-a-")])
            await self.relay.proc.wait_for(f"Agent/{agent['id']} connected", timeout=30)
            accepted = await self.admin.push_to_agent(
                agent, f"mllp://127.0.0.1:{self.mllp_port}", hl7("CLUSTER01"),
                "x-application/hl7-v2+er7")
            push_id = accepted["issue"][0]["diagnostics"].rsplit("/", 1)[1]

            async def delivered() -> bool:
                doc = await self.admin.request_json("GET", f"/fhir/R4/AgentPush/{push_id}")
                return doc["state"] == "delivered"

            await procs.wait_until(delivered, timeout=30, what="push delivered")

            pool = HTTPConnectionPool(reactor)
            self.addCleanup(pool.closeCachedConnections)
            b = Browser(self, node_b.url, pool)
            self.assertEqual(await b.login(viewer), 303)
            code, text, _ = await b.get("/console/fleet")
            self.assertEqual(code, 200)
            row = re.search(rf'<tr id="agent-{agent["id"]}".*?</tr>', text, re.S)
            assert row is not None
            self.assertIn(">online<", row.group(0))
            self.assertNotIn("node-b", row.group(0))  # held by node A, named as such
            code, text, _ = await b.get(f"/console/agent/{agent['id']}")
            self.assertEqual(code, 200)
            self.assertIn(f"mllp://127.0.0.1:{self.mllp_port}", text)  # its lane
            code, text, _ = await b.get("/console/messages?control_id=CLUSTER01")
            self.assertEqual(code, 200)
            self.assertEqual(text.count('<tr id="push-'), 1)
            self.assertIn(f'id="push-{push_id}"', text)
            self.assertIn(">delivered<", text)

        return ensureDeferred(go())

    def test_a_sign_in_holds_on_every_node_and_a_sign_out_ends_it_everywhere(self
                                                                            ) -> Deferred:
        async def go() -> None:
            operator = await self.create_client("operator")
            node_b = await self.node_b()
            pool = HTTPConnectionPool(reactor)
            self.addCleanup(pool.closeCachedConnections)
            on_b = Browser(self, node_b.url, pool)
            self.assertEqual(await on_b.login(operator), 303)
            on_a = Browser(self, self.relay.url, pool)
            on_a.cookie = on_b.cookie  # the balancer sends the next request to node A
            code, text, _ = await on_a.get("/console/fleet")
            self.assertEqual(code, 200)
            self.assertEqual(on_a.csrf, on_b.csrf)  # one session, one CSRF token
            code, _, _ = await on_a.get("/console/messages")
            self.assertEqual(code, 200)
            code, _, headers = await on_a.post("/console/logout")
            self.assertEqual(code, 303)

            async def signed_out_on_b() -> bool:
                code, _, headers = await on_b.get("/console/fleet")
                return code == 303 and headers.getRawHeaders("location") == [
                    "/console/login"]

            await procs.wait_until(signed_out_on_b, timeout=15, what="sign-out on node B")
            on_a.cookie = on_b.cookie = None
            self.assertEqual(await on_a.login(operator), 303)

        return ensureDeferred(go())

    def test_a_stream_on_one_node_sees_agents_come_and_go_on_the_other(self) -> Deferred:
        async def go() -> None:
            agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
            creds = await self.create_client("agent", [agent["id"]])
            viewer = await self.create_client("viewer")
            node_b = await self.node_b()
            pool = HTTPConnectionPool(reactor)
            self.addCleanup(pool.closeCachedConnections)
            b = Browser(self, node_b.url, pool)
            self.assertEqual(await b.login(viewer), 303)
            stream = await open_stream(self, node_b.url, b.cookie)
            await stream.wait_for(b"event: sessions")
            proc = procs.agent_process(self, self.relay.url, creds, agent["id"],
                                       ["--data", tempfile.mkdtemp(prefix="agent-a-")])
            await self.relay.proc.wait_for(f"Agent/{agent['id']} connected", timeout=30)
            online = f'"agent":"{agent["id"]}","connected":true'.encode()
            await stream.wait_for(online, timeout=20)  # node A holds it; told at node B
            await proc.stop()
            offline = f'"agent":"{agent["id"]}","connected":false'.encode()
            await stream.wait_for(offline, timeout=30)

        return ensureDeferred(go())

