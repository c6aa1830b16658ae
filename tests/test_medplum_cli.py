"""
The real ``@medplum/cli`` (``medplum agent status|ping|push|reload-config``) against a real
``twistd medagent-relay``, with Medplum's own agent and ours connected: the CLI calls the
type-level operations (``Agent/$bulk-status?_id=...``, ``Agent/$reload-config?_id=...``) and
``$push``, with client credentials from the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from medagent.contenttypes import PING
from medagent.client import RelayError
from tests import procs
from tests.peerenv import need_node_module, need_program
from tests.test_medplum_agent import ORDER, MedplumAgent


class MedplumCLI(TestCase):
    timeout = 180

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.node = need_program("node")
        modules = need_node_module("@medplum/cli")
        self.cli = os.path.join(modules, "@medplum", "cli", "dist", "cjs", "index.cjs")
        self.relay, self.admin = await procs.relay_with_admin(self)
        self.home = tempfile.mkdtemp(prefix="medplum-cli-home-")  # the CLI keeps ~/.medplum
        self.addCleanup(shutil.rmtree, self.home, True)
        self.creds = self.relay.create_client("admin")
        self.mllp_port = procs.free_port()
        self.device_proc = procs.python(
            self, "python-hl7-server",
            [os.path.join(procs.ROOT, "tests", "peers", "hl7", "pyhl7_server.py"),
             str(self.mllp_port)])
        await self.device_proc.wait_for("MLLP server on", timeout=20)
        self.device = await self.admin.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.mllp_port}"})
        self.medplum_agent = await self.admin.create(
            {"resourceType": "Agent", "name": "Medplum agent", "status": "active"})
        self.our_agent = await self.admin.create(
            {"resourceType": "Agent", "name": "medagent", "status": "active"})
        medplum = MedplumAgent(self, self.relay.url,
                               self.relay.create_client("agent", [self.medplum_agent["id"]]),
                               self.medplum_agent["id"])
        self.medplum_proc = await medplum.start()
        procs.agent_process(self, self.relay.url,
                            self.relay.create_client("agent", [self.our_agent["id"]]),
                            self.our_agent["id"])

        async def both_connected() -> bool:
            for agent in (self.medplum_agent, self.our_agent):
                params = await self.admin.request_json(
                    "GET", f"/fhir/R4/Agent/{agent['id']}/$status")
                if params["parameter"][0]["valueCode"] != "connected":
                    return False
            return True

        await procs.wait_until(both_connected, timeout=40, interval=0.2, what="both connected")

    async def medplum(self, *args: str) -> procs.Proc:
        """Run ``medplum ARGS`` to its end; the process (exit code, output) is returned."""
        proc = procs.spawn(self, "medplum-cli", [self.node, self.cli, *args], env={
            "HOME": self.home, "MEDPLUM_BASE_URL": self.relay.url + "/",
            "MEDPLUM_CLIENT_ID": self.creds["clientId"],
            "MEDPLUM_CLIENT_SECRET": self.creds["clientSecret"]})
        timer = reactor.callLater(60, proc.signal)
        await proc.ended
        if timer.active():
            timer.cancel()
        return proc

    @staticmethod
    def json_output(proc: procs.Proc) -> Any:
        text = proc.text
        return json.loads(text[text.index("{"):text.rindex("}") + 1])

    def test_agent_status_ping_push_reload_config(self) -> Deferred:
        async def go() -> None:
            ids = [self.medplum_agent["id"], self.our_agent["id"]]
            # status: Agent/$bulk-status?_id=a,b
            proc = await self.medplum("agent", "status", *ids)
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertIn("2 successful response(s)", proc.text)
            proc = await self.medplum("agent", "status", *ids, "--output", "json")
            self.assertEqual(proc.exit_code, 0, proc.text)
            rows = {}
            for entry in self.json_output(proc)["entry"]:
                agent, result = (p["resource"] for p in entry["resource"]["parameter"])
                rows[agent["id"]] = {p["name"]: p for p in result["parameter"]}
            self.assertEqual(sorted(rows), sorted(ids))
            for row in rows.values():
                self.assertEqual(row["status"]["valueCode"], "connected")
                self.assertIn("valueString", row["version"])
            # reload-config: Agent/$reload-config?_id=a,b; each agent answers
            proc = await self.medplum("agent", "reload-config", *ids)
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertIn("2 successful response(s)", proc.text)
            self.assertNotIn("failed response", proc.text)
            # push: $push with Device/{id}, waited: the device's ACK is printed
            for n, agent_id in enumerate(ids):
                ctrl = f"CLI0000{n}"
                proc = await self.medplum("agent", "push", self.device["id"],
                                          ORDER.format(ctrl=ctrl), agent_id)
                self.assertEqual(proc.exit_code, 0, proc.text)
                self.assertIn(f"MSA|AA|{ctrl}", proc.text)
                self.assertEqual(self.device_proc.count(f"{ctrl}|P"), 1)
            # ping a bare host: Medplum's agent runs the OS ping (127.0.0.1 only)
            proc = await self.medplum("agent", "ping", "127.0.0.1", ids[0])
            self.assertEqual(proc.exit_code, 0, proc.text)
            self.assertIn("1 packets transmitted, 1 received", proc.text)
            # ours probes a device's port, and says so
            proc = await self.medplum("agent", "ping", "127.0.0.1", ids[1])
            self.assertNotEqual(proc.exit_code, 0, proc.text)
            self.assertIn("Unexpected response from agent while pinging", proc.text)
            # (the CLI prints no cause; the relay's answer says it)
            with self.assertRaises(RelayError) as e:
                await self.admin.push_to_agent(self.our_agent, "127.0.0.1", "PING 1", PING, True)
            self.assertEqual(e.exception.status, 400)
            self.assertIn("pings a device by its destination URL with a port", str(e.exception))

        return ensureDeferred(go())
