"""
A real ``twistd medagent-relay --database postgresql://...`` (L{tests.pgenv}'s throwaway
cluster, loopback), a real agent process and a real third-party MLLP listener (python-hl7):
a push journaled in PostgreSQL while the agent is away is delivered once it connects, and
the relay keeps no SQLite file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from medagent.client import MedagentClient
from medagent.relay.auth import Authority, load_or_create_key
from medagent.storage.postgres import MIGRATIONS, PgClientRegistry, PgDatabase
from tests import pgenv, procs
from tests.peerenv import FIXTURES
from tests.test_e2e import hl7


class RelayOnPostgres(TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._setUp())

    def create_client(self, role: str, agents: list[str] = ()) -> Deferred[dict[str, Any]]:
        """A client in the relay's PostgreSQL registry (on a thread: it blocks)."""

        def make() -> dict[str, Any]:
            db = PgDatabase(reactor, self.dsn, migrations=MIGRATIONS)
            key = load_or_create_key(os.path.join(self.data_dir, "token.key"))
            return Authority(PgClientRegistry(db), key).create_client_sync(role, list(agents))

        return deferToThread(make)

    async def _setUp(self) -> None:
        self.dsn = await deferToThread(pgenv.fresh_database, "medagent_relay_e2e")
        self.data_dir = tempfile.mkdtemp(prefix="medagent-relay-pg-")
        admin = await self.create_client("admin")
        self.relay = procs.RelayFixture(self, self.data_dir)
        await self.relay.start(["--database", self.dsn])
        self.admin = MedagentClient(reactor, self.relay.url, admin["clientId"],
                                    admin["clientSecret"])
        self.addCleanup(self.admin.close)
        self.mllp_port = procs.free_port()
        self.device_proc = procs.python(
            self, "python-hl7-server",
            [os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(self.mllp_port)])
        await self.device_proc.wait_for("MLLP server on", timeout=20)

    def test_a_push_journaled_in_postgres_is_delivered_through_the_agent(self) -> Deferred:
        async def go() -> None:
            agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
            device = await self.admin.create(
                {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.mllp_port}"})
            agent = await self.admin.update(
                {**agent, "device": {"reference": f"Device/{device['id']}"}})
            agent_creds = await self.create_client("agent", [agent["id"]])
            # queued while the agent is not connected: only the journal has it
            accepted = await self.admin.push_to_agent(
                agent, f"Device/{device['id']}", hl7("PG000001"), "x-application/hl7-v2+er7")
            path = accepted["issue"][0]["diagnostics"].split(self.relay.url, 1)[1]
            self.assertEqual((await self.admin.request_json("GET", path))["state"], "queued")
            db = PgDatabase(reactor, self.dsn)
            self.addCleanup(db.stop)
            rows = await db.run(lambda c: c.execute(
                "SELECT state, agent_id FROM pushes").fetchall())
            self.assertEqual(rows, [{"state": "queued", "agent_id": agent["id"]}])

            procs.agent_process(self, self.relay.url, agent_creds, agent["id"])

            async def delivered() -> Any:
                doc = await self.admin.request_json("GET", path)
                return doc if doc["state"] == "delivered" else None

            doc = await procs.wait_until(delivered, timeout=30, what="push delivered")
            self.assertIn("MSA|AA|PG000001", doc["reply"]["body"])
            await self.device_proc.wait_for("PG000001", timeout=5)
            self.assertEqual(self.device_proc.count("RECV from"), 1)
            rows = await db.run(lambda c: c.execute(
                "SELECT state, reply_body FROM pushes").fetchall())
            self.assertEqual([r["state"] for r in rows], ["delivered"])
            self.assertIn("MSA|AA|PG000001", rows[0]["reply_body"])
            self.assertFalse(os.path.exists(os.path.join(self.data_dir, "relay.sqlite")))

        return ensureDeferred(go())


class _TwoNodes(TestCase):
    """L{RelayOnPostgres}'s node A, device and admin, and a second node B on the database."""

    timeout = 150
    setUp = RelayOnPostgres.setUp
    _setUp = RelayOnPostgres._setUp
    create_client = RelayOnPostgres.create_client

    async def node_b(self) -> procs.RelayFixture:
        """
        Node B, with a data folder of its own (no C{token.key}): the signing keys come from
        the database, where node A put its C{token.key}, so A's tokens are valid at B.
        """
        data_b = tempfile.mkdtemp(prefix="medagent-relay-pg-b-")
        node = procs.RelayFixture(self, data_b)
        await node.start(["--database", self.dsn, "--node-id", "node-b"])
        return node


class TwoNodesOneAgent(_TwoNodes):
    """
    Two ``twistd medagent-relay`` nodes on one PostgreSQL database and two real agent
    processes with the same agent id, one dialling each node: the second node refuses while
    the first holds the session; once the first node is killed (``kill -9``, no goodbye) its
    lease lapses and the second node takes the agent.
    """

    def test_same_agent_on_two_nodes_one_refused_then_taken_over(self) -> Deferred:
        async def go() -> None:
            import signal

            agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
            creds = await self.create_client("agent", [agent["id"]])
            node_b = await self.node_b()
            await self.relay.proc.wait_for("medagent relay listening on", timeout=5)

            first = procs.agent_process(self, self.relay.url, creds, agent["id"],
                                        ["--data", tempfile.mkdtemp(prefix="agent-a-")])
            await self.relay.proc.wait_for(f"Agent/{agent['id']} connected", timeout=30)
            second = procs.agent_process(self, node_b.url, creds, agent["id"],
                                         ["--data", tempfile.mkdtemp(prefix="agent-b-")])
            await node_b.proc.wait_for(f"Refused connection for Agent/{agent['id']}",
                                       timeout=30)
            self.assertNotIn(f"Agent/{agent['id']} connected from".encode(),
                             bytes(node_b.proc.output))
            self.assertNotIn(f"Agent/{agent['id']} disconnected".encode(),
                             bytes(self.relay.proc.output))
            self.assertIsNone(first.exit_code)

            # node A dies without a word: its lease (20 s) lapses, node B takes the agent
            await self.relay.stop(signal.SIGKILL)
            await node_b.proc.wait_for(f"Agent/{agent['id']} connected from", timeout=60)
            self.assertIsNone(second.exit_code)

        return ensureDeferred(go())


class PushesThroughEitherNode(_TwoNodes):
    """
    Two ``twistd medagent-relay`` nodes on one PostgreSQL database, the agent on node A, a
    real MLLP device (python-hl7): a push accepted by node B is read from the journal and
    delivered by node A; a waited push on node B gets the device's answer; a waited push to an
    agent no node holds is 503 at once.
    """

    def test_push_via_the_other_node(self) -> Deferred:
        async def go() -> None:
            from medagent.client import RelayError

            agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
            idle = await self.admin.create({"resourceType": "Agent", "name": "Idle agent",
                                            "status": "active"})
            device = await self.admin.create(
                {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.mllp_port}"})
            creds = await self.create_client("agent", [agent["id"]])
            node_b = await self.node_b()
            # a token node A issued is valid at node B: one signing key ring in the database
            admin_b = MedagentClient(reactor, node_b.url,
                                     access_token=await self.admin.access_token())
            self.addCleanup(admin_b.close)

            procs.agent_process(self, self.relay.url, creds, agent["id"],
                                ["--data", tempfile.mkdtemp(prefix="agent-a-")])
            await self.relay.proc.wait_for(f"Agent/{agent['id']} connected", timeout=30)

            accepted = await admin_b.push_to_agent(
                agent, f"Device/{device['id']}", hl7("XN000001"), "x-application/hl7-v2+er7")
            path = accepted["issue"][0]["diagnostics"].split(node_b.url, 1)[1]

            async def delivered() -> Any:
                doc = await admin_b.request_json("GET", path)
                return doc if doc["state"] == "delivered" else None

            doc = await procs.wait_until(delivered, timeout=30, what="push delivered")
            self.assertIn("MSA|AA|XN000001", doc["reply"]["body"])
            self.assertIn(b"Push %s to Agent/%s delivered" % (
                path.rsplit("/", 1)[-1].encode(), agent["id"].encode()),
                bytes(self.relay.proc.output), "node A, which holds the agent, sent it")

            reply = await admin_b.push_to_agent(
                agent, f"Device/{device['id']}", hl7("XN000002"), "x-application/hl7-v2+er7",
                True, wait_timeout=20_000)
            self.assertIn("MSA|AA|XN000002", reply)
            await self.device_proc.wait_for("XN000002", timeout=5)
            self.assertEqual(self.device_proc.count("RECV from"), 2)

            e = await self.assertFailure(admin_b.push_to_agent(
                idle, f"Device/{device['id']}", hl7("XN000003"), "x-application/hl7-v2+er7",
                True), RelayError)
            self.assertEqual(e.status, 503)

            # agent operations asked of node B are run by node A, which holds the agent
            base = f"/fhir/R4/Agent/{agent['id']}"
            status = await admin_b.request_json("GET", f"{base}/$status")
            self.assertEqual(status["parameter"][0], {"name": "status", "valueCode": "connected"})
            on_a = await self.admin.request_json("GET", f"{base}/$status")
            self.assertEqual(status["parameter"][:2], on_a["parameter"][:2])
            reloaded = await admin_b.request_json("GET", f"{base}/$reload-config")
            self.assertEqual(reloaded["resourceType"], "OperationOutcome")
            self.assertEqual(reloaded["id"], "ok")
            logs = await admin_b.request_json("GET", f"{base}/$fetch-logs?limit=5")
            self.assertEqual(logs["parameter"][0]["name"], "logs")
            stats = json.loads((await admin_b.request_json("GET", f"{base}/$stats")
                                )["parameter"][0]["valueString"])
            self.assertIsInstance(stats["agent"], dict, stats.get("agentUnavailable"))
            self.assertIn("lanes", stats["relay"])
            idle_stats = json.loads((await admin_b.request_json(
                "GET", f"/fhir/R4/Agent/{idle['id']}/$stats"))["parameter"][0]["valueString"])
            self.assertIn("not connected", idle_stats["agentUnavailable"])

        return ensureDeferred(go())
