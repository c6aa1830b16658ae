"""
The plain records the storage interfaces hand back and take in (no SQL, no database types):
a registered client (L{StoredClient}), a subscription delivery to queue (L{NewDelivery}) and
a queued one (L{Delivery}).  The push journal's record, L{medagent.storage.journal.Push},
lives with its state machine.
"""

from __future__ import annotations

import json
from typing import Any

import attr

from medagent.storage.resources import now_iso

# -- clients -------------------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class StoredClient:
    """One OAuth2 client as a L{ClientRegistry} keeps it: never its secret, only a hash."""

    client_id: str
    salt: bytes
    secret_hash: bytes
    role: str
    agents: tuple[str, ...]
    name: str | None
    created: float
    revoked: bool = False


# -- console sessions shared by relay nodes ----------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class SharedConsoleSession:
    """
    A console sign-in as the nodes share it (L{ConsoleSessions}): who signed in, and the
    session's CSRF token.  Keyed by the SHA-256 of the cookie's id, never the id itself.
    """

    id_hash: bytes
    client_id: str
    role: str
    agents: frozenset[str]
    name: str | None
    csrf: str


# -- subscription deliveries ---------------------------------------------------------------

PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"
DELIVERY_STATES = (PENDING, DELIVERED, FAILED, CANCELLED)


@attr.s(frozen=True, auto_attribs=True)
class NewDelivery:
    """A delivery to queue: pending, not leased, no attempts yet, due at C{next_attempt}."""

    id: str
    subscription_id: str
    interaction: str
    resource_type: str
    resource_id: str
    version_id: str | None
    #: JSON text of C{{"resource": ..., "previous": ...}}
    payload: str | None
    max_attempts: int
    next_attempt: float
    created: float


@attr.s(auto_attribs=True)
class Delivery:
    """One queued delivery (a row of the delivery queue)."""

    id: str
    seq: int
    subscription_id: str
    interaction: str
    resource_type: str
    resource_id: str
    version_id: str | None
    payload: dict[str, Any] | None
    state: str
    attempts: int
    max_attempts: int
    next_attempt: float
    last_error: str | None
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subscription": f"Subscription/{self.subscription_id}",
            "interaction": self.interaction,
            "resource": f"{self.resource_type}/{self.resource_id}",
            "versionId": self.version_id,
            "state": self.state,
            "attempts": self.attempts,
            "maxAttempts": self.max_attempts,
            "nextAttempt": now_iso(self.next_attempt) if self.state == PENDING else None,
            "lastError": self.last_error,
        }


def delivery_from_row(row: Any) -> Delivery:
    """A delivery queue row (a mapping by column; C{payload} is JSON text) as a L{Delivery}."""
    return Delivery(
        id=row["id"], seq=row["seq"], subscription_id=row["subscription_id"],
        interaction=row["interaction"], resource_type=row["resource_type"],
        resource_id=row["resource_id"], version_id=row["version_id"],
        payload=json.loads(row["payload"]) if row["payload"] else None,
        state=row["state"], attempts=row["attempts"], max_attempts=row["max_attempts"],
        next_attempt=row["next_attempt"], last_error=row["last_error"],
        created=row["created"], updated=row["updated"],
    )


def pause_from_row(r: Any) -> dict[str, Any]:
    """A paused lane's row (either backend) as L{medagent.storage.interfaces.LanePauses.list}
    gives it: C{{agent, lane, by, since}}."""
    return {"agent": r["agent_id"], "lane": r["lane"], "by": r["paused_by"],
            "since": float(r["since"])}
