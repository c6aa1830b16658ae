"""
A device that is down only holds up its own lane: real relay and agent processes, a recording
MLLP sink as the healthy device, a refused port as the one that is down.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from tests import procs
from tests.peerenv import FIXTURES
from tests.test_faults import order

DOWN_PUSHES = 1100  # more than the relay's agent-wide window (1000)


class DeviceDownTest(TestCase):
    timeout = 300

    def test_healthy_device_not_held_up_by_one_that_is_down(self) -> Deferred:
        async def go() -> None:
            relay, client = await procs.relay_with_admin(self)
            agent = await client.create({"resourceType": "Agent", "name": "lanes",
                                         "status": "active"})
            creds = relay.create_client("agent", [agent["id"]])
            sink_log = tempfile.mktemp(prefix="sink-", suffix=".log")
            self.addCleanup(lambda: os.path.exists(sink_log) and os.unlink(sink_log))
            sink_port, down_port = procs.free_port(), procs.free_port()  # nothing on down_port
            sink = procs.python(self, "sink", [os.path.join(FIXTURES, "recording_sink.py"),
                                               str(sink_port), sink_log])
            await sink.wait_for("recording sink on", timeout=20)
            down = await client.create({"resourceType": "Device",
                                        "url": f"mllp://127.0.0.1:{down_port}"})
            healthy = await client.create({"resourceType": "Device",
                                           "url": f"mllp://127.0.0.1:{sink_port}"})
            proc = procs.agent_process(self, relay.url, creds, agent["id"],
                                       ["--data", tempfile.mkdtemp(prefix="agent-data-")])
            await proc.wait_for("Connected to the relay", timeout=30)

            async def push(device: dict, ctrl: str) -> None:
                await client.push_to_agent(agent, f"Device/{device['id']}", order(ctrl),
                                           "x-application/hl7-v2+er7")

            for start in range(0, DOWN_PUSHES, 50):
                await gatherResults([ensureDeferred(push(down, f"DN{i:05d}"))
                                     for i in range(start, min(start + 50, DOWN_PUSHES))])

            async def down_retrying() -> bool:
                bundle = await client.request_json(
                    "GET", "/fhir/R4/AgentPush",
                    params={"agent": agent["id"], "state": "accepted", "_count": "1000"})
                return any("retrying" in e["resource"].get("error", "")
                           for e in bundle.get("entry", []))

            await procs.wait_until(down_retrying, timeout=30, interval=0.1,
                                   what="the agent retrying the device that is down")

            def sink_ids() -> list[str]:
                with open(sink_log, encoding="ascii") as f:
                    return [line.strip() for line in f if line.strip()]

            ids = [f"OK{i:05d}" for i in range(10)]
            started = time.monotonic()
            for ctrl in ids:
                await push(healthy, ctrl)
            await procs.wait_until(lambda: len(sink_ids()) >= len(ids), timeout=20,
                                   interval=0.01, what="the healthy device's 10 messages")
            elapsed = time.monotonic() - started
            self.assertEqual(sink_ids(), ids)  # once each, in order
            self.assertLess(elapsed, 1.0, f"10 pushes to a healthy device took {elapsed:.2f}s")
            # the device that is down still has all of its pushes, none lost, none failed
            counts: dict = {}

            async def relay_has_the_answers() -> bool:
                # The sink has the 10th message before the relay has its answer: wait for it.
                params = await client.request_json("GET",
                                                   f"/fhir/R4/Agent/{agent['id']}/$stats")
                counts.update(json.loads(params["parameter"][0]["valueString"])["relay"])
                return counts["delivered"] + counts["failed"] >= len(ids)

            await procs.wait_until(relay_has_the_answers, timeout=10, interval=0.05,
                                   what="the relay recording the healthy device's answers")
            self.assertEqual((counts["delivered"], counts["failed"]), (len(ids), 0))
            self.assertEqual(counts["queued"] + counts["sent"] + counts["accepted"], DOWN_PUSHES)
            self.assertGreater(counts["queued"], 0)  # beyond its lane window: in the journal

            # an operator clears the device that is down: a push on the agent (behind the
            # one being retried) and one still queued on the relay
            async def in_state(state: str) -> list[dict]:
                bundle = await client.request_json(
                    "GET", "/fhir/R4/AgentPush",
                    params={"agent": agent["id"], "state": state, "_count": "1000"})
                return [e["resource"] for e in bundle.get("entry", [])]

            on_agent = sorted(await in_state("accepted"), key=lambda d: d["created"])[-1]
            on_relay = (await in_state("queued"))[0]
            for doc in (on_agent, on_relay):
                done = await client.request_json("POST", f"/fhir/R4/AgentPush/{doc['id']}/$cancel")
                self.assertEqual(done["state"], "cancelled")
                self.assertEqual((await client.request_json(
                    "GET", f"/fhir/R4/AgentPush/{doc['id']}"))["state"], "cancelled")

        return ensureDeferred(go())
