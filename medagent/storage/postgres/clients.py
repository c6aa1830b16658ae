"""
The OAuth2 client registry in PostgreSQL (L{medagent.storage.interfaces.ClientRegistry}).
The C{*_sync} calls open a connection of their own on the calling thread (the CLI).
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from twisted.internet.defer import Deferred

from medagent.storage.postgres.database import PgDatabase
from medagent.storage.records import StoredClient


def _from_row(row: Any) -> StoredClient:
    return StoredClient(
        client_id=row["client_id"], salt=bytes(row["salt"]),
        secret_hash=bytes(row["secret_hash"]), role=row["role"],
        agents=tuple(json.loads(row["agents"])), name=row["name"], created=row["created"],
        revoked=bool(row["revoked"]))


def _add(conn: Any, client: StoredClient) -> None:
    conn.execute(
        "INSERT INTO clients (client_id, salt, secret_hash, role, agents, name, created)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (client.client_id, client.salt, client.secret_hash, client.role,
         json.dumps(list(client.agents)), client.name, client.created),
    )


def _list(conn: Any) -> list[StoredClient]:
    return [_from_row(r) for r in conn.execute("SELECT * FROM clients ORDER BY created, seq")]


def _revoke(conn: Any, client_id: str) -> bool:
    return conn.execute(
        "UPDATE clients SET revoked=true WHERE client_id=%s", (client_id,)
    ).rowcount > 0


class PgClientRegistry:
    """L{ClientRegistry} on a L{PgDatabase}; see the interface for what each call guarantees."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def add(self, client: StoredClient) -> Deferred[None]:
        return self._db.run_ordered(_add, client)

    def add_sync(self, client: StoredClient) -> None:
        self._db.run_sync(_add, client)

    def list(self) -> Deferred[list[StoredClient]]:
        return self._db.run(_list)

    # builtins.list: the method C{list} above shadows the builtin inside this class body.
    def list_sync(self) -> builtins.list[StoredClient]:
        return self._db.run_sync(_list)

    def lookup(self, client_id: str) -> Deferred[StoredClient | None]:
        def txn(conn: Any) -> StoredClient | None:
            row = conn.execute("SELECT * FROM clients WHERE client_id=%s",
                               (client_id,)).fetchone()
            return _from_row(row) if row is not None else None

        return self._db.run(txn)

    def revoke(self, client_id: str) -> Deferred[bool]:
        return self._db.run_ordered(_revoke, client_id)

    def revoke_sync(self, client_id: str) -> bool:
        return self._db.run_sync(_revoke, client_id)

    def revoked(self) -> Deferred[set[str]]:
        def txn(conn: Any) -> set[str]:
            return {r["client_id"] for r in
                    conn.execute("SELECT client_id FROM clients WHERE revoked")}

        return self._db.run(txn)
