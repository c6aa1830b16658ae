"""
Lanes per device and the answers of waited pushes, with real processes: ``twistd`` relay and
agent, and the recording MLLP sink of the fault tests (every MSH-10 it receives, in order).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from medagent.client import RelayError
from tests import test_faults
from tests.test_faults import order

HL7_V2 = "x-application/hl7-v2+er7"
IN_DOUBT_PHRASE = "the device may or may not have received this message"


class LaneProcesses(TestCase):
    timeout = 180

    # the fault tests' fixture, without their scenarios
    FaultTest = test_faults.FaultTest
    setUp = FaultTest.setUp
    _setUp = FaultTest._setUp
    start_sink = FaultTest.start_sink
    start_agent = FaultTest.start_agent
    _procs_for_debug = FaultTest._procs_for_debug
    open_count = FaultTest.open_count
    wait_all_final = FaultTest.wait_all_final
    sink_ids = FaultTest.sink_ids
    journal = FaultTest.journal
    del FaultTest

    async def status_doc(self, push_id: str) -> dict[str, Any]:
        return await self.client.request_json("GET", f"/fhir/R4/AgentPush/{push_id}")

    def test_url_variants_of_one_device_keep_push_order(self) -> Deferred:
        """
        Queued while the agent is offline: orders for one device through Devices whose URLs
        differ in the query, in the loopback name and in case; then a Device's URL gains a
        query parameter halfway (an operator's edit).  The device gets them all once, in
        push order.
        """

        async def go() -> None:
            await self.start_sink()
            port = self.sink_port
            urls = [f"mllp://127.0.0.1:{port}", f"mllp://localhost:{port}?ackTimeout=60",
                    f"mllp://LOCALHOST:{port}?returnAck=first",
                    f"mllp://127.0.0.1:{port}?encoding=utf-8"]
            devices = [await self.client.create({"resourceType": "Device", "url": u})
                       for u in urls]
            ids = []
            for i in range(80):
                if i == 40:  # the operator adds ?ackTimeout=60 to the first Device
                    devices[0] = await self.client.update(
                        dict(devices[0], url=f"mllp://127.0.0.1:{port}?ackTimeout=60"))
                ctrl = f"LV{i:04d}"
                ids.append(ctrl)
                device = devices[0] if i < 40 or i % 2 else devices[1 + i % 3]
                await self.client.push_to_agent(self.agent, f"Device/{device['id']}",
                                                order(ctrl), HL7_V2)
            self.start_agent()
            await self.wait_all_final()
            self.assertEqual(self.sink_ids(), ids)  # once each, in push order
            states = [d["state"] for d in (await self.journal()).values()]
            self.assertEqual(states.count("delivered"), len(ids))

        return ensureDeferred(go())

    def test_waited_push_to_a_refused_device_is_502_at_once_and_stays_queued(self) -> Deferred:
        async def go() -> None:
            agent = self.start_agent()
            await agent.wait_for("Connected to the relay", timeout=30)
            device = await self.client.create(
                {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.sink_port}"})
            started = time.monotonic()
            with self.assertRaises(RelayError) as e:
                await self.client.push_to_agent(self.agent, f"Device/{device['id']}",
                                                order("RF0001"), HL7_V2, True,
                                                wait_timeout=30_000)
            self.assertEqual(e.exception.status, 502)
            self.assertLess(time.monotonic() - started, 20, "answered at once, not at timeout")
            text = json.dumps(e.exception.outcome)
            self.assertIn("is retried", text)
            location = e.exception.headers["content-location"]
            push_id = location.rstrip("/").rsplit("/", 1)[1]
            doc = await self.status_doc(push_id)
            self.assertIn(doc["state"], ("accepted", "sent"))
            self.assertIn("retrying", doc.get("error", ""))
            self.assertNotIn("inDoubt", doc)
            await self.start_sink()  # the device comes up: the push is delivered, once
            await self.wait_all_final(timeout=90)
            self.assertEqual((await self.status_doc(push_id))["state"], "delivered")
            self.assertEqual(self.sink_ids(), ["RF0001"])

        return ensureDeferred(go())

    def test_after_a_device_crash_the_persistent_connection_is_used_again(self) -> Deferred:
        async def go() -> None:
            sink = await self.start_sink()
            agent = self.start_agent()
            await agent.wait_for("Connected to the relay", timeout=30)
            device = await self.client.create(
                {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.sink_port}"})
            for i in range(3):
                await self.client.push_to_agent(self.agent, f"Device/{device['id']}",
                                                order(f"CR{i:04d}"), HL7_V2, True)
            sink.signal(9)  # the device crashes right after its last ACK
            await sink.ended
            sink = await self.start_sink()
            ids = [f"CS{i:04d}" for i in range(40)]
            for ctrl in ids:
                await self.client.push_to_agent(self.agent, f"Device/{device['id']}",
                                                order(ctrl), HL7_V2)
            await self.wait_all_final()
            self.assertEqual(self.sink_ids()[3:], ids)
            self.assertLessEqual(sink.count("connection accepted"), 2)

        return ensureDeferred(go())

    def test_no_ack_in_time_is_504_and_in_doubt(self) -> Deferred:
        async def go() -> None:
            await self.start_sink("--ignore", "ND0001")
            agent = self.start_agent()
            await agent.wait_for("Connected to the relay", timeout=30)
            device = await self.client.create(
                {"resourceType": "Device",
                 "url": f"mllp://127.0.0.1:{self.sink_port}?ackTimeout=1"})
            with self.assertRaises(RelayError) as e:
                await self.client.push_to_agent(self.agent, f"Device/{device['id']}",
                                                order("ND0001"), HL7_V2, True,
                                                wait_timeout=20_000)
            self.assertEqual(e.exception.status, 504)
            location = e.exception.headers["content-location"]
            doc = await self.status_doc(location.rstrip("/").rsplit("/", 1)[1])
            self.assertEqual((doc["state"], doc.get("inDoubt")), ("failed", True))
            self.assertIn(IN_DOUBT_PHRASE, doc["error"])
            listed = await self.client.request_json(
                "GET", "/fhir/R4/AgentPush", params={"agent": self.agent["id"]})
            self.assertIs(listed["entry"][0]["resource"].get("inDoubt"), True)

        return ensureDeferred(go())


del os
