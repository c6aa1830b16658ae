"""
The relay's FHIR resource store in PostgreSQL (L{medagent.storage.interfaces.ResourceStore}).

What a resource is and how it is indexed is L{medagent.storage.resources}, shared with SQLite.
No read cache: other relay nodes write the same rows.  A write locks its row
(C{FOR UPDATE}); two nodes creating one new id at once cannot both win (the loser gets 409).
Write order (the order of C{search}) is C{last_updated}, then a sequence drawn by each write.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from medagent.fhir import FHIRError, bad_request, not_found
from medagent.storage.interfaces import PreparedWrite, WriteHook
from medagent.storage.postgres import deliveries
from medagent.storage.postgres.database import PgDatabase
from medagent.storage.records import Delivery, NewDelivery
from medagent.storage.resources import (
    MAX_RESOURCE_BYTES,
    SEARCH_PARAMS,
    check_resource,
    index_values,
    int_param,
    now_iso,
)

log = Logger()


class PgTransaction:
    """
    The L{medagent.storage.interfaces.Transaction} handle of one PostgreSQL write: what a
    write hook may do inside the write's transaction, and nothing else.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def enqueue_deliveries(self, rows: Sequence[NewDelivery]) -> list[Delivery]:
        return deliveries.insert(self._conn, rows)


class PgStore:
    """The shared resource store."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self.listeners: list[Callable[[str, dict[str, Any] | None, dict[str, Any] | None],
                                      None]] = []
        self.write_hooks: list[WriteHook] = []

    def _prepare(self, resource_type: str, id: str, resource: dict[str, Any] | None
                 ) -> list[tuple[WriteHook, PreparedWrite]]:
        return [(hook, hook.prepare(resource_type, id, resource))
                for hook in list(self.write_hooks)]

    @staticmethod
    def _run_hooks(conn: Any, plans: list[tuple[WriteHook, PreparedWrite]], interaction: str,
                   resource: dict[str, Any] | None, previous: dict[str, Any] | None
                   ) -> list[tuple[WriteHook, Any]]:
        tx = PgTransaction(conn)
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

    # -- writes ----------------------------------------------------------------------

    def create(self, resource: dict[str, Any]) -> Deferred[dict[str, Any]]:
        check_resource(resource, str(resource.get("resourceType")))
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
        rtype, rid = resource["resourceType"], resource["id"]

        def txn(conn: Any) -> tuple[dict[str, Any], dict[str, Any] | None,
                                    list[tuple[WriteHook, Any]]]:
            row = conn.execute(
                "SELECT version, deleted, content FROM resources WHERE type=%s AND id=%s"
                " FOR UPDATE", (rtype, rid)).fetchone()
            if row is not None and expect_new and not row["deleted"]:
                raise FHIRError(409, f"{rtype}/{rid} exists", "duplicate")
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
            if row is None:
                inserted = conn.execute(
                    "INSERT INTO resources (type, id, version, last_updated, write_seq, deleted,"
                    " content) VALUES (%s, %s, %s, %s, nextval('resource_write_seq'), false, %s)"
                    " ON CONFLICT (type, id) DO NOTHING RETURNING version",
                    (rtype, rid, version, meta["lastUpdated"], content)).fetchone()
                if inserted is None:  # another node created it after our SELECT
                    raise FHIRError(409, f"{rtype}/{rid} was written concurrently",
                                    "duplicate" if expect_new else "conflict")
            else:
                conn.execute(
                    "UPDATE resources SET version=%s, last_updated=%s,"
                    " write_seq=nextval('resource_write_seq'), deleted=false, content=%s"
                    " WHERE type=%s AND id=%s",
                    (version, meta["lastUpdated"], content, rtype, rid))
            conn.execute("DELETE FROM search_index WHERE type=%s AND id=%s", (rtype, rid))
            values = [(rtype, rid, p, s, v) for (p, s, v) in index_values(resource)]
            if values:
                conn.cursor().executemany(
                    "INSERT INTO search_index (type, id, param, system, value)"
                    " VALUES (%s,%s,%s,%s,%s)", values)
            previous = (json.loads(row["content"])
                        if row is not None and not row["deleted"] else None)
            interaction = "update" if previous is not None else "create"
            return resource, previous, self._run_hooks(conn, plans, interaction, resource,
                                                       previous)

        def done(result: tuple[dict[str, Any], dict[str, Any] | None,
                               list[tuple[WriteHook, Any]]]) -> dict[str, Any]:
            stored, previous, tokens = result
            self._committed(tokens)
            self._notify("update" if previous is not None else "create", stored, previous)
            return stored

        return self._db.run_ordered(txn).addCallback(done)

    def delete(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]:
        try:
            plans = self._prepare(resource_type, id, None)
        except Exception as e:
            return fail(e)

        def txn(conn: Any) -> tuple[dict[str, Any], list[tuple[WriteHook, Any]]]:
            row = conn.execute(
                "SELECT content FROM resources WHERE type=%s AND id=%s AND NOT deleted"
                " FOR UPDATE", (resource_type, id)).fetchone()
            if row is None:
                raise not_found(f"{resource_type}/{id} not found")
            conn.execute(
                "UPDATE resources SET deleted=true, version=version+1 WHERE type=%s AND id=%s",
                (resource_type, id))
            conn.execute("DELETE FROM search_index WHERE type=%s AND id=%s",
                         (resource_type, id))
            previous = json.loads(row["content"])
            return previous, self._run_hooks(conn, plans, "delete", None, previous)

        def done(result: tuple[dict[str, Any], list[tuple[WriteHook, Any]]]) -> dict[str, Any]:
            resource, tokens = result
            self._committed(tokens)
            self._notify("delete", None, resource)
            return resource

        return self._db.run_ordered(txn).addCallback(done)

    # -- reads -----------------------------------------------------------------------

    def read(self, resource_type: str, id: str) -> Deferred[dict[str, Any]]:
        def txn(conn: Any) -> dict[str, Any]:
            row = conn.execute(
                "SELECT content FROM resources WHERE type=%s AND id=%s AND NOT deleted",
                (resource_type, id)).fetchone()
            if row is None:
                raise not_found(f"{resource_type}/{id} not found")
            return json.loads(row["content"])

        return self._db.run(txn)

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
    """The SQL for a search (the same rules as the SQLite store's, in PostgreSQL's dialect)."""
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
            ors = []
            for alt in value.split(","):
                sql, sql_args = _clause(name, modifier, alt)
                ors.append(sql)
                args.extend(sql_args)
            clauses.append("(" + " OR ".join(ors) + ")")
    where = " AND ".join(clauses) if clauses else "true"
    query = ("SELECT content FROM resources r WHERE r.type=%s AND NOT r.deleted AND " + where
             + " ORDER BY r.last_updated, r.write_seq LIMIT %s OFFSET %s")
    args.extend([count, offset])
    return query, args


def _clause(name: str, modifier: str, value: str) -> tuple[str, list[Any]]:
    if name == "_id":
        return "r.id = %s", [value]
    base = ("EXISTS (SELECT 1 FROM search_index s WHERE s.type=r.type AND s.id=r.id"
            " AND s.param=%s")
    if name == "identifier" or name == "code":
        if "|" in value:
            system, _, token = value.partition("|")
            if system:
                return base + " AND s.system=%s AND s.value=%s)", [name, system, token]
            return base + " AND s.system IS NULL AND s.value=%s)", [name, token]
        return base + " AND s.value=%s)", [name, value]
    if name == "name":
        if modifier == "exact":
            return base + " AND s.value=%s)", [name, value.lower()]
        escaped = value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        if modifier == "contains":
            return base + " AND s.value LIKE %s ESCAPE '\\')", [name, f"%{escaped}%"]
        return base + " AND s.value LIKE %s ESCAPE '\\')", [name, f"{escaped}%"]
    return base + " AND s.value=%s)", [name, value]
