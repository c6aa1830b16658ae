"""
Pausing a lane with real processes (issue 12): ``twistd`` relay and agent, the recording MLLP
sink of the fault tests (every MSH-10 it receives, in order), and the ``medagent lane`` CLI.
Push 10, pause, push 10 more: none of the second batch reaches the device while paused; a
pusher's CLI cannot resume it; resume: all 20 reached the device once, in push order.  And
pushes already on the agent's disk (its device down) when the lane is paused wait there too
(``lane-hold``), also when the device comes back, until resumed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests import procs, test_faults

#: how long the test watches a paused lane for a push that should not come
WATCH = 3.0


class LanePauseProcesses(TestCase):
    timeout = 180

    FaultTest = test_faults.FaultTest
    setUp = FaultTest.setUp
    _setUp = FaultTest._setUp
    start_sink = FaultTest.start_sink
    start_agent = FaultTest.start_agent
    device = FaultTest.device
    push_all = FaultTest.push_all
    _procs_for_debug = FaultTest._procs_for_debug
    open_count = FaultTest.open_count
    wait_all_final = FaultTest.wait_all_final
    sink_ids = FaultTest.sink_ids
    journal = FaultTest.journal
    del FaultTest

    async def cli(self, creds: dict[str, Any], *argv: str) -> procs.Proc:
        proc = procs.python(self, "cli", ["-m", "medagent.cli", *argv], env={
            "MEDAGENT_RELAY": self.relay.url, "MEDAGENT_CLIENT_ID": creds["clientId"],
            "MEDAGENT_CLIENT_SECRET": creds["clientSecret"]})
        await proc.ended
        return proc

    def test_push_pause_push_resume_keeps_order_and_delivers_each_once(self) -> Deferred:
        async def go() -> None:
            await self.start_sink()
            agent = self.start_agent()
            await agent.wait_for("Connected to the relay", timeout=30)
            device = await self.device()
            lane = f"mllp://127.0.0.1:{self.sink_port}"
            operator = self.relay.create_client("operator")
            pusher = self.relay.create_client("pusher", [self.agent["id"]])
            first = [f"PA{i:04d}" for i in range(10)]
            second = [f"PB{i:04d}" for i in range(10)]
            await self.push_all(device, first)
            await procs.wait_until(lambda: len(self.sink_ids()) >= 10, timeout=60,
                                   what="the first batch delivered")

            paused = await self.cli(operator, "lane", "pause", self.agent["id"],
                                    f"Device/{device['id']}", "--json")
            self.assertEqual(paused.exit_code, 0, paused.text)
            self.assertEqual(json.loads(paused.text)["lane"], lane)
            await self.push_all(device, second)
            # the attack: a pusher may push to the agent but not release (or pause) its lane
            for verb in ("resume", "pause"):
                refused = await self.cli(pusher, "lane", verb, self.agent["id"], lane)
                self.assertEqual(refused.exit_code, 1, refused.text)
                self.assertIn("403", refused.text)
            # watched for a while: nothing of the second batch reaches the device
            ends = time.monotonic() + WATCH
            while time.monotonic() < ends:
                self.assertEqual(self.sink_ids(), first)
                await deferLater(reactor, 0.25, lambda: None)
            states = {d["id"]: d["state"] for d in (await self.journal()).values()}
            self.assertEqual(sorted(states.values()).count("queued"), 10)
            admin = self.relay.create_client("admin")
            status = await self.cli(admin, "status", self.agent["id"], "--lanes", "--json")
            self.assertEqual(status.exit_code, 0, status.text)
            [row] = [r for r in json.loads(status.text)["lanes"] if r["lane"] == lane]
            self.assertTrue(row["paused"])
            self.assertEqual(row["lastAckCode"], "AA")
            self.assertIsNotNone(row["ackP99Ms"])

            resumed = await self.cli(operator, "lane", "resume", self.agent["id"], lane)
            self.assertEqual(resumed.exit_code, 0, resumed.text)
            self.assertIn("resumed", resumed.text)
            await self.wait_all_final(timeout=90)
            self.assertEqual(self.sink_ids(), first + second)  # once each, in push order
            docs = (await self.journal()).values()
            self.assertEqual([d["state"] for d in docs].count("delivered"), 20)
            audits = await self.client.search("AuditEvent", {})
            self.assertEqual(sorted(a["subtype"][0]["code"] for a in audits
                                    if a.get("subtype", [{}])[0].get("system")
                                    == "urn:medagent:lane"),
                             ["pause-lane", "resume-lane"])

        return ensureDeferred(go())

    def test_pushes_on_the_agent_wait_there_while_paused(self) -> Deferred:
        async def go() -> None:
            agent = self.start_agent()  # the device is down: pushes wait on the agent's disk
            await agent.wait_for("Connected to the relay", timeout=30)
            device = await self.device()
            lane = f"mllp://127.0.0.1:{self.sink_port}"
            operator = self.relay.create_client("operator")
            ids = [f"PH{i:04d}" for i in range(10)]
            await self.push_all(device, ids)

            async def all_on_the_agent() -> bool:
                states = [d["state"] for d in (await self.journal()).values()]
                return states.count("accepted") == len(ids)

            await procs.wait_until(all_on_the_agent, timeout=60, interval=0.25,
                                   what="every push on the agent's disk")
            paused = await self.cli(operator, "lane", "pause", self.agent["id"], lane, "--json")
            self.assertEqual(paused.exit_code, 0, paused.text)
            result = json.loads(paused.text)
            self.assertEqual((result["onAgent"], result["heldOnAgent"]), (10, True))
            await agent.wait_for("Relay holds 1 lane(s)", timeout=10)
            await self.start_sink()  # the device is back; the lane is paused
            ends = time.monotonic() + WATCH + 2  # (past the agent's first backoff)
            while time.monotonic() < ends:
                self.assertEqual(self.sink_ids(), [])
                await deferLater(reactor, 0.25, lambda: None)
            resumed = await self.cli(operator, "lane", "resume", self.agent["id"], lane)
            self.assertEqual(resumed.exit_code, 0, resumed.text)
            await self.wait_all_final(timeout=120)
            self.assertEqual(self.sink_ids(), ids)  # once each, in push order

        return ensureDeferred(go())
