"""
The DICOM worklist channel's items and MPPS instances in SQLite; the channel itself (C-FIND,
N-CREATE/N-SET, the status rules) is L{medagent.dicom.worklist.WorklistChannel}.  Datasets are
stored as DICOM JSON text; every call is one transaction of its own and is scoped to one
channel name.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred

from medagent.storage.sqlite.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS dicom_worklist (
    channel TEXT NOT NULL,
    accession TEXT NOT NULL,
    sps_id TEXT NOT NULL,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (channel, accession, sps_id)
);
CREATE TABLE IF NOT EXISTS dicom_mpps (
    channel TEXT NOT NULL,
    sop_instance TEXT NOT NULL,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (channel, sop_instance)
);
"""


class SQLiteWorklistStore:
    """One worklist channel's rows in a L{Database}."""

    def __init__(self, db: Database, channel: str) -> None:
        self._db = db
        self.channel = channel

    def load(self) -> Deferred[tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]]:
        """C{([(accession, sps_id, dataset)], [(sop_instance, status, dataset)])}."""

        def txn(conn: Any) -> tuple[list, list]:
            items = conn.execute("SELECT accession, sps_id, dataset FROM dicom_worklist "
                                 "WHERE channel = ?", (self.channel,)).fetchall()
            mpps = conn.execute("SELECT sop_instance, status, dataset FROM dicom_mpps "
                                "WHERE channel = ?", (self.channel,)).fetchall()
            return ([(r[0], r[1], r[2]) for r in items], [(r[0], r[1], r[2]) for r in mpps])

        return self._db.run(txn)

    def put_item(self, accession: str, sps_id: str, status: str, dataset: str,
                 now: float) -> Deferred[bool]:
        """Add or replace an item; fires with whether it existed."""

        def txn(conn: Any) -> bool:
            existed = conn.execute(
                "SELECT 1 FROM dicom_worklist WHERE channel=? AND accession=? AND sps_id=?",
                (self.channel, accession, sps_id)).fetchone() is not None
            conn.execute(
                "INSERT OR REPLACE INTO dicom_worklist (channel, accession, sps_id, status, "
                "dataset, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (self.channel, accession, sps_id, status, dataset, now))
            return existed

        return self._db.run(txn)

    def remove_items(self, key: str) -> Deferred[int]:
        """Delete the items whose Accession Number or SPS ID is C{key}; how many."""

        def txn(conn: Any) -> int:
            return conn.execute(
                "DELETE FROM dicom_worklist WHERE channel=? AND (accession=? OR sps_id=?)",
                (self.channel, key, key)).rowcount

        return self._db.run(txn)

    def set_items(self, updates: Sequence[tuple[str, str, str, str, float]]) -> Deferred[None]:
        """C{(accession, sps_id, status, dataset, now)} for each item to update."""
        rows = [(status, dataset, now, self.channel, accession, sps_id)
                for accession, sps_id, status, dataset, now in updates]

        def txn(conn: Any) -> None:
            conn.executemany("UPDATE dicom_worklist SET status=?, dataset=?, updated=? "
                             "WHERE channel=? AND accession=? AND sps_id=?", rows)

        return self._db.run(txn)

    def put_mpps(self, sop_instance: str, status: str, dataset: str,
                 now: float) -> Deferred[None]:
        def txn(conn: Any) -> None:
            conn.execute("INSERT OR REPLACE INTO dicom_mpps (channel, sop_instance, status, "
                         "dataset, updated) VALUES (?, ?, ?, ?, ?)",
                         (self.channel, sop_instance, status, dataset, now))

        return self._db.run(txn)
