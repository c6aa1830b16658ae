"""
Pausing a lane (issue 12): the hub sends none of a paused lane's pushes, keeps them queued in
the journal in order, and sends them in order once resumed; other lanes go on; only operators
and admins pause; each change is audited.  Hub, journal and pause records on an inline
database with a Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from medagent import wire
from medagent.fhir import FHIRError
from medagent.relay.lanes import LaneControl
from medagent.storage import journal as j
from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.pauses import SQLiteLanePauses
from medagent.storage.sqlite.store import SQLiteStore
from tests.fakes import inline_database
from tests.test_hub import HL7, _HubCase

OTHER = "mllp://127.0.0.1:2576"


class _PauseCase(_HubCase):
    def setUp(self) -> None:
        super().setUp()
        db = inline_database(self, SQLiteStore.schema() + SQLiteClientRegistry.schema()
                             + SQLiteJournal.schema() + SQLiteLanePauses.schema(), self.clock)
        self.pauses = SQLiteLanePauses(db)
        self.hub.lane_pauses = self.pauses
        self.lanes = LaneControl(self.hub, self.store, self.pauses, self.clock)
        operator = self.successResultOf(self.auth.create_client("operator"))
        self.operator = self.auth.verify_token(self.token(operator))

    def send(self, n: int, prefix: str, destination: str | None = None) -> list[str]:
        ids = []
        for i in range(n):
            extra = {"destination": destination} if destination else {}
            result = self.successResultOf(self.push(HL7.replace("MSG0001", f"{prefix}{i}"),
                                                    **extra))
            ids.append(result.push.id)
        return ids

    def sent_ids(self, conn: Any) -> list[str]:
        return [m["pushId"] for m in conn.of_type(wire.TRANSMIT_REQUEST)]

    def pause(self, principal: Any = None, destination: str | None = None) -> dict[str, Any]:
        return self.successResultOf(self.lanes_call("pause", principal, destination))

    def lanes_call(self, action: str, principal: Any = None, destination: str | None = None
                   ) -> Any:
        from twisted.internet.defer import ensureDeferred
        method = self.lanes.pause if action == "pause" else self.lanes.resume
        return ensureDeferred(method(principal or self.operator, self.agent["id"],
                                     destination or self.device["url"], "127.0.0.1"))

    def state(self, push_id: str) -> str:
        return self.successResultOf(self.journal.get(push_id)).state


class PauseTests(_PauseCase):
    def test_paused_lane_holds_in_order_and_resume_sends_them_in_order(self) -> None:
        conn, session = self.connect(["durable"])
        first = self.send(3, "A")
        self.assertEqual(self.sent_ids(conn), first)
        result = self.pause()
        self.assertEqual((result["lane"], result["paused"], result["changed"],
                          result["onAgent"]), ("mllp://127.0.0.1:2575", True, True, 3))
        second = self.send(3, "B")
        other = self.send(1, "C", OTHER)
        # the other device's lane goes on; the paused one sends nothing more
        self.assertEqual(self.sent_ids(conn), first + other)
        self.assertEqual([self.state(i) for i in second], [j.QUEUED] * 3)
        # answers of what the agent had keep coming in; still nothing sent on the lane
        for request in conn.of_type(wire.TRANSMIT_REQUEST)[:3]:
            self.answer(conn, session, request)
        self.assertEqual(self.sent_ids(conn), first + other)
        self.assertEqual(self.successResultOf(self.hub.snapshot_anywhere(self.agent["id"]))
                         ["paused"], ["mllp://127.0.0.1:2575"])
        resumed = self.successResultOf(self.lanes_call("resume"))
        self.assertEqual((resumed["paused"], resumed["changed"]), (False, True))
        self.assertEqual(self.sent_ids(conn), first + other + second)
        self.assertEqual(self.successResultOf(self.lanes_call("resume"))["changed"], False)

    def test_pause_is_read_before_the_first_scan(self) -> None:
        queued = self.send(2, "Q")  # while the agent is away
        self.pause()
        conn, session = self.connect(["durable"])
        self.assertEqual(self.sent_ids(conn), [])
        self.assertEqual(session.paused, {"mllp://127.0.0.1:2575"})
        self.successResultOf(self.lanes_call("resume"))
        self.assertEqual(self.sent_ids(conn), queued)

    def test_medplum_agent_lane_is_held_too(self) -> None:
        conn, session = self.connect()  # no capabilities: one push at a time
        first = self.send(1, "M")
        self.assertEqual(self.sent_ids(conn), first)
        self.pause()
        later = self.send(2, "N")
        self.answer(conn, session, conn.of_type(wire.TRANSMIT_REQUEST)[0])
        self.assertEqual(self.state(first[0]), j.DELIVERED)
        self.assertEqual(self.sent_ids(conn), first)
        self.successResultOf(self.lanes_call("resume"))
        self.assertEqual(self.sent_ids(conn), first + later[:1])
        self.answer(conn, session, conn.of_type(wire.TRANSMIT_REQUEST)[1])
        self.assertEqual(self.sent_ids(conn), first + later)

    def test_pause_by_device_reference_and_query_do_not_split_the_lane(self) -> None:
        conn, session = self.connect(["durable"])
        result = self.pause(destination=f"Device/{self.device['id']}")
        self.assertEqual(result["lane"], "mllp://127.0.0.1:2575")
        self.send(1, "D", "mllp://127.0.0.1:2575?ackTimeout=30")
        self.assertEqual(self.sent_ids(conn), [])

    def test_bad_destinations_are_refused(self) -> None:
        for bad, status in (("", 400), ("not a url", 400), ("x" * 2000, 400),
                            ("Device/nope", 404)):
            f = self.failureResultOf(self.lanes_call("pause", destination=bad) if bad
                                     else self._pause_raw(bad), FHIRError)
            self.assertEqual(f.value.status, status, bad)
        self.assertEqual(self.successResultOf(self.pauses.list()), [])

    def _pause_raw(self, destination: Any) -> Any:
        from twisted.internet.defer import ensureDeferred
        return ensureDeferred(self.lanes.pause(self.operator, self.agent["id"], destination))


class PauseAccessTests(_PauseCase):
    def test_pusher_viewer_and_agent_may_not_pause_or_resume(self) -> None:
        conn, session = self.connect(["durable"])
        for role, agents in (("pusher", [self.agent["id"]]), ("viewer", []),
                             ("agent", [self.agent["id"]])):
            client = self.successResultOf(self.auth.create_client(role, agents))
            who = self.auth.verify_token(self.token(client))
            for action in ("pause", "resume"):
                f = self.failureResultOf(self.lanes_call(action, who), FHIRError)
                self.assertEqual(f.value.status, 403, (role, action))
        self.assertEqual(self.successResultOf(self.pauses.list()), [])
        self.send(1, "P")
        self.assertEqual(len(self.sent_ids(conn)), 1)

    def test_pause_and_resume_are_audited_without_payloads(self) -> None:
        self.send(1, "X")
        self.pause()
        self.pause()  # already paused: no second record
        self.successResultOf(self.lanes_call("resume", self.admin))
        events = self.successResultOf(self.store.search("AuditEvent", {}))
        codes = [e["subtype"][0]["code"] for e in events]
        self.assertEqual(sorted(codes), ["pause-lane", "resume-lane"])
        by = {e["subtype"][0]["code"]: e["agent"][0]["who"]["reference"] for e in events}
        self.assertEqual(by["pause-lane"],
                         f"ClientApplication/{self.operator.client_id}")
        self.assertEqual(by["resume-lane"], f"ClientApplication/{self.admin.client_id}")
        for e in events:
            self.assertIn({"what": {"reference": f"Agent/{self.agent['id']}"}}, e["entity"])
            self.assertNotIn("PID", repr(e))
            self.assertNotIn("MSH", repr(e))


class _SlowPauses:
    """Pause records whose reads answer when the test says (out of order, if it likes)."""

    def __init__(self) -> None:
        self.reads: list[Deferred[list[dict[str, Any]]]] = []

    def list(self, agent_id: str | None = None, limit: int = 1000
             ) -> Deferred[list[dict[str, Any]]]:
        d: Deferred[list[dict[str, Any]]] = Deferred()
        self.reads.append(d)
        return d


def _rows(agent_id: str, *lanes: str) -> list[dict[str, Any]]:
    return [{"agent": agent_id, "lane": lane, "by": "op", "since": 1.0} for lane in lanes]


class PauseReadRaces(_HubCase):
    LANE = "mllp://127.0.0.1:2575"

    def setUp(self) -> None:
        super().setUp()
        self.slow = _SlowPauses()
        self.hub.lane_pauses = self.slow

    def test_a_pause_during_the_first_read_is_read_again(self) -> None:
        conn, session = self.connect(["durable"])
        [first] = self.slow.reads
        self.hub.reload_pauses(self.agent["id"])  # an operator paused it meanwhile
        self.slow.reads[1].callback(_rows(self.agent["id"], self.LANE))
        first.callback([])  # the first read predates the pause: not trusted
        self.assertEqual(len(self.slow.reads), 3)
        self.assertIsNone(session.paused)
        self.slow.reads[2].callback(_rows(self.agent["id"], self.LANE))
        self.assertEqual(session.paused, {self.LANE})
        self.successResultOf(self.push())
        self.assertEqual(conn.of_type(wire.TRANSMIT_REQUEST), [])

    def test_an_older_read_answering_late_is_not_applied(self) -> None:
        conn, session = self.connect(["durable"])
        self.slow.reads[0].callback([])
        self.hub.refresh_pauses()  # a poll's read, issued before the pause was written
        self.hub.reload_pauses(self.agent["id"])  # paused ...
        self.hub.reload_pauses(self.agent["id"])  # ... and resumed
        poll_read, pause_read, resume_read = self.slow.reads[1:]
        resume_read.callback([])
        pause_read.callback(_rows(self.agent["id"], self.LANE))  # late: ignored
        poll_read.callback(_rows(self.agent["id"], self.LANE))  # (as if): older, ignored
        self.assertEqual(session.paused, set())
        self.successResultOf(self.push())
        self.assertEqual(len(conn.of_type(wire.TRANSMIT_REQUEST)), 1)
