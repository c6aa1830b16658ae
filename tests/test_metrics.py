"""
Prometheus metrics: the relay's registry moved by a hub with fake connections, the agent's by
its queue with fake senders (both on a Clock), the /metrics resource, and one integration test
scraping real twistd relay and agent processes over loopback while pushes flow.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest

from medagent import wire
from medagent.client import MedagentClient
from medagent.delivery import DeliveryError, Reply
from medagent.destination import lane_key
from medagent.metrics import (
    MAX_LABEL_VALUES,
    OTHER,
    AgentMetrics,
    MetricsResource,
    RelayMetrics,
    destination_label,
    lane_label,
    relay_metrics,
)
from medagent.storage import journal as j
from tests import procs
from tests.peerenv import FIXTURES
from tests.test_e2e import hl7
from tests.test_hub import HL7, _HubCase
from tests.test_lanes import QueueBase

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(text: str) -> Samples:
    """Every sample of a Prometheus text page: (name, labels) → value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(metrics: Any) -> Samples:
    return scrape_text(metrics.render().decode("utf-8"))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class _FakeBots:
    def __init__(self) -> None:
        self.observers: list[Any] = []


class _Run:
    def __init__(self, outcome: str, duration: float = 0.5) -> None:
        self.outcome = outcome
        self.duration = duration

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


class RelayMetricsTests(_HubCase):
    def setUp(self) -> None:
        super().setUp()
        self.bots = _FakeBots()
        self.backlog: tuple[int, float | None] = (0, None)
        self.metrics = relay_metrics(self.hub, self.bots, lambda: succeed(self.backlog),
                                     self.clock)

    def test_push_flow_moves_counters_and_latency(self) -> None:
        conn, session = self.connect(caps=["durable"])
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_connected_agents"), 1)
        self.assertEqual(value(s, "medagent_relay_agent_connects_total"), 1)
        self.assertIsNone(value(s, "medagent_relay_pushes_total", state="sent"))
        d = self.push(wait=True)
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_pushes_total", state="sent"), 1)
        self.assertEqual(value(s, "medagent_relay_in_flight_pushes"), 1)
        self.clock.advance(0.75)
        self.answer(conn, session, request)
        self.assertEqual(self.successResultOf(d).push.state, j.DELIVERED)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_pushes_total", state="delivered"), 1)
        self.assertEqual(value(s, "medagent_relay_in_flight_pushes"), 0)
        self.assertEqual(value(s, "medagent_relay_push_latency_seconds_count", state="delivered"),
                         1)
        self.assertAlmostEqual(
            value(s, "medagent_relay_push_latency_seconds_sum", state="delivered"), 0.75)
        self.assertEqual(value(s, "medagent_relay_push_latency_seconds_bucket",
                               state="delivered", le="0.5"), 0)
        self.assertEqual(value(s, "medagent_relay_push_latency_seconds_bucket",
                               state="delivered", le="1.0"), 1)

    def test_failed_push_counted_by_state(self) -> None:
        conn, session = self.connect(caps=["durable"])
        self.push()
        request = conn.of_type(wire.TRANSMIT_REQUEST)[0]
        self.answer(conn, session, request, statusCode=502, delivery="failed",
                    error="Connection refused")
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_pushes_total", state="failed"), 1)
        self.assertIsNone(value(s, "medagent_relay_pushes_total", state="delivered"))

    def test_disconnect_and_reconnect(self) -> None:
        conn, session = self.connect(caps=["durable"])
        self.hub.connection_lost(session, "closed")
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_connected_agents"), 0)
        self.assertEqual(value(s, "medagent_relay_agent_disconnects_total"), 1)
        self.assertEqual(value(s, "medagent_relay_agent_reconnects_total"), 0)
        self.connect(caps=["durable"])
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_agent_connects_total"), 2)
        self.assertEqual(value(s, "medagent_relay_agent_reconnects_total"), 1)
        self.assertEqual(value(s, "medagent_relay_connected_agents"), 1)

    def test_heartbeat_rtt(self) -> None:
        conn, session = self.connect(caps=["durable"])
        self.clock.advance(self.hub.heartbeat_interval)
        self.assertEqual(len(conn.of_type(wire.HEARTBEAT_REQUEST)), 1)
        self.clock.advance(0.25)
        self.hub.frame_received(session, wire.encode(wire.heartbeat_response()))
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_heartbeat_rtt_seconds_count"), 1)
        self.assertAlmostEqual(value(s, "medagent_relay_heartbeat_rtt_seconds_sum"), 0.25)
        # a second response without a request in between is not a round trip
        self.hub.frame_received(session, wire.encode(wire.heartbeat_response()))
        self.assertEqual(value(scrape(self.metrics),
                               "medagent_relay_heartbeat_rtt_seconds_count"), 1)

    def test_no_payload_in_metrics(self) -> None:
        conn, session = self.connect(caps=["durable"])
        self.push(body=HL7.replace("123", "PATIENT-98765"))
        self.answer(conn, session, conn.of_type(wire.TRANSMIT_REQUEST)[0],
                    body="MSH|^~\\&|R|F|S|F|1||ACK|SECRET-ACK|P|2.5\rMSA|AA|MSG0001")
        text = self.metrics.render().decode()
        for secret in ("PATIENT-98765", "MSG0001", "SECRET-ACK", "MSH", self.agent["id"]):
            self.assertNotIn(secret, text)

    def test_bot_runs_and_failures(self) -> None:
        [observer] = self.bots.observers
        observer(_Run("success"), "subscription")
        observer(_Run("timeout", 10.0), "subscription")
        observer(_Run("error"), "made-up trigger with PHI")
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_bot_runs_total", trigger="subscription",
                               outcome="success"), 1)
        self.assertEqual(value(s, "medagent_relay_bot_runs_total", trigger="subscription",
                               outcome="timeout"), 1)
        self.assertEqual(value(s, "medagent_relay_bot_runs_total", trigger=OTHER,
                               outcome="error"), 1)
        self.assertEqual(value(s, "medagent_relay_bot_failures_total", outcome="timeout"), 1)
        self.assertIsNone(value(s, "medagent_relay_bot_failures_total", outcome="success"))
        self.assertEqual(value(s, "medagent_relay_bot_run_seconds_count"), 3)

    def test_subscription_backlog_read_at_scrape(self) -> None:
        self.backlog = (3, self.clock.seconds() - 42.0)
        self.assertIsNone(value(scrape(self.metrics), "medagent_relay_subscription_backlog"))
        self.successResultOf(self.metrics.refresh())
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_subscription_backlog"), 3)
        self.assertAlmostEqual(value(s, "medagent_relay_subscription_oldest_age_seconds"), 42.0)
        self.backlog = (0, None)
        self.successResultOf(self.metrics.refresh())
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_relay_subscription_backlog"), 0)
        self.assertEqual(value(s, "medagent_relay_subscription_oldest_age_seconds"), 0)


class RegistryTests(SynchronousTestCase):
    def test_registries_are_separate_and_not_global(self) -> None:
        a, b = RelayMetrics(), RelayMetrics()
        AgentMetrics()  # a third in the same process: no duplicate-name error
        a.push_state("sent")
        self.assertEqual(value(scrape(a), "medagent_relay_pushes_total", state="sent"), 1)
        self.assertIsNone(value(scrape(b), "medagent_relay_pushes_total", state="sent"))
        self.assertNotIn(b"medagent_", generate_latest(REGISTRY))

    def test_labels(self) -> None:
        self.assertEqual(lane_label("mllp://Dev.Example:2575?ackTimeout=5&secret=x"),
                         lane_key("mllp://Dev.Example:2575").split("?")[0])
        self.assertNotIn("secret", lane_label("mllp://dev:1?secret=x"))
        self.assertEqual(destination_label("mllp://10.0.0.5:2575?x=1"), "10.0.0.5:2575")
        self.assertEqual(destination_label("dicom://AE@[::1]:104"), "[::1]:104")

    def test_destination_labels_are_capped(self) -> None:
        m = AgentMetrics()
        for i in range(MAX_LABEL_VALUES + 50):
            m.delivery(f"mllp://10.0.{i // 250}.{i % 250}:2575", "failed", 0.1, "connect")
        s = scrape(m)
        destinations = {dict(labels)["destination"] for (name, labels) in s
                        if name == "medagent_agent_device_errors_total"}
        self.assertEqual(len(destinations), MAX_LABEL_VALUES + 1)
        self.assertEqual(value(s, "medagent_agent_device_errors_total", destination=OTHER,
                               phase="connect"), 50)


class AgentMetricsTests(QueueBase):
    def make_app(self) -> None:
        super().make_app()
        from medagent.metrics import agent_metrics
        self.app.queue.wall = self.clock.seconds
        self.metrics = agent_metrics(self.app)

    def test_lane_gauges_read_queue_state(self) -> None:
        self.push("p1", "mllp://dev:1?ackTimeout=9")
        self.push("p2", "mllp://dev:1")
        self.push("p3", "mllp://other:2")
        self.clock.advance(5)
        self.successResultOf(self.metrics.refresh())
        s = scrape(self.metrics)
        dev, other = lane_label("mllp://dev:1"), lane_label("mllp://other:2")
        self.assertEqual(value(s, "medagent_agent_lane_depth", lane=dev), 2)
        self.assertEqual(value(s, "medagent_agent_lane_depth", lane=other), 1)
        self.assertEqual(value(s, "medagent_agent_lane_in_flight", lane=dev), 1)
        self.assertEqual(value(s, "medagent_agent_lane_oldest_age_seconds", lane=dev), 5)
        self.assertNotIn("ackTimeout", self.metrics.render().decode())
        # the first message of dev:1 answered: one left there
        self.sender.calls[0][2].callback(Reply("MSA|AA|p1"))
        self.clock.advance(1)
        self.successResultOf(self.metrics.refresh())
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_agent_lane_depth", lane=dev), 1)
        self.assertEqual(value(s, "medagent_agent_deliveries_total", outcome="delivered"), 1)
        self.assertEqual(value(s, "medagent_agent_device_latency_seconds_count", scheme="mllp"),
                         1)
        self.assertAlmostEqual(value(s, "medagent_agent_device_latency_seconds_sum",
                                     scheme="mllp"), 5)

    def test_device_errors_by_destination(self) -> None:
        self.push("p1", "mllp://dev:1")
        self.clock.advance(0.5)
        self.sender.calls[0][2].errback(DeliveryError("Connection refused", transient=True,
                                                      phase="connect"))
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_agent_deliveries_total", outcome="retrying"), 1)
        self.assertEqual(value(s, "medagent_agent_device_errors_total", destination="dev:1",
                               phase="connect"), 1)
        self.clock.advance(60)  # the retry
        self.sender.calls[-1][2].errback(DeliveryError("No ACK", transient=False, phase="ack"))
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_agent_deliveries_total", outcome="failed"), 1)
        self.assertEqual(value(s, "medagent_agent_device_errors_total", destination="dev:1",
                               phase="ack"), 1)

    def test_relay_sessions(self) -> None:
        s = scrape(self.metrics)  # make_app connected once, before the metrics were attached
        self.assertEqual(value(s, "medagent_agent_relay_connected"), 1)
        self.app.connection_lost("gone")
        self.assertEqual(value(scrape(self.metrics), "medagent_agent_relay_connected"), 0)
        for _ in range(2):
            self.app.connection_made(self.conn)
            self.app.frame_received(wire.encode({"type": wire.CONNECT_RESPONSE,
                                                 "capabilities": ["durable"]}))
        s = scrape(self.metrics)
        self.assertEqual(value(s, "medagent_agent_relay_connects_total"), 2)
        self.assertEqual(value(s, "medagent_agent_relay_reconnects_total"), 1)


class ResourceTests(SynchronousTestCase):
    def render(self, metrics: Any, clock: Clock, path: bytes = b"metrics") -> DummyRequest:
        request = DummyRequest([path])
        request.method = b"GET"
        MetricsResource(metrics, clock).render(request)
        return request

    def test_serves_text_format_after_refresh(self) -> None:
        clock = Clock()
        m = RelayMetrics()
        pending: Deferred[None] = Deferred()
        m.add_refresher(lambda: pending)
        m.push_state("queued")
        request = self.render(m, clock)
        self.assertFalse(request.finished)
        pending.callback(None)
        self.assertTrue(request.finished)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain; version=0.0.4"))
        s = scrape_text(b"".join(request.written).decode())
        self.assertEqual(value(s, "medagent_relay_pushes_total", state="queued"), 1)

    def test_refresh_that_hangs_is_bounded(self) -> None:
        clock = Clock()
        m = RelayMetrics()
        m.add_refresher(lambda: Deferred())  # never fires
        request = self.render(m, clock)
        self.assertFalse(request.finished)
        clock.advance(5)
        self.assertTrue(request.finished)
        self.assertIn(b"medagent_relay_pushes", b"".join(request.written))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_other_paths_are_404(self) -> None:
        request = self.render(RelayMetrics(), Clock(), b"admin")
        self.assertEqual(request.responseCode, 404)


class MetricsIntegration(TestCase):
    """
    Real twistd relay and agent with ``--metrics`` and ``--log-format json``, a real MLLP
    device (python-hl7's server): both endpoints scraped over loopback while pushes flow.
    """

    timeout = 120

    def test_scrape_relay_and_agent_while_pushes_flow(self) -> Deferred:
        return ensureDeferred(self._go())

    async def scrape(self, port: int) -> Samples:
        response = await treq.get(f"http://127.0.0.1:{port}/metrics", timeout=10,
                                  pool=self.pool)
        self.assertEqual(response.code, 200)
        self.assertIn("version=0.0.4", response.headers.getRawHeaders("content-type")[0])
        text = (await response.content()).decode("utf-8")
        for secret in ("12345", "DOE^JANE", "MET0000"):
            self.assertNotIn(secret, text)
        return scrape_text(text)

    async def _go(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        relay_metrics_port, agent_metrics_port = procs.free_port(), procs.free_port()
        relay = procs.RelayFixture(self)
        admin_creds = relay.create_client("admin")
        await relay.start([f"--metrics=tcp:{relay_metrics_port}:interface=127.0.0.1",
                           "--log-format=json"])
        admin = MedagentClient(reactor, relay.url, admin_creds["clientId"],
                               admin_creds["clientSecret"])
        self.addCleanup(admin.close)
        agent = await admin.create({"resourceType": "Agent", "name": "lab", "status": "active"})
        agent_creds = relay.create_client("agent", [agent["id"]])
        mllp_port = procs.free_port()
        device_proc = procs.python(
            self, "python-hl7-server",
            [os.path.join(FIXTURES, "hl7", "pyhl7_server.py"), str(mllp_port)])
        await device_proc.wait_for("MLLP server on", timeout=20)
        device = await admin.create({"resourceType": "Device",
                                     "url": f"mllp://127.0.0.1:{mllp_port}"})
        agent = await admin.update({**agent, "device": {"reference": f"Device/{device['id']}"}})

        before = await self.scrape(relay_metrics_port)
        self.assertEqual(value(before, "medagent_relay_connected_agents"), 0)
        self.assertIsNone(value(before, "medagent_relay_pushes_total", state="delivered"))

        agent_proc = procs.agent_process(
            self, relay.url, agent_creds, agent["id"],
            [f"--metrics=tcp:{agent_metrics_port}:interface=127.0.0.1", "--log-format=json"])

        async def connected() -> bool:
            s = await self.scrape(relay_metrics_port)
            return value(s, "medagent_relay_connected_agents") == 1

        await procs.wait_until(connected, timeout=30, interval=0.2, what="agent connected")

        for i in range(3):
            ack = await admin.push_to_agent(agent, f"Device/{device['id']}",
                                            hl7(f"MET0000{i}"), "x-application/hl7-v2+er7",
                                            True)
            self.assertIn(f"MSA|AA|MET0000{i}", ack)
            s = await self.scrape(relay_metrics_port)
            self.assertEqual(value(s, "medagent_relay_pushes_total", state="delivered"), i + 1)
            self.assertEqual(value(s, "medagent_relay_push_latency_seconds_count",
                                   state="delivered"), i + 1)

        async def agent_counted() -> Samples | None:
            s = await self.scrape(agent_metrics_port)
            return s if value(s, "medagent_agent_deliveries_total",
                              outcome="delivered") == 3 else None

        s = await procs.wait_until(agent_counted, timeout=20, interval=0.2,
                                   what="agent metrics")
        self.assertEqual(value(s, "medagent_agent_device_latency_seconds_count", scheme="mllp"),
                         3)
        lane = lane_label(f"mllp://127.0.0.1:{mllp_port}")
        self.assertIsNone(value(s, "medagent_agent_lane_depth", lane=lane))  # empty: unlisted
        self.assertEqual(value(s, "medagent_agent_relay_connected"), 1)
        self.assertEqual(value(s, "medagent_agent_relay_connects_total"), 1)
        relay_s = await self.scrape(relay_metrics_port)
        self.assertEqual(value(relay_s, "medagent_relay_agent_connects_total"), 1)
        self.assertEqual(value(relay_s, "medagent_relay_subscription_backlog"), 0)

        # a device that is down: errors by destination on the agent, the lane holds it
        down_port = procs.free_port()
        down = await admin.create({"resourceType": "Device",
                                   "url": f"mllp://127.0.0.1:{down_port}"})
        agent = await admin.update({**agent, "device": [
            {"reference": f"Device/{device['id']}"}, {"reference": f"Device/{down['id']}"}]})
        await admin.push_to_agent(agent, f"Device/{down['id']}", hl7("MET00009"),
                                  "x-application/hl7-v2+er7")

        async def errors_counted() -> Samples | None:
            s = await self.scrape(agent_metrics_port)
            n = value(s, "medagent_agent_device_errors_total",
                      destination=f"127.0.0.1:{down_port}", phase="connect")
            return s if n and value(s, "medagent_agent_lane_depth",
                                    lane=lane_label(f"mllp://127.0.0.1:{down_port}")) == 1 \
                else None

        await procs.wait_until(errors_counted, timeout=20, interval=0.2, what="device errors")

        # --log-format json: one object a line, fields, never the payload
        for proc in (relay.proc, agent_proc):
            assert proc is not None
            lines = [json.loads(line) for line in proc.text.splitlines()
                     if line.startswith("{")]
            self.assertTrue(any(e.get("log_namespace", "").startswith("medagent")
                                for e in lines), proc.name)
            for secret in ("12345", "DOE^JANE"):
                self.assertNotIn(secret, proc.text)
        await agent_proc.stop()
        await relay.stop()
