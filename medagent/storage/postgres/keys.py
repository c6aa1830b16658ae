"""
The token signing keys every relay node on one database shares
(L{medagent.storage.interfaces.SigningKeys}), in PostgreSQL: a token one node issued is valid
at every node.  Times are PostgreSQL's (nodes' clocks may differ).

Rotation without a failed token: a new key is published first and signs only once it is
L{PUBLISH_DELAY} seconds old, by which time every node has read it (they read the ring every
L{medagent.relay.service.KEY_REFRESH} seconds, a third of that delay).  Until then the newest
older key signs.  A retired key verifies nothing more: retiring is how a leaked key is
withdrawn (its tokens fail at every node within one refresh).
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet.defer import Deferred

from medagent.storage.postgres.database import PgDatabase

#: seconds a new key is published before it signs
PUBLISH_DELAY = 180.0
#: arbitrary, fixed: serialises the first key's creation across nodes starting at once
_FIRST_KEY_LOCK = 0x6D656461676B6579


def _ring(conn: Any) -> tuple[dict[str, bytes], str | None]:
    rows = conn.execute(
        "SELECT kid, secret, clock_timestamp() - created >= make_interval(secs => %s) AS ripe"
        " FROM signing_keys WHERE retired IS NULL ORDER BY created DESC, kid",
        (PUBLISH_DELAY,)).fetchall()
    keys = {r["kid"]: bytes(r["secret"]) for r in rows}
    ripe = [r["kid"] for r in rows if r["ripe"]]
    # the newest ripe key signs; with none ripe (a first key, or all older ones retired),
    # the newest: no node can have an older one to prefer
    signing = ripe[0] if ripe else (rows[0]["kid"] if rows else None)
    return keys, signing


def load_ring(conn: Any, first: tuple[str, bytes] | None = None
              ) -> tuple[dict[str, bytes], str]:
    """In a transaction: the ring and the signing kid, made of C{first} (or a new random key)
    when there is no key yet (under a lock: nodes starting at once make one key)."""
    keys, signing = _ring(conn)
    if signing is None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FIRST_KEY_LOCK,))
        keys, signing = _ring(conn)
    if signing is None:
        kid, secret = first if first is not None else (new_kid(), secrets.token_bytes(32))
        conn.execute("INSERT INTO signing_keys (kid, secret, created) VALUES"
                     " (%s, %s, clock_timestamp() - make_interval(secs => %s))",
                     (kid, secret, PUBLISH_DELAY))  # the first key signs at once
        keys, signing = _ring(conn)
    assert signing is not None
    return keys, signing


def rotate_key(conn: Any) -> str:
    """In a transaction: publish a new key; its kid."""
    kid = new_kid()
    conn.execute("INSERT INTO signing_keys (kid, secret) VALUES (%s, %s)",
                 (kid, secrets.token_bytes(32)))
    return kid


def retire_key(conn: Any, kid: str) -> bool:
    """In a transaction: retire C{kid}; C{False} if there is no such key not yet retired."""
    row = conn.execute("UPDATE signing_keys SET retired = clock_timestamp()"
                       " WHERE kid = %s AND retired IS NULL RETURNING kid", (kid,)).fetchone()
    return row is not None


def list_keys(conn: Any) -> list[dict[str, Any]]:
    """In a transaction: every key but its secret."""
    _, signing = _ring(conn)
    rows = conn.execute("SELECT kid, created, retired FROM signing_keys"
                        " ORDER BY created, kid").fetchall()
    return [{"kid": r["kid"], "created": r["created"].isoformat(),
             "retired": r["retired"].isoformat() if r["retired"] else None,
             "signing": r["kid"] == signing} for r in rows]


class PgSigningKeys:
    """L{SigningKeys} on a L{PgDatabase} (the functions above, on its workers)."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def load(self, first: tuple[str, bytes] | None = None
             ) -> Deferred[tuple[dict[str, bytes], str]]:
        return self._db.run(load_ring, first)

    def rotate(self) -> Deferred[str]:
        return self._db.run(rotate_key)

    def retire(self, kid: str) -> Deferred[bool]:
        return self._db.run(retire_key, kid)

    def list(self) -> Deferred[list[dict[str, Any]]]:
        return self._db.run(list_keys)


def new_kid() -> str:
    """A key id: random, URL-safe, says nothing about the key."""
    return secrets.token_urlsafe(9)
