"""
Medplum's own agent (v5.0.10, the bundled C{agent.cjs}) against our relay: pushes queued while
it was down reach the device once each and in order once it starts, although it refuses
pushes until it has read its config and has no ordered lanes of its own.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests import procs
from tests.peerenv import FIXTURES, need, need_program, peer_path
from tests.test_faults import order


def medplum_agent_dir() -> str:
    """Where agent.cjs and loopback-listen.cjs are (see reference/peers/medplum-agent)."""
    for folder in (os.environ.get("MEDAGENT_MEDPLUM_AGENT"), peer_path("medplum-agent"),
                   "/work/shared/reference/peers/medplum-agent"):
        if folder and os.path.isfile(os.path.join(folder, "agent.cjs")):
            return folder
    need(False, "Medplum agent bundle (agent.cjs)")
    raise AssertionError("unreachable")


class MedplumAgentOrderTest(TestCase):
    timeout = 180

    def test_queued_while_down_arrive_once_in_order(self) -> Deferred:
        node = need_program("node")
        folder = medplum_agent_dir()

        async def go() -> None:
            relay, client = await procs.relay_with_admin(self)
            agent = await client.create({"resourceType": "Agent", "name": "medplum",
                                         "status": "active"})
            creds = relay.create_client("agent", [agent["id"]])
            sink_log = tempfile.mktemp(prefix="sink-", suffix=".log")
            self.addCleanup(lambda: os.path.exists(sink_log) and os.unlink(sink_log))
            port = procs.free_port()
            sink = procs.python(self, "sink", [os.path.join(FIXTURES, "recording_sink.py"),
                                               str(port), sink_log])
            await sink.wait_for("recording sink on", timeout=20)
            device = await client.create({"resourceType": "Device",
                                          "url": f"mllp://127.0.0.1:{port}"})
            ids = [f"MP{i:03d}" for i in range(20)]
            for ctrl in ids:  # the agent is down: all of them wait in the journal
                await client.push_to_agent(agent, f"Device/{device['id']}", order(ctrl),
                                           "x-application/hl7-v2+er7")
            workdir = tempfile.mkdtemp(prefix="medplum-agent-")
            with open(os.path.join(workdir, "agent.properties"), "w") as f:
                f.write(f"baseUrl={relay.url}\nclientId={creds['clientId']}\n"
                        f"clientSecret={creds['clientSecret']}\nagentId={agent['id']}\n"
                        "logLevel=INFO\nlogger.main.logDir=./logs\n"
                        "logger.channel.logDir=./logs\n")
            # its pid file lives in os.tmpdir(): one of its own, so no other run's agent counts
            procs.spawn(self, "medplum-agent",
                        [node, "-r", os.path.join(folder, "loopback-listen.cjs"),
                         os.path.join(folder, "agent.cjs")], cwd=workdir,
                        env={"TMPDIR": workdir})

            def sink_ids() -> list[str]:
                with open(sink_log, encoding="ascii") as f:
                    return [line.strip() for line in f if line.strip()]

            async def all_final() -> bool:
                bundle = await client.request_json(
                    "GET", "/fhir/R4/AgentPush", params={"agent": agent["id"], "_count": "100"})
                return all(e["resource"]["state"] in ("delivered", "failed")
                           for e in bundle["entry"])

            await procs.wait_until(all_final, timeout=90, interval=0.25, what="all pushes final")
            self.assertEqual(sink_ids(), ids)  # once each, in push order
            bundle = await client.request_json(
                "GET", "/fhir/R4/AgentPush", params={"agent": agent["id"], "_count": "100"})
            self.assertEqual({e["resource"]["state"] for e in bundle["entry"]}, {"delivered"})

        return ensureDeferred(go())
