"""
Durable storage of the relay and the agent, behind interfaces.

- L{medagent.storage.interfaces}: the contracts (C{ResourceStore}, C{PushJournal},
  C{ClientRegistry}, C{DeliveryQueue}, the write-hook C{Transaction}, the agent's queues).
- L{medagent.storage.resources}, L{medagent.storage.journal}, L{medagent.storage.records}:
  the records and rules every implementation shares (no SQL).
- L{medagent.storage.sqlite}: the embedded SQLite implementation; every SQL string of the
  relay and the agent (queues, DICOM worklist) lives under it.
- L{medagent.storage.postgres}: the PostgreSQL implementation of the relay's interfaces,
  shared by relay nodes (psycopg 3 in an owned thread pool).
- L{open_storage}: the relay's storage set from its C{--database} option.
"""

from __future__ import annotations

import os
from typing import Any

import attr

#: Hosts a database link may reach without TLS: this machine.
_LOOPBACK = frozenset(["localhost", "127.0.0.1", "::1"])


@attr.s(auto_attribs=True)
class Storage:
    """
    The relay's storage set, from one database (L{open_storage}).  C{db} is the database
    object (SQLite L{medagent.storage.sqlite.Database} or PostgreSQL
    L{medagent.storage.postgres.PgDatabase}); start and stop it with the relay.
    """

    backend: str
    db: Any
    store: Any
    journal: Any
    registry: Any
    deliveries: Any
    #: the paused lanes (L{medagent.storage.interfaces.LanePauses})
    pauses: Any = None
    #: the inbound log (L{medagent.storage.interfaces.InboundLog})
    inbound: Any = None

    def start(self) -> Any:
        """Start the database (PostgreSQL: also apply migrations; fires when ready)."""
        return self.db.start()

    def stop(self) -> None:
        self.db.stop()


def open_storage(database_url: str | None, data_dir: str, reactor: Any, *,
                 synchronous: str = "NORMAL") -> Storage:
    """
    The relay's store, journal, client registry and delivery queue.  C{database_url} ``None``
    or empty: the SQLite file in C{data_dir} (one node).  ``postgresql://user@host:port/db``:
    the database shared by relay nodes.  Nothing connects here (the relay's start does), so
    this never blocks.  A URL with a password is refused (secrets never on a command line:
    use ``~/.pgpass`` or ``PGPASSFILE``), and so is a non-loopback host without
    ``sslmode=require`` (or ``verify-ca``/``verify-full``, or ``PGSSLMODE``): TLS on every hop
    that leaves the machine.  Errors never repeat the URL (it names credentials).
    """
    if not database_url:
        from medagent.storage.sqlite import (
            SQLiteClientRegistry,
            SQLiteDeliveryQueue,
            SQLiteInboundLog,
            SQLiteJournal,
            SQLiteStore,
            open_relay_database,
        )

        db = open_relay_database(reactor, data_dir, synchronous)
        from medagent.storage.sqlite.pauses import SQLiteLanePauses

        return Storage("sqlite", db, SQLiteStore(db), SQLiteJournal(db),
                       SQLiteClientRegistry(db), SQLiteDeliveryQueue(db),
                       SQLiteLanePauses(db), SQLiteInboundLog(db))
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise ValueError("--database must be a postgresql:// URL (or empty for SQLite)")
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError("--database postgresql://... needs psycopg (pip install psycopg)")
    try:
        info = conninfo_to_dict(database_url)
    except Exception:
        raise ValueError("--database is not a valid postgresql:// URL") from None
    if info.get("password"):
        raise ValueError("--database must not carry a password: use ~/.pgpass or PGPASSFILE")
    hosts = [h for h in str(info.get("host") or "").split(",") if h]
    sslmode = str(info.get("sslmode") or os.environ.get("PGSSLMODE") or "")
    remote = [h for h in hosts if h not in _LOOPBACK and not h.startswith("/")]
    if remote and sslmode not in ("require", "verify-ca", "verify-full"):
        raise ValueError("--database to another machine needs sslmode=require, verify-ca or"
                         " verify-full")
    from medagent.storage.postgres import (
        PgClientRegistry,
        PgDeliveryQueue,
        PgInboundLog,
        PgJournal,
        PgStore,
    )
    from medagent.storage.postgres import open_relay_database as open_pg

    pg = open_pg(reactor, database_url)
    from medagent.storage.postgres.pauses import PgLanePauses

    return Storage("postgresql", pg, PgStore(pg), PgJournal(pg), PgClientRegistry(pg),
                   PgDeliveryQueue(pg), PgLanePauses(pg), PgInboundLog(pg))
