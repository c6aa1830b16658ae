#!/usr/bin/env python3
"""
The console's trends read (``SQLiteJournal.trends``) on a journal with many old rows,
side by side, in one run, interleaved, on the same SQLite file:

* ours:      the trends query, fleet-wide and for one agent (index searches: only rows open
             now or updated in the 24-hour window are read);
* full scan: the same query made to read every row (``NOT INDEXED``): what it would cost
             unbounded, growing with the journal's whole history;
* floor:     ``agent_summaries``, the read behind the fleet page's queue columns, on the
             same file (what a console page already pays).

The journal: --old finished pushes spread over the 30 days before the window (what
retention keeps), --recent pushes in the last 24 h (a tenth still open), over --agents
agents.  Times are the median of --runs runs each (milliseconds).

Usage: python bench/trends_query.py [--old N] [--recent N] [--agents N] [--runs N]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medagent.storage import journal as j  # noqa: E402
from medagent.storage.sqlite.journal import SCHEMA, trend_query  # noqa: E402

HOUR = 3600.0


def fill(conn: sqlite3.Connection, now: float, old: int, recent: int, agents: int) -> None:
    rnd = random.Random(7)
    rows = []
    for i in range(old + recent):
        agent = f"agent-{rnd.randrange(agents)}"
        if i < old:
            created = now - 24 * HOUR - rnd.random() * 30 * 86400
            state = rnd.choice((j.DELIVERED,) * 9 + (j.FAILED,))
            updated = created + rnd.random() * 5
        else:
            created = now - rnd.random() * 24 * HOUR
            if rnd.random() < 0.1:
                state, updated = j.QUEUED, created
            else:
                state = rnd.choice((j.DELIVERED,) * 9 + (j.FAILED,))
                updated = min(now, created + rnd.random() * 60)
        rows.append((f"p{i}", agent, "mllp://dev:2575", "mllp://dev:2575",
                     "x-application/hl7-v2+er7", "MSH|", state, created, updated))
    conn.executemany(
        "INSERT INTO pushes (id, agent_id, destination, remote, content_type, body, state,"
        " created, updated) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    conn.commit()


def timed(conn: sqlite3.Connection, sql: str, args: tuple) -> float:
    t = time.perf_counter()
    conn.execute(sql, args).fetchall()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=int, default=300_000)
    ap.add_argument("--recent", type=int, default=10_000)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    if not (0 <= a.old <= 5_000_000 and 0 <= a.recent <= 1_000_000 and 1 <= a.agents <= 10_000
            and 1 <= a.runs <= 200):
        sys.exit("bench: --old <= 5e6, --recent <= 1e6, 1 <= --agents <= 1e4, 1 <= --runs <= 200")
    folder = tempfile.mkdtemp(prefix="medagent-bench-trends-")
    path = os.path.join(folder, "relay.sqlite")
    try:
        conn = sqlite3.connect(path)
        conn.executescript(SCHEMA)
        now = 1_700_000_000.0
        fill(conn, now, a.old, a.recent, a.agents)
        start = j.trend_window(now, HOUR, 24)
        fleet_sql, fleet_args = trend_query(start, HOUR, 24, None)
        agent_sql, agent_args = trend_query(start, HOUR, 24, "agent-0")
        full_sql = fleet_sql.replace("FROM pushes", "FROM pushes NOT INDEXED")
        assert full_sql.count("NOT INDEXED") == 3
        opens = ",".join(f"'{s}'" for s in j.OPEN_STATES)
        floor_sql = (f"SELECT agent_id, count(*), min(created) FROM pushes WHERE state IN"
                     f" ({opens}) GROUP BY agent_id")
        floor2_sql = ("SELECT agent_id, count(*) FROM pushes WHERE state='failed' AND"
                      " updated>=? GROUP BY agent_id")
        # the same answer either way (the bound reads only what counts)
        assert (conn.execute(fleet_sql, fleet_args).fetchall()
                == conn.execute(full_sql, fleet_args).fetchall())
        times: dict[str, list[float]] = {"ours_fleet": [], "ours_agent": [], "full_scan": [],
                                         "floor_agent_summaries": []}
        for _ in range(a.runs):  # interleaved: the machine's load hits each alike
            times["ours_fleet"].append(timed(conn, fleet_sql, fleet_args))
            times["ours_agent"].append(timed(conn, agent_sql, agent_args))
            times["full_scan"].append(timed(conn, full_sql, fleet_args))
            times["floor_agent_summaries"].append(
                timed(conn, floor_sql, ()) + timed(conn, floor2_sql, (now - HOUR,)))
        conn.close()
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
    out = {"bench": "trends_query", "old_rows": a.old, "recent_rows": a.recent,
           "agents": a.agents, "runs": a.runs,
           **{f"{k}_ms": round(statistics.median(v), 2) for k, v in times.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
