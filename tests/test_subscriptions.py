"""
Subscriptions: criteria matching, interaction filters, HMAC signatures, the durable retry
schedule (on a Clock), ordering per resource, and delivery to bots and URLs.  The store and
the queue are real SQLite driven synchronously; the bot runner and the HTTP POST are fakes
that record what they were given and answer what the test says.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from medagent.relay import bots as b
from medagent.relay.subscriptions import (
    CANCELLED,
    DELIVERED,
    FAILED,
    PENDING,
    CriteriaError,
    SubscriptionManager,
    matches,
    parse_criteria,
    retry_delay,
    sign,
    subscription_spec,
)
from medagent.storage.sqlite.database import Database
from medagent.storage.sqlite.deliveries import SQLiteDeliveryQueue
from medagent.storage.sqlite.store import SQLiteStore
from tests.fakes import InlineReactor, inline_database

MEDPLUM = "https://medplum.com/fhir/StructureDefinition/"


def subscription(criteria: str = "ServiceRequest", endpoint: str = "Bot/bot-1", *,
                 status: str = "active", interactions: tuple[str, ...] = (),
                 max_attempts: int | None = None, secret: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    ext: list[dict[str, Any]] = [
        {"url": MEDPLUM + "subscription-supported-interaction", "valueCode": i}
        for i in interactions]
    if max_attempts is not None:
        ext.append({"url": "http://medplum.com/fhir/StructureDefinition/"
                           "subscription-max-attempts", "valueInteger": max_attempts})
    if secret is not None:
        ext.append({"url": "https://www.medplum.com/fhir/StructureDefinition/"
                           "subscription-secret", "valueString": secret})
    return {"resourceType": "Subscription", "status": status, "criteria": criteria,
            "channel": {"type": "rest-hook", "endpoint": endpoint}, "extension": ext,
            "reason": "test", **extra}


SR = {"resourceType": "ServiceRequest", "id": "sr1", "status": "active",
      "identifier": [{"system": "urn:placer", "value": "ORD-1"}],
      "subject": {"reference": "Patient/p1"},
      "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}}


class CriteriaTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_criteria("ServiceRequest").params, ())
        c = parse_criteria("ServiceRequest?status=active,on-hold&code=http://loinc.org|2345-7"
                           "&_count=5")
        self.assertEqual(c.resource_type, "ServiceRequest")
        self.assertEqual(c.params, (("status", "", ("active", "on-hold")),
                                    ("code", "", ("http://loinc.org|2345-7",))))
        for bad in ("", None, "serviceRequest", "ServiceRequest?performer=x",
                    "ServiceRequest?status:not=active", "?status=active"):
            self.assertRaises(CriteriaError, parse_criteria, bad)

    def test_matches(self) -> None:
        yes = [
            "ServiceRequest",
            "ServiceRequest?status=active",
            "ServiceRequest?status=draft,active",
            "ServiceRequest?status=active&subject=Patient/p1",
            "ServiceRequest?identifier=urn:placer|ORD-1",
            "ServiceRequest?identifier=ORD-1",
            "ServiceRequest?code=http://loinc.org|2345-7",
            "ServiceRequest?_id=sr1",
            "ServiceRequest?status=active&status=active",
        ]
        no = [
            "Patient",
            "ServiceRequest?status=revoked",
            "ServiceRequest?status=active&subject=Patient/p2",
            "ServiceRequest?identifier=urn:other|ORD-1",
            "ServiceRequest?identifier=|ORD-1",  # |value means: no system
            "ServiceRequest?code=http://snomed.info/sct|2345-7",
            "ServiceRequest?_id=sr2",
        ]
        for text in yes:
            self.assertTrue(matches(parse_criteria(text), SR), text)
        for text in no:
            self.assertFalse(matches(parse_criteria(text), SR), text)

    def test_name_modifiers(self) -> None:
        patient = {"resourceType": "Patient", "id": "p",
                   "name": [{"family": "Doe", "given": ["Jane"]}]}
        for text, want in (("Patient?name=do", True), ("Patient?name=oe", False),
                           ("Patient?name:contains=oe", True), ("Patient?name:exact=doe", True),
                           ("Patient?name:exact=do", False), ("Patient?name=JANE", True)):
            self.assertEqual(matches(parse_criteria(text), patient), want, text)


class SpecTests(SynchronousTestCase):
    def test_interactions(self) -> None:
        spec = subscription_spec({"id": "s", **subscription()})
        self.assertEqual(spec.interactions, {"create", "update", "delete"})  # absent = all
        spec = subscription_spec({"id": "s", **subscription(interactions=("create",))})
        self.assertEqual(spec.interactions, {"create"})
        spec = subscription_spec({"id": "s", **subscription(interactions=("update", "delete"))})
        self.assertEqual(spec.interactions, {"update", "delete"})
        spec = subscription_spec({"id": "s", **subscription(interactions=("patch",))})
        self.assertFalse(spec.usable)
        self.assertIn("supported-interaction", spec.problem)

    def test_extensions_and_channel(self) -> None:
        spec = subscription_spec({"id": "s", **subscription(max_attempts=99, secret="abc")})
        self.assertEqual((spec.max_attempts, spec.secret, spec.kind), (18, "abc", "bot"))
        self.assertEqual(subscription_spec({"id": "s", **subscription()}).max_attempts, 4)
        self.assertEqual(
            subscription_spec({"id": "s", **subscription(max_attempts=0)}).max_attempts, 1)
        url = subscription_spec({"id": "s", **subscription(endpoint="https://x.test/hook")})
        self.assertEqual((url.kind, url.usable), ("url", True))
        for bad in (subscription(endpoint="ftp://x"), subscription(endpoint="Bot/"),
                    {**subscription(), "channel": {"type": "websocket", "endpoint": "Bot/b"}},
                    subscription(criteria="ServiceRequest?performer=x"),
                    {**subscription(), "extension": [
                        {"url": MEDPLUM + "fhir-path-criteria-expression",
                         "valueString": "%current.status='active'"}]}):
            self.assertFalse(subscription_spec({"id": "s", **bad}).usable, bad)
        self.assertFalse(subscription_spec({"id": "s", **subscription(status="off")}).usable)
        ended = subscription_spec({"id": "s", **subscription(end="2024-01-01T00:00:00Z")})
        self.assertTrue(ended.usable)
        self.assertEqual(ended.end, 1704067200.0)
        self.assertFalse(ended.live(1704067200.0))
        self.assertTrue(ended.live(1704067199.0))
        self.assertFalse(subscription_spec({"id": "s", **subscription(end="soon")}).usable)
        spec = subscription_spec({"id": "s", **subscription(endpoint="https://h.test/x"),
                                  "channel": {"type": "rest-hook", "endpoint": "https://h.test/x",
                                              "header": ["X-Api-Key: t"]}})
        self.assertEqual(spec.headers, (("X-Api-Key", "t"),))
        self.assertTrue(spec.usable)

    def test_signature_is_rfc4231_hmac_sha256(self) -> None:
        # RFC 4231 test case 2
        self.assertEqual(sign("Jefe", b"what do ya want for nothing?"),
                         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")

    def test_retry_schedule(self) -> None:
        self.assertEqual([retry_delay(n, 10, 600) for n in range(1, 9)],
                         [10, 20, 40, 80, 160, 320, 600, 600])


class FakeRunner:
    """Records bot runs; answers from a script (default: success)."""

    audit = True
    stopped = False
    max_time_limit = 60.0

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.script: list[Any] = []

    def execute(self, bot_id: str, input: Any, content_type: str, **kw: Any) -> Deferred:
        self.calls.append({"bot": bot_id, "input": input, "contentType": content_type, **kw})
        answer = self.script.pop(0) if self.script else b.SUCCESS
        if isinstance(answer, Deferred):
            return answer
        return succeed(b.BotRun(bot_id=bot_id, outcome=answer,
                                error=None if answer == b.SUCCESS else "boom"))


class ManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = InlineReactor()
        self.clock.advance(1_700_000_000)
        self.db = inline_database(self, SQLiteStore.schema() + SQLiteDeliveryQueue.schema(),
                                  self.clock)
        self.store = SQLiteStore(self.db)
        self.runner = FakeRunner()
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []
        self.post_status: list[Any] = []
        self.manager = self.make_manager()
        self.events: list[tuple[str, str]] = []
        self.manager.observers.append(lambda e, d, detail: self.events.append((e, d.id)))

    def make_manager(self) -> SubscriptionManager:
        manager = SubscriptionManager(self.clock, SQLiteDeliveryQueue(self.db), self.store,
                                      self.runner, poster=self.post, retry_base=10.0,
                                      retry_cap=600.0)
        self.addCleanup(manager.stop)
        return manager

    def post(self, url: str, body: bytes, headers: Any, timeout: float) -> Deferred:
        self.posts.append((url, body, dict(headers)))
        answer = self.post_status.pop(0) if self.post_status else 200
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        return self.successResultOf(self.store.create(resource))

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        return self.successResultOf(self.store.update(resource))

    def start(self) -> None:
        self.successResultOf(self.manager.start())

    def deliveries(self, **kw: Any) -> list[Any]:
        return self.successResultOf(self.manager.deliveries(**kw))

    def audits(self) -> list[dict[str, Any]]:
        return self.successResultOf(self.store.search("AuditEvent", {}))

    def test_delivery_commits_with_the_write_or_not_at_all(self) -> None:
        """No window where a write is committed and its trigger is not (or the reverse)."""
        self.start()
        self.create(subscription("ServiceRequest?status=active"))
        sr = self.create({k: v for k, v in SR.items() if k != "id"})
        self.assertEqual([d.resource_id for d in self.deliveries()], [sr["id"]])
        # The queue cannot be written: the write that would fire is refused, not lost.
        self.db.run_sync(lambda c: c.execute(
            "ALTER TABLE subscription_deliveries RENAME TO broken"))
        self.addCleanup(self.db.run_sync, lambda c: c.execute(
            "ALTER TABLE broken RENAME TO subscription_deliveries"))
        f = self.failureResultOf(self.store.create({**SR, "id": None}))
        self.assertIn("subscription_deliveries", f.getErrorMessage())
        self.assertEqual(len(self.successResultOf(self.store.search("ServiceRequest", {}))), 1)

    def test_fires_after_commit_with_resource_and_headers(self) -> None:
        self.start()
        sub = self.create(subscription("ServiceRequest?status=active"))
        sr = self.create({k: v for k, v in SR.items() if k != "id"})
        self.assertEqual(len(self.runner.calls), 1)
        call = self.runner.calls[0]
        self.assertEqual(call["bot"], "bot-1")
        self.assertEqual(call["input"], sr)  # the committed version, with meta
        self.assertEqual(call["contentType"], "application/fhir+json")
        self.assertEqual(call["trigger"], "subscription")
        self.assertEqual(call["headers"]["X-Medplum-Subscription"], sub["id"])
        self.assertEqual(call["headers"]["X-Medplum-Interaction"], "create")
        self.assertNotIn("X-Signature", call["headers"])
        self.assertEqual(call["event_extra"], {"previous": None, "interaction": "create"})
        self.assertIn(f"Subscription/{sub['id']}", call["entities"])
        self.assertIn(f"ServiceRequest/{sr['id']}", call["entities"])
        [delivery] = self.deliveries()
        self.assertEqual((delivery.state, delivery.attempts, delivery.payload),
                         (DELIVERED, 1, None))  # payload dropped once delivered
        # Not matching: a revoked one, other types, AuditEvents.
        self.create({**SR, "id": "sr9", "status": "revoked"})
        self.create({"resourceType": "Patient"})
        self.create({"resourceType": "AuditEvent"})
        self.assertEqual(len(self.runner.calls), 1)

    def test_interaction_filter(self) -> None:
        self.start()
        self.create(subscription(interactions=("create",)))
        sr = self.create(dict(SR))
        self.update({**sr, "status": "on-hold"})
        self.successResultOf(self.store.delete("ServiceRequest", sr["id"]))
        self.assertEqual([c["headers"]["X-Medplum-Interaction"] for c in self.runner.calls],
                         ["create"])

    def test_update_carries_previous_and_delete_input(self) -> None:
        self.start()
        self.create(subscription(secret="s3cret"))
        sr = self.create(dict(SR))
        sr2 = self.update({**sr, "status": "revoked"})
        self.successResultOf(self.store.delete("ServiceRequest", sr["id"]))
        create, update, delete = self.runner.calls
        self.assertEqual(update["event_extra"]["previous"]["status"], "active")
        self.assertEqual(update["input"]["status"], "revoked")
        self.assertEqual(delete["input"], {"deletedResource": sr2})
        self.assertEqual(delete["headers"]["X-Medplum-Deleted-Resource"],
                         f"ServiceRequest/{sr['id']}")
        body = json.dumps(delete["input"], separators=(",", ":")).encode()
        self.assertEqual(delete["headers"]["X-Signature"],
                         hmac.new(b"s3cret", body, hashlib.sha256).hexdigest())

    def test_retry_schedule_and_give_up(self) -> None:
        self.start()
        self.create(subscription())  # default: 4 attempts
        self.runner.script = [b.ERROR, b.TIMEOUT, b.CRASH, b.ERROR]
        self.create(dict(SR))
        self.assertEqual(len(self.runner.calls), 1)
        for delay, calls in ((10, 2), (20, 3), (40, 4)):
            self.clock.advance(delay - 0.5)
            self.assertEqual(len(self.runner.calls), calls - 1, delay)
            self.clock.advance(0.5)
            self.assertEqual(len(self.runner.calls), calls, delay)
        [delivery] = self.deliveries()
        self.assertEqual((delivery.state, delivery.attempts), (FAILED, 4))
        self.assertIn("boom", delivery.last_error)
        self.assertIsNotNone(delivery.payload)  # kept for examination
        self.clock.advance(10_000)
        self.assertEqual(len(self.runner.calls), 4)
        self.assertEqual([c["attempt"] for c in self.runner.calls], [1, 2, 3, 4])
        self.assertEqual([e for e, _ in self.events], ["queued", "retry", "retry", "retry",
                                                       "failed"])

    def test_max_attempts_extension_and_success_on_retry(self) -> None:
        self.start()
        self.create(subscription(max_attempts=2))
        self.runner.script = [b.ERROR, b.ERROR]
        self.create(dict(SR))
        self.clock.advance(10)
        self.assertEqual(self.deliveries()[0].state, FAILED)
        self.assertEqual(len(self.runner.calls), 2)
        self.runner.script = [b.MEMORY]
        self.create({**SR, "id": "sr2"})
        self.clock.advance(10)
        [latest, _] = self.deliveries()
        self.assertEqual((latest.state, latest.attempts), (DELIVERED, 2))

    def test_busy_does_not_use_up_attempts(self) -> None:
        self.start()
        self.create(subscription(max_attempts=1))
        self.runner.script = [b.BUSY, b.BUSY]
        self.create(dict(SR))
        self.clock.advance(5)
        self.clock.advance(5)
        [delivery] = self.deliveries()
        self.assertEqual((delivery.state, delivery.attempts), (DELIVERED, 1))
        self.assertEqual(len(self.runner.calls), 3)

    def test_same_resource_in_order(self) -> None:
        """A cancel never overtakes the order it cancels, even when the order is retried."""
        self.start()
        self.create(subscription())
        self.runner.script = [b.ERROR]  # the create fails once
        sr = self.create(dict(SR))
        self.update({**sr, "status": "revoked"})
        other = self.create({**SR, "id": "other"})  # another resource is not held up
        self.assertEqual([(c["input"]["id"], c["input"]["status"]) for c in self.runner.calls],
                         [("sr1", "active"), ("other", "active")])
        self.clock.advance(10)
        self.assertEqual([(c["input"]["id"], c["input"]["status"]) for c in self.runner.calls],
                         [("sr1", "active"), ("other", "active"), ("sr1", "active"),
                          ("sr1", "revoked")])
        self.assertEqual({d.state for d in self.deliveries()}, {DELIVERED})
        self.assertTrue(other)

    def test_in_flight_lane_and_concurrency(self) -> None:
        self.start()
        self.create(subscription())
        pending = [Deferred() for _ in range(6)]
        self.runner.script = list(pending)
        for i in range(6):
            self.create({**SR, "id": f"sr{i}"})
        self.assertEqual(len(self.runner.calls), 4)  # default concurrency
        pending[0].callback(b.BotRun(bot_id="bot-1", outcome=b.SUCCESS))
        self.assertEqual(len(self.runner.calls), 5)
        for d in pending[1:5]:
            d.callback(b.BotRun(bot_id="bot-1", outcome=b.SUCCESS))
        self.assertEqual(len(self.runner.calls), 6)
        pending[5].callback(b.BotRun(bot_id="bot-1", outcome=b.SUCCESS))
        self.assertEqual(len(self.deliveries(state=DELIVERED)), 6)

    def test_url_endpoint_signed_retried_and_audited(self) -> None:
        self.start()
        sub = self.create(subscription(endpoint="https://hooks.test/x", secret="abc"))
        self.post_status = [503, ConnectionRefusedError("refused"), 204]
        sr = self.create(dict(SR))
        self.clock.advance(10)
        self.clock.advance(20)
        self.assertEqual(len(self.posts), 3)
        url, body, headers = self.posts[-1]
        self.assertEqual(url, "https://hooks.test/x")
        self.assertEqual(json.loads(body), sr)
        self.assertEqual(headers["X-Signature"],
                         hmac.new(b"abc", body, hashlib.sha256).hexdigest())
        self.assertEqual(headers["Content-Type"], "application/fhir+json")
        self.assertEqual(headers["X-Medplum-Subscription"], sub["id"])
        self.assertEqual(self.deliveries()[0].state, DELIVERED)
        audits = self.audits()
        self.assertEqual([a["outcome"] for a in audits], ["4", "4", "0"])
        self.assertIn("HTTP 503", audits[0]["outcomeDesc"])
        self.assertIn("ConnectionRefusedError", audits[1]["outcomeDesc"])
        self.assertEqual({e["what"]["reference"] for e in audits[2]["entity"]},
                         {f"Subscription/{sub['id']}", f"ServiceRequest/{sr['id']}"})
        for audit in audits:  # no PHI: the resource itself is not in the audit trail
            self.assertNotIn("ORD-1", json.dumps(audit))
        # Delete: empty JSON body and the deleted resource's reference in a header.
        self.successResultOf(self.store.delete("ServiceRequest", sr["id"]))
        url, body, headers = self.posts[-1]
        self.assertEqual(body, b"{}")
        self.assertEqual(headers["X-Medplum-Deleted-Resource"], f"ServiceRequest/{sr['id']}")

    def test_subscription_turned_off_cancels_pending(self) -> None:
        self.start()
        sub = self.create(subscription())
        self.runner.script = [b.ERROR]
        self.create(dict(SR))
        self.update({**sub, "status": "off"})
        self.clock.advance(10)
        [delivery] = self.deliveries()
        self.assertEqual(delivery.state, CANCELLED)
        self.assertEqual(len(self.runner.calls), 1)
        self.create({**SR, "id": "sr2"})  # off: no longer fires
        self.assertEqual(len(self.deliveries()), 1)

    def test_ended_subscription_does_not_fire(self) -> None:
        self.start()
        self.create(subscription(end="2023-11-14T22:13:21Z"))  # one second after the clock
        self.create(dict(SR))
        self.clock.advance(2)
        self.create({**SR, "id": "sr2"})
        self.assertEqual([c["input"]["id"] for c in self.runner.calls], ["sr1"])

    def test_loads_existing_subscriptions_and_backlog(self) -> None:
        self.create(subscription())
        loading: Deferred = Deferred()
        search = self.store.search
        self.patch(self.store, "search", lambda *a: loading)
        started = self.manager.start()
        # Written while the Subscriptions are still loading: held, then matched.
        self.create(dict(SR))
        self.assertEqual(self.runner.calls, [])
        search("Subscription", {}).chainDeferred(loading)
        self.successResultOf(started)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(self.runner.calls[0]["input"]["id"], "sr1")

    def test_restart_resumes_interrupted_attempts(self) -> None:
        self.start()
        self.create(subscription(max_attempts=1))
        hung: Deferred = Deferred()
        self.runner.script = [hung]
        self.create(dict(SR))
        [delivery] = self.deliveries()
        self.assertEqual((delivery.state, delivery.attempts), (PENDING, 1))
        self.manager.stop()  # the relay stops (or crashes) mid-attempt
        hung.callback(b.BotRun(bot_id="bot-1", outcome=b.STOPPED))
        self.manager = self.make_manager()
        self.start()
        self.assertEqual(len(self.runner.calls), 2)  # tried again, with its attempt back
        [delivery] = self.deliveries()
        self.assertEqual((delivery.state, delivery.attempts), (DELIVERED, 1))

    def test_sweep_deletes_old_finished_deliveries(self) -> None:
        self.start()
        self.create(subscription(max_attempts=1))
        self.runner.script = [b.SUCCESS, b.ERROR]
        self.create(dict(SR))
        self.create({**SR, "id": "sr2"})
        self.assertEqual(self.successResultOf(self.manager.sweep()), 0)
        self.clock.advance(8 * 86400)  # the hourly sweep runs
        self.assertEqual([d.state for d in self.deliveries()], [FAILED])
        self.clock.advance(30 * 86400)
        self.assertEqual(self.deliveries(), [])


class _WatchedIndex(dict):
    """The manager's Subscriptions-by-type index, recording the thread of every read."""

    def __init__(self, threads: list[str], *a: Any) -> None:
        super().__init__(*a)
        self.threads = threads

    def get(self, *a: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().get(*a)


class ReactorThreadTests(TestCase):
    """
    On a real database thread: the manager's state is read (matching) only on the reactor
    thread, before the write goes to the database; the deliveries still commit with it.
    """

    def setUp(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self.db = Database(reactor, os.path.join(folder, "relay.sqlite"),
                           schema=SQLiteStore.schema() + SQLiteDeliveryQueue.schema(),
                           name="test-subscriptions-db")
        self.db.start()
        self.addCleanup(self.db.stop)
        self.store = SQLiteStore(self.db)
        self.runner = FakeRunner()
        self.manager = SubscriptionManager(reactor, SQLiteDeliveryQueue(self.db), self.store,
                                           self.runner)
        self.addCleanup(self.manager.stop)

    async def test_matching_reads_manager_state_on_the_reactor_thread_only(self) -> None:
        await self.manager.start()
        await self.store.create(subscription("ServiceRequest?status=active",
                                             interactions=("create", "delete")))
        threads: list[str] = []
        self.manager._by_type = _WatchedIndex(threads, self.manager._by_type)
        match = self.manager.match

        def watched_match(*a: Any, **kw: Any) -> Any:
            threads.append(threading.current_thread().name)
            return match(*a, **kw)

        self.manager.match = watched_match  # type: ignore[method-assign]
        sr = await self.store.create({k: v for k, v in SR.items() if k != "id"})
        await self.store.delete("ServiceRequest", sr["id"])
        self.assertTrue(threads)
        self.assertEqual(set(threads), {threading.current_thread().name})
        found = await self.manager.deliveries()
        self.assertEqual(sorted(d.interaction for d in found), ["create", "delete"])
