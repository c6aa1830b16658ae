"""
The SQLite implementation of L{medagent.storage.interfaces}: one file, one owned worker thread
(L{database.Database}), one module per interface.  This package is the only place that
speaks SQLite's dialect (``?`` parameters, ``INSERT OR IGNORE``, ``rowid``, ``MAX(a, b)``).
"""

from __future__ import annotations

import os
from typing import Any

from medagent.storage.sqlite.clients import SQLiteClientRegistry
from medagent.storage.sqlite.database import Database, DatabaseStopped
from medagent.storage.sqlite.deliveries import SQLiteDeliveryQueue
from medagent.storage.sqlite.inbound import SQLiteInboundLog
from medagent.storage.sqlite.journal import SQLiteJournal
from medagent.storage.sqlite.pauses import SQLiteLanePauses
from medagent.storage.sqlite.store import SQLiteStore, SQLiteTransaction

__all__ = ["Database", "DatabaseStopped", "SQLiteClientRegistry", "SQLiteDeliveryQueue",
           "SQLiteInboundLog", "SQLiteJournal", "SQLiteLanePauses", "SQLiteStore",
           "SQLiteTransaction", "RELAY_SCHEMA",
           "open_relay_database"]

#: Every table of the relay's database file.
RELAY_SCHEMA = (SQLiteStore.schema() + SQLiteClientRegistry.schema() + SQLiteJournal.schema()
                + SQLiteDeliveryQueue.schema() + SQLiteLanePauses.schema()
                + SQLiteInboundLog.schema())


def open_relay_database(reactor: Any, data_dir: str, synchronous: str = "NORMAL") -> Database:
    """The relay's database (``relay.sqlite`` in C{data_dir}), with its migrations."""
    return Database(reactor, os.path.join(data_dir, "relay.sqlite"), schema=RELAY_SCHEMA,
                    synchronous=synchronous, name="relay-db",
                    migrations=[SQLiteJournal.migrate])
