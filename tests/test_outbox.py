"""
The agent's inbound outbox (L{medagent.agent.outbox.Outbox}): a device's message is on disk
before its channel hears "stored" (an enhanced-mode CA), messages that arrive together share
one commit, and the channel hears before the message goes up to the relay.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from medagent.agent.outbox import Outbox, Stored
from medagent.delivery import Reply
from tests.fakes import InlineReactor, inline_database


class OutboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.db = inline_database(self, Outbox.schema(), self.clock)
        self.events: list[Any] = []
        self.link_up = True
        self.outbox = Outbox(self.db, self.clock, "a1", self.send)
        self.commits = 0
        run = self.db.run

        def counting_run(fn: Any, *args: Any) -> Any:
            self.commits += 1
            return run(fn, *args)

        self.db.run = counting_run  # type: ignore[method-assign]

    def send(self, msg: dict[str, Any]) -> bool:
        self.events.append(("sent", msg["body"]))
        return self.link_up

    def rows(self) -> list[str]:
        return [r["body"] for r in self.successResultOf(self.outbox.rows.pending(100))]

    def test_stored_only_after_commit(self) -> None:
        """While the commit is under way nothing is answered; after it, the row is there."""
        with self.db.hold():
            d = self.outbox.forward("ch", "x-application/hl7-v2+er7", "m1", "dev:1")
            self.assertNoResult(d)
            self.assertEqual(self.events, [])
        stored = self.successResultOf(d)
        self.assertIsInstance(stored, Stored)
        self.assertEqual(self.rows(), ["m1"])

    def test_messages_arriving_together_share_one_commit(self) -> None:
        """Group commit: three messages gathered during a commit go in one transaction."""
        with self.db.hold():
            ds = [self.outbox.forward("ch", "t", f"m{i}", "dev:1") for i in range(3)]
        self.assertEqual(self.commits, 1)
        for d in ds:
            self.assertIsInstance(self.successResultOf(d), Stored)
        # order on disk is arrival order (what a resend after a reconnect replays)
        self.assertEqual(self.rows(), ["m0", "m1", "m2"])
        self.assertEqual([e[1] for e in self.events], ["m0", "m1", "m2"])

    def test_channel_hears_before_the_relay_send(self) -> None:
        """The device's CA is not held up by encoding the message for the relay."""
        with self.db.hold():  # the commit is under way while the channel adds its callback
            d = self.outbox.forward("ch", "t", "m1", "dev:1")
            d.addCallback(lambda stored: self.events.append(("stored", None)))
        self.assertEqual(self.events, [("stored", None), ("sent", "m1")])

    def test_failed_write_is_not_stored_and_not_sent(self) -> None:
        """A write that fails is a failed forward (the channel answers CE), never a send."""
        self.db.stop()
        f = self.failureResultOf(self.outbox.forward("ch", "t", "m1", "dev:1"))
        self.assertIn("stopped", f.getErrorMessage())
        self.assertEqual(self.events, [])

    def test_answer_removes_the_row_and_fires(self) -> None:
        stored = self.successResultOf(self.outbox.forward("ch", "t", "m1", "dev:1"))
        callback = next(iter(self.outbox.waiting))
        self.assertTrue(self.outbox.answered({"callback": callback, "statusCode": 200,
                                              "body": "MSH|ack", "contentType": "t"}))
        reply = self.successResultOf(stored.answer)
        self.assertIsInstance(reply, Reply)
        self.assertEqual(reply.body, "MSH|ack")
        self.assertEqual(self.rows(), [])

    def test_link_down_keeps_the_message(self) -> None:
        """Stored even when the link is down: it waits on disk and goes after a reconnect."""
        self.link_up = False
        self.successResultOf(self.outbox.forward("ch", "t", "m1", "dev:1"))
        self.assertEqual(self.rows(), ["m1"])
        self.link_up = True
        self.events.clear()
        self.assertEqual(self.successResultOf(self.outbox.resend_pending()), 1)
        self.assertEqual(self.events, [("sent", "m1")])
