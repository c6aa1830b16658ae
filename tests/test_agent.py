"""
The agent's protocol app and durable queue, with a fake relay connection, a fake device
sender, a Clock and a real SQLite file driven synchronously.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from medagent import wire
from medagent.agent.app import AgentApp
from medagent.agent.dispatch import Dispatcher
from medagent.delivery import DeliveryError, Reply
from medagent.agent.outbox import Outbox
from medagent.agent.queue import DurableQueue
from tests.fakes import InlineReactor, inline_database
from tests.test_hub import FakeConnection


class FakeSender:
    """Records what it was asked to send; the test fires each answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Deferred[Reply]]] = []

    def send(self, destination: Any, content_type: str, body: str, options: Any) -> Deferred:
        d: Deferred[Reply] = Deferred()
        self.calls.append((destination.url, body, d))
        return d

    def ping(self, destination: Any) -> Deferred:
        return succeed(Reply("pong"))

    def close(self) -> Deferred:
        return succeed(None)


class Tokens:
    def access_token(self) -> Deferred[str]:
        return succeed("tok")


class AgentAppTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.db = inline_database(self, DurableQueue.schema() + Outbox.schema(), self.clock)
        self.sender = FakeSender()
        self.make_app()

    def make_app(self) -> None:
        self.dispatcher = Dispatcher({"mllp": self.sender})
        self.app = AgentApp(self.clock, "a1", Tokens(), self.dispatcher, self.db,
                            heartbeat_interval=10)
        self.app.queue.rng = lambda: 0.5  # no jitter: delays are exact
        self.app.start()
        self.addCleanup(self.app.stop)
        self.conn = FakeConnection()
        self.app.connection_made(self.conn)

    def go_live(self, durable: bool = True) -> None:
        msg: dict[str, Any] = {"type": wire.CONNECT_RESPONSE}
        if durable:
            msg["capabilities"] = ["durable"]
        self.app.frame_received(wire.encode(msg))

    def push(self, push_id: str, remote: str = "mllp://dev:1", body: str = "MSH|x") -> None:
        self.app.frame_received(wire.encode({
            "type": wire.TRANSMIT_REQUEST, "remote": remote, "contentType": "x", "body": body,
            "callback": f"Agent/a1-{push_id}", "pushId": push_id}))

    def answers(self) -> list[dict[str, Any]]:
        return [m for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                if m.get("delivery") in ("delivered", "failed")]

    def row(self, push_id: str) -> dict[str, Any]:
        return self.db.run_sync(
            lambda c: dict(c.execute("SELECT * FROM inbox WHERE push_id=?", (push_id,))
                           .fetchone()))

    def test_connect_request(self) -> None:
        request = self.conn.sent[0]
        self.assertEqual((request["type"], request["accessToken"], request["agentId"]),
                         (wire.CONNECT_REQUEST, "tok", "a1"))
        self.assertIn("durable", request["capabilities"])

    def test_accept_deliver_confirm(self) -> None:
        self.go_live()
        self.push("p1")
        accepted = self.conn.of_type(wire.TRANSMIT_RESPONSE)[0]
        self.assertEqual((accepted["delivery"], accepted["statusCode"]), ("accepted", 202))
        self.assertEqual(self.row("p1")["state"], "delivering")
        url, body, d = self.sender.calls[0]
        self.assertEqual((url, body), ("mllp://dev:1", "MSH|x"))
        d.callback(Reply("MSA|AA|x", "x-application/hl7-v2+er7", detail="AA"))
        [answer] = self.answers()
        self.assertEqual((answer["delivery"], answer["body"], answer["callback"]),
                         ("delivered", "MSA|AA|x", "Agent/a1-p1"))
        self.assertEqual(self.row("p1")["confirmed"], 0)
        self.app.frame_received(wire.encode({"type": wire.TRANSMIT_CONFIRM, "pushId": "p1"}))
        self.assertEqual(self.row("p1")["confirmed"], 1)

    def test_repeated_request_not_delivered_again(self) -> None:
        self.go_live()
        self.push("p1")
        self.push("p1")
        self.assertEqual(len(self.sender.calls), 1)
        self.sender.calls[0][2].callback(Reply("ACK"))
        self.push("p1")
        self.assertEqual(len(self.sender.calls), 1)
        self.assertEqual([a["body"] for a in self.answers()], ["ACK", "ACK"])

    def test_order_per_lane_and_independent_lanes(self) -> None:
        self.go_live()
        self.push("p1")
        self.push("p2")
        self.push("q1", remote="mllp://other:2")
        self.assertEqual([c[0] for c in self.sender.calls], ["mllp://dev:1", "mllp://other:2"])
        self.sender.calls[0][2].callback(Reply("A1"))
        self.assertEqual([c[0] for c in self.sender.calls],
                         ["mllp://dev:1", "mllp://other:2", "mllp://dev:1"])

    def test_retry_delays_double_up_to_the_cap_times_jitter(self) -> None:
        """The queue's backoff: 1, 2, 4 ... capped at 60 s, scaled 0.5x .. 1.5x by C{rng}."""
        queue = self.app.queue
        self.assertEqual([queue.retry_delay(n) for n in range(1, 9)],
                         [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0])
        queue.rng = lambda: 0.0
        self.assertEqual([queue.retry_delay(n) for n in (1, 3, 7, 500)], [0.5, 2.0, 30.0, 30.0])
        queue.rng = lambda: 0.999
        self.assertAlmostEqual(queue.retry_delay(7), 60.0 * 1.499)

    def test_transient_failure_retried_with_backoff(self) -> None:
        self.go_live()
        self.push("p1")
        self.push("p2")
        self.sender.calls[0][2].errback(DeliveryError("refused", phase="connect"))
        progress = [m for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                    if m.get("error")]
        self.assertIn("refused (attempt 1, retrying)", progress[0]["error"])
        self.assertEqual(len(self.sender.calls), 1)  # p2 waits behind p1: order is kept
        self.clock.advance(1.0)
        self.assertEqual(len(self.sender.calls), 2)
        self.assertEqual(self.sender.calls[1][1], "MSH|x")
        self.sender.calls[1][2].errback(DeliveryError("refused", phase="connect"))
        self.clock.advance(1.9)
        self.assertEqual(len(self.sender.calls), 2)
        self.clock.advance(0.1)  # second retry after 2 s
        self.sender.calls[2][2].callback(Reply("ACK"))
        self.assertEqual(self.row("p1")["attempts"], 3)
        self.assertEqual(len(self.sender.calls), 4)  # now p2

    def test_max_attempts(self) -> None:
        self.go_live()
        self.push("p1", remote="mllp://dev:1?maxAttempts=2")
        self.sender.calls[0][2].errback(DeliveryError("refused", phase="connect"))
        self.clock.advance(1)
        self.sender.calls[1][2].errback(DeliveryError("refused", phase="connect"))
        [answer] = self.answers()
        self.assertEqual(answer["delivery"], "failed")
        self.assertIn("gave up after 2 attempts", answer["error"])

    def test_failure_after_write_not_retried(self) -> None:
        self.go_live()
        self.push("p1")
        self.sender.calls[0][2].errback(DeliveryError("no ACK within 30 s (timeout)",
                                                      phase="ack"))
        self.clock.advance(100)
        self.assertEqual(len(self.sender.calls), 1)
        [answer] = self.answers()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("failed", 504))

    def test_negative_answer_not_retried(self) -> None:
        self.go_live()
        self.push("p1")
        self.sender.calls[0][2].callback(Reply("MSA|AE|x", delivered=False, detail="AE"))
        [answer] = self.answers()
        self.assertEqual((answer["delivery"], answer["statusCode"]), ("failed", 200))

    def test_restart_marks_in_doubt_and_resumes_queued(self) -> None:
        self.go_live()
        self.push("p1")
        self.push("p2")
        self.push("r1", remote="mllp://dev:9?inDoubt=resend")
        # The agent "dies" with p1 and r1 delivering and p2 queued.
        self.app.stop()
        self.sender = FakeSender()
        self.make_app()
        self.assertEqual(self.row("p1")["state"], "done")
        self.assertIn("may or may not have received", self.row("p1")["last_error"])
        self.assertEqual(sorted(c[1] for c in self.sender.calls), ["MSH|x", "MSH|x"])
        self.assertEqual(sorted(c[0] for c in self.sender.calls),
                         ["mllp://dev:1", "mllp://dev:9?inDoubt=resend"])
        self.assertEqual(self.row("p2")["state"], "delivering")
        self.assertEqual(self.row("r1")["attempts"], 2)

    def test_answers_kept_while_offline_and_resent(self) -> None:
        self.go_live()
        self.push("p1")
        self.app.connection_lost("cut")
        self.sender.calls[0][2].callback(Reply("ACK"))
        self.assertEqual(self.answers(), [])
        conn2 = FakeConnection()
        self.conn = conn2
        self.app.connection_made(conn2)
        self.go_live()
        self.assertEqual([a["body"] for a in self.answers()], ["ACK"])

    def test_plain_relay_confirmed_on_send(self) -> None:
        self.go_live(durable=False)
        self.push("p1")
        self.sender.calls[0][2].callback(Reply("ACK"))
        self.assertEqual(self.row("p1")["confirmed"], 1)

    def test_heartbeats(self) -> None:
        self.go_live()
        self.clock.advance(10)
        self.assertEqual(len(self.conn.of_type(wire.HEARTBEAT_REQUEST)), 1)
        # the (refreshed) token rides on the heartbeat, and the agent says it does
        self.assertEqual(self.conn.of_type(wire.HEARTBEAT_REQUEST)[0]["accessToken"], "tok")
        self.assertIn(wire.CAP_TOKEN_REFRESH,
                      self.conn.of_type(wire.CONNECT_REQUEST)[0]["capabilities"])
        self.app.frame_received(b'{"type":"agent:heartbeat:response","version":"x"}')
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertIsNone(self.conn.closed)
        self.clock.advance(10)
        self.assertEqual(self.conn.closed, "missed heartbeats")

    def test_connect_not_answered(self) -> None:
        for _ in range(4):
            self.clock.advance(10)
        self.assertEqual(self.conn.closed, "connect not answered")

    def test_bad_frames(self) -> None:
        self.go_live()
        self.app.frame_received(b"{oops")
        self.app.frame_received(b'{"type":"agent:nope","callback":"c9"}')
        errors = self.conn.of_type(wire.ERROR)
        self.assertIn("not JSON", errors[0]["body"])
        self.assertEqual(errors[1]["callback"], "c9")

    def test_unsupported_scheme_fails_cleanly(self) -> None:
        self.go_live()
        self.push("p1", remote="gopher://x:1")
        [answer] = self.answers()
        self.assertEqual(answer["statusCode"], 400)
        self.assertIn("Unsupported destination scheme", answer["error"])

    def test_stats(self) -> None:
        self.go_live()
        self.push("p1")
        self.push("p2")
        self.app.frame_received(b'{"type":"agent:stats:request","callback":"s1"}')
        stats = self.conn.of_type(wire.STATS_RESPONSE)[0]["stats"]
        self.assertEqual(stats["lanes"]["mllp://dev:1"]["waiting"], 2)
        self.assertTrue(stats["lanes"]["mllp://dev:1"]["inFlight"])
        json.dumps(stats)

    def test_lane_retired_while_a_message_is_being_stored(self) -> None:
        """A message stored after its lane emptied and was retired is still delivered."""
        self.go_live()
        self.push("p1")  # in flight
        with self.db.hold():  # hold the next commit, as a busy database thread would
            self.push("p2")  # arrives while p1's lane is busy
            self.sender.calls[0][2].callback(Reply("A1"))  # p1 done: the empty lane is retired
        self.assertEqual(len(self.sender.calls), 2)
        self.sender.calls[1][2].callback(Reply("A2"))
        self.assertEqual([a["body"] for a in self.answers()], ["A1", "A2"])

    def test_message_arriving_while_another_is_stored_keeps_order(self) -> None:
        """The case a websocket cut produces: stores of one lane overlap its idle moment."""
        self.go_live()
        self.push("p1")  # in flight
        with self.db.hold():
            self.push("p2")  # lane busy: queued
            self.sender.calls[0][2].callback(Reply("A1"))  # p1 done, p2 not stored yet
            self.push("p3")  # must not jump ahead of p2, nor be delivered twice
        for i in (1, 2):
            self.sender.calls[i][2].callback(Reply(f"A{i + 1}"))
        self.clock.advance(100)
        self.assertEqual([c[1] for c in self.sender.calls], ["MSH|x"] * 3)
        self.assertEqual([a["pushId"] for a in self.answers()], ["p1", "p2", "p3"])
        self.assertEqual(len(self.sender.calls), 3)

    def test_answer_says_how_long_the_device_took(self) -> None:
        """C{deviceMs}: from handing the message to the device to its answer (an interval
        on the agent's clock, so the relay can place it on its own)."""
        self.go_live()
        self.push("p1")
        self.clock.advance(0.125)
        self.sender.calls[0][2].callback(Reply("A1"))
        [answer] = self.answers()
        self.assertEqual(answer[wire.DEVICE_MS], 125.0)

    def test_busy_lane_answer_and_next_claim_share_one_commit(self) -> None:
        """
        On a busy lane, recording message N's answer and claiming message N+1 is one
        transaction (one thread hop, one commit), the answer written first; N+1 is handed to
        the device only after that commit.
        """
        self.go_live()
        self.push("p1")  # in flight
        self.push("p2")  # waits on the lane
        transactions: list[int] = []
        run = self.db.run

        def counting_run(fn: Any, *args: Any) -> Any:
            transactions.append(len(self.sender.calls))
            return run(fn, *args)

        self.db.run = counting_run  # type: ignore[method-assign]
        self.sender.calls[0][2].callback(Reply("A1"))
        self.assertEqual(transactions, [1])  # one commit, before p2 was handed over
        self.assertEqual(len(self.sender.calls), 2)
        rows = self.successResultOf(run(lambda c: [tuple(r) for r in c.execute(
            "SELECT push_id, state, attempts FROM inbox ORDER BY seq")]))
        self.assertEqual(rows, [("p1", "done", 1), ("p2", "delivering", 1)])

    # -- agent:transmit:cancel (the 'cancel' extension) -----------------------------------

    def cancel(self, push_id: str, callback: str = "c1") -> dict[str, Any]:
        self.app.frame_received(wire.encode({"type": wire.TRANSMIT_CANCEL, "pushId": push_id,
                                             "callback": callback}))
        return [m for m in self.conn.of_type(wire.TRANSMIT_CANCEL_RESPONSE)
                if m["callback"] == callback][-1]

    def test_cancel_capability_announced(self) -> None:
        self.assertIn("cancel", self.conn.sent[0]["capabilities"])

    def test_cancel_drops_a_queued_message(self) -> None:
        self.go_live()
        self.push("p1")  # being delivered
        self.push("p2")  # queued behind it
        self.push("p3")
        answer = self.cancel("p2")
        self.assertEqual((answer["statusCode"], answer["pushId"]), (200, "p2"))
        self.assertEqual(self.row("p2")["state"], "done")
        self.assertEqual(json.loads(self.row("p2")["answer"])["delivery"], "cancelled")
        self.sender.calls[0][2].callback(Reply("A1"))
        self.assertEqual(len(self.sender.calls), 2)  # p3 next, p2 never
        self.sender.calls[1][2].callback(Reply("A3"))
        self.assertEqual([a["pushId"] for a in self.answers()], ["p1", "p3"])
        # the relay re-sends the request after a reconnect: answered from the record
        self.push("p2")
        self.assertEqual(len(self.sender.calls), 2)
        replayed = [m for m in self.conn.of_type(wire.TRANSMIT_RESPONSE)
                    if m.get("delivery") == "cancelled"]
        self.assertEqual([m["pushId"] for m in replayed], ["p2"])

    def test_cancel_while_delivering_is_refused(self) -> None:
        self.go_live()
        self.push("p1")
        self.assertEqual(self.cancel("p1")["statusCode"], 409)
        self.sender.calls[0][2].callback(Reply("A1"))
        self.assertEqual([a["pushId"] for a in self.answers()], ["p1"])
        self.assertEqual(self.cancel("p1", "c2")["statusCode"], 409)  # answered already

    def test_cancel_unknown_push(self) -> None:
        self.go_live()
        self.assertEqual(self.cancel("nope")["statusCode"], 404)

    def test_cancel_while_waiting_on_a_retry(self) -> None:
        self.go_live()
        self.push("p1")
        self.push("p2")
        self.sender.calls[0][2].errback(DeliveryError("refused", phase="connect"))
        self.assertEqual(self.cancel("p1")["statusCode"], 200)  # queued again, not in flight
        self.clock.advance(1.0)
        self.assertEqual(len(self.sender.calls), 2)
        self.assertEqual(self.row("p2")["state"], "delivering")

    def test_cancel_racing_a_claim(self) -> None:
        """The cancel and the lane's claim of the same message: exactly one of them wins."""
        self.go_live()
        self.push("p1")
        self.push("p2")
        with self.db.hold():  # hold commits: the claim of p2 and the cancel queue up
            self.sender.calls[0][2].callback(Reply("A1"))  # lane claims p2 (queued write)
            self.app.frame_received(wire.encode({"type": wire.TRANSMIT_CANCEL, "pushId": "p2",
                                                 "callback": "c1"}))
        [answer] = self.conn.of_type(wire.TRANSMIT_CANCEL_RESPONSE)
        self.assertEqual(answer["statusCode"], 409)
        self.assertEqual(len(self.sender.calls), 2)

    def test_cancel_queued_ahead_of_a_claim_wins(self) -> None:
        self.go_live()
        for push_id in ("p1", "p2", "p3"):
            self.push(push_id)
        with self.db.hold():  # hold commits: the cancel, then the claim of p2, queue up
            self.app.frame_received(wire.encode({"type": wire.TRANSMIT_CANCEL, "pushId": "p2",
                                                 "callback": "c1"}))
            self.sender.calls[0][2].callback(Reply("A1"))  # p1 done: the lane claims p2
        [answer] = self.conn.of_type(wire.TRANSMIT_CANCEL_RESPONSE)
        self.assertEqual(answer["statusCode"], 200)
        self.assertEqual(len(self.sender.calls), 2)  # p3, never p2
        self.assertEqual(self.row("p2")["state"], "done")
        self.assertEqual(self.row("p3")["state"], "delivering")
        self.sender.calls[1][2].callback(Reply("A3"))
        self.assertEqual([a["pushId"] for a in self.answers()], ["p1", "p3"])
