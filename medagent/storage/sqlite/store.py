"""
The relay's FHIR resource store in SQLite: JSON resources with versions, searchable by a few
parameters.

L{medagent.storage.interfaces.ResourceStore} is the contract; what a resource is and how it
is indexed is L{medagent.storage.resources}.  Reads by id are served from a bounded
write-through cache, since every write in this process goes through the store (one relay
node per database file).
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from medagent.fhir import FHIRError, bad_request, not_found
from medagent.storage.interfaces import PreparedWrite, WriteHook
from medagent.storage.records import Delivery, NewDelivery
from medagent.storage.resources import (
    MAX_RESOURCE_BYTES,
    SEARCH_PARAMS,
    check_resource,
    index_values,
    int_param,
    now_iso,
)
from medagent.storage.sqlite import deliveries
from medagent.storage.sqlite.database import Database

log = Logger()

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    content TEXT NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS search_index (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    system TEXT,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS search_by_value ON search_index (type, param, value);
CREATE INDEX IF NOT EXISTS search_by_id ON search_index (type, id);
"""


class SQLiteTransaction:
    """
    The L{medagent.storage.interfaces.Transaction} handle of one SQLite write: what a write
    hook may do inside the write's transaction, and nothing else (no connection escapes).
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def enqueue_deliveries(self, rows: Sequence[NewDelivery]) -> list[Delivery]:
        return deliveries.insert(self._conn, rows)


class SQLiteStore:
    """The embedded resource store."""

    def __init__(self, db: Database, *, cache_size: int = 4096) -> None:
        self._db = db
        self._cache: OrderedDict[tuple[str, str], dict[str, Any] | None] = OrderedDict()
        self._cache_size = cache_size
        #: called after each committed write as (interaction, resource, previous), with
        #: interaction ``create``/``update``/``delete``; Subscriptions hang off this.
        self.listeners: list[Callable[[str, dict[str, Any] | None, dict[str, Any] | None],
                                      None]] = []
        #: L{WriteHook}s: each is asked on the reactor thread, before a write goes to the
        #: database thread, for a L{PreparedWrite}; that runs inside the write's own
        #: transaction with a L{SQLiteTransaction}, and the hook's C{committed(token)} runs on
        #: the reactor thread after the commit.  What a write triggers (Subscription
        #: deliveries) is stored with the write, or not at all.
        self.write_hooks: list[WriteHook] = []

    def _prepare(self, resource_type: str, id: str, resource: dict[str, Any] | None
                 ) -> list[tuple[WriteHook, PreparedWrite]]:
        """Reactor thread: every hook's plan for this write (a hook that raises fails it)."""
        return [(hook, hook.prepare(resource_type, id, resource))
                for hook in list(self.write_hooks)]

    @staticmethod
    def _run_hooks(conn: Any, plans: list[tuple[WriteHook, PreparedWrite]], interaction: str,
                   resource: dict[str, Any] | None, previous: dict[str, Any] | None
                   ) -> list[tuple[WriteHook, Any]]:
        """Database thread, inside the write's transaction: only the plans run here."""
        tx = SQLiteTransaction(conn)
        return [(hook, plan.in_transaction(tx, interaction, resource, previous))
                for hook, plan in plans]

    def _committed(self, tokens: list[tuple[WriteHook, Any]]) -> None:
        for hook, token in tokens:
            try:
                hook.committed(token)
            except Exception:
                log.failure("Write hook failed after commit")

    def _notify(self, interaction: str, resource: dict[str, Any] | None,
                previous: dict[str, Any] | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(interaction, resource, previous)
            except Exception:
                log.failure("Store listener failed for a {interaction}",
                            interaction=interaction)

    @staticmethod
    def schema() -> str:
        return SCHEMA

    # -- cache -----------------------------------------------------------------------

    def _remember(self, key: tuple[str, str], resource: dict[str, Any] | None) -> None:
        self._cache[key] = resource
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # -- writes ----------------------------------------------------------------------

    def create(self, resource: dict[str, Any]) -> Deferred[dict[str, Any]]:
        resource_type = resource.get("resourceType")
        check_resource(resource, str(resource_type))
        resource = dict(resource)
        resource["id"] = resource.get("id") or str(uuid.uuid4())
        return self._write(resource, expect_new=True)

    def update(
        self, resource: dict[str, Any], if_match: str | None = None
    ) -> Deferred[dict[str, Any]]:
        check_resource(resource, str(resource.get("resourceType")))
        if not isinstance(resource.get("id"), str) or not resource["id"]:
            raise bad_request("Resource id is required for update")
        return self._write(dict(resource), if_match=if_match)

    def _write(
        self, resource: dict[str, Any], *, expect_new: bool = False, if_match: str | None = None
    ) -> Deferred[dict[str, Any]]:
        text = json.dumps(resource, separators=(",", ":"))
        if len(text) > MAX_RESOURCE_BYTES:
            raise FHIRError(413, "Resource too large", "too-costly")
        try:
            plans = self._prepare(resource["resourceType"], resource["id"], resource)
        except Exception as e:
            return fail(e)

        def txn(conn: Any) -> tuple[dict[str, Any], dict[str, Any] | None,
                                    list[tuple[WriteHook, Any]]]:
            row = conn.execute(
                "SELECT version, deleted, content FROM resources WHERE type=? AND id=?",
                (resource["resourceType"], resource["id"]),
            ).fetchone()
            if row is not None and expect_new and not row["deleted"]:
                raise FHIRError(409, f"{resource['resourceType']}/{resource['id']} exists",
                                "duplicate")
            version = (row["version"] + 1) if row is not None else 1
            if if_match is not None:
                wanted = if_match.strip().removeprefix("W/").strip('"')
                if row is None or str(row["version"]) != wanted:
                    raise FHIRError(412, "Version mismatch (If-Match)", "conflict")
            meta = dict(resource.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = now_iso()
            resource["meta"] = meta
            content = json.dumps(resource, separators=(",", ":"))
            conn.execute(
                "INSERT OR REPLACE INTO resources (type, id, version, last_updated, deleted,"
                " content) VALUES (?, ?, ?, ?, 0, ?)",
                (resource["resourceType"], resource["id"], version, meta["lastUpdated"], content),
            )
            conn.execute(
                "DELETE FROM search_index WHERE type=? AND id=?",
                (resource["resourceType"], resource["id"]),
            )
            conn.executemany(
                "INSERT INTO search_index (type, id, param, system, value) VALUES (?,?,?,?,?)",
                [
                    (resource["resourceType"], resource["id"], p, s, v)
                    for (p, s, v) in index_values(resource)
                ],
            )
            previous = (
                json.loads(row["content"]) if row is not None and not row["deleted"] else None
            )
            interaction = "update" if previous is not None else "create"
            return resource, previous, self._run_hooks(conn, plans, interaction, resource,
                                                       previous)

        d = self._db.run(txn)

        def remember(result: tuple[dict[str, Any], dict[str, Any] | None,
                                   list[tuple[WriteHook, Any]]]) -> dict[str, Any]:
            stored, previous, tokens = result
            self._remember((stored["resourceType"], stored["id"]), stored)
            self._committed(tokens)
            self._notify("update" if previous is not None else "create", stored, previous)
            return stored

        return d.addCallback(remember)

    def delete(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]:
        try:
            plans = self._prepare(resource_type, id, None)
        except Exception as e:
            return fail(e)

        def txn(conn: Any) -> tuple[dict[str, Any], list[tuple[WriteHook, Any]]]:
            row = conn.execute(
                "SELECT content FROM resources WHERE type=? AND id=? AND deleted=0",
                (resource_type, id),
            ).fetchone()
            if row is None:
                raise not_found(f"{resource_type}/{id} not found")
            conn.execute(
                "UPDATE resources SET deleted=1, version=version+1 WHERE type=? AND id=?",
                (resource_type, id),
            )
            conn.execute("DELETE FROM search_index WHERE type=? AND id=?", (resource_type, id))
            previous = json.loads(row["content"])
            return previous, self._run_hooks(conn, plans, "delete", None, previous)

        d = self._db.run(txn)

        def forget(result: tuple[dict[str, Any], list[tuple[WriteHook, Any]]]) -> dict[str, Any]:
            resource, tokens = result
            self._remember((resource_type, id), None)
            self._committed(tokens)
            self._notify("delete", None, resource)
            return resource

        return d.addCallback(forget)

    # -- reads -----------------------------------------------------------------------

    def read(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]:
        key = (resource_type, id)
        if key in self._cache:
            cached = self._cache[key]
            self._cache.move_to_end(key)
            if cached is None:
                return fail(not_found(f"{resource_type}/{id} not found"))
            return succeed(cached)

        def txn(conn: Any) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT content FROM resources WHERE type=? AND id=? AND deleted=0",
                (resource_type, id),
            ).fetchone()
            return json.loads(row["content"]) if row is not None else None

        def found(resource: dict[str, Any] | None) -> dict[str, Any]:
            self._remember(key, resource)
            if resource is None:
                raise not_found(f"{resource_type}/{id} not found")
            return resource

        return self._db.run(txn).addCallback(found)

    def search(
        self, resource_type: str, params: Mapping[str, list[str]]
    ) -> Deferred[list[dict[str, Any]]]:
        """
        AND across parameters, OR across comma-separated values.  ``identifier`` takes
        ``system|value``, ``|value`` or ``value``; ``name`` matches a prefix, any case.
        """
        try:
            query, args = _search_sql(resource_type, params)
        except FHIRError as e:
            return fail(e)

        def txn(conn: Any) -> list[dict[str, Any]]:
            return [json.loads(row["content"]) for row in conn.execute(query, args)]

        return self._db.run(txn)


def _search_sql(resource_type: str, params: Mapping[str, list[str]]) -> tuple[str, list[Any]]:
    """The SQL for a search: AND across parameters, OR across comma-separated values."""
    clauses: list[str] = []
    args: list[Any] = [resource_type]
    count = 100
    offset = 0
    for raw_name, values in params.items():
        name, _, modifier = raw_name.partition(":")
        if name == "_count":
            count = int_param(name, values[-1], 0, 1000)
            continue
        if name == "_offset":
            offset = int_param(name, values[-1], 0, 10**9)
            continue
        if name.startswith("_") and name != "_id":
            continue  # _sort, _total, _format...: accepted, ignored
        if name not in SEARCH_PARAMS:
            raise bad_request(f"Unsupported search parameter {name!r} for {resource_type}")
        for value in values:
            alternatives = value.split(",")
            ors = []
            for alt in alternatives:
                sql, sql_args = _clause(name, modifier, alt)
                ors.append(sql)
                args.extend(sql_args)
            clauses.append("(" + " OR ".join(ors) + ")")
    where = " AND ".join(clauses) if clauses else "1=1"
    query = (
        "SELECT content FROM resources r WHERE r.type=? AND r.deleted=0 AND "
        + where
        + " ORDER BY r.last_updated, r.rowid LIMIT ? OFFSET ?"  # ties: in write order
    )
    args.extend([count, offset])
    return query, args


def _clause(name: str, modifier: str, value: str) -> tuple[str, list[Any]]:
    if name == "_id":
        return "r.id = ?", [value]
    base = (
        "EXISTS (SELECT 1 FROM search_index s WHERE s.type=r.type AND s.id=r.id AND s.param=?"
    )
    if name == "identifier" or name == "code":
        if "|" in value:
            system, _, token = value.partition("|")
            if system:
                return base + " AND s.system=? AND s.value=?)", [name, system, token]
            return base + " AND s.system IS NULL AND s.value=?)", [name, token]
        return base + " AND s.value=?)", [name, value]
    if name == "name":
        if modifier == "exact":
            return base + " AND s.value=?)", [name, value.lower()]
        escaped = value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        if modifier == "contains":
            return base + " AND s.value LIKE ? ESCAPE '\\')", [name, f"%{escaped}%"]
        return base + " AND s.value LIKE ? ESCAPE '\\')", [name, f"{escaped}%"]
    return base + " AND s.value=?)", [name, value]
