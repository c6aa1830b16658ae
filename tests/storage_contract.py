"""
Contract tests of L{medagent.storage.interfaces}: what every storage implementation must do.

Each class is a mixin for a C{twisted.trial.unittest.TestCase}; an implementation's test
module subclasses it together with C{TestCase} and provides the factories (C{make_store},
C{make_queue}, C{make_journal}, C{make_registry}).  Tests are coroutines, so they run the same
whether the implementation answers at once (inline fakes) or from its own threads.
"""

from __future__ import annotations

import threading
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from medagent.fhir import FHIRError
from medagent.storage import journal as j
from medagent.storage.interfaces import (
    ClientRegistry,
    DeliveryQueue,
    PushJournal,
    ResourceStore,
    Transaction,
)
from medagent.storage.records import (
    CANCELLED,
    DELIVERED,
    FAILED,
    PENDING,
    NewDelivery,
    StoredClient,
)

#: The test's own thread: where every call and every callback must happen.
_MAIN = threading.current_thread


async def _fails(testcase: Any, d: Deferred[Any], status: int) -> FHIRError:
    try:
        await d
    except FHIRError as e:
        testcase.assertEqual(e.status, status)
        return e
    testcase.fail(f"expected a {status}")
    raise AssertionError  # unreachable


def _new_delivery(id: str, *, sub: str = "s1", resource: str = "r1", due: float = 100.0,
                  max_attempts: int = 4) -> NewDelivery:
    return NewDelivery(id=id, subscription_id=sub, interaction="create",
                       resource_type="ServiceRequest", resource_id=resource, version_id="1",
                       payload='{"resource":{"id":"%s"},"previous":null}' % resource,
                       max_attempts=max_attempts, next_attempt=due, created=due)


# -- resources -----------------------------------------------------------------------------


@attr.s(auto_attribs=True)
class _RecordingHook:
    """A write hook that queues one delivery per write and records where it ran."""

    testcase: Any
    fail_prepare: bool = False
    fail_in_transaction: bool = False
    prepared: list[tuple[str, str, Any]] = attr.ib(factory=list)
    threads: list[str] = attr.ib(factory=list)
    committed_tokens: list[Any] = attr.ib(factory=list)

    def prepare(self, resource_type: str, id: str, resource: dict[str, Any] | None) -> Any:
        self.threads.append("prepare:" + threading.current_thread().name)
        if self.fail_prepare:
            raise ValueError("refused in prepare")
        self.prepared.append((resource_type, id, resource))
        return _RecordingPlan(self)

    def committed(self, token: Any) -> None:
        self.threads.append("committed:" + threading.current_thread().name)
        self.committed_tokens.append(token)


@attr.s(frozen=True, auto_attribs=True)
class _RecordingPlan:
    hook: _RecordingHook

    def in_transaction(self, tx: Transaction, interaction: str, resource: Any,
                       previous: Any) -> Any:
        self.hook.threads.append("tx:" + threading.current_thread().name)
        target = resource if resource is not None else previous
        [delivery] = tx.enqueue_deliveries([_new_delivery(
            f"d-{interaction}-{target['id']}-{(target.get('meta') or {}).get('versionId')}",
            resource=target["id"])])
        if self.hook.fail_in_transaction:
            raise ValueError("refused in the transaction")
        return (interaction, delivery.id, (resource or {}).get("meta", {}).get("versionId"),
                previous is not None)


class ResourceStoreContract:
    """L{ResourceStore}: CRUD, versions, search and the write-hook transaction."""

    #: whether the implementation's transactions run on a thread other than the caller's
    separate_database_thread = False

    def make_store(self) -> ResourceStore:
        raise NotImplementedError

    def make_queue(self) -> DeliveryQueue:
        """A delivery queue on the same database as L{make_store}'s store."""
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()
        self.queue = self.make_queue()

    async def test_create_read_update_delete_versions(self) -> None:
        created = await self.store.create({"resourceType": "Patient", "name": [{"family": "A"}]})
        self.assertTrue(created["id"])
        self.assertEqual(created["meta"]["versionId"], "1")
        self.assertTrue(created["meta"]["lastUpdated"].endswith("Z"))
        self.assertEqual(await self.store.read("Patient", created["id"]), created)
        await _fails(self, self.store.create({**created}), 409)
        updated = await self.store.update({**created, "gender": "other"})
        self.assertEqual(updated["meta"]["versionId"], "2")
        await _fails(self, self.store.update({**created}, if_match='W/"1"'), 412)
        third = await self.store.update({**updated, "gender": "female"}, if_match='W/"2"')
        self.assertEqual(third["meta"]["versionId"], "3")
        self.assertEqual((await self.store.read("Patient", created["id"]))["gender"], "female")
        deleted = await self.store.delete("Patient", created["id"])
        self.assertEqual(deleted["meta"]["versionId"], "3")
        await _fails(self, self.store.read("Patient", created["id"]), 404)
        await _fails(self, self.store.delete("Patient", created["id"]), 404)
        again = await self.store.create({"resourceType": "Patient", "id": created["id"]})
        self.assertEqual(again["meta"]["versionId"], "5")  # the delete counted as a version

    async def test_update_creates_and_if_match_needs_an_existing_version(self) -> None:
        await _fails(self, self.store.update({"resourceType": "Device", "id": "d1"},
                                             if_match="1"), 412)
        made = await self.store.update({"resourceType": "Device", "id": "d1"})
        self.assertEqual(made["meta"]["versionId"], "1")

    async def test_search_parameters_and_order(self) -> None:
        a = await self.store.create({
            "resourceType": "Device", "status": "active", "url": "mllp://h:1",
            "identifier": [{"system": "urn:s", "value": "X1"}],
            "name": "Analyser One"})
        b = await self.store.create({"resourceType": "Device", "status": "inactive",
                                     "identifier": [{"value": "X2"}]})
        c = await self.store.create({"resourceType": "Device", "status": "active",
                                     "name": "Other"})
        await self.store.create({"resourceType": "Patient", "status": "active"})

        async def ids(**params: list[str]) -> list[str]:
            return [r["id"] for r in await self.store.search("Device", params)]

        self.assertEqual(await ids(), [a["id"], b["id"], c["id"]])  # in write order
        self.assertEqual(await ids(status=["active"]), [a["id"], c["id"]])
        self.assertEqual(await ids(status=["active,inactive"]), [a["id"], b["id"], c["id"]])
        self.assertEqual(await ids(status=["active"], url=["mllp://h:1"]), [a["id"]])
        self.assertEqual(await ids(identifier=["urn:s|X1"]), [a["id"]])
        self.assertEqual(await ids(identifier=["|X2"]), [b["id"]])
        self.assertEqual(await ids(identifier=["|X1"]), [])
        self.assertEqual(await ids(identifier=["X1"]), [a["id"]])
        self.assertEqual(await ids(name=["analy"]), [a["id"]])
        self.assertEqual(await ids(**{"name:contains": ["ONE"]}), [a["id"]])
        self.assertEqual(await ids(**{"name:exact": ["analy"]}), [])
        self.assertEqual(await ids(_id=[b["id"]]), [b["id"]])
        self.assertEqual(await ids(_count=["1"], _offset=["1"]), [b["id"]])
        await self.store.delete("Device", b["id"])
        self.assertEqual(await ids(), [a["id"], c["id"]])
        await _fails(self, self.store.search("Device", {"colour": ["red"]}), 400)
        await _fails(self, self.store.search("Device", {"_count": ["1001"]}), 400)

    async def test_update_moves_a_resource_to_the_end_of_write_order(self) -> None:
        a = await self.store.create({"resourceType": "Task", "status": "ready"})
        b = await self.store.create({"resourceType": "Task", "status": "ready"})
        await self.store.update({**a, "status": "ready"})
        found = await self.store.search("Task", {})
        self.assertEqual([r["id"] for r in found], [b["id"], a["id"]])

    async def test_hook_plan_runs_in_the_write_and_commits_with_it(self) -> None:
        hook = _RecordingHook(self)
        self.store.write_hooks.append(hook)
        created = await self.store.create({"resourceType": "Task", "id": "t1"})
        updated = await self.store.update({**created})
        await self.store.delete("Task", "t1")
        self.assertEqual([p[:2] for p in hook.prepared], [("Task", "t1")] * 3)
        self.assertIsNone(hook.prepared[2][2])  # a delete has no new version
        self.assertEqual(hook.committed_tokens, [
            ("create", "d-create-t1-1", "1", False),
            ("update", "d-update-t1-2", "2", True),
            ("delete", "d-delete-t1-2", None, True),
        ])
        self.assertEqual(updated["meta"]["versionId"], "2")
        queued = await self.queue.list()
        self.assertEqual([d.id for d in queued],
                         ["d-delete-t1-2", "d-update-t1-2", "d-create-t1-1"])
        main = _MAIN().name
        self.assertEqual([t for t in hook.threads if not t.startswith("tx:")],
                         [f"prepare:{main}", f"committed:{main}"] * 3)
        tx_threads = {t for t in hook.threads if t.startswith("tx:")}
        if self.separate_database_thread:
            self.assertNotIn(f"tx:{main}", tx_threads)

    async def test_a_failed_write_has_no_hook_effects(self) -> None:
        hook = _RecordingHook(self)
        self.store.write_hooks.append(hook)
        await self.store.create({"resourceType": "Task", "id": "t1"})
        await _fails(self, self.store.create({"resourceType": "Task", "id": "t1"}), 409)
        hook.fail_in_transaction = True
        try:
            await self.store.create({"resourceType": "Task", "id": "t2"})
        except ValueError:
            pass
        else:
            self.fail("the write succeeded although its hook failed")
        hook.fail_in_transaction, hook.fail_prepare = False, True
        try:
            await self.store.update({"resourceType": "Task", "id": "t3"})
        except ValueError:
            pass
        else:
            self.fail("the write succeeded although its hook refused it")
        await _fails(self, self.store.read("Task", "t2"), 404)
        await _fails(self, self.store.read("Task", "t3"), 404)
        self.assertEqual([d.id for d in await self.queue.list()], ["d-create-t1-1"])
        self.assertEqual(len(hook.committed_tokens), 1)


# -- the push journal ----------------------------------------------------------------------


class PushJournalContract:
    """L{PushJournal}: seq order, transitions, idempotency lookups and window, paging."""

    def make_journal(self, clock: Clock) -> PushJournal:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.journal = self.make_journal(self.clock)

    def push(self, agent: str = "a1", remote: str = "mllp://dev:2575", body: str = "MSH|",
             **kw: Any) -> j.Push:
        return j.Push(id=self.journal.new_id(), agent_id=agent, destination=remote,
                      remote=remote, content_type="x-application/hl7-v2+er7", body=body,
                      **kw)

    async def test_search_by_patient_id_and_dicom_uids(self) -> None:
        hl7 = await self.journal.create(self.push(patient_id="MRN1", accession="A1"))
        dicom = await self.journal.create(self.push(
            remote="dicom://PACS@pacs:104",
            patient_id="MRN1", study_uid="1.2.840.1", sop_uid="1.2.840.1.7"))
        await self.journal.create(self.push(patient_id="MRN2"))

        async def ids(**params: str) -> list[str]:
            return [p.id for p in await self.journal.search(params)]

        self.assertEqual(await ids(patient_id="MRN1"), [dicom.id, hl7.id])
        self.assertEqual(await ids(study_uid="1.2.840.1"), [dicom.id])
        self.assertEqual(await ids(sop_uid="1.2.840.1.7"), [dicom.id])
        self.assertEqual(await ids(sop_uid="1.2.840.1"), [])
        got = await self.journal.get(dicom.id)
        self.assertEqual((got.patient_id, got.study_uid, got.sop_uid),
                         ("MRN1", "1.2.840.1", "1.2.840.1.7"))
        page, total, _ = await self.journal.search_page({"patient_id": "MRN1"}, count=1)
        self.assertEqual(([p.id for p in page], total), ([dicom.id], 2))

    async def test_create_get_and_seq_order(self) -> None:
        first = await self.journal.create(self.push(options={"timeout": 5}))
        second = await self.journal.create(self.push())
        self.assertLess(first.seq, second.seq)
        self.assertEqual(first.created, self.clock.seconds())
        got = await self.journal.get(first.id)
        self.assertEqual((got.id, got.state, got.options, got.seq),
                         (first.id, j.QUEUED, {"timeout": 5}, first.seq))
        await _fails(self, self.journal.get("nope"), 404)
        await _fails(self, self.journal.current("nope"), 404)
        self.assertNotEqual(self.journal.new_id(), self.journal.new_id())

    async def test_transition_is_stored_and_in_doubt_sticks(self) -> None:
        p = await self.journal.create(self.push())
        self.clock.advance(3)
        await self.journal.transition(p, j.SENT, count_attempt=True, in_doubt=True)
        await self.journal.transition(p, j.FAILED, error="refused",
                                      reply=(502, "text/plain", "no"))
        got = await self.journal.current(p.id)
        self.assertEqual((got.state, got.attempts, got.last_error, got.in_doubt, got.updated),
                         (j.FAILED, 1, "refused", True, self.clock.seconds()))
        self.assertEqual((got.reply_status, got.reply_content_type, got.reply_body),
                         (502, "text/plain", "no"))
        await self.journal.flushed()
        self.assertEqual((await self.journal.get(p.id)).state, j.FAILED)

    async def test_idempotency_key_is_per_requester_and_windowed(self) -> None:
        p = await self.journal.create(self.push(requester="c1", idempotency_key="k"))
        # the same key again: refused in the insert's own transaction, naming the first
        try:
            await self.journal.create(self.push(requester="c1", idempotency_key="k",
                                                body="MSH|other"))
        except j.RepeatedPush as e:
            self.assertEqual((e.earlier.id, e.by_key), (p.id, True))
        else:
            self.fail("a second push with the same key was journaled")
        self.assertEqual((await self.journal.find_by_key("c1", "k")).id, p.id)
        self.assertIsNone(await self.journal.find_by_key("c2", "k"))
        other = await self.journal.create(self.push(requester="c2"))
        await self.journal.remember_key("c2", "k", other.id)
        await self.journal.remember_key("c2", "k", p.id)  # already bound: keeps its push
        self.assertEqual((await self.journal.find_by_key("c2", "k")).id, other.id)
        await self.journal.transition(other, j.CANCELLED)
        self.assertIsNone(await self.journal.find_by_key("c2", "k"))
        self.clock.advance(j.IDEMPOTENCY_WINDOW + 1)
        self.assertIsNone(await self.journal.find_by_key("c1", "k"))

    async def test_same_message_by_device_control_id_and_hash(self) -> None:
        p = await self.journal.create(self.push(remote="mllp://Dev:2575?returnAck=x",
                                                control_id="M1", body_hash="h"))
        await self.journal.create(self.push(agent="a2", control_id="M1", body_hash="h"))
        same = await self.journal.find_same_message("a1", "mllp://dev:2575", "M1", "h")
        self.assertEqual(same.id, p.id)
        try:  # the same message again (another caller, no key): refused, naming the first
            await self.journal.create(self.push(control_id="M1", body_hash="h",
                                                requester="c9"))
        except j.RepeatedPush as e:
            self.assertEqual((e.earlier.id, e.by_key), (p.id, False))
        else:
            self.fail("the same message was journaled twice")
        self.assertIsNone(await self.journal.find_same_message("a1", "mllp://dev:9", "M1", "h"))
        self.assertIsNone(await self.journal.find_same_message("a1", "mllp://dev:2575", "M1",
                                                               "other"))
        # another device, or another body under the same MSH-10: a new message
        await self.journal.create(self.push(remote="mllp://dev:9", control_id="M1",
                                            body_hash="h"))
        await self.journal.create(self.push(control_id="M1", body_hash="h2"))
        self.clock.advance(j.IDEMPOTENCY_WINDOW + 1)
        self.assertIsNone(await self.journal.find_same_message("a1", "mllp://dev:2575", "M1",
                                                               "h"))

    async def test_open_lists_in_seq_order_with_filters(self) -> None:
        a = await self.journal.create(self.push(remote="mllp://x:1"))
        b = await self.journal.create(self.push(remote="mllp://y:1"))
        c = await self.journal.create(self.push(remote="mllp://x:1"))
        await self.journal.create(self.push(agent="a2"))
        await self.journal.transition(b, j.DELIVERED)
        ids = [p.id for p in await self.journal.open_for_agent("a1")]
        self.assertEqual(ids, [a.id, c.id])
        self.assertEqual([p.id for p in await self.journal.open_for_agent("a1", after_seq=a.seq)],
                         [c.id])
        self.assertEqual([p.id for p in await self.journal.open_for_agent("a1", limit=1)],
                         [a.id])
        self.assertEqual([p.id for p in await self.journal.open_pushes(
            "a1", remotes=["mllp://y:1"], states=[j.DELIVERED])], [b.id])
        self.assertEqual([p.id for p in await self.journal.open_pushes(
            "a1", exclude_remotes=["mllp://x:1"])], [])
        # ordered after the writes issued before it: sees the transition just made
        await self.journal.transition(c, j.SENT)
        self.assertEqual([p.state for p in await self.journal.open_pushes("a1")],
                         [j.QUEUED, j.SENT])

    async def test_timeline_is_kept_with_each_write(self) -> None:
        p = self.push()
        p.stamp("received", 100.0)
        p = await self.journal.create(p)
        p.stamp("journaled", 100.5)
        p.stamp("sent", 101.0)
        await self.journal.transition(p, j.SENT)
        got = await self.journal.current(p.id)
        self.assertEqual(got.timeline, {"received": 100.0, "journaled": 100.5, "sent": 101.0})
        doc = got.to_json()
        self.assertEqual([(s["stage"], s["sinceReceivedMs"]) for s in doc["timeline"]],
                         [("received", 0.0), ("journaled", 500.0), ("sent", 1000.0)])
        self.assertEqual(j.timeline_from_text('{"sent": "x", "other": 1, "answered": 2}'),
                         {"answered": 2.0})
        self.assertEqual(j.timeline_from_text("not json"), {})

    async def test_agents_with_queued_pushes(self) -> None:
        self.assertEqual(await self.journal.agents_with_queued([]), set())
        await self.journal.create(self.push(agent="a1"))
        done = await self.journal.create(self.push(agent="a2"))
        await self.journal.transition(done, j.SENT)
        await self.journal.create(self.push(agent="a3"))
        many = [f"x{i}" for i in range(1200)] + ["a1", "a2", "a3"]  # more than one chunk
        self.assertEqual(await self.journal.agents_with_queued(many), {"a1", "a3"})
        self.assertEqual(await self.journal.agents_with_queued(["a2", "a9"]), set())

    async def test_search_page_is_newest_first_and_stable(self) -> None:
        pushes = [await self.journal.create(self.push()) for _ in range(5)]
        await self.journal.create(self.push(agent="a2"))
        page, total, cursor = await self.journal.search_page({"agent": "a1"}, count=2)
        self.assertEqual(([p.id for p in page], total), ([pushes[4].id, pushes[3].id], 5))
        await self.journal.create(self.push())  # written while the list is walked
        page, total, cursor = await self.journal.search_page({"agent": "a1"}, count=2,
                                                             before_seq=cursor)
        self.assertEqual([p.id for p in page], [pushes[2].id, pushes[1].id])
        page, _, cursor = await self.journal.search_page({"agent": "a1"}, count=2,
                                                         before_seq=cursor)
        self.assertEqual(([p.id for p in page], cursor), ([pushes[0].id], None))
        self.assertEqual(await self.journal.search_page({}, count=0), ([], 7, None))
        found = await self.journal.search({"state": j.QUEUED, "agent": "a2"})
        self.assertEqual(len(found), 1)

    async def test_search_by_control_id_accession_time_and_resend_link(self) -> None:
        first = await self.journal.create(self.push(control_id="CTRL1", accession="ACC9",
                                                    body_hash="h1"))
        self.clock.advance(10)
        await self.journal.create(self.push(control_id="CTRL2"))
        self.clock.advance(10)
        # the same message again is a repeat, unless it is an operator's resend
        with self.assertRaises(j.RepeatedPush):
            await self.journal.create(self.push(control_id="CTRL1", body_hash="h1"))
        again = await self.journal.create(self.push(control_id="CTRL1", body_hash="h1",
                                                    resent_from=first.id))
        got = await self.journal.get(again.id)
        self.assertEqual((got.resent_from, got.accession), (first.id, None))
        self.assertEqual((await self.journal.get(first.id)).accession, "ACC9")
        found = await self.journal.search({"control_id": "CTRL1"})
        self.assertEqual([p.id for p in found], [again.id, first.id])
        self.assertEqual([p.id for p in await self.journal.search({"accession": "ACC9"})],
                         [first.id])
        self.assertEqual([p.id for p in await self.journal.search({"resent_from": first.id})],
                         [again.id])
        start = first.created
        page, total, _ = await self.journal.search_page(
            {"since": str(start + 5), "until": str(start + 15)}, count=10)
        self.assertEqual((total, [p.control_id for p in page]), (1, ["CTRL2"]))
        page, total, _ = await self.journal.search_page(
            {"control_id": "CTRL1", "since": str(start + 15)}, count=10)
        self.assertEqual([p.id for p in page], [again.id])
        self.assertEqual(await self.journal.search({"control_id": "nope"}), [])

    async def test_agent_and_lane_summaries(self) -> None:
        old = await self.journal.create(self.push())
        self.clock.advance(30)
        await self.journal.create(self.push(remote="mllp://other:1"))
        failed = await self.journal.create(self.push(remote="mllp://other:1"))
        await self.journal.transition(failed, j.FAILED, error="AE from device")
        done = await self.journal.create(self.push(agent="a2"))
        await self.journal.transition(done, j.DELIVERED)
        await self.journal.flushed()
        now = self.clock.seconds()
        fleet = await self.journal.agent_summaries(now - 3600)
        self.assertEqual(fleet["a1"], {"open": 2, "oldestOpen": old.created, "failedSince": 1})
        self.assertNotIn("a2", fleet)  # nothing open, nothing failed
        self.assertEqual((await self.journal.agent_summaries(now + 1))["a1"]["failedSince"], 0)
        lanes = await self.journal.lane_summaries("a1")
        self.assertEqual([lane["remote"] for lane in lanes],
                         ["mllp://dev:2575", "mllp://other:1"])
        self.assertEqual((lanes[0]["open"], lanes[0]["oldestOpenAgeSeconds"],
                          lanes[0]["lastState"]), (1, 30.0, None))
        self.assertEqual((lanes[1]["open"], lanes[1]["oldestOpenAgeSeconds"],
                          lanes[1]["lastState"], lanes[1]["lastError"]),
                         (1, 0.0, j.FAILED, "AE from device"))
        self.assertEqual(await self.journal.lane_summaries("nobody"), [])

    async def test_outcome_counts_since(self) -> None:
        early = await self.journal.create(self.push())
        await self.journal.transition(early, j.FAILED, error="x")
        self.clock.advance(60)
        for i, state in enumerate((j.DELIVERED, j.FAILED, j.DELIVERED, j.CANCELLED)):
            push = await self.journal.create(self.push(body=f"MSH|{i}"))
            await self.journal.transition(push, state)
        other = await self.journal.create(self.push(agent="a2"))
        await self.journal.transition(other, j.DELIVERED)
        await self.journal.create(self.push(agent="a3"))  # still open: not counted
        await self.journal.flushed()
        since = self.clock.seconds() - 1
        self.assertEqual(await self.journal.outcome_counts(since),
                         {"a1": {"finished": 3, "failed": 1},
                          "a2": {"finished": 1, "failed": 0}})
        self.assertEqual(list(await self.journal.outcome_counts(since, limit=1)), ["a1"])
        self.assertEqual((await self.journal.outcome_counts(since - 3600))["a1"],
                         {"finished": 4, "failed": 2})

    async def test_trends_count_created_failed_and_open_per_bucket(self) -> None:
        hour = 3600.0
        t0 = self.clock.seconds()
        start = j.trend_window(t0 + 3 * hour, hour, 4)  # 4 hours, the last holds t0 + 3 h
        self.assertEqual(start % hour, 0.0)
        # before the window: one still open (depth from the start), one finished before it
        # (not read at all), one finished inside it
        self.clock.advance(start - t0 - 600)
        old_open = await self.journal.create(self.push())
        gone = await self.journal.create(self.push())
        await self.journal.transition(gone, j.DELIVERED)
        old_done = await self.journal.create(self.push())
        self.clock.advance(600 + 60)  # bucket 0
        await self.journal.transition(old_done, j.DELIVERED)
        a = await self.journal.create(self.push())
        b = await self.journal.create(self.push())
        other = await self.journal.create(self.push(agent="a2"))
        self.clock.advance(hour)  # bucket 1
        await self.journal.transition(a, j.FAILED, error="AE")
        await self.journal.transition(other, j.EXPIRED)
        self.clock.advance(hour)  # bucket 2
        await self.journal.transition(b, j.DELIVERED)
        retried = await self.journal.create(self.push())
        await self.journal.transition(retried, j.FAILED)
        await self.journal.transition(retried, j.QUEUED)  # a retry reopens it
        self.clock.advance(hour)  # bucket 3 (now)
        await self.journal.flushed()
        found = await self.journal.trends(start, hour, 4)
        self.assertEqual(set(found), {"a1", "a2"})
        a1 = found["a1"]
        self.assertEqual((a1.start, a1.width, a1.end), (start, hour, start + 4 * hour))
        self.assertEqual(a1.created, (2, 0, 1, 0))
        self.assertEqual(a1.failed, (0, 1, 0, 0))
        # open at each end: old_open (+ old_done in bucket 0 ends), a, b, then retried
        self.assertEqual(a1.depth, (3, 2, 2, 2))
        self.assertEqual(found["a2"], j.Trend(start, hour, (1, 0, 0, 0), (0, 1, 0, 0),
                                              (1, 0, 0, 0)))
        self.assertEqual(await self.journal.trends(start, hour, 4, agent_id="a2"),
                         {"a2": found["a2"]})
        self.assertEqual(await self.journal.trends(start, hour, 4, agent_id="nobody"), {})
        # quarter hours: the same pushes, finer
        quarters = (await self.journal.trends(start, hour / 4, 16))["a1"]
        self.assertEqual(sum(quarters.created), 3)
        self.assertEqual(quarters.depth[-1], 2)
        self.assertEqual(quarters.failed[4:8], (1, 0, 0, 0))
        for width, count in ((0, 4), (hour, 0), (hour, j.MAX_TREND_BUCKETS + 1)):
            self.assertRaises(ValueError, self.journal.trends, start, width, count)
        self.assertIsNotNone(old_open.seq)

    async def test_a_retried_expired_push_is_not_expired_again(self) -> None:
        p = await self.journal.create(self.push(expires_at=self.clock.seconds() + 5))
        self.clock.advance(10)
        self.assertEqual(await self.journal.expire_overdue(), 1)
        again = await self.journal.get(p.id)
        again.expires_at = None  # what a retry does
        await self.journal.transition(again, j.QUEUED, error="")
        await self.journal.flushed()
        self.assertEqual(await self.journal.expire_overdue(), 0)
        got = await self.journal.get(p.id)
        self.assertEqual((got.state, got.expires_at), (j.QUEUED, None))

    async def test_counts_expire_and_prune(self) -> None:
        due = await self.journal.create(self.push(expires_at=self.clock.seconds() + 10))
        keep = await self.journal.create(self.push())
        done = await self.journal.create(self.push())
        await self.journal.transition(done, j.DELIVERED)
        self.clock.advance(10)
        self.assertEqual(await self.journal.expire_overdue(), 1)
        self.assertEqual((await self.journal.get(due.id)).state, j.EXPIRED)
        counts = await self.journal.counts("a1")
        self.assertEqual({s: counts[s] for s in j.STATES},
                         {**{s: 0 for s in j.STATES}, j.QUEUED: 1, j.DELIVERED: 1,
                          j.EXPIRED: 1})
        self.assertEqual(counts["oldestOpenAgeSeconds"], 10.0)
        self.clock.advance(100)
        self.assertEqual(await self.journal.prune(50), 2)  # delivered and expired
        self.assertEqual((await self.journal.get(keep.id)).state, j.QUEUED)
        await _fails(self, self.journal.get(done.id), 404)


# -- clients -------------------------------------------------------------------------------


def _client(id: str, created: float, role: str = "pusher") -> StoredClient:
    return StoredClient(client_id=id, salt=b"\0salt", secret_hash=b"\1hash", role=role,
                        agents=("a1", "a2"), name=f"client {id}", created=created)


class ClientRegistryContract:
    """L{ClientRegistry}: add, list in creation order, lookup, revocation for good."""

    def make_registry(self) -> ClientRegistry:
        raise NotImplementedError

    def setUp(self) -> None:
        self.registry = self.make_registry()

    async def test_add_list_lookup(self) -> None:
        await self.registry.add(_client("c2", 2.0))
        await self.registry.add(_client("c1", 1.0, role="admin"))
        listed = await self.registry.list()
        self.assertEqual([c.client_id for c in listed], ["c1", "c2"])
        self.assertEqual(await self.registry.lookup("c2"), _client("c2", 2.0))
        self.assertIsNone(await self.registry.lookup("nobody"))
        try:
            await self.registry.add(_client("c2", 3.0))
        except Exception:
            pass
        else:
            self.fail("a second client with the same id was stored")
        self.assertEqual(len(await self.registry.list()), 2)

    async def test_revocation(self) -> None:
        await self.registry.add(_client("c1", 1.0))
        await self.registry.add(_client("c2", 2.0))
        self.assertEqual(await self.registry.revoked(), set())
        self.assertTrue(await self.registry.revoke("c1"))
        self.assertTrue(await self.registry.revoke("c1"))  # still revoked, still known
        self.assertFalse(await self.registry.revoke("nobody"))
        self.assertEqual(await self.registry.revoked(), {"c1"})
        self.assertTrue((await self.registry.lookup("c1")).revoked)
        self.assertFalse((await self.registry.lookup("c2")).revoked)
        self.assertEqual([c.revoked for c in await self.registry.list()], [True, False])

    def test_sync_calls_for_tools(self) -> None:
        self.registry.add_sync(_client("c1", 1.0))
        self.assertTrue(self.registry.revoke_sync("c1"))
        self.assertFalse(self.registry.revoke_sync("nobody"))
        [client] = self.registry.list_sync()
        self.assertEqual((client.client_id, client.revoked), ("c1", True))


# -- Subscription deliveries ---------------------------------------------------------------


class DeliveryQueueContract:
    """L{DeliveryQueue}: lanes, due times, leases, attempts, retries, final states, sweep."""

    def make_queue(self) -> DeliveryQueue:
        raise NotImplementedError

    def setUp(self) -> None:
        self.queue = self.make_queue()

    async def test_enqueue_and_list(self) -> None:
        stored = await self.queue.enqueue([_new_delivery("d1"), _new_delivery("d2", sub="s2")])
        self.assertEqual([(d.id, d.state, d.attempts) for d in stored],
                         [("d1", PENDING, 0), ("d2", PENDING, 0)])
        self.assertLess(stored[0].seq, stored[1].seq)
        self.assertEqual(stored[0].payload, {"resource": {"id": "r1"}, "previous": None})
        self.assertEqual([d.id for d in await self.queue.list()], ["d2", "d1"])  # newest first
        self.assertEqual([d.id for d in await self.queue.list("s2")], ["d2"])
        self.assertEqual([d.id for d in await self.queue.list(state=DELIVERED)], [])
        self.assertEqual([d.id for d in await self.queue.list(limit=1)], ["d2"])

    async def test_backlog_counts_pending_and_the_oldest(self) -> None:
        self.assertEqual(await self.queue.backlog(), (0, None))
        await self.queue.enqueue([_new_delivery("d1"), _new_delivery("d2", resource="r2")])
        count, oldest = await self.queue.backlog()
        self.assertEqual(count, 2)
        self.assertIsNotNone(oldest)
        await self.queue.finish("d1", DELIVERED, error=None, now=101.0, keep_payload=False)
        self.assertEqual((await self.queue.backlog())[0], 1)

    async def test_claim_one_per_lane_when_due_with_a_lease(self) -> None:
        await self.queue.enqueue([
            _new_delivery("d1"), _new_delivery("d2"),  # one lane
            _new_delivery("d3", resource="r2", due=150.0),
            _new_delivery("d4", resource="r3"),
        ])
        claimed, nxt = await self.queue.claim(100.0, 60.0, 10)
        self.assertEqual([(d.id, d.attempts) for d in claimed], [("d1", 1), ("d4", 1)])
        self.assertEqual(nxt, 150.0)
        again, _ = await self.queue.claim(100.0, 60.0, 10)
        self.assertEqual(again, [])  # leased, and d2 waits behind d1
        await self.queue.finish("d1", DELIVERED, error=None, now=101.0, keep_payload=False)
        claimed, _ = await self.queue.claim(101.0, 60.0, 1)
        self.assertEqual([d.id for d in claimed], ["d2"])
        [d1] = [d for d in await self.queue.list() if d.id == "d1"]
        self.assertEqual((d1.state, d1.payload, d1.attempts), (DELIVERED, None, 1))
        claimed, _ = await self.queue.claim(150.0, 60.0, 10)
        self.assertEqual([d.id for d in claimed], ["d3"])

    async def test_retry_recover_and_failed_keeps_its_payload(self) -> None:
        await self.queue.enqueue([_new_delivery("d1")])
        [d], _ = await self.queue.claim(100.0, 60.0, 1)
        await self.queue.retry("d1", attempts=1, next_attempt=130.0, error="HTTP 500",
                               now=101.0)
        claimed, nxt = await self.queue.claim(120.0, 60.0, 1)
        self.assertEqual((claimed, nxt), ([], 130.0))
        [d], _ = await self.queue.claim(130.0, 60.0, 1)
        self.assertEqual((d.attempts, d.last_error), (2, "HTTP 500"))
        # a crash while leased: due again, and the cut-short attempt is given back
        self.assertEqual(await self.queue.recover(140.0), 1)
        [d], _ = await self.queue.claim(140.0, 60.0, 1)
        self.assertEqual(d.attempts, 2)
        await self.queue.finish("d1", FAILED, error="HTTP 500", now=141.0, keep_payload=True)
        [d] = await self.queue.list()
        self.assertEqual((d.state, d.last_error, d.payload is not None), (FAILED, "HTTP 500", True))
        self.assertEqual(await self.queue.recover(150.0), 0)

    async def test_sweep_by_age_and_state(self) -> None:
        await self.queue.enqueue([_new_delivery(f"d{i}", resource=f"r{i}") for i in range(4)])
        await self.queue.claim(100.0, 60.0, 4)
        await self.queue.finish("d0", DELIVERED, error=None, now=100.0, keep_payload=False)
        await self.queue.finish("d1", CANCELLED, error="deleted", now=100.0, keep_payload=False)
        await self.queue.finish("d2", FAILED, error="x", now=100.0, keep_payload=True)
        self.assertEqual(await self.queue.sweep(finished_before=100.0, failed_before=100.0), 0)
        self.assertEqual(await self.queue.sweep(finished_before=101.0, failed_before=100.0), 2)
        self.assertEqual(await self.queue.sweep(finished_before=101.0, failed_before=101.0), 1)
        self.assertEqual([d.id for d in await self.queue.list()], ["d3"])


class LanePausesContract:
    """L{LanePauses}: one record per (agent, lane), kept until resumed; listed in order."""

    def make_pauses(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.pauses = self.make_pauses()

    async def test_pause_resume_list(self) -> None:
        self.assertEqual(await self.pauses.list(), [])
        self.assertTrue(await self.pauses.pause("a2", "mllp://lab:2575", "op1", 10.0))
        self.assertTrue(await self.pauses.pause("a1", "mllp://lis:2575", "op1", 11.0))
        self.assertTrue(await self.pauses.pause("a1", "dicom://PACS@pacs:104", "admin", 12.5))
        # paused already: the first record (who, since) is kept
        self.assertFalse(await self.pauses.pause("a1", "mllp://lis:2575", "op2", 13.0))
        self.assertEqual(await self.pauses.list("a1"), [
            {"agent": "a1", "lane": "dicom://PACS@pacs:104", "by": "admin", "since": 12.5},
            {"agent": "a1", "lane": "mllp://lis:2575", "by": "op1", "since": 11.0}])
        self.assertEqual([(p["agent"], p["lane"]) for p in await self.pauses.list()], [
            ("a1", "dicom://PACS@pacs:104"), ("a1", "mllp://lis:2575"),
            ("a2", "mllp://lab:2575")])
        self.assertEqual(len(await self.pauses.list(limit=2)), 2)
        self.assertTrue(await self.pauses.resume("a1", "mllp://lis:2575"))
        self.assertFalse(await self.pauses.resume("a1", "mllp://lis:2575"))
        self.assertFalse(await self.pauses.resume("a3", "mllp://lab:2575"))
        self.assertEqual([p["lane"] for p in await self.pauses.list("a1")],
                         ["dicom://PACS@pacs:104"])
        self.assertEqual([p["agent"] for p in await self.pauses.list("a2")], ["a2"])


# -- the agent's queues --------------------------------------------------------------------


class OutboxStoreContract:
    """L{OutboxStore}: rows kept in the order they were added until removed."""

    def make_outbox(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.outbox = self.make_outbox()

    def row(self, callback: str) -> dict[str, Any]:
        return {"callback": callback, "channel": "lab", "remote": "mllp://dev:1",
                "content_type": "x-application/hl7-v2+er7", "body": "MSH|"}

    async def test_add_pending_remove_count(self) -> None:
        for callback in ("c2", "c1", "c3"):
            await self.outbox.add(self.row(callback), 5.0)
        self.assertEqual(await self.outbox.count(), 3)
        pending = await self.outbox.pending(2)
        self.assertEqual([r["callback"] for r in pending], ["c2", "c1"])
        self.assertEqual({k: pending[0][k] for k in self.row("c2")}, self.row("c2"))
        await self.outbox.remove("c1")
        await self.outbox.remove("nobody")
        self.assertEqual([r["callback"] for r in await self.outbox.pending(10)], ["c2", "c3"])
        self.assertEqual(await self.outbox.count(), 2)


class InboxStoreContract:
    """L{InboxStore}: held once per push id, state moves, cancel only while queued, confirm."""

    def make_inbox(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.inbox = self.make_inbox()

    async def test_lane_holds_are_the_last_set_recorded(self) -> None:
        self.assertEqual(await self.inbox.holds(), [])
        await self.inbox.set_holds(["mllp://b:1", "mllp://a:1", "mllp://a:1"])
        self.assertEqual(await self.inbox.holds(), ["mllp://a:1", "mllp://b:1"])
        await self.inbox.set_holds(["dicom://P@p:104"])
        self.assertEqual(await self.inbox.holds(), ["dicom://P@p:104"])
        await self.inbox.set_holds([])
        self.assertEqual(await self.inbox.holds(), [])

    async def put(self, push_id: str, state: str = "queued", now: float = 1.0) -> Any:
        return await self.inbox.store((push_id, "mllp://dev:1", "text/plain", "body", "{}",
                                       f"cb-{push_id}", state, 0, now, now))

    async def test_store_is_once_per_push_id(self) -> None:
        new, seq = await self.put("p1")
        self.assertTrue(new)
        self.assertEqual(await self.put("p1"), (False, ("queued", None)))
        _, seq2 = await self.put("p2")
        self.assertLess(seq, seq2)

    async def test_claim_mark_answer_confirm_prune(self) -> None:
        _, seq = await self.put("p1")
        row = await self.inbox.claim(seq, "queued", 2.0)  # the mark comes later
        self.assertEqual((row["state"], row["attempts"], row["push_id"]), ("queued", 1, "p1"))
        await self.inbox.mark_delivering(seq, 3.0, lambda: ValueError("not queued"))
        try:
            await self.inbox.mark_delivering(seq, 3.0, lambda: ValueError("not queued"))
        except ValueError:
            pass
        else:
            self.fail("marked an entry that is not queued")
        self.assertEqual((await self.inbox.claim(seq, "delivering", 4.0))["attempts"], 1)
        await self.inbox.answer(seq, {"pushId": "p1", "statusCode": 200}, None, 5.0)
        self.assertEqual(await self.inbox.unconfirmed(10),
                         [{"pushId": "p1", "statusCode": 200, "callback": "cb-p1"}])
        self.assertEqual(await self.inbox.prune(100.0), 0)  # not confirmed yet
        await self.inbox.confirm("p1")
        self.assertEqual(await self.inbox.unconfirmed(10), [])
        self.assertEqual(await self.inbox.prune(5.0), 0)  # not older than the cutoff
        self.assertEqual(await self.inbox.prune(6.0), 1)

    async def test_cancel_only_while_queued(self) -> None:
        _, seq = await self.put("p1")
        _, seq2 = await self.put("p2", state="delivering")
        answer = {"delivery": "cancelled"}
        self.assertEqual(await self.inbox.cancel("p1", 2.0, "why", lambda r, c: answer),
                         ("cancelled", (seq, "mllp://dev:1")))
        self.assertEqual(await self.inbox.cancel("p1", 2.0, "why", lambda r, c: answer),
                         ("done", None))
        self.assertEqual(await self.inbox.cancel("p2", 2.0, "why", lambda r, c: answer),
                         ("delivering", None))
        self.assertEqual(await self.inbox.cancel("p9", 2.0, "why", lambda r, c: answer),
                         ("unknown", None))
        self.assertEqual(await self.inbox.unconfirmed(10),
                         [{"delivery": "cancelled", "callback": "cb-p1"}])

    async def test_recover_requeue_and_ages(self) -> None:
        _, s1 = await self.put("p1", state="delivering", now=1.0)
        _, s2 = await self.put("p2", state="delivering", now=2.0)
        _, s3 = await self.put("p3", now=3.0)
        self.assertEqual(sorted(await self.inbox.oldest_open()), [("mllp://dev:1", 1.0)])

        def resolve(remote: str, callback: Any, push_id: str) -> Any:
            return None if push_id == "p1" else ("in doubt", {"pushId": push_id})

        queued, delivering = await self.inbox.recover(10.0, resolve)
        self.assertEqual(delivering, 2)
        self.assertEqual([q[:2] for q in queued], [(s1, "p1"), (s3, "p3")])
        self.assertEqual(await self.inbox.unconfirmed(10),
                         [{"pushId": "p2", "callback": "cb-p2"}])
        await self.inbox.claim(s3, "delivering", 11.0)
        await self.inbox.requeue(s3, "refused", 12.0)
        row = await self.inbox.claim(s3, "delivering", 13.0)
        self.assertEqual((row["state"], row["attempts"], row["last_error"]),
                         ("delivering", 2, "refused"))


# -- the inbound log -----------------------------------------------------------------------


class InboundLogContract:
    """L{InboundLog}: records as stored, seq order, the search filters, paging, the agent
    page's channel summaries, and both bounds of the prune."""

    def make_inbound(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.inbound = self.make_inbound()

    def message(self, **kw: Any) -> Any:
        from medagent.storage.inbound import InboundMessage

        values: dict[str, Any] = dict(
            id=self.inbound.new_id(), agent_id="a1", channel="adt", received=1000.0,
            content_type="x-application/hl7-v2+er7", size=42, remote="10.0.0.5:4000",
            message_type="ADT^A01", control_id="C1", patient_id="P1", accession="ACC1",
            status=200, ack_code="AA", outcome="ok", bot="Bot/b1", duration_ms=12.5,
            body="MSH|^~\\&|x\rPID|1||P1")
        values.update(kw)
        return InboundMessage(**values)

    async def test_add_get_round_trip_and_seq_order(self) -> None:
        first = await self.inbound.add(self.message())
        second = await self.inbound.add(self.message(
            id=self.inbound.new_id(), content_type="application/json", message_type=None,
            control_id=None, patient_id=None, accession=None, study_uid="1.2.3",
            sop_uid="1.2.3.4", status=500, ack_code=None, outcome="error", bot=None,
            duration_ms=None, error_kind="no-channel", body=None, remote=None))
        self.assertLess(first.seq, second.seq)
        got = await self.inbound.get(first.id)
        self.assertEqual(got, first)
        got = await self.inbound.get(second.id)
        self.assertEqual((got.body, got.study_uid, got.sop_uid, got.error_kind, got.remote,
                          got.duration_ms, got.outcome), (None, "1.2.3", "1.2.3.4",
                                                          "no-channel", None, None, "error"))
        self.assertNotIn("body", got.to_json(include_body=True))
        self.assertEqual(first.to_json(include_body=True)["body"], first.body)
        self.assertNotIn("body", first.to_json())
        await _fails(self, self.inbound.get("nope"), 404)

    async def test_search_by_every_filter_newest_first(self) -> None:
        a = await self.inbound.add(self.message(received=100.0))
        b = await self.inbound.add(self.message(
            id=self.inbound.new_id(), agent_id="a2", channel="oru", control_id="C2",
            patient_id="P2", accession="ACC2", outcome="rejected", ack_code="AE",
            received=200.0, remote="10.0.0.6:1"))
        c = await self.inbound.add(self.message(
            id=self.inbound.new_id(), control_id="C3", study_uid="1.2", sop_uid="1.2.9",
            received=300.0, message_type="ORU^R01"))

        async def ids(**params: str) -> list[str]:
            found, total, _ = await self.inbound.search_page(params, count=10)
            self.assertEqual(total, len(found))
            return [m.id for m in found]

        self.assertEqual(await ids(), [c.id, b.id, a.id])
        self.assertEqual(await ids(agent="a2"), [b.id])
        self.assertEqual(await ids(agent="a1", channel="adt"), [c.id, a.id])
        self.assertEqual(await ids(channel="oru"), [b.id])
        self.assertEqual(await ids(control_id="C1"), [a.id])
        self.assertEqual(await ids(patient_id="P2"), [b.id])
        self.assertEqual(await ids(accession="ACC2"), [b.id])
        self.assertEqual(await ids(study_uid="1.2"), [c.id])
        self.assertEqual(await ids(sop_uid="1.2.9"), [c.id])
        self.assertEqual(await ids(outcome="rejected"), [b.id])
        self.assertEqual(await ids(ack="AE"), [b.id])
        self.assertEqual(await ids(message_type="ORU^R01"), [c.id])
        self.assertEqual(await ids(remote="10.0.0.6:1"), [b.id])
        self.assertEqual(await ids(since="150", until="300"), [b.id])
        self.assertEqual(await ids(since="150"), [c.id, b.id])
        self.assertEqual(await ids(control_id="nothing"), [])
        self.assertEqual(await ids(agent="a1", patient_id="P2"), [])

    async def test_pages_by_cursor_do_not_shift(self) -> None:
        made = [await self.inbound.add(self.message(id=self.inbound.new_id(),
                                                    received=float(i)))
                for i in range(5)]
        page, total, cursor = await self.inbound.search_page({}, count=2)
        self.assertEqual(([m.id for m in page], total), ([made[4].id, made[3].id], 5))
        await self.inbound.add(self.message(id=self.inbound.new_id()))  # a newer one
        page, total, cursor = await self.inbound.search_page({}, count=2, before_seq=cursor)
        self.assertEqual([m.id for m in page], [made[2].id, made[1].id])
        page, total, cursor = await self.inbound.search_page({}, count=2, before_seq=cursor)
        self.assertEqual(([m.id for m in page], cursor), ([made[0].id], None))
        page, total, cursor = await self.inbound.search_page({}, count=0)
        self.assertEqual((page, total, cursor), ([], 6, None))

    async def test_channel_summaries(self) -> None:
        await self.inbound.add(self.message(received=10.0))
        await self.inbound.add(self.message(id=self.inbound.new_id(), received=500.0))
        last = await self.inbound.add(self.message(
            id=self.inbound.new_id(), received=600.0, status=200, ack_code="AE",
            outcome="rejected", error_kind=None, bot="Bot/b2"))
        await self.inbound.add(self.message(id=self.inbound.new_id(), channel="lab",
                                            received=50.0, outcome="error", status=500,
                                            ack_code=None, error_kind="bot-timeout"))
        await self.inbound.add(self.message(id=self.inbound.new_id(), agent_id="other"))
        found = await self.inbound.channel_summaries("a1", since=100.0)
        self.assertEqual(found, [
            {"channel": "adt", "count": 2, "lastReceived": 600.0, "lastOutcome": "rejected",
             "lastStatus": 200, "lastAck": "AE", "lastBot": "Bot/b2", "lastErrorKind": None,
             "lastId": last.id},
            {"channel": "lab", "count": 0, "lastReceived": 50.0, "lastOutcome": "error",
             "lastStatus": 500, "lastAck": None, "lastBot": "Bot/b1",
             "lastErrorKind": "bot-timeout", "lastId": found[1]["lastId"]}])
        self.assertEqual(await self.inbound.channel_summaries("nobody", since=0.0), [])

    async def test_prune_by_age_then_by_count(self) -> None:
        made = [await self.inbound.add(self.message(id=self.inbound.new_id(),
                                                    received=float(i * 100)))
                for i in range(6)]
        self.assertEqual(await self.inbound.prune(150.0), 2)  # received 0 and 100
        self.assertEqual(await self.inbound.prune(150.0, max_rows=10), 0)
        self.assertEqual(await self.inbound.prune(0.0, max_rows=3), 1)  # the oldest left
        found, total, _ = await self.inbound.search_page({}, count=10)
        self.assertEqual([m.id for m in found], [m.id for m in made[3:]][::-1])
        self.assertEqual(await self.inbound.prune(0.0, max_rows=3), 0)

    async def test_prune_deletes_at_most_limit_a_call_oldest_first(self) -> None:
        made = [await self.inbound.add(self.message(id=self.inbound.new_id(),
                                                    received=float(i)))
                for i in range(7)]
        self.assertEqual(await self.inbound.prune(5.0, limit=2), 2)  # received 0 and 1
        self.assertEqual(await self.inbound.prune(5.0, max_rows=1, limit=2), 2)  # 2, 3
        self.assertEqual(await self.inbound.prune(5.0, max_rows=1, limit=10), 2)  # 4; 5
        found, total, _ = await self.inbound.search_page({}, count=10)
        self.assertEqual([m.id for m in found], [made[6].id])
