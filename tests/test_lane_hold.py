"""
The ``lane-hold`` extension (issue 12): pushes of a paused lane already on our agent's disk
wait there too.  The agent's queue with a fake sender on a Clock (holds stop the next
delivery, not the one on its way; a release goes on in order; kept across a restart; a bad
message changes nothing), and the hub's side (sent after every connect and on each change,
only to an agent that announced it).
"""

from __future__ import annotations

from typing import Any

from medagent import wire
from medagent.delivery import Reply
from tests.test_lane_pause import _PauseCase
from tests.test_lanes import QueueBase

LANE = "mllp://dev:1"


class AgentHolds(QueueBase):
    def hold(self, *lanes: str) -> None:
        self.app.frame_received(wire.encode({"type": wire.LANES_HOLD, "lanes": list(lanes)}))

    def sent(self) -> list[str]:
        return [body for _, body, _ in self.sender.calls]

    def test_announced(self) -> None:
        [connect] = self.conn.of_type(wire.CONNECT_REQUEST)
        self.assertIn(wire.CAP_LANE_HOLD, connect["capabilities"])

    def test_held_lane_starts_nothing_more_and_a_release_goes_on_in_order(self) -> None:
        for i in range(3):
            self.push(f"p{i}")
        self.assertEqual(self.sent(), ["p0"])
        self.hold(LANE)
        self.sender.calls[0][2].callback(Reply("ACK"))  # the one on its way finishes
        self.push("p3")
        self.push("o0", "mllp://other:1")  # another device goes on
        self.assertEqual(self.sent(), ["p0", "o0"])
        stats = self.app.current_stats()
        self.assertEqual(stats["held"], [LANE])
        self.assertTrue(stats["lanes"][LANE]["held"])
        self.hold()  # released
        self.assertEqual(self.sent(), ["p0", "o0", "p1"])
        for i in (2, 3):
            self.sender.calls[-1][2].callback(Reply("ACK"))
        self.assertEqual(self.sent(), ["p0", "o0", "p1", "p2", "p3"])

    def test_an_idle_held_lane_does_not_take_a_new_push_directly(self) -> None:
        self.hold(LANE)
        self.push("p0")
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.state("p0"), "queued")
        self.hold("mllp://else:1")
        self.assertEqual(self.sent(), ["p0"])

    def test_holds_are_kept_across_a_restart(self) -> None:
        self.push("p0")
        self.push("p1")
        self.hold(LANE)
        self.sender.calls[0][2].callback(Reply("ACK"))
        self.restart()  # before the relay is reached again: still held
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.app.queue.held, {LANE})
        self.hold()
        self.assertEqual(self.sent(), ["p1"])

    def test_a_bad_hold_message_changes_nothing(self) -> None:
        self.hold(LANE)
        for lanes in ("mllp://dev:1", [1], [""], ["x" * (wire.MAX_LANE_KEY + 1)],
                      ["l"] * (wire.MAX_HELD_LANES + 1), None):
            self.app.frame_received(wire.encode({"type": wire.LANES_HOLD, "lanes": lanes}))
            self.assertEqual(self.conn.of_type(wire.ERROR)[-1]["body"],
                             f"lanes must be a list of at most {wire.MAX_HELD_LANES} lane keys")
        self.assertEqual(self.app.queue.held, {LANE})


class HubSendsHolds(_PauseCase):
    def holds(self, conn: Any) -> list[list[str]]:
        return [m["lanes"] for m in conn.of_type(wire.LANES_HOLD)]

    def test_sent_after_connect_and_on_each_change_to_an_agent_that_holds(self) -> None:
        conn, session = self.connect(["durable", wire.CAP_LANE_HOLD])
        self.assertEqual(self.holds(conn), [[]])  # (it may hold lanes from before)
        self.pause()
        self.pause()  # no change: nothing sent
        self.assertEqual(self.holds(conn), [[], ["mllp://127.0.0.1:2575"]])
        self.assertTrue(self.successResultOf(self.hub.snapshot_anywhere(self.agent["id"]))
                        ["holdsOnAgent"])
        self.successResultOf(self.lanes_call("resume"))
        self.assertEqual(self.holds(conn), [[], ["mllp://127.0.0.1:2575"], []])

    def test_never_sent_to_an_agent_without_the_capability(self) -> None:
        for caps in (["durable"], None):
            conn, session = self.connect(caps)
            self.pause()
            self.successResultOf(self.lanes_call("resume"))
            self.assertEqual(self.holds(conn), [])
