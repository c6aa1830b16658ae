"""
Nothing lost, nothing twice: fault tests with real processes.

Each test pushes many HL7 messages with distinct MSH-10 (not waited) to one device, a sink
that records every message it receives, breaks something in the middle, and then checks the
exact counts: the sink got each message exactly once and in push order, and the journal
shows each push delivered (or, for the one documented window, failed with the reason).
"""

from __future__ import annotations

import os
import signal
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests import procs
from tests.peerenv import FIXTURES
from tests.test_e2e import _Proxy

N = int(os.environ.get("MEDAGENT_FAULT_N", "1000"))
#: the documented window: the device may have the bytes, its answer never came (said one way)
IN_DOUBT = "the device may or may not have received this message"


def order(ctrl: str) -> str:
    return (f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|{ctrl}|P|2.5.1\r"
            f"PID|1||12345^^^MRN||DOE^JANE\rORC|NW|{ctrl}")


class FaultTest(TestCase):
    timeout = 300

    def setUp(self) -> Deferred:
        return ensureDeferred(self._setUp())

    async def _setUp(self) -> None:
        self.relay, self.client = await procs.relay_with_admin(self)
        self.agent = await self.client.create({"resourceType": "Agent", "name": "faults",
                                               "status": "active"})
        self.creds = self.relay.create_client("agent", [self.agent["id"]])
        self.sink_log = tempfile.mktemp(prefix="sink-", suffix=".log")
        self.addCleanup(lambda: os.path.exists(self.sink_log) and os.unlink(self.sink_log))
        self.sink_port = procs.free_port()
        self.agent_data = tempfile.mkdtemp(prefix="agent-data-")

    async def start_sink(self, *extra: str) -> procs.Proc:
        sink = procs.python(self, "sink", [os.path.join(FIXTURES, "recording_sink.py"),
                                           str(self.sink_port), self.sink_log, *extra])
        await sink.wait_for("recording sink on", timeout=20)
        return sink

    async def device(self, params: str = "") -> dict[str, Any]:
        return await self.client.create(
            {"resourceType": "Device", "url": f"mllp://127.0.0.1:{self.sink_port}{params}"})

    def start_agent(self, relay_url: str | None = None) -> procs.Proc:
        proc = procs.agent_process(self, relay_url or self.relay.url, self.creds,
                                   self.agent["id"], ["--data", self.agent_data])
        self._agents = getattr(self, "_agents", []) + [proc]
        return proc

    def _procs_for_debug(self) -> list[procs.Proc]:
        return [*getattr(self, "_agents", []), self.relay.proc]

    async def push_all(self, device: dict[str, Any], ids: list[str],
                       during: Any = None) -> None:
        """Push sequentially (so push order is well defined); call during(i) between."""
        for i, ctrl in enumerate(ids):
            if during is not None:
                await during(i)
            await self.client.push_to_agent(self.agent, f"Device/{device['id']}", order(ctrl),
                                            "x-application/hl7-v2+er7")

    async def open_count(self) -> int:
        params = await self.client.request_json("GET",
                                                f"/fhir/R4/Agent/{self.agent['id']}/$stats")
        import json

        relay = json.loads(params["parameter"][0]["valueString"])["relay"]
        return relay["queued"] + relay["sent"] + relay["accepted"]

    async def wait_all_final(self, timeout: float = 120) -> None:
        async def done() -> bool:
            return await self.open_count() == 0

        await procs.wait_until(done, timeout=timeout, interval=0.25, what="all pushes final")

    def sink_ids(self) -> list[str]:
        with open(self.sink_log, encoding="ascii") as f:
            return [line.strip() for line in f if line.strip()]

    async def journal(self) -> dict[str, dict[str, Any]]:
        bundle = await self.client.request_json(
            "GET", "/fhir/R4/AgentPush", params={"agent": self.agent["id"], "_count": "1000"})
        out = {}
        for entry in bundle["entry"]:
            doc = entry["resource"]
            out[doc["remote"] + "#" + doc["id"]] = doc
        return out

    async def check(self, ids: list[str], *, allow_in_doubt: int = 0) -> list[str]:
        """Each id reached the sink exactly once, in order; the journal agrees."""
        await self.wait_all_final()
        got = self.sink_ids()
        states = [d["state"] for d in (await self.journal()).values()]
        in_doubt_docs = [d for d in (await self.journal()).values() if d["state"] == "failed"]
        self.assertLessEqual(len(in_doubt_docs), allow_in_doubt, in_doubt_docs[:3])
        for doc in in_doubt_docs:
            self.assertIn(IN_DOUBT, doc.get("error", ""), doc)
            self.assertIs(doc.get("inDoubt"), True, doc)
        twice = sorted({i for i in got if got.count(i) > 1})
        self.assertEqual(twice, [], f"reached the device twice: {twice[:5]}\n" + "\n".join(
            line for proc in self._procs_for_debug() for line in proc.text.splitlines()
            if any(t in line for t in twice[:2]))[-4000:])
        delivered_expected = [i for i in ids if i in set(got)]
        self.assertEqual(got, delivered_expected, "order per destination not kept")
        self.assertGreaterEqual(len(got), len(ids) - len(in_doubt_docs))
        self.assertEqual(states.count("delivered"), len(ids) - len(in_doubt_docs))
        return got

    # -- the scenarios ------------------------------------------------------------------------

    def test_1_agent_offline_then_started(self) -> Deferred:
        async def go() -> None:
            await self.start_sink()
            device = await self.device()
            ids = [f"OFF{i:05d}" for i in range(N)]
            await self.push_all(device, ids)
            self.assertEqual(await self.open_count(), N)
            self.start_agent()
            await self.check(ids)

        return ensureDeferred(go())

    def test_2_agent_killed_mid_delivery(self) -> Deferred:
        async def go() -> None:
            await self.start_sink()
            device = await self.device()
            ids = [f"KA{i:05d}" for i in range(N)]
            await self.push_all(device, ids)
            agent = self.start_agent()
            await procs.wait_until(lambda: len(self.sink_ids()) >= N // 3, timeout=60,
                                   what="a third delivered")
            agent.signal(signal.SIGKILL)
            await agent.ended
            self.start_agent()
            await self.check(ids, allow_in_doubt=1)

        return ensureDeferred(go())

    def test_3_relay_killed_mid_run(self) -> Deferred:
        async def go() -> None:
            await self.start_sink()
            device = await self.device()
            self.start_agent()
            ids = [f"KR{i:05d}" for i in range(N)]
            await self.push_all(device, ids)
            await procs.wait_until(lambda: len(self.sink_ids()) >= N // 4, timeout=60,
                                   what="a quarter delivered")
            self.relay.proc.signal(signal.SIGKILL)
            await self.relay.proc.ended
            await self.relay.start()
            await self.check(ids)

        return ensureDeferred(go())

    def test_4_websocket_cut_repeatedly(self) -> Deferred:
        async def go() -> None:
            await self.start_sink()
            device = await self.device()
            proxy = _Proxy("127.0.0.1", self.relay.port)
            port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.start_agent(f"http://127.0.0.1:{port.getHost().port}")
            cuts = []

            async def cut(i: int) -> None:
                if i and i % 250 == 0:
                    cuts.append(proxy.cut())

            ids = [f"WS{i:05d}" for i in range(N)]
            await self.push_all(device, ids, cut)
            await self.check(ids)
            self.assertGreaterEqual(sum(cuts), 1)

        return ensureDeferred(go())

    def test_5_device_down_then_back(self) -> Deferred:
        async def go() -> None:
            sink = await self.start_sink()
            device = await self.device()
            self.start_agent()
            ids = [f"DD{i:05d}" for i in range(N)]
            state: dict[str, Any] = {}

            async def outage(i: int) -> None:
                if i == N // 3:
                    await sink.stop(signal.SIGKILL)
                if i == 2 * N // 3:
                    state["sink"] = await self.start_sink()

            await self.push_all(device, ids, outage)
            # the device killed between reading a message and ACKing it: that one is
            # failed with the reason (no silent resend); all others exactly once
            await self.check(ids, allow_in_doubt=1)

        return ensureDeferred(go())

    def test_6_device_never_acks_one(self) -> Deferred:
        async def go() -> None:
            silent = "NA00010"
            await self.start_sink("--ignore", silent)
            device = await self.device("?ackTimeout=2")
            self.start_agent()
            ids = [f"NA{i:05d}" for i in range(min(N, 100))]
            await self.push_all(device, ids)
            await self.wait_all_final()
            got = self.sink_ids()
            self.assertEqual(got, ids)  # every one reached the device once; the lane went on
            docs = {d["id"]: d for d in (await self.journal()).values()}
            failed = [d for d in docs.values() if d["state"] == "failed"]
            self.assertEqual(len(failed), 1)
            self.assertIn("ACK", failed[0]["error"])
            self.assertIn(IN_DOUBT, failed[0]["error"])
            self.assertIs(failed[0].get("inDoubt"), True)
            self.assertEqual(sum(d["state"] == "delivered" for d in docs.values()),
                             len(ids) - 1)

        return ensureDeferred(go())

    def test_7_two_agents_same_credentials(self) -> Deferred:
        async def go() -> None:
            await self.start_sink()
            device = await self.device()
            first = self.start_agent()
            await first.wait_for("Connected to the relay", timeout=30)
            second = procs.agent_process(self, self.relay.url, self.creds, self.agent["id"],
                                         ["--data", tempfile.mkdtemp(prefix="agent-2-")])
            await second.wait_for("already connected", timeout=30)
            ids = [f"TW{i:05d}" for i in range(N)]
            await self.push_all(device, ids)
            await self.check(ids)
            self.assertNotIn("Connected to the relay", second.text)

        return ensureDeferred(go())
