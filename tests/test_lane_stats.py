"""
The agent's per-lane statistics in ``$stats`` (issue 12): the device's last answer and its
code, the ACK latency p50/p99 over a bounded ring, the recent errors by kind (never text),
kept when the lane empties; the queue with a fake sender on a Clock.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.agent import queue as q
from medagent.delivery import DeliveryError, Reply
from tests.test_lanes import QueueBase

ACK_AA = "MSH|^~\\&|R|F|S|F|20240101||ACK|A1|P|2.5\rMSA|AA|p0"
ACK_AE = "MSH|^~\\&|R|F|S|F|20240101||ACK|A2|P|2.5\rMSA|AE|p1|bad PID"


class LaneStatsUnitTests(SynchronousTestCase):
    def test_percentiles_nearest_rank_over_the_ring(self) -> None:
        stats = q.LaneStats()
        self.assertEqual((stats.view()["ackP50Ms"], stats.view()["ackP99Ms"]), (None, None))
        for ms in range(1, 101):  # 1..100 ms
            stats.answered(float(ms), "AA", ms / 1000)
        view = stats.view()
        self.assertEqual((view["ackP50Ms"], view["ackP99Ms"], view["ackSamples"]),
                         (50.0, 99.0, 100))
        for _ in range(q.LATENCY_RING):  # the ring keeps only the recent ones
            stats.answered(1.0, "AA", 0.5)
        view = stats.view()
        self.assertEqual((view["ackP50Ms"], view["ackP99Ms"], view["ackSamples"]),
                         (500.0, 500.0, q.LATENCY_RING))

    def test_error_ring_is_bounded_newest_first(self) -> None:
        stats = q.LaneStats()
        for i in range(q.ERROR_RING + 5):
            stats.failed(float(i), f"k{i}")
        errors = stats.view()["recentErrors"]
        self.assertEqual(len(errors), q.ERROR_RING)
        self.assertEqual(errors[0], {"at": float(q.ERROR_RING + 4), "kind": f"k{q.ERROR_RING + 4}"})

    def test_answer_codes(self) -> None:
        self.assertEqual(q.answer_code(Reply(ACK_AE, delivered=False)), "AE")
        self.assertEqual(q.answer_code(Reply(json.dumps({"status": "0x0000"}),
                                             content_type="application/json")), "0x0000")
        self.assertEqual(q.answer_code(Reply("accepted", status_code=200)), "200")
        self.assertEqual(q.answer_code(Reply("MSH|garbage")), "200")


class LaneStatsQueueTests(QueueBase):
    def lane(self) -> dict:
        return self.app.current_stats()["laneStats"]["mllp://dev:1"]

    def test_last_ack_latency_and_errors_in_stats(self) -> None:
        self.push("p0")
        self.clock.advance(0.25)
        self.sender.calls[0][2].callback(Reply(ACK_AA))
        self.push("p1")
        self.clock.advance(0.75)
        self.sender.calls[1][2].callback(Reply(ACK_AE, delivered=False))
        self.push("p2")
        self.sender.calls[2][2].errback(DeliveryError("refused", phase="connect"))
        lane = self.lane()
        self.assertEqual(lane["lastAckCode"], "AE")
        self.assertIsNotNone(lane["lastAck"])
        self.assertEqual((lane["ackP50Ms"], lane["ackP99Ms"]), (250.0, 750.0))
        self.assertEqual([e["kind"] for e in lane["recentErrors"]], ["connect", "refused"])
        self.assertNotIn("bad PID", json.dumps(self.app.current_stats()))

    def test_a_ping_is_not_an_ack(self) -> None:
        self.push("p0")
        self.clock.advance(0.25)
        self.sender.calls[0][2].callback(Reply(ACK_AA))
        self.app.frame_received(wire.encode({
            "type": wire.TRANSMIT_REQUEST, "remote": "mllp://dev:1",
            "contentType": "x-application/ping", "body": "PING",
            "callback": "Agent/a1-ping1", "pushId": "ping1"}))
        self.clock.advance(5)
        self.assertEqual(len(self.answers()), 2)
        lane = self.lane()
        self.assertEqual((lane["lastAckCode"], lane["ackSamples"], lane["ackP99Ms"]),
                         ("AA", 1, 250.0))

    def test_stats_outlive_an_empty_lane_and_are_bounded(self) -> None:
        self.push("p0")
        self.sender.calls[0][2].callback(Reply(ACK_AA))
        self.assertNotIn("mllp://dev:1", self.app.queue.lanes)  # the lane itself is gone
        self.assertEqual(self.lane()["lastAckCode"], "AA")
        self.patch(q, "MAX_LANE_STATS", 3)
        for i in range(5):
            self.app.queue._stats_of(f"mllp://other{i}:1")
        self.assertEqual(list(self.app.queue.lane_stats),
                         ["mllp://other2:1", "mllp://other3:1", "mllp://other4:1"])


class CliLaneRows(SynchronousTestCase):
    def test_rows_from_stats_and_from_an_agent_without_lane_stats(self) -> None:
        from medagent.cli_ops import _lane_table, lane_rows

        stats = {"relay": {"lanes": {"paused": ["mllp://b:1"], "lanes": {
                     "mllp://b:1": {"inFlight": 2}}}},
                 "agent": {"lanes": {"mllp://a:1": {"waiting": 3, "retrying": True}},
                           "laneStats": {"mllp://a:1": {"lastAck": 0.0, "lastAckCode": "AE",
                                                        "ackP50Ms": 5.0, "ackP99Ms": 9.0,
                                                        "recentErrors": [{"kind": "ack"}]}}}}
        rows = lane_rows(stats)
        self.assertEqual([(r["lane"], r["paused"], r["waiting"], r["onAgent"]) for r in rows],
                         [("mllp://a:1", False, 3, 0), ("mllp://b:1", True, 0, 2)])
        text = _lane_table(rows)
        self.assertIn("retrying", text)
        self.assertIn("1970-01-01 00:00:00Z  AE", text)
        self.assertIn("paused", text)
        # Medplum's agent: no agent part at all; the relay's view only
        self.assertEqual(lane_rows({"relay": {"lanes": {"paused": []}}, "agent": None}), [])
        self.assertEqual(lane_rows({}), [])
