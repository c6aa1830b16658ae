"""
The shared Twisted recipes: L{medagent._twisted.shielded} (a caller that goes away stops
waiting, never the work it waited for: a push being written, a bot run and its audit) and the
injectable jitter of the subscription retry schedule (Twisted's C{backoffPolicy}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from medagent._twisted import shielded
from medagent.relay.subscriptions import retry_delay


class ShieldedTests(SynchronousTestCase):
    def test_result_and_failure_pass_through(self) -> None:
        self.assertEqual(self.successResultOf(shielded(succeed(3))), 3)
        f = self.failureResultOf(shielded(fail(ValueError("x"))), ValueError)
        self.assertEqual(str(f.value), "x")

    def test_cancelling_the_wait_does_not_cancel_the_work(self) -> None:
        cancelled: list[Any] = []
        inner: Deferred[int] = Deferred(cancelled.append)
        outer = shielded(inner)
        outer.cancel()
        self.failureResultOf(outer, CancelledError)
        self.assertEqual(cancelled, [])
        self.assertFalse(inner.called)
        inner.callback(5)  # the work finishes; nobody waits, nothing breaks
        self.assertIsNone(self.successResultOf(inner))

    def test_failure_after_the_caller_left_goes_to_late_failure(self) -> None:
        late: list[Failure] = []
        inner: Deferred[int] = Deferred()
        outer = shielded(inner, late.append)
        outer.cancel()
        self.failureResultOf(outer, CancelledError)
        inner.errback(ValueError("after"))
        self.assertEqual([f.type for f in late], [ValueError])
        self.assertIsNone(self.successResultOf(inner))  # handled: no unhandled error

    def test_late_failure_is_dropped_without_a_callback_and_cancel_is_not_reported(self) -> None:
        late: list[Failure] = []
        quiet: Deferred[int] = Deferred()
        left = shielded(quiet)
        left.cancel()
        self.failureResultOf(left, CancelledError)
        quiet.errback(ValueError("dropped"))
        self.assertIsNone(self.successResultOf(quiet))
        reported: Deferred[int] = Deferred()
        outer = shielded(reported, late.append)
        outer.cancel()
        self.failureResultOf(outer, CancelledError)
        reported.errback(CancelledError())
        self.assertEqual(late, [])


class RetryDelayTests(SynchronousTestCase):
    def test_jitter_is_added_to_the_schedule(self) -> None:
        self.assertEqual([retry_delay(n, 10, 600, jitter=lambda: 0.25) for n in (1, 2, 8)],
                         [10.25, 20.25, 600.25])

    def test_no_jitter_by_default(self) -> None:
        self.assertEqual(retry_delay(3, 10, 600), 40)
