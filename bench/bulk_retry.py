#!/usr/bin/env python3
"""
One bulk retry at its cap (500 failed pushes of an offline agent, on the relay's SQLite
journal in a temporary folder), side by side with its floor, in one process, interleaved:

* ours:  L{medagent.relay.bulk.retry_matching}: the search, then per push the push
         service's retry and its C{AuditEvent};
* floor: the same pushes through C{PushService.retry} one by one, with no search and no
         audit (what 500 single retries cost anyway).

Each round fails the pushes again (a direct journal transition) before the next one.
Times are the median of --rounds rounds (milliseconds for the whole set).

Usage: python bench/bulk_retry.py [--pushes N] [--rounds N]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


async def run(reactor: Any, n: int, rounds: int, folder: str) -> dict[str, Any]:
    from medagent.relay import bulk
    from medagent.relay.auth import ADMIN, OPERATOR, Principal
    from medagent.relay.service import RelayService
    from medagent.storage import journal as j

    relay = RelayService(reactor, data_dir=folder, listen="tcp:0:interface=127.0.0.1")
    relay.startService()
    try:
        admin = Principal("bench-admin", ADMIN)
        operator = Principal("bench-operator", OPERATOR)
        agent = await relay.store.create({"resourceType": "Agent", "name": "bench"})
        pushes = []
        for i in range(n):
            body = (f"MSH|^~\\&|EHR|HOSP|LIS|LAB|20240101120000||ORM^O01|BENCH{i:06d}|P|2.5.1\r"
                    f"PID|1||{i}^^^MRN||DOE^JANE\rORC|NW|ORD{i}")
            result = await relay.pushes.push(admin, (agent["id"], None), {
                "destination": "mllp://127.0.0.1:9", "contentType": "x-application/hl7-v2+er7",
                "body": body})
            pushes.append(result.push)

        async def fail_all() -> None:
            for p in pushes:
                live = await relay.journal.get(p.id)
                await relay.journal.transition(live, j.FAILED, error="AE")
            await relay.journal.flushed()

        times: dict[str, list[float]] = {"ours_bulk": [], "floor_single_retries": []}
        retried = 0
        for _ in range(rounds):
            await fail_all()
            t = time.perf_counter()
            done = await bulk.retry_matching(
                relay.pushes, relay.journal, relay.store, operator,
                {"agent": agent["id"]}, address="127.0.0.1", now=reactor.seconds(),
                via="bench", limit=min(n, bulk.MAX_BULK_RETRY))
            await relay.journal.flushed()
            times["ours_bulk"].append((time.perf_counter() - t) * 1000)
            retried = len(done.retried)
            await fail_all()
            t = time.perf_counter()
            for p in pushes:
                await relay.pushes.retry(operator, p.id)
            await relay.journal.flushed()
            times["floor_single_retries"].append((time.perf_counter() - t) * 1000)
        return {"bench": "bulk_retry", "pushes": n, "rounds": rounds, "retried": retried,
                **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()}}
    finally:
        await relay.stopService()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pushes", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not (1 <= a.pushes <= 500 and 1 <= a.rounds <= 50):
        sys.exit("bench: 1 <= --pushes <= 500 (the cap), 1 <= --rounds <= 50")
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    folder = tempfile.mkdtemp(prefix="medagent-bench-bulk-")
    out: dict[str, Any] = {}

    def done(result: Any) -> None:
        out["result"] = result
        reactor.stop()

    def failed(f: Any) -> None:
        out["error"] = f.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run(reactor, a.pushes, a.rounds, folder))
                            .addCallbacks(done, failed))
    # a bound on the whole run: it stops by itself
    reactor.callLater(600, lambda: reactor.running and reactor.stop())
    reactor.run()
    shutil.rmtree(folder, ignore_errors=True)
    if "error" in out:
        sys.exit(out["error"])
    print(json.dumps(out.get("result")))


if __name__ == "__main__":
    main()
