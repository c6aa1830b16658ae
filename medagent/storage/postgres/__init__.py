"""
The PostgreSQL implementation of L{medagent.storage.interfaces} for relay nodes that share
one database: psycopg 3 in a thread pool the database object owns (L{database.PgDatabase}),
numbered migrations (L{schema}), one module per interface.  This package is the only place
that speaks PostgreSQL's dialect (``%s`` parameters, ``RETURNING``, ``SKIP LOCKED``).
"""

from __future__ import annotations

from typing import Any

from medagent.storage.postgres.calls import PgAgentCalls
from medagent.storage.postgres.clients import PgClientRegistry
from medagent.storage.postgres.console import PgConsoleSessions
from medagent.storage.postgres.database import PgDatabase
from medagent.storage.postgres.deliveries import PgDeliveryQueue
from medagent.storage.postgres.inbound import PgInboundLog
from medagent.storage.postgres.journal import PgJournal
from medagent.storage.postgres.keys import PgSigningKeys
from medagent.storage.postgres.notices import PgNotices
from medagent.storage.postgres.pauses import PgLanePauses
from medagent.storage.postgres.schema import DATA_TABLES, MIGRATIONS
from medagent.storage.postgres.sessions import PgAgentSessions
from medagent.storage.postgres.store import PgStore, PgTransaction

__all__ = ["DATA_TABLES", "MIGRATIONS", "PgAgentCalls", "PgAgentSessions", "PgClientRegistry",
           "PgConsoleSessions", "PgDatabase", "PgDeliveryQueue", "PgInboundLog", "PgJournal",
           "PgLanePauses",
           "PgNotices", "PgSigningKeys", "PgStore", "PgTransaction", "open_relay_database"]


def open_relay_database(reactor: Any, dsn: str, *, size: int = 4) -> PgDatabase:
    """The relay's shared database at C{dsn} (``postgresql://...``), with its migrations."""
    return PgDatabase(reactor, dsn, migrations=MIGRATIONS, size=size, name="relay-pg")
