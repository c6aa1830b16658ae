"""
The push journal's record and state machine, whatever database keeps it.

States: ``queued`` (stored, not yet on the websocket) → ``sent`` (written to the agent's
socket) → ``accepted`` (a durable agent has it on its disk) → ``delivered`` (the device
acknowledged) | ``failed`` (with the reason) | ``expired`` | ``cancelled``.  The contract of a
journal is L{medagent.storage.interfaces.PushJournal}; the SQLite one is
L{medagent.storage.sqlite.journal.SQLiteJournal}.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import attr
from twisted.logger import Logger

from medagent.destination import lane_key
from medagent.fhir import HL7_V2
from medagent.hl7.message import HL7Error, normalise

QUEUED = "queued"
SENT = "sent"
ACCEPTED = "accepted"
DELIVERED = "delivered"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"

STATES = (QUEUED, SENT, ACCEPTED, DELIVERED, FAILED, EXPIRED, CANCELLED)
FINAL_STATES = frozenset([DELIVERED, FAILED, EXPIRED, CANCELLED])
#: States in which the agent still owes an answer.
OPEN_STATES = (QUEUED, SENT, ACCEPTED)
#: The stages of a push's L{Push.timeline}, in order: the relay got the request, the push
#: was on disk, written to the agent's socket, on the agent's disk (a durable agent's
#: "accepted"), handed to the device (our agent's answer says how long before it answered:
#: L{wire.DEVICE_MS}, an interval on the agent's clock, placed before "answered" on the
#: relay's, so the two clocks need not agree), the device's answer back at the relay.
STAGES = ("received", "journaled", "sent", "accepted", "device", "answered")

log = Logger()

#: How long an idempotency key (and a message, for the same-message rule) is remembered.
IDEMPOTENCY_WINDOW = 24 * 3600

def message_hash(content_type: str, body: str) -> str:
    """
    The identity of a message's content: SHA-256 of its content type and its body as the device
    gets it.  HL7 v2 is normalised the way the agent sends it (a ``\\n`` or a trailing newline
    does not make another message) and MSH-7, the time the message was built, is left out: a
    sender that rebuilds the same message for a retry (our bots' C{order_message} does) stamps
    a new MSH-7 on the same MSH-10: that is the same message sent again, not a new one.
    """
    text = body
    if content_type == HL7_V2:
        try:
            text = normalise(body)
        except HL7Error:
            pass
        else:
            msh, end, rest = text.partition("\r")
            fields = msh.split(msh[3])  # fields[n - 1] is MSH-n
            if len(fields) > 6:
                fields[6] = ""
            text = msh[3].join(fields) + end + rest
    digest = hashlib.sha256(content_type.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


@attr.s(auto_attribs=True)
class Push:
    """One journal entry."""

    id: str
    agent_id: str
    destination: str
    remote: str
    content_type: str
    body: str
    options: dict[str, Any] = attr.ib(factory=dict)
    idempotency_key: str | None = None
    state: str = QUEUED
    created: float = 0.0
    updated: float = 0.0
    expires_at: float | None = None
    attempts: int = 0
    last_error: str | None = None
    reply_status: int | None = None
    reply_content_type: str | None = None
    reply_body: str | None = None
    requester: str | None = None
    #: MSH-10 of an HL7 v2 push (the same-message rule's key)
    control_id: str | None = None
    #: L{message_hash} of content type and body
    body_hash: str | None = None
    seq: int | None = None
    #: ended failed after it may have reached the device (the agent's ``inDoubt: true``)
    in_doubt: bool = False
    #: when it reached each of L{STAGES} (relay clock seconds; the last time for a stage
    #: passed again, a re-send after a reconnect): where its time went, kept with the push
    timeline: dict[str, float] = attr.ib(factory=dict)

    def stamp(self, stage: str, at: float) -> None:
        """Record that the push reached C{stage} at C{at}."""
        self.timeline[stage] = at
    #: the order / accession number of an HL7 v2 push (ORC-2, else OBR-2, else OBR-3), indexed
    #: for the console's search
    accession: str | None = None
    #: the push this one is a resend of (an operator's "resend"), or None
    resent_from: str | None = None
    #: the patient id of an HL7 v2 push (PID-3, first component) or a DICOM one (Patient
    #: ID), indexed for the console's search
    patient_id: str | None = None
    #: Study / SOP Instance UID of a DICOM push, indexed for the console's search
    study_uid: str | None = None
    sop_uid: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self, *, include_body: bool = False) -> dict[str, Any]:
        """The status document shown at the push's status URL."""
        doc: dict[str, Any] = {
            "resourceType": "AgentPush",
            "id": self.id,
            "agent": {"reference": f"Agent/{self.agent_id}"},
            "destination": self.destination,
            "remote": self.remote,
            "contentType": self.content_type,
            "state": self.state,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "attempts": self.attempts,
        }
        if self.idempotency_key:
            doc["idempotencyKey"] = self.idempotency_key
        expires = _iso(self.expires_at) if self.expires_at else None
        if expires:
            doc["expiresAt"] = expires
        if self.last_error:
            doc["error"] = self.last_error
        if self.in_doubt:
            doc["inDoubt"] = True
        if self.resent_from:
            doc["resentFrom"] = {"reference": f"AgentPush/{self.resent_from}"}
        if self.reply_body is not None:
            doc["reply"] = {
                "statusCode": self.reply_status,
                "contentType": self.reply_content_type,
                "body": self.reply_body,
            }
        start = self.timeline.get("received")
        stages = [{"stage": stage, "at": _iso(self.timeline[stage]),
                   **({"sinceReceivedMs": round((self.timeline[stage] - start) * 1000, 3)}
                      if start is not None else {})}
                  for stage in STAGES if isinstance(self.timeline.get(stage), (int, float))]
        if stages:
            doc["timeline"] = stages
        if include_body:
            doc["body"] = self.body
        return doc


def _iso(t: float | None) -> str | None:
    """
    An instant as FHIR text; C{None} for a value no calendar has (infinite, NaN, beyond year
    9999, not a number), so one bad stored value cannot break a status document or a list.
    """
    if t is None or isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    if not math.isfinite(t) or not -62135596800 <= t < 253402300800:
        return None
    try:
        return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
                + f".{int(t * 1000) % 1000:03d}Z")
    except (OverflowError, ValueError, OSError):
        return None


#: The columns of a journal row that are L{Push} fields as they are (plus C{options}, JSON
#: text, and C{in_doubt}, a flag).
PUSH_COLUMNS = (
    "seq id agent_id destination remote content_type body options idempotency_key state created "
    "updated expires_at attempts last_error reply_status reply_content_type reply_body requester "
    "control_id body_hash accession resent_from patient_id study_uid sop_uid"
).split()


def push_from_row(row: Any) -> Push:
    """A journal row (a mapping by column) as a L{Push}; damaged C{options} read as none."""
    values = {c: row[c] for c in PUSH_COLUMNS}
    try:
        options = json.loads(values["options"] or "{}")
    except (TypeError, ValueError):
        options = None
    if not isinstance(options, dict):
        log.warn("Push {push_id} has unreadable options in the journal; ignored",
                 push_id=values["id"])
        options = {}
    values["options"] = options
    values["in_doubt"] = bool(row["in_doubt"])
    values["timeline"] = timeline_from_text(row["timeline"])
    return Push(**values)


def timeline_text(push: Push) -> str:
    """The timeline as stored (JSON text)."""
    return json.dumps(push.timeline, separators=(",", ":"))


def timeline_from_text(text: Any) -> dict[str, float]:
    """A stored timeline; anything unreadable (or not a stage) is left out, never an error."""
    try:
        found = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {k: float(v) for k, v in found.items() if k in STAGES
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


#: Filters of the push list that are equality on one column: query parameter → column (the
#: same for every backend; C{since}/C{until} bound C{created}, see L{time_bounds}).
FILTERS = (("agent", "agent_id"), ("state", "state"), ("destination", "destination"),
           ("requester", "requester"), ("remote", "remote"), ("control_id", "control_id"),
           ("accession", "accession"), ("resent_from", "resent_from"),
           ("patient_id", "patient_id"), ("study_uid", "study_uid"), ("sop_uid", "sop_uid"))


def search_where(params: Any, mark: str) -> tuple[str, list[Any]]:
    """The WHERE clause and arguments of a push search (L{FILTERS}, C{since}/C{until}) in a
    backend's placeholder C{mark}."""
    clauses: list[str] = []
    args: list[Any] = []
    for key, column in FILTERS:
        if params.get(key):
            clauses.append(f"{column}={mark}")
            args.append(params[key])
    since, until = time_bounds(params)
    if since is not None:
        clauses.append(f"created>={mark}")
        args.append(since)
    if until is not None:
        clauses.append(f"created<{mark}")
        args.append(until)
    return " AND ".join(clauses) or "1=1", args


def time_bounds(params: Any) -> tuple[float | None, float | None]:
    """C{since} and C{until} of a search (seconds since the epoch, as text), or None each;
    callers check them first (a bad value here reads as absent)."""
    out: list[float | None] = []
    for name in ("since", "until"):
        raw = params.get(name)
        try:
            value = float(raw) if raw not in (None, "") else None
        except (TypeError, ValueError):
            value = None
        out.append(value if value is not None and math.isfinite(value) else None)
    return out[0], out[1]


def lane_summary(rows: Any, now: float) -> list[dict[str, Any]]:
    """
    The console's lanes of one agent from the rows of a backend's lane query (C{remote},
    C{open_count}, C{oldest_open}, C{last_state}, C{last_updated}, C{last_error}); one
    definition of the fields for every backend.
    """
    out = []
    for r in rows:
        out.append({
            "remote": r["remote"],
            "open": int(r["open_count"] or 0),
            "oldestOpenAgeSeconds": (round(now - r["oldest_open"], 3)
                                     if r["oldest_open"] is not None else None),
            "lastState": r["last_state"],
            "lastUpdated": r["last_updated"],
            "lastError": r["last_error"],
        })
    return out


class RepeatedPush(Exception):
    """
    L{PushJournal.create} found, in the same transaction, an earlier push the new one repeats
    (another relay node journaled it meanwhile, or a concurrent request here): nothing was
    stored.  C{by_key}: found by the caller's Idempotency-Key (the message may differ: the
    caller decides whether that is a repeat or a conflict); otherwise the same message.
    """

    def __init__(self, earlier: Push, by_key: bool) -> None:
        super().__init__(f"repeats push {earlier.id}")
        self.earlier = earlier
        self.by_key = by_key


def earlier_by_key(conn: Any, mark: str, requester: str, key: str, since: float
                   ) -> Push | None:
    """
    The first push C{requester} created with C{key} since C{since}, or bound to it in
    C{push_keys}, not cancelled; C{mark} is the driver's placeholder (C{?} or C{%s}).
    """
    row = conn.execute(
        f"SELECT * FROM pushes WHERE requester={mark} AND idempotency_key={mark}"
        f" AND created>={mark} AND state <> 'cancelled' ORDER BY seq LIMIT 1",
        (requester, key, since)).fetchone()
    if row is None:
        row = conn.execute(
            f"SELECT p.* FROM push_keys k JOIN pushes p ON p.id=k.push_id"
            f" WHERE k.requester={mark} AND k.idempotency_key={mark} AND k.created>={mark}"
            f" AND p.state <> 'cancelled'", (requester, key, since)).fetchone()
    return push_from_row(row) if row is not None else None


def earlier_same_message(conn: Any, mark: str, agent_id: str, device: str, control_id: str,
                         body_hash: str, since: float) -> Push | None:
    """The first push through C{agent_id} to C{device} (a lane key) with this MSH-10 and body
    hash since C{since}, not cancelled, whoever sent it."""
    rows = conn.execute(
        f"SELECT * FROM pushes WHERE agent_id={mark} AND control_id={mark} AND body_hash={mark}"
        f" AND created>={mark} AND state <> 'cancelled' ORDER BY seq LIMIT 100",
        (agent_id, control_id, body_hash, since))
    for row in rows:
        if lane_key(row["remote"]) == device:
            return push_from_row(row)
    return None


def write_scopes(push: Push) -> list[str]:
    """
    What a new push's insert serialises on across relay nodes (PostgreSQL's advisory locks,
    held to commit): its agent, so that per agent C{seq} order is commit order (a node that
    has read a push of an agent has read every earlier one: its lanes' next-seq marks hold),
    and the scopes of the repeat rules (L{check_not_repeated}).
    """
    scopes = [f"agent\n{push.agent_id}"]
    if push.idempotency_key is not None:
        scopes.append(f"key\n{push.requester or ''}\n{push.idempotency_key}")
    if push.control_id is not None and push.body_hash is not None:
        scopes.append(f"message\n{push.agent_id}\n{push.control_id}")
    return scopes


def check_not_repeated(conn: Any, mark: str, push: Push, since: float) -> None:
    """
    Inside L{PushJournal.create}'s transaction, before the insert: raise L{RepeatedPush} if an
    earlier push has C{push}'s key or is the same message.  Across processes the check and
    the insert are atomic only if writers of one scope are serialised until commit (see
    L{write_scopes}; SQLite's single writer needs nothing more).
    """
    if push.idempotency_key is not None:
        earlier = earlier_by_key(conn, mark, push.requester or "", push.idempotency_key, since)
        if earlier is not None:
            raise RepeatedPush(earlier, by_key=True)
    if push.control_id is not None and push.body_hash is not None and push.resent_from is None:
        # (an operator's resend is the same message on purpose: never a repeat)
        earlier = earlier_same_message(conn, mark, push.agent_id, lane_key(push.remote),
                                       push.control_id, push.body_hash, since)
        if earlier is not None:
            raise RepeatedPush(earlier, by_key=False)


def outcome_count_rows(conn: Any, mark: str, since: float, limit: int
                       ) -> dict[str, dict[str, int]]:
    """
    In a transaction (either backend): per agent, the pushes that ended delivered or failed
    at or after C{since} (C{finished}) and how many of them failed (C{failed}); the error
    rate alert's figures.  At most C{limit} agents.
    """
    out: dict[str, dict[str, int]] = {}
    for row in conn.execute(
            "SELECT agent_id, count(*) AS n,"
            " sum(CASE WHEN state='failed' THEN 1 ELSE 0 END) AS f FROM pushes"
            f" WHERE state IN ('delivered', 'failed') AND updated>={mark}"
            f" GROUP BY agent_id ORDER BY agent_id LIMIT {mark}", (since, limit)):
        out[row["agent_id"]] = {"finished": int(row["n"]), "failed": int(row["f"] or 0)}
    return out


def agent_summary_rows(conn: Any, mark: str, since: float) -> dict[str, dict[str, Any]]:
    """
    In a transaction (either backend; C{mark} is its placeholder): per agent with open
    pushes or failures, C{open} (queued, sent, accepted), C{oldestOpen} (creation time of the
    oldest open one) and C{failedSince} (pushes that ended failed at or after C{since}).
    """
    out: dict[str, dict[str, Any]] = {}
    marks = ",".join([mark] * len(OPEN_STATES))
    for row in conn.execute(
            f"SELECT agent_id, count(*) AS n, min(created) AS t FROM pushes"
            f" WHERE state IN ({marks}) GROUP BY agent_id", tuple(OPEN_STATES)):
        out[row["agent_id"]] = {"open": row["n"], "oldestOpen": row["t"], "failedSince": 0}
    for row in conn.execute(
            f"SELECT agent_id, count(*) AS n FROM pushes WHERE state='failed'"
            f" AND updated>={mark} GROUP BY agent_id", (since,)):
        entry = out.setdefault(row["agent_id"], {"open": 0, "oldestOpen": None,
                                                 "failedSince": 0})
        entry["failedSince"] = row["n"]
    return out


# -- trends (the console's last 24 hours) ---------------------------------------------------

#: Final states the trends count as failures (a push that ended without reaching the device).
FAILURE_STATES = (FAILED, EXPIRED)
#: The most buckets one trends read may ask for (a day of 5-minute buckets).
MAX_TREND_BUCKETS = 288


@attr.s(auto_attribs=True, frozen=True)
class Trend:
    """
    One agent's (or the fleet's) pushes over C{len(created)} buckets of C{width} seconds
    from C{start}: C{created} (pushes journaled in the bucket), C{failed} (pushes that ended
    failed or expired in it) and C{depth} (pushes open at the bucket's end: journaled before
    it and not finished by it).  A finished push's end is its C{updated}: nothing moves a
    finished push but a retry, which reopens it; so a retried push counts by its latest
    outcome, and as open from its creation to that outcome.
    """

    start: float
    width: float
    created: tuple[int, ...]
    failed: tuple[int, ...]
    depth: tuple[int, ...]

    @property
    def end(self) -> float:
        return self.start + self.width * len(self.created)

    def bucket_start(self, k: int) -> float:
        return self.start + self.width * k


def trend_window(now: float, width: float, count: int) -> float:
    """
    The start of C{count} buckets of C{width} s aligned on multiples of C{width} (whole hours
    for hourly buckets), the last one holding C{now}; the same buckets on every node.
    """
    check_trend_buckets(width, count)
    return (math.floor(now / width) + 1 - count) * width


def check_trend_buckets(width: float, count: int) -> None:
    """A programming error (ValueError) unless C{width} > 0 and 1 <= C{count} <= the max."""
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError("a trend bucket must be a positive number of seconds")
    if not (isinstance(count, int) and 1 <= count <= MAX_TREND_BUCKETS):
        raise ValueError(f"trends have 1 to {MAX_TREND_BUCKETS} buckets")


#: the kinds of row a backend's trends query returns (L{trends_from_rows})
TREND_CREATED, TREND_FAILED, TREND_DONE = "c", "f", "d"


def trends_from_rows(rows: Any, start: float, width: float, count: int
                     ) -> dict[str, Trend]:
    """
    The L{Trend} of each agent from a backend's trends query: rows of C{agent_id}, C{kind}
    (L{TREND_CREATED}: by creation bucket, -1 for before C{start}; L{TREND_FAILED} /
    L{TREND_DONE}: by the bucket it ended in, failed or otherwise), C{bucket} and C{n}.
    Only pushes open now or finished since C{start} are in the rows, so an open push
    created before C{start} is open at C{start} (the queue depth the window starts with).
    """
    acc: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {}
    for r in rows:
        created, failed, ended, base = acc.setdefault(
            r["agent_id"], ([0] * count, [0] * count, [0] * count, [0]))
        b, n, kind = int(r["bucket"]), int(r["n"]), r["kind"]
        if b >= count:  # (a clock ahead of ours: it happened now)
            b = count - 1
        if kind == TREND_CREATED:
            if b < 0:
                base[0] += n
            else:
                created[b] += n
        elif b >= 0:
            ended[b] += n
            if kind == TREND_FAILED:
                failed[b] += n
    out: dict[str, Trend] = {}
    for agent_id, (created, failed, ended, base) in acc.items():
        depth, open_now = [], base[0]
        for k in range(count):
            open_now += created[k] - ended[k]
            depth.append(max(0, open_now))
        out[agent_id] = Trend(start, width, tuple(created), tuple(failed), tuple(depth))
    return out


def empty_trend(start: float, width: float, count: int) -> Trend:
    """No push at all in the window."""
    zeros = (0,) * count
    return Trend(start, width, zeros, zeros, zeros)


def trend_total(trends: Any, start: float, width: float, count: int) -> Trend:
    """The sum of several agents' trends over the same buckets (the whole fleet)."""
    created, failed, depth = [0] * count, [0] * count, [0] * count
    for t in trends:
        for k in range(count):
            created[k] += t.created[k]
            failed[k] += t.failed[k]
            depth[k] += t.depth[k]
    return Trend(start, width, tuple(created), tuple(failed), tuple(depth))
