"""
A paused lane on a cluster (issue 12): two ``twistd medagent-relay`` nodes on one PostgreSQL
database (L{tests.pgenv}), the agent held by node A, a real MLLP device.  The lane is paused
through node B (the record is in the shared database; node A, which holds the agent, is told
at once): a push accepted by node B waits; resumed through node B, it is delivered once.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from medagent.client import MedagentClient
from tests import procs
from tests.test_e2e import hl7
from tests.test_postgres_relay import _TwoNodes

#: seconds the test watches a paused lane for a push that should not come
WATCH = 3.0


class LanePausedOnTheOtherNode(_TwoNodes):
    def test_pause_and_resume_through_the_node_without_the_agent(self) -> Deferred:
        async def go() -> None:
            agent = await self.admin.create({"resourceType": "Agent", "name": "Lab agent",
                                             "status": "active"})
            lane = f"mllp://127.0.0.1:{self.mllp_port}"
            creds = await self.create_client("agent", [agent["id"]])
            operator = await self.create_client("operator")
            node_b = await self.node_b()
            on_b = MedagentClient(reactor, node_b.url, operator["clientId"],
                                  operator["clientSecret"])
            self.addCleanup(on_b.close)
            admin_b = MedagentClient(reactor, node_b.url,
                                     access_token=await self.admin.access_token())
            self.addCleanup(admin_b.close)
            procs.agent_process(self, self.relay.url, creds, agent["id"],
                                ["--data", tempfile.mkdtemp(prefix="agent-a-")])
            await self.relay.proc.wait_for(f"Agent/{agent['id']} connected", timeout=30)
            base = f"/fhir/R4/Agent/{agent['id']}"

            paused = await on_b.request_json("POST", f"{base}/$pause-lane",
                                             json_body={"destination": lane})
            self.assertEqual((paused["lane"], paused["paused"], paused["changed"]),
                             (lane, True, True))
            accepted = await admin_b.push_to_agent(agent, lane, hl7("PAUSEB01"),
                                                   "x-application/hl7-v2+er7")
            path = accepted["issue"][0]["diagnostics"].split(node_b.url, 1)[1]
            ends = time.monotonic() + WATCH
            while time.monotonic() < ends:
                self.assertEqual((await admin_b.request_json("GET", path))["state"], "queued")
                await deferLater(reactor, 0.25, lambda: None)
            self.assertEqual(self.device_proc.count("RECV from"), 0)
            # node A, which holds the agent, reports the lane paused in $stats
            stats = json.loads((await self.admin.request_json("GET", f"{base}/$stats")
                                )["parameter"][0]["valueString"])
            self.assertEqual(stats["relay"]["lanes"]["paused"], [lane])

            resumed = await on_b.request_json("POST", f"{base}/$resume-lane",
                                              json_body={"destination": lane})
            self.assertEqual((resumed["paused"], resumed["changed"]), (False, True))

            async def delivered() -> Any:
                doc = await admin_b.request_json("GET", path)
                return doc if doc["state"] == "delivered" else None

            await procs.wait_until(delivered, timeout=30, what="push delivered")
            await self.device_proc.wait_for("PAUSEB01", timeout=5)
            self.assertEqual(self.device_proc.count("RECV from"), 1)

        return ensureDeferred(go())
