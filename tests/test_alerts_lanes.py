"""
The console alerts of issue 12 beyond "agent offline": a stuck device lane (one alert per
lane, however many pushes wait and however the URL is spelt; cleared when it moves), the
error rate of an agent's pushes (raised once, cleared when it ends), and the webhook that
posts each change (bounded queue, retries with backoff on a Clock, never blocking the
monitor; then against a loopback twisted.web server through the relay's own treq poster).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from medagent.metrics import RelayMetrics
from medagent.relay import tap as relay_tap
from medagent.relay.console import webhook as wh
from medagent.relay.console.alerts import ERROR_RATE, KINDS, QUEUE_AGE, Alert, AlertMonitor
from medagent.relay.subscriptions import treq_poster
from medagent.relay.webhooks import WebhookPolicy
from medagent.storage import journal as j
from medagent.storage.sqlite.journal import SQLiteJournal
from tests.fakes import InlineReactor, inline_database
from tests.test_console import FakeHub, FakeStore


class FakeOutcomes:
    """The journal's outcome counts (what the error rate alert reads)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}
        self.asked: list[float] = []

    def outcome_counts(self, since: float, limit: int = 1000) -> Deferred[Any]:
        self.asked.append(since)
        return succeed(dict(self.rows))


class LaneAgeAlerts(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        db = inline_database(self, SQLiteJournal.schema(), self.clock)
        self.journal = SQLiteJournal(db, clock=self.clock)
        self.monitor = AlertMonitor(self.clock, FakeHub(), FakeStore([]), offline_after=None,
                                    journal=self.journal, queue_age_after=600, interval=15)
        self.seen: list[tuple[str, str, str | None, bool]] = []
        self.monitor.listeners.append(lambda a, raised: self.seen.append(
            (a.kind, a.agent_id, a.lane, raised)))
        self.addCleanup(self.monitor.stop)

    def push(self, agent: str, remote: str, n: str) -> j.Push:
        push = j.Push(id=self.journal.new_id(), agent_id=agent, destination=remote,
                      remote=remote, content_type="x-application/hl7-v2+er7",
                      body=f"MSH|{n}", control_id=n)
        return self.successResultOf(self.journal.create(push))

    def test_one_alert_per_stuck_lane_cleared_when_it_moves(self) -> None:
        self.monitor.start()
        stuck = [self.push("a1", "mllp://lis:2575", f"S{i}") for i in range(20)]
        # the same device spelt another way: the same lane
        stuck.append(self.push("a1", "mllp://LIS:2575?ackTimeout=60", "S20"))
        self.clock.advance(300)
        young = self.push("a1", "mllp://pacs:2575", "Y0")
        for _ in range(25):  # 375 s later: the first lane is stuck, the second is not
            self.clock.advance(15)
        self.assertEqual(self.seen, [(QUEUE_AGE, "a1", "mllp://lis:2575", True)])
        [alert] = self.monitor.active.values()
        self.assertEqual(alert.text(), "Agent/a1: pushes to mllp://lis:2575 waiting too long")
        self.assertAlmostEqual(alert.since, stuck[0].created, delta=1)
        for _ in range(20):  # the second one's turn
            self.clock.advance(15)
        self.assertEqual(self.seen[-1], (QUEUE_AGE, "a1", "mllp://pacs:2575", True))
        self.assertEqual(len(self.monitor.active), 2)
        metrics = RelayMetrics()
        metrics.watch_alerts(self.monitor, KINDS)
        self.assertIn(b'medagent_relay_alerts_active{kind="queue-age"} 2.0', metrics.render())
        for push in stuck:
            self.successResultOf(self.journal.transition(push, j.DELIVERED))
        self.clock.advance(15)
        self.assertEqual(self.seen[-1], (QUEUE_AGE, "a1", "mllp://lis:2575", False))
        self.assertEqual([a.lane for a in self.monitor.active.values()], ["mllp://pacs:2575"])
        self.successResultOf(self.journal.transition(young, j.CANCELLED))
        self.clock.advance(15)
        self.assertEqual(self.monitor.active, {})
        self.assertEqual(len(self.seen), 4)  # raised twice, cleared twice: nothing per check


class ErrorRateAlerts(SynchronousTestCase):
    def test_raised_once_over_the_threshold_with_enough_outcomes_and_cleared(self) -> None:
        clock = Clock()
        clock.advance(10_000)
        journal = FakeOutcomes()
        monitor = AlertMonitor(clock, FakeHub(), FakeStore([]), offline_after=None,
                               journal=journal, error_rate=0.5, error_window=900,
                               error_min=5, interval=15)
        seen: list[tuple[str, str, bool]] = []
        monitor.listeners.append(lambda a, raised: seen.append((a.kind, a.agent_id, raised)))
        monitor.start()
        journal.rows = {"a1": {"finished": 4, "failed": 4},  # too few to say
                        "a2": {"finished": 100, "failed": 49}}  # under the threshold
        clock.advance(15)
        self.assertEqual(seen, [])
        self.assertEqual(journal.asked[-1], clock.seconds() - 900)
        journal.rows["a1"] = {"finished": 6, "failed": 3}
        for _ in range(10):
            clock.advance(15)
        self.assertEqual(seen, [(ERROR_RATE, "a1", True)])
        self.assertEqual(monitor.active[(ERROR_RATE, "a1")].text(),
                         "Agent/a1: too many pushes failed (3 of 6 failed in 15 min)")
        journal.rows["a1"] = {"finished": 7, "failed": 3}
        clock.advance(15)
        self.assertEqual(seen, [(ERROR_RATE, "a1", True), (ERROR_RATE, "a1", False)])
        monitor.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bad_settings_are_refused(self) -> None:
        for kw in ({"error_rate": 0.0}, {"error_rate": 1.5}, {"error_rate": 0.5, "error_min": 0},
                   {"error_rate": 0.5, "error_window": 0}):
            rate = kw.get("error_rate")
            if rate == 0.0:
                continue  # (0 is "off", not an error)
            self.assertRaises(ValueError, AlertMonitor, Clock(), FakeHub(), FakeStore([]),
                              offline_after=None, journal=FakeOutcomes(), **kw)
        self.assertRaises(ValueError, AlertMonitor, Clock(), FakeHub(), FakeStore([]),
                          offline_after=None, error_rate=0.5)  # no journal


def _alert(kind: str = QUEUE_AGE, lane: str | None = "mllp://lis:2575") -> Alert:
    return Alert(kind, "a1", 1_700_000_000.0, 1_700_000_600.0, lane=lane)


class WebhookUnits(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.posts: list[tuple[str, dict[str, Any], Deferred[int]]] = []

        def post(url: str, body: bytes, headers: Any, timeout: float) -> Deferred[int]:
            d: Deferred[int] = Deferred()
            self.assertEqual(headers["Content-Type"], "application/json")
            self.posts.append((url, json.loads(body), d))
            return d

        self.hook = wh.AlertWebhook(self.clock, post, "https://hooks.example/alerts",
                                    max_queue=3, max_attempts=3, retry_base=2.0, timeout=5)
        self.addCleanup(self.hook.stop)

    def test_payload_says_what_and_when_never_more(self) -> None:
        alert = _alert()
        self.hook(alert, True)
        [(url, payload, d)] = self.posts
        self.assertEqual(url, "https://hooks.example/alerts")
        self.assertEqual(payload, {
            "kind": "queue-age", "key": "queue-age/a1/mllp://lis:2575", "state": "raised",
            "agent": "a1", "lane": "mllp://lis:2575", "since": "2023-11-14T22:13:20.000Z",
            "at": "2023-11-14T22:23:20.000Z",
            "text": "Agent/a1: pushes to mllp://lis:2575 waiting too long"})
        d.callback(204)
        alert.cleared = 1_700_000_900.0
        self.hook(alert, False)
        self.assertEqual((self.posts[1][1]["state"], self.posts[1][1]["at"]),
                         ("cleared", "2023-11-14T22:28:20.000Z"))
        self.posts[1][2].callback(200)
        self.assertEqual(self.hook.counts, {"sent": 2, "retried": 0, "failed": 0,
                                            "dropped": 0})

    def test_in_order_one_at_a_time_retried_with_backoff_then_given_up(self) -> None:
        self.hook(_alert(lane="L1"), True)
        self.hook(_alert(lane="L2"), True)  # waits: one POST at a time, in order
        self.assertEqual([p[1]["lane"] for p in self.posts], ["L1"])
        self.posts[0][2].callback(500)
        self.assertEqual(len(self.posts), 1)
        self.clock.advance(1.9)
        self.assertEqual(len(self.posts), 1)
        self.clock.advance(0.1)  # 2 s
        self.assertEqual([p[1]["lane"] for p in self.posts], ["L1", "L1"])
        self.posts[1][2].errback(ConnectionError("refused"))
        self.clock.advance(3.9)
        self.assertEqual(len(self.posts), 2)
        self.clock.advance(0.1)  # then 4 s
        self.assertEqual(len(self.posts), 3)
        self.posts[2][2].callback(503)  # the third attempt: given up, the next one goes
        self.assertEqual([p[1]["lane"] for p in self.posts[3:]], ["L2"])
        self.posts[3][2].callback(200)
        self.assertEqual(self.hook.counts, {"sent": 1, "retried": 2, "failed": 1,
                                            "dropped": 0})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_hanging_receiver_times_out_and_never_blocks_the_monitor(self) -> None:
        for i in range(10):  # the monitor's listener returns at once, whatever the receiver
            self.hook(_alert(lane=f"L{i}"), True)
        self.assertEqual(len(self.posts), 1)
        self.assertEqual(len(self.hook.queue), 3)  # bounded: the oldest dropped, counted
        self.assertEqual(self.hook.counts["dropped"], 7)
        # the one being tried stays; the oldest behind it went
        self.assertEqual([p["lane"] for p in self.hook.queue], ["L0", "L8", "L9"])
        self.clock.advance(6)  # the first POST's timeout (5 s + 1): a failed attempt
        self.assertEqual(self.hook.counts["retried"], 1)
        self.clock.advance(2)
        self.assertEqual([p[1]["lane"] for p in self.posts], ["L0", "L0"])
        self.posts[-1][2].callback(200)
        self.assertEqual([p[1]["lane"] for p in self.posts[2:]], ["L8"])

    def test_bad_urls_are_refused(self) -> None:
        for url in ("http://hooks.example/x", "ftp://h/x", "https://u:p@hooks.example/x",
                    "not a url", "https://h:99999/"):
            self.assertIsNotNone(wh.webhook_url_problem(url), url)
        for url in ("https://hooks.example/x", "http://127.0.0.1:8080/hook",
                    "http://localhost/h"):
            self.assertIsNone(wh.webhook_url_problem(url), url)

    def test_relay_options(self) -> None:
        def parse(*argv: str) -> Any:
            options = relay_tap.Options()
            options.parseOptions(["--bot-user", "nobody", *argv])
            return options.service_kwargs()

        kw = parse()
        self.assertEqual((kw["alert_error_percent"], kw["alert_error_minutes"],
                          kw["alert_error_min"], kw["alert_webhook"]), (50.0, 15.0, 5, None))
        self.assertRaises(usage.UsageError, parse, "--alert-webhook", "http://hooks.example/")
        self.assertRaises(usage.UsageError, parse, "--alert-error-percent", "101")
        self.assertRaises(usage.UsageError, parse, "--alert-webhook", "@/nonexistent/file")
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        os.write(fd, b"https://hooks.example/T0KEN/secret\n")
        os.close(fd)
        self.assertEqual(parse("--alert-webhook", f"@{path}")["alert_webhook"],
                         "https://hooks.example/T0KEN/secret")


class _Receiver(Resource):
    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = codes
        self.got: list[dict[str, Any]] = []
        self.arrived: Deferred[None] = Deferred()

    def render_POST(self, request: Any) -> bytes:  # noqa: N802
        self.got.append(json.loads(request.content.read()))
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        if len(self.got) == 3 and not self.arrived.called:
            self.arrived.callback(None)
        return b"ok"


class WebhookLoopback(TestCase):
    timeout = 30

    def test_posts_to_a_loopback_server_and_retries_a_500(self) -> Deferred:
        async def go() -> None:
            receiver = _Receiver([500])
            port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            url = f"http://127.0.0.1:{port.getHost().port}/alerts"
            post, close = treq_poster(reactor, WebhookPolicy([url]))
            self.addCleanup(close)
            hook = wh.AlertWebhook(reactor, post, url, retry_base=0.05, timeout=5)
            self.addCleanup(hook.stop)
            hook(_alert(), True)
            hook(_alert(ERROR_RATE, None), True)
            await receiver.arrived.addTimeout(20, reactor)
            await _until(lambda: hook.counts["sent"] == 2)
            self.assertEqual([(g["kind"], g["state"]) for g in receiver.got],
                             [("queue-age", "raised"), ("queue-age", "raised"),
                              ("error-rate", "raised")])  # the first after its 500
            self.assertEqual(hook.counts, {"sent": 2, "retried": 1, "failed": 0,
                                           "dropped": 0})

        return ensureDeferred(go())


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    from tests import procs

    await procs.wait_until(predicate, timeout=timeout, interval=0.02, what="condition")
