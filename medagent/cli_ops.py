"""
The ``medagent`` operator commands that call a running relay: agents, status, pushes,
tail, ping, reload-config, logs and the batch form of push.  Each maps to one of the relay's HTTP
endpoints (medagent/relay/http/); a table for people, ``--json`` for scripts.

Exit codes: 0 ok, 1 the relay or the device said no (or could not be reached), 2 a usage
or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import quote, urlsplit

from medagent.contenttypes import PING

#: the relay's largest AgentPush page (MAX_PAGE in medagent/relay/http/pushes.py)
PAGE = 100
#: largest --count of ``pushes list`` (pages followed: at most MAX_COUNT / PAGE)
MAX_COUNT = 10_000
#: ``pushes list`` flags and the AgentPush search parameters they set (the console's filters)
LIST_FILTERS = (("agent", "agent"), ("state", "state"), ("destination", "destination"),
                ("control_id", "control_id"), ("accession", "accession"),
                ("since", "since"), ("until", "until"), ("patient_id", "patient_id"),
                ("study_uid", "study_uid"), ("sop_uid", "sop_uid"))
#: ``inbound list`` flags and the AgentInbound search parameters they set
INBOUND_FILTERS = (("agent", "agent"), ("channel", "channel"), ("control_id", "control_id"),
                   ("patient_id", "patient_id"), ("accession", "accession"),
                   ("study_uid", "study_uid"), ("sop_uid", "sop_uid"), ("outcome", "outcome"),
                   ("since", "since"), ("until", "until"))
#: largest file ``push`` reads (the relay refuses larger bodies anyway)
MAX_FILE = 16 * 1024 * 1024

Runner = Callable[[argparse.Namespace, str, Callable[[Any], Awaitable[None]]], int]


def _q(id: str) -> str:
    return quote(id, safe="")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text())


def _params(parameters: Any) -> dict[str, Any]:
    """A FHIR Parameters resource as {name: value}."""
    out: dict[str, Any] = {}
    for p in (parameters or {}).get("parameter") or []:
        value = next((v for k, v in p.items() if k.startswith("value")), None)
        out[str(p.get("name"))] = value
    return out


def _push_row(p: dict[str, Any]) -> list[Any]:
    agent = ((p.get("agent") or {}).get("reference") or "").removeprefix("Agent/")
    return [p.get("id"), agent, p.get("state"), p.get("destination"), p.get("attempts"),
            p.get("updated"), p.get("error")]


PUSH_HEADER = ["ID", "AGENT", "STATE", "DESTINATION", "ATTEMPTS", "UPDATED", "ERROR"]


def cmd_agents(args: argparse.Namespace, run: Runner) -> int:
    async def go(client: Any) -> None:
        agents = await client.search("Agent", {"_count": "1000"})
        rows = []
        for a in agents:
            st = _params(await client.request_json("GET", f"/fhir/R4/Agent/{_q(a['id'])}/$status"))
            rows.append({"id": a["id"], "name": a.get("name"), "status": st.get("status"),
                         "version": st.get("version"), "lastUpdated": st.get("lastUpdated")})
        emit(args, rows, lambda: table(
            [[r["id"], r["name"], r["status"], r["version"]] for r in rows],
            ["ID", "NAME", "STATUS", "VERSION"]))

    return run(args, "agents", go)


def cmd_status(args: argparse.Namespace, run: Runner) -> int:
    async def go(client: Any) -> None:
        st = _params(await client.request_json(
            "GET", f"/fhir/R4/Agent/{_q(args.agent)}/$status"))
        data = {"id": args.agent, **st}
        lanes: list[dict[str, Any]] | None = None
        if getattr(args, "lanes", False):
            stats = _params(await client.request_json(
                "GET", f"/fhir/R4/Agent/{_q(args.agent)}/$stats")).get("stats")
            lanes = data["lanes"] = lane_rows(json.loads(stats) if stats else {})
        emit(args, data, lambda: table([[data.get(k) for k in ("id", "status", "version",
                                                               "lastUpdated")]],
                                       ["ID", "STATUS", "VERSION", "LAST UPDATED"])
             + ("" if lanes is None else "\n\n" + _lane_table(lanes)))

    return run(args, "status", go)


def lane_rows(stats: Any) -> list[dict[str, Any]]:
    """
    One row per device lane from an agent's ``$stats``: waiting and in flight (the agent's
    queue), on the agent and paused (the relay's view), last ACK, its code, the ACK latency's
    p50/p99 and the recent errors (the agent's lane statistics; absent for an agent that does
    not report them, e.g. Medplum's).
    """
    agent = (stats or {}).get("agent") or {}
    relay = ((stats or {}).get("relay") or {}).get("lanes") or {}
    queue_lanes = agent.get("lanes") or {}
    lane_stats = agent.get("laneStats") or {}
    on_agent = relay.get("lanes") or {}
    paused = set(relay.get("paused") or ())
    rows = []
    for name in sorted(set(queue_lanes) | set(lane_stats) | set(on_agent) | paused):
        q, ls, r = queue_lanes.get(name) or {}, lane_stats.get(name) or {}, \
            on_agent.get(name) or {}
        rows.append({
            "lane": name, "paused": name in paused, "waiting": q.get("waiting", 0),
            "onAgent": r.get("inFlight", 0), "retrying": bool(q.get("retrying")),
            "lastAck": ls.get("lastAck"), "lastAckCode": ls.get("lastAckCode"),
            "ackP50Ms": ls.get("ackP50Ms"), "ackP99Ms": ls.get("ackP99Ms"),
            "recentErrors": ls.get("recentErrors") or []})
    return rows


def _lane_table(rows: list[dict[str, Any]]) -> str:
    def when(t: Any) -> Any:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) \
            if isinstance(t, (int, float)) else None

    return table([[r["lane"], "paused" if r["paused"] else
                   "retrying" if r["retrying"] else "active", r["waiting"], r["onAgent"],
                   when(r["lastAck"]), r["lastAckCode"], r["ackP50Ms"], r["ackP99Ms"],
                   ",".join(e.get("kind", "?") for e in r["recentErrors"][:3]) or None]
                  for r in rows],
                 ["LANE", "STATE", "WAITING", "ON AGENT", "LAST ACK", "CODE", "P50 MS",
                  "P99 MS", "RECENT ERRORS"])


def cmd_lane(args: argparse.Namespace, run: Runner) -> int:
    """``lane pause|resume AGENT DESTINATION``: operators and admins (the relay checks)."""
    op = {"pause": "$pause-lane", "resume": "$resume-lane"}[args.lane_command]

    async def go(client: Any) -> None:
        result = await client.request_json(
            "POST", f"/fhir/R4/Agent/{_q(args.agent)}/{op}",
            json_body={"destination": args.destination})
        state = "paused" if result.get("paused") else "resumed"
        note = "" if result.get("changed") else " (it was already)"
        on_agent = result.get("onAgent") or 0
        extra = (f"; {on_agent} push(es) already on the agent "
                 + ("are held there too" if result.get("heldOnAgent") else "are not held")
                 if result.get("paused") and on_agent else "")
        emit(args, result, lambda: f"Agent/{args.agent}: lane {result.get('lane')} "
                                   f"{state}{note}{extra}")

    return run(args, f"lane {args.lane_command}", go)


def cmd_lane_list(args: argparse.Namespace, run: Runner) -> int:
    async def go(client: Any) -> None:
        result = await client.request_json("GET", f"/fhir/R4/Agent/{_q(args.agent)}/$lanes")
        rows = result.get("paused") or []
        emit(args, result, lambda: table(
            [[p.get("lane"), p.get("by"), time.strftime("%Y-%m-%d %H:%M:%SZ",
                                                        time.gmtime(p.get("since") or 0))]
             for p in rows], ["PAUSED LANE", "BY", "SINCE"]))

    return run(args, "lane list", go)


def _list(args: argparse.Namespace, run: Runner, path: str,
          filters: Sequence[tuple[str, str]], what: str, key: str,
          row: Callable[[dict[str, Any]], list[Any]], header: Sequence[str]) -> int:
    """A list command: pages of C{path} with C{filters}, following next links to --count."""
    if not 1 <= args.count <= MAX_COUNT:
        print(f"medagent: --count must be between 1 and {MAX_COUNT}", file=sys.stderr)
        return 2
    if not 1 <= args.page_size <= PAGE:
        print(f"medagent: --page-size must be between 1 and {PAGE}", file=sys.stderr)
        return 2

    async def go(client: Any) -> None:
        params = {"_count": str(min(args.page_size, args.count))}
        for flag, param in filters:
            if getattr(args, flag, None):
                params[param] = str(getattr(args, flag))
        found, total = await _pages(client, path, params, args.count)
        emit(args, {"total": total, key: found},
             lambda: table([row(p) for p in found], header)
             + f"\n# {len(found)} shown of {total}")

    return run(args, what, go)


async def _pages(client: Any, path: str, params: dict[str, str], count: int
                 ) -> tuple[list[dict[str, Any]], Any]:
    """Up to C{count} entries of a searchset at C{path}, following its next links."""
    found: list[dict[str, Any]] = []
    at: str | None = path
    query: dict[str, str] | None = params
    total = None
    while at is not None and len(found) < count:
        page = await client.request_json("GET", at, params=query)
        total = page.get("total", total)
        found += [e["resource"] for e in page.get("entry") or []]
        nxt = next((link["url"] for link in page.get("link") or []
                    if link.get("relation") == "next"), None)
        if nxt is None or not page.get("entry"):
            break
        if nxt.startswith(client.base_url + "/"):
            at = nxt[len(client.base_url):]
        else:
            parts = urlsplit(nxt)
            at = parts.path + (f"?{parts.query}" if parts.query else "")
        query = None
    return found[:count], total


def _inbound_row(m: dict[str, Any]) -> list[Any]:
    agent = ((m.get("agent") or {}).get("reference") or "").removeprefix("Agent/")
    answer = " ".join(str(x) for x in (m.get("statusCode"), m.get("ackCode")) if x is not None)
    return [m.get("id"), m.get("received"), agent, m.get("channel"), m.get("messageType"),
            m.get("controlId") or m.get("sopInstanceUid"), m.get("outcome"), answer or None,
            m.get("errorKind")]


INBOUND_HEADER = ["ID", "RECEIVED", "AGENT", "CHANNEL", "TYPE", "MSH-10/UID", "OUTCOME",
                  "ANSWER", "ERROR"]


def cmd_inbound_list(args: argparse.Namespace, run: Runner) -> int:
    """The inbound log (device → agent → relay → Bot), newest first, never payloads."""
    return _list(args, run, "/fhir/R4/AgentInbound", INBOUND_FILTERS, "inbound list",
                 "inbound", _inbound_row, INBOUND_HEADER)


def cmd_pushes_list(args: argparse.Namespace, run: Runner) -> int:
    return _list(args, run, "/fhir/R4/AgentPush", LIST_FILTERS, "pushes list", "pushes",
                 _push_row, PUSH_HEADER)


#: pushes whose last state ``tail`` remembers, at most (the oldest forgotten first)
TAIL_MEMORY = 10_000


def cmd_tail(args: argparse.Namespace, run: Runner) -> int:
    """
    Follow the push journal: every C{--interval} seconds the newest page of pushes (with
    the filters), printed when a push is new or changed state, oldest change first.  Stops
    after C{--for} seconds (default: until interrupted).  Memory is bounded
    (L{TAIL_MEMORY} pushes remembered).
    """
    if not 0.2 <= args.interval <= 60:
        print("medagent: --interval must be between 0.2 and 60 seconds", file=sys.stderr)
        return 2
    if args.seconds is not None and not 0 < args.seconds <= 7 * 86400:
        print("medagent: --for must be between 0 and 604800 seconds", file=sys.stderr)
        return 2

    async def go(client: Any) -> None:
        from collections import OrderedDict

        from twisted.internet.task import deferLater

        params = {"_count": str(PAGE)}
        if args.agent:
            params["agent"] = args.agent
        inbound = getattr(args, "inbound", False)
        if args.state and not inbound:
            params["state"] = args.state
        path, header = "/fhir/R4/AgentPush", PUSH_HEADER
        row: Callable[[dict[str, Any]], list[Any]] = _push_row
        if inbound:  # the inbound log: a message is printed once, when it is recorded
            path, header, row = "/fhir/R4/AgentInbound", INBOUND_HEADER, _inbound_row
        seen: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        start = client.reactor.seconds()
        if not args.json:
            print("  ".join(header), flush=True)
        while True:
            page = await client.request_json("GET", path, params=params)
            for p in reversed([e["resource"] for e in page.get("entry") or []]):
                mark = (p.get("state"), p.get("updated"))
                if seen.get(p.get("id")) == mark:
                    continue
                seen[p.get("id")] = mark
                seen.move_to_end(p.get("id"))
                while len(seen) > TAIL_MEMORY:
                    seen.popitem(last=False)
                print(json.dumps(p) if args.json else
                      "  ".join("-" if c is None else str(c) for c in row(p)),
                      flush=True)
            if args.seconds is not None and client.reactor.seconds() - start >= args.seconds:
                return
            await deferLater(client.reactor, args.interval, lambda: None)

    return run(args, "tail", go)


def _push_op(args: argparse.Namespace, run: Runner, method: str, suffix: str,
             what: str) -> int:
    async def go(client: Any) -> None:
        p = await client.request_json(method, f"/fhir/R4/AgentPush/{_q(args.id)}{suffix}")
        emit(args, p, lambda: table([_push_row(p)], PUSH_HEADER))

    return run(args, what, go)


def cmd_pushes_show(args: argparse.Namespace, run: Runner) -> int:
    return _push_op(args, run, "GET", "", "pushes show")


def cmd_pushes_retry(args: argparse.Namespace, run: Runner) -> int:
    if getattr(args, "all", False) or args.id is None:
        return cmd_pushes_retry_all(args, run)
    return _push_op(args, run, "POST", "/$retry", "pushes retry")


#: the most pushes one ``pushes retry --all`` asks the relay to retry (its cap, too)
MAX_BULK_RETRY = 500
BULK_HEADER = ["ID", "RESULT", "REASON"]


def cmd_pushes_retry_all(args: argparse.Namespace, run: Runner) -> int:
    """
    ``pushes retry --all [filters]``: one ``POST AgentPush/$retry`` with the filters; a line
    per push and the counts (or ``--json``); exit 1 when any matched push was not retried
    (skipped, or left over the cap).
    """
    if args.id is not None and args.all:
        print("medagent: give a push id or --all, not both", file=sys.stderr)
        return 2
    if not args.all:
        print("medagent: pushes retry needs a push id, or --all with filters",
              file=sys.stderr)
        return 2
    if not 1 <= args.limit <= MAX_BULK_RETRY:
        print(f"medagent: --limit must be between 1 and {MAX_BULK_RETRY}", file=sys.stderr)
        return 2
    answer: dict[str, Any] = {}

    async def go(client: Any) -> None:
        params = {"_count": str(args.limit)}
        for flag, param in LIST_FILTERS:
            if getattr(args, flag, None) is not None:
                params[param] = str(getattr(args, flag))
        answer.update(await client.request_json("POST", "/fhir/R4/AgentPush/$retry",
                                                params=params))
        emit(args, answer, lambda: table(
            [[p.get("id"), p.get("result"), p.get("reason")] for p in answer.get("pushes")
             or []], BULK_HEADER)
            + f"\n# {answer.get('matched')} matched: {answer.get('retried')} retried, "
              f"{answer.get('skipped')} skipped, {answer.get('remaining')} left")

    rc = run(args, "pushes retry --all", go)
    if rc == 0 and (answer.get("skipped") or answer.get("remaining")):
        return 1
    return rc


def cmd_pushes_resend(args: argparse.Namespace, run: Runner) -> int:
    return _push_op(args, run, "POST", "/$resend", "pushes resend")


def cmd_pushes_cancel(args: argparse.Namespace, run: Runner) -> int:
    return _push_op(args, run, "POST", "/$cancel", "pushes cancel")


def cmd_ping(args: argparse.Namespace, run: Runner) -> int:
    async def go(client: Any) -> None:
        reply = await client.push_to_agent(args.agent, args.destination, "PING", PING, True,
                                           wait_timeout=args.timeout)
        emit(args, {"agent": args.agent, "destination": args.destination, "reply": reply},
             lambda: reply if isinstance(reply, str) else json.dumps(reply))

    return run(args, "ping", go)


def cmd_reload_config(args: argparse.Namespace, run: Runner) -> int:
    async def go(client: Any) -> None:
        outcome = await client.request_json(
            "GET", f"/fhir/R4/Agent/{_q(args.agent)}/$reload-config")
        emit(args, outcome, lambda: f"Agent/{args.agent}: configuration reloaded")

    return run(args, "reload-config", go)


def cmd_logs(args: argparse.Namespace, run: Runner) -> int:
    if not 1 <= args.limit <= 1000:
        print("medagent: --limit must be between 1 and 1000", file=sys.stderr)
        return 2

    async def go(client: Any) -> None:
        answer = await client.request_json(
            "GET", f"/fhir/R4/Agent/{_q(args.agent)}/$fetch-logs",
            params={"limit": str(args.limit)})
        text = _params(answer).get("logs") or ""
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        emit(args, lines, lambda: "\n".join(
            line if isinstance(line, str) else json.dumps(line) for line in lines))

    return run(args, "logs", go)


# -- push of a folder ----------------------------------------------------------------------

def hl7_ack_code(reply: Any) -> str | None:
    """MSA-1 of an HL7 v2 reply (AA, AE, AR, CA, CE, CR), or None when it is not one."""
    if not isinstance(reply, str):
        return None
    for segment in reply.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA") and len(segment) > 4:
            return segment[4:].split(segment[3], 1)[0] or None
    return None


def folder_files(folder: str) -> list[str]:
    """Every regular file directly in C{folder}, sorted by name (hidden ones included)."""
    names = sorted(os.listdir(folder))
    return [n for n in names if os.path.isfile(os.path.join(folder, n))
            and not os.path.islink(os.path.join(folder, n))]


def cmd_push_folder(args: argparse.Namespace, run: Runner) -> int:
    """
    One waited push per file, in name order: a progress line per file on stderr, a summary
    on stdout, exit 1 when any file was not delivered (refused, failed, or a negative ACK).
    A file is pushed whole as text; a file that is not UTF-8 is reported and skipped.
    """
    folder = args.file
    try:
        names = folder_files(folder)
    except OSError as e:
        print(f"medagent: cannot list {folder}: {e.strerror}", file=sys.stderr)
        return 2
    if not names:
        print(f"medagent: no files in {folder}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []

    async def go(client: Any) -> None:
        from medagent.client import RelayError

        n = len(names)
        for i, name in enumerate(names, 1):
            result: dict[str, Any] = {"file": name}
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    raw = f.read(MAX_FILE + 1)
                if len(raw) > MAX_FILE:
                    raise ValueError(f"larger than {MAX_FILE} bytes")
                body = raw.decode("utf-8")
            except (OSError, ValueError) as e:
                result.update(result="failed", error=f"not read: {type(e).__name__}: {e}"
                              if not isinstance(e, UnicodeDecodeError) else "not UTF-8 text")
            else:
                try:
                    reply = await client.push_to_agent(
                        args.agent, args.destination, body, args.content_type, True,
                        wait_timeout=args.timeout)
                except RelayError as e:
                    result.update(result="failed", status=e.status, error=str(e),
                                  location=e.headers.get("content-location"))
                except Exception as e:  # the relay unreachable: this file failed
                    result.update(result="failed", error=f"{type(e).__name__}: {e}")
                else:
                    code = hl7_ack_code(reply)
                    if code is not None and code not in ("AA", "CA"):
                        result.update(result="rejected", ack=code)
                    else:
                        result.update(result="delivered", ack=code)
            results.append(result)
            outcome = result["result"]
            detail = result.get("ack") if outcome == "rejected" else result.get("error")
            suffix = f" ({detail})" if detail and outcome != "delivered" else ""
            print(f"[{i}/{n}] {name} ... {outcome}{suffix}", file=sys.stderr, flush=True)
        summary = {k: sum(1 for r in results if r["result"] == k)
                   for k in ("delivered", "rejected", "failed")}
        emit(args, {"total": n, **summary, "files": results},
             lambda: f"{n} files: {summary['delivered']} delivered, {summary['rejected']} "
                     f"rejected, {summary['failed']} failed")

    rc = run(args, "push", go)
    if rc == 0 and any(r["result"] != "delivered" for r in results):
        return 1
    return rc
