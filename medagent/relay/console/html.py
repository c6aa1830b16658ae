"""
The console's pages as HTML text: plain functions of plain values, no Twisted, no I/O.

Everything that comes from outside (agent names, ids, destinations, errors, payloads) goes
through L{h} (HTML escaping, quotes included) and nothing else reaches a page; the only
script is the static L{CONSOLE_JS}, so the Content-Security-Policy allows no inline code.
"""

from __future__ import annotations

import os
import time
from html import escape
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote, urlencode

from medagent.destination import lane_key
from medagent.storage import journal as j

PREFIX = "/console"


def h(value: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return escape("" if value is None else str(value), quote=True)


def u(value: str) -> str:
    """One path segment."""
    return quote(value, safe="")


def when(t: float | None) -> str:
    if t is None:
        return "—"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))
    except (OverflowError, ValueError, OSError):
        return "—"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{h(csrf)}">'


def action_form(path: str, label: str, csrf: str, *, confirm: str | None = None,
                name: str | None = None) -> str:
    """A POST button (with the session's CSRF token); C{confirm} asks first (console.js)."""
    extra = f' data-confirm="{h(confirm)}"' if confirm else ""
    ident = f' name="{h(name)}"' if name else ""
    return (f'<form method="post" action="{h(PREFIX + path)}" class="action"{extra}>'
            f'{_csrf_field(csrf)}<button type="submit"{ident}>{h(label)}</button></form>')


def page(title: str, body: str, *, who: Any = None, csrf: str | None = None,
         current: str = "", alerts: int = 0, flash: str | None = None,
         live: bool = True) -> bytes:
    """The layout around every page (C{who}: the signed-in principal, or None)."""
    nav = ""
    if who is not None:
        links = []
        for key, label, href in (("fleet", "Fleet", "/fleet"),
                                 ("messages", "Messages", "/messages"),
                                 ("inbound", "Inbound", "/inbound"),
                                 ("trends", "Trends", "/trends"),
                                 ("alerts", "Alerts", "/alerts")):
            mark = ' aria-current="page"' if key == current else ""
            badge = (f' <span class="badge" id="alert-count">{alerts}</span>'
                     if key == "alerts" else "")
            if key == "alerts" and not alerts:
                badge = ' <span class="badge" id="alert-count" hidden>0</span>'
            links.append(f'<li><a href="{PREFIX}{href}"{mark}>{label}{badge}</a></li>')
        logout = (f'<form method="post" action="{PREFIX}/logout" class="logout">'
                  f'{_csrf_field(csrf or "")}<button type="submit">Sign out</button></form>')
        nav = (f'<nav aria-label="Console"><ul>{"".join(links)}</ul>'
               f'<p class="who">{h(who.client_id)} ({h(who.role)})</p>{logout}'
               f'<p id="live" class="live" aria-live="polite" '
               f'data-enabled="{1 if live else 0}">connecting…</p></nav>')
    note = f'<p class="flash" role="status">{h(flash)}</p>' if flash else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{h(title)} · medagent console</title>"
        f'<link rel="stylesheet" href="{PREFIX}/static/console.css">'
        f'<script src="{PREFIX}/static/console.js" defer></script>'
        '</head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><p class="brand">medagent console</p>{nav}</header>'
        f'<main id="main" tabindex="-1"><h1>{h(title)}</h1>{note}{body}</main>'
        "</body></html>\n"
    ).encode("utf-8")


def login_page(error: str | None = None, client_id: str = "") -> bytes:
    err = (f'<p class="error" role="alert" id="login-error">{h(error)}</p>'
           if error else "")
    body = (
        f'{err}<form method="post" action="{PREFIX}/login" class="login">'
        '<p><label for="client_id">Client id</label>'
        f'<input id="client_id" name="client_id" autocomplete="username" required '
        f'value="{h(client_id)}" maxlength="200"></p>'
        '<p><label for="client_secret">Client secret</label>'
        '<input id="client_secret" name="client_secret" type="password" '
        'autocomplete="current-password" required maxlength="500"></p>'
        '<p><button type="submit">Sign in</button></p></form>'
    )
    return page("Sign in", body)


def _table(caption: str, heads: Sequence[str], rows: Iterable[str], *, ident: str = "",
           attrs: str = "", empty: str = "Nothing here yet.") -> str:
    """A table; C{caption} is HTML (escape what goes into it), the rows are HTML too."""
    rows = list(rows)
    # a column of links has no visible heading; a screen reader still hears one
    head = "".join(f'<th scope="col">{h(x)}</th>' if x else
                   '<th scope="col"><span class="vh">Links</span></th>' for x in heads)
    body = "".join(rows) or (f'<tr class="empty"><td colspan="{len(heads)}">{h(empty)}'
                             "</td></tr>")
    ident_attr = f' id="{ident}"' if ident else ""
    cap = f'<caption id="{ident}-caption">' if ident else "<caption>"
    return (f'<div class="scroll"><table{ident_attr}{attrs}>{cap}{caption}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def state_badge(state: str, field: str = "state") -> str:
    return f'<span class="state s-{h(state)}" data-field="{field}">{h(state)}</span>'


# -- fleet -----------------------------------------------------------------------------------


FLEET_HEADS = ("Agent", "State", "Version", "Last heartbeat", "Connected since",
               "Relay node", "Queued", "Oldest waiting", "Errors (1 h)")


def fleet_row(row: Mapping[str, Any], now: float) -> str:
    agent_id = row["id"]
    state = "online" if row["connected"] else "offline"
    rtt = row.get("rtt")
    beat = when(row.get("last_heartbeat"))
    if rtt is not None:
        beat += f" (RTT {rtt * 1000:.0f} ms)"
    oldest = row.get("oldest_open")
    return (
        f'<tr id="agent-{h(agent_id)}" data-agent="{h(agent_id)}" class="{state}">'
        f'<th scope="row"><a href="{PREFIX}/agent/{h(u(agent_id))}">'
        f'{h(row.get("name") or agent_id)}</a><br><small>{h(agent_id)}</small></th>'
        f'<td>{state_badge(state)}{paused_note(row.get("paused"))}</td>'
        f'<td data-field="version">{h(row.get("version") or "—")}</td>'
        f'<td data-field="heartbeat">{h(beat)}</td>'
        f'<td data-field="since">{h(when(row.get("connected_since")))}</td>'
        f'<td data-field="node">{h(row.get("node") or "—")}</td>'
        f'<td data-field="open">{int(row.get("open") or 0)}</td>'
        f'<td data-field="oldest">{h(age(now - oldest) if oldest is not None else "—")}</td>'
        f'<td data-field="errors">{int(row.get("errors") or 0)}</td>'
        "</tr>"
    )


def paused_note(n: Any) -> str:
    """A fleet row's note of the agent's paused lanes (none: nothing)."""
    if not isinstance(n, int) or n <= 0:
        return ""
    return f' <small class="paused" data-field="paused">{n} lane(s) paused</small>'


def fleet_page(rows: Sequence[Mapping[str, Any]], now: float, **layout: Any) -> bytes:
    table = _table(h(f"{len(rows)} agent(s)"), FLEET_HEADS, (fleet_row(r, now) for r in rows),
                   ident="fleet", empty="No agents are registered.")
    return page("Fleet", table, current="fleet", **layout)


# -- agent -----------------------------------------------------------------------------------


def agent_page(row: Mapping[str, Any], lanes: Sequence[Mapping[str, Any]], now: float, *,
               can_act: bool, csrf: str, details: Mapping[str, Any] | None = None,
               ping: j.Push | None = None, trends: str = "", channels: str = "",
               **layout: Any) -> bytes:
    """An agent's page; C{trends} and C{channels} are HTML (escaped already) after its
    lanes; C{details} the lanes' details and actions (L{lane_cells}), C{ping} a ping just
    sent from it."""
    agent_id = row["id"]
    state = "online" if row["connected"] else "offline"
    facts = (
        f'<dl class="facts" id="agent-{h(agent_id)}" data-agent="{h(agent_id)}">'
        f"<dt>Id</dt><dd>{h(agent_id)}</dd>"
        f"<dt>State</dt><dd>{state_badge(state)}</dd>"
        f'<dt>Version</dt><dd data-field="version">{h(row.get("version") or "—")}</dd>'
        f'<dt>Last heartbeat</dt><dd data-field="heartbeat">'
        f'{h(when(row.get("last_heartbeat")))}</dd>'
        f'<dt>Connected since</dt><dd data-field="since">'
        f'{h(when(row.get("connected_since")))}</dd>'
        f'<dt>Relay node</dt><dd data-field="node">{h(row.get("node") or "—")}</dd>'
        f'<dt>Errors (1 h)</dt><dd>{int(row.get("errors") or 0)}</dd></dl>'
    )
    actions = ""
    if can_act:
        actions = ('<section aria-labelledby="actions-h"><h2 id="actions-h">Actions</h2>'
                   + action_form(f"/agent/{u(agent_id)}/reload", "Reload config", csrf,
                                 name="reload")
                   + "</section>")
    lane_rows = []
    if details is not None:
        lanes = with_paused_lanes(lanes, details)
    for lane in lanes:
        remote = lane["remote"]
        search = urlencode({"agent": agent_id, "remote": remote})
        extra = lane_cells(agent_id, lane, details, can_act=can_act, csrf=csrf) \
            if details is not None else ("", "")
        lane_rows.append(
            f'<tr data-lane="{h(lane_of(remote))}"><th scope="row">{h(remote)}</th>'
            f'{extra[0]}<td>{int(lane.get("open") or 0)}</td>'
            f'<td>{h(age(lane.get("oldestOpenAgeSeconds")))}</td>'
            f'<td>{state_badge(lane["lastState"], "last") if lane.get("lastState") else "—"}'
            f' {h(when(lane.get("lastUpdated")) if lane.get("lastState") else "")}</td>'
            f'<td>{h(lane.get("lastError") or "")}</td>'
            f'<td><a href="{PREFIX}/messages?{h(search)}">messages</a>{extra[1]}</td></tr>')
    heads: tuple[str, ...] = ("Destination", "Queued", "Oldest waiting", "Last outcome",
                              "Last error", "")
    if details is not None:
        heads = ("Destination",) + LANE_DETAIL_HEADS + heads[1:]
    lanes_table = _table(h("Lanes (one per device)"), heads,
                         lane_rows, ident="lanes", empty="No pushes to this agent yet.")
    if ping is not None:
        lanes_table = ping_result(ping) + lanes_table
    name = row.get("name") or agent_id
    return page(f"Agent {name}", facts + actions + lanes_table + trends + channels,
                current="fleet", **layout)


#: the lane columns from the agent's and the relay's own view (L{lane_cells})
LANE_DETAIL_HEADS = ("State", "In flight", "Last ACK", "ACK p50 / p99", "Recent errors")


def lane_of(remote: str) -> str:
    """The lane (device) key of a destination URL, as the pause records name it."""
    return lane_key(remote)


def with_paused_lanes(lanes: Sequence[Mapping[str, Any]], details: Mapping[str, Any]
                      ) -> list[Mapping[str, Any]]:
    """The journal's lanes, and a row for each paused lane the journal has no push of."""
    seen = {lane_of(lane["remote"]) for lane in lanes}
    extra = [{"remote": key} for key in sorted(details.get("paused") or {}) if key not in seen]
    return list(lanes) + extra


def _ms(value: Any) -> str:
    return f"{float(value):.0f} ms" if isinstance(value, (int, float)) else "—"


def lane_cells(agent_id: str, lane: Mapping[str, Any], details: Mapping[str, Any], *,
               can_act: bool, csrf: str) -> tuple[str, str]:
    """
    The detail cells of one lane row (state, in flight, last ACK, latency, recent errors)
    and its actions (ping, pause or resume).  C{details}: C{paused} (lane → record),
    C{relay} (the relay's lanes: pushes on the agent) and C{agent} (the agent's own lane
    statistics, or None: an agent that does not report them, e.g. Medplum's).
    """
    key = lane_of(lane["remote"])
    pause = (details.get("paused") or {}).get(key)
    relay = (details.get("relay") or {}).get(key) or {}
    stats = (details.get("agent") or {}).get(key) if details.get("agent") is not None else None
    on_agent = int(relay.get("inFlight") or 0)
    if pause is not None:
        state = (f'<span class="state s-paused" data-field="lane-state">paused</span>'
                 f'<br><small>by {h(pause.get("by"))} since {h(when(pause.get("since")))}'
                 "</small>")
        if on_agent:
            where = ("held on the agent too" if details.get("holdsOnAgent")
                     else "already on the agent (not held)")
            state += f"<br><small>{on_agent} {where}</small>"
    elif relay.get("retrying"):
        state = '<span class="state s-retrying" data-field="lane-state">retrying</span>'
    else:
        state = '<span class="state s-active" data-field="lane-state">active</span>'
    if stats:
        last = (f'{h(stats.get("lastAckCode") or "—")} {h(when(stats.get("lastAck")))}'
                if stats.get("lastAck") is not None else "—")
        latency = f'{h(_ms(stats.get("ackP50Ms")))} / {h(_ms(stats.get("ackP99Ms")))}'
        errors = "".join(f'<li>{h(e.get("kind"))} <small>{h(when(e.get("at")))}</small></li>'
                         for e in (stats.get("recentErrors") or [])[:5]
                         if isinstance(e, Mapping))
        errors = f'<ul class="errors">{errors}</ul>' if errors else "—"
    else:
        last, latency, errors = "—", "—", "—"
    cells = (f"<td>{state}</td><td data-field=\"in-flight\">{on_agent}</td>"
             f"<td>{last}</td><td>{latency}</td><td>{errors}</td>")
    actions = ""
    if can_act:
        base = f"/agent/{u(agent_id)}"
        if pause is None:
            actions += lane_form(f"{base}/ping", "Ping", csrf, lane["remote"], "ping")
            actions += lane_form(f"{base}/pause", "Pause", csrf, key, "pause",
                                 confirm="Pause this lane? Its pushes wait on the relay.")
        else:
            actions += lane_form(f"{base}/resume", "Resume", csrf, key, "resume")
    return cells, (f'<div class="lane-actions">{actions}</div>' if actions else "")


def lane_form(path: str, label: str, csrf: str, lane: str, name: str, *,
              confirm: str | None = None) -> str:
    """A POST button for one lane (its destination in a hidden field), CSRF token included."""
    extra = f' data-confirm="{h(confirm)}"' if confirm else ""
    return (f'<form method="post" action="{h(PREFIX + path)}" class="action"{extra}>'
            f'{_csrf_field(csrf)}<input type="hidden" name="lane" value="{h(lane)}">'
            f'<button type="submit" name="{h(name)}" aria-label="{h(label)} {h(lane)}">'
            f"{h(label)}</button></form>")


def ping_result(push: j.Push) -> str:
    """The outcome of a ping from this page (it is a push in the journal: linked)."""
    if push.state == j.DELIVERED:
        text = "reachable"
    elif push.final:
        text = f"not reachable: {push.last_error or push.state}"
    else:
        text = f"no answer yet ({push.state})"
    return (f'<p class="ping" id="ping-result" role="status">Ping of {h(push.remote)}: '
            f'{h(text)} (<a href="{PREFIX}/message/{h(u(push.id))}">details</a>)</p>')


# -- messages --------------------------------------------------------------------------------


MESSAGE_HEADS = ("Created", "Agent", "Destination", "MSH-10", "Order no.", "State",
                 "Attempts")


def message_row(push: j.Push) -> str:
    return (
        f'<tr id="push-{h(push.id)}" data-push="{h(push.id)}" '
        f'data-updated="{float(push.updated or 0)!r}">'
        f'<td>{h(when(push.created))}</td>'
        f'<td><a href="{PREFIX}/agent/{h(u(push.agent_id))}">{h(push.agent_id)}</a></td>'
        f'<td>{h(push.destination)}</td>'
        f'<td><a href="{PREFIX}/message/{h(u(push.id))}" data-field="control">'
        f'{h(push.control_id or push.id[:12])}</a></td>'
        f'<td>{h(push.accession or "")}</td>'
        f"<td>{state_badge(push.state)}</td>"
        f'<td data-field="attempts">{push.attempts}</td></tr>'
    )


SEARCH_FIELDS = (("control_id", "MSH-10 (control id)", "text"),
                 ("accession", "Order / accession no.", "text"),
                 ("agent", "Agent id", "text"),
                 ("destination", "Destination", "text"),
                 ("remote", "Device URL", "text"),
                 ("patient_id", "Patient id", "text"),
                 ("study_uid", "Study Instance UID", "text"),
                 ("sop_uid", "SOP Instance UID", "text"),
                 ("since", "From (UTC)", "datetime-local"),
                 ("until", "To (UTC)", "datetime-local"))


def messages_page(pushes: Sequence[j.Push], filters: Mapping[str, str], total: int,
                  next_cursor: int | None, *, live: bool, bulk: str = "",
                  **layout: Any) -> bytes:
    fields = []
    who = layout.get("who")
    for name, label, kind in SEARCH_FIELDS:
        if name == "patient_id" and not (who is not None and who.may_see_payloads()):
            continue  # a role without patient data does not search by it either
        fields.append(f'<p><label for="f-{name}">{h(label)}</label>'
                      f'<input id="f-{name}" name="{name}" type="{kind}" '
                      f'value="{h(filters.get(name, ""))}" maxlength="200"></p>')
    options = ['<option value="">any</option>'] + [
        f'<option{" selected" if filters.get("state") == s else ""}>{h(s)}</option>'
        for s in j.STATES]
    fields.insert(2, '<p><label for="f-state">State</label>'
                     f'<select id="f-state" name="state">{"".join(options)}</select></p>')
    form = (f'<form method="get" action="{PREFIX}/messages" class="search" role="search">'
            + "".join(fields) + '<p><button type="submit">Search</button> '
            f'<a href="{PREFIX}/messages">clear</a></p></form>')
    caption = f'<span data-count="{int(total)}">{int(total)}</span> message(s)'
    table = _table(caption, MESSAGE_HEADS, (message_row(p) for p in pushes),
                   ident="messages", attrs=f' data-live="{1 if live else 0}"',
                   empty="No message matches.")
    more = older_link("/messages", filters, next_cursor)
    return page("Messages", form + bulk + table + more, current="messages", **layout)


def older_link(path: str, filters: Mapping[str, str], next_cursor: int | None) -> str:
    """A search page's "Older messages" link (the same filters, the next cursor), if any."""
    if next_cursor is None:
        return ""
    query = urlencode({**{k: v for k, v in filters.items() if v}, "cursor": str(next_cursor)})
    return f'<p><a href="{PREFIX}{path}?{h(query)}" rel="next">Older messages</a></p>'


#: what each stage of a push's timeline reads as on its page
STAGE_TEXT = {"received": "received", "journaled": "journaled", "sent": "sent to the agent",
              "accepted": "on the agent's disk", "device": "sent to the device",
              "answered": "device answered"}


def message_page(push: j.Push, *,
                 resends: Sequence[j.Push], can_act: bool, can_see_payload: bool,
                 payload_shown: bool, csrf: str, **layout: Any) -> bytes:
    facts = [
        ("Id", h(push.id)),
        ("State", f'<span id="detail-state" data-push="{h(push.id)}" '
                  f'data-updated="{float(push.updated or 0)!r}">'
                  f"{state_badge(push.state)}</span>"),
        ("Agent", f'<a href="{PREFIX}/agent/{h(u(push.agent_id))}">{h(push.agent_id)}</a>'),
        ("Destination", h(push.destination)),
        ("Device URL", h(push.remote)),
        ("Content type", h(push.content_type)),
        ("MSH-10", h(push.control_id or "—")),
        ("Order / accession no.", h(push.accession or "—")),
        ("Attempts", f'<span data-field="attempts">{push.attempts}</span>'),
        ("Created", h(when(push.created))),
        ("Updated", h(when(push.updated))),
    ]
    if push.expires_at:
        facts.append(("Expires", h(when(push.expires_at))))
    if push.last_error:
        facts.append(("Last error", f'<span class="error">{h(push.last_error)}</span>'))
    if push.in_doubt:
        facts.append(("In doubt", "yes: the device may have received it"))
    if push.reply_status is not None:
        facts.append(("Device answer", h(f"status {push.reply_status}")))
    if push.resent_from:
        facts.append(("Resend of", f'<a href="{PREFIX}/message/{h(u(push.resent_from))}">'
                                   f"{h(push.resent_from)}</a>"))
    dl = '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + \
        "</dl>"
    # the push's own timeline (kept with it by the journal, whichever node moved it), then
    # its outcome; a push journaled before timelines: its creation
    start = push.timeline.get("received")
    steps: list[tuple[float, str, str | None]] = [
        (push.timeline[stage], STAGE_TEXT[stage], None) for stage in j.STAGES
        if stage in push.timeline] or [(push.created, "received and journaled", None)]
    if push.final or push.last_error:
        steps.append((push.updated, push.state, push.last_error))
    items = "".join(
        f"<li><time>{h(when(t))}</time> {h(state)}"
        + (f' <span class="ms">+{(t - start) * 1000:.1f} ms</span>'
           if start is not None and t >= start else "")
        + (f' <span class="error">{h(note)}</span>' if note else "") + "</li>"
        for t, state, note in steps)
    timeline_html = ('<section aria-labelledby="tl-h"><h2 id="tl-h">Timeline</h2>'
                     f'<ol class="timeline" id="timeline">{items}</ol></section>')
    actions = ""
    if can_act:
        buttons = []
        pid = u(push.id)
        if push.state in (j.FAILED, j.EXPIRED):
            buttons.append(action_form(f"/message/{pid}/retry", "Retry", csrf, name="retry"))
        if push.state in j.OPEN_STATES:
            buttons.append(action_form(f"/message/{pid}/cancel", "Cancel", csrf,
                                       name="cancel", confirm="Cancel this message?"))
        if push.final:
            buttons.append(action_form(f"/message/{pid}/resend", "Resend as a new message",
                                       csrf, name="resend",
                                       confirm="Send this message to the device again?"))
        actions = ('<section aria-labelledby="act-h"><h2 id="act-h">Actions</h2>'
                   + ("".join(buttons) or "<p>No action for a message in this state.</p>")
                   + "</section>")
    payload = ""
    if can_see_payload:
        if payload_shown:
            reply = ""
            if push.reply_body is not None:
                reply = ('<h3>Device answer</h3><pre class="payload" id="reply">'
                         f"{h(push.reply_body.replace(chr(13), chr(10)))}</pre>")
            payload = ('<section aria-labelledby="pl-h"><h2 id="pl-h">Payload</h2>'
                       '<p class="note">This view was recorded in the audit log.</p>'
                       f'<pre class="payload" id="payload">'
                       f"{h(push.body.replace(chr(13), chr(10)))}</pre>{reply}</section>")
        else:
            payload = ('<section aria-labelledby="pl-h"><h2 id="pl-h">Payload</h2>'
                       f'<p><a id="show-payload" href="{PREFIX}/message/{h(u(push.id))}'
                       '?payload=1">Show the payload</a> (contains patient data; each view '
                       "is recorded in the audit log)</p></section>")
    related = ""
    if resends:
        related = _table(h("Resends of this message"), MESSAGE_HEADS,
                         (message_row(p) for p in resends), ident="resends")
    title = f"Message {push.control_id or push.id}"
    return page(title, dl + actions + timeline_html + payload + related,
                current="messages", **layout)


# -- alerts ----------------------------------------------------------------------------------


def alert_rules(monitor: Any) -> str:
    """The conditions this relay's alert monitor watches, as a list (the page's intro)."""
    rules = []
    if getattr(monitor, "offline_after", None):
        rules.append(f"an agent offline for more than {age(monitor.offline_after)}")
    if getattr(monitor, "queue_age_after", None):
        rules.append("a device lane whose oldest push has waited more than "
                     f"{age(monitor.queue_age_after)}")
    if getattr(monitor, "error_rate", None):
        rules.append(f"an agent whose pushes that ended in the last "
                     f"{age(monitor.error_window)} failed in {monitor.error_rate:.0%} or more "
                     f"(at least {monitor.error_min} ended)")
    items = "".join(f"<li>{h(r)}</li>" for r in rules)
    return (f'<p>One alert for each of these, cleared when it ends:</p><ul id="alert-rules">'
            f"{items}</ul>")


def alerts_page(active: Sequence[Any], history: Sequence[Any], offline_after: float,
                monitor: Any = None, **layout: Any) -> bytes:
    def row(alert: Any, cleared: bool) -> str:
        cells = (f'<td><a href="{PREFIX}/agent/{h(u(alert.agent_id))}">{h(alert.text())}</a>'
                 f"</td><td>{h(when(alert.since))}</td><td>{h(when(alert.raised))}</td>")
        if cleared:
            cells += f"<td>{h(when(alert.cleared))}</td>"
        return f'<tr data-alert="{h(alert.agent_id)}">{cells}</tr>'

    intro = (f"<p>An agent offline for more than {h(age(offline_after))} raises one alert; "
             "it clears when the agent is back.</p>") if monitor is None \
        else alert_rules(monitor)
    body = intro + _table(h("Active alerts"), ("Alert", "Since", "Raised"),
                          (row(a, False) for a in active), ident="alerts-active",
                          empty="No active alert.")
    body += _table(h("Cleared recently"), ("Alert", "Since", "Raised", "Cleared"),
                   (row(a, True) for a in history), ident="alerts-cleared",
                   empty="None.")
    return page("Alerts", body, current="alerts", **layout)


def error_page(status: int, text: str, **layout: Any) -> bytes:
    return page(f"{status}", f'<p class="error" role="alert">{h(text)}</p>'
                f'<p><a href="{PREFIX}/fleet">Back to the fleet</a></p>', **layout)


# -- static files ----------------------------------------------------------------------------


def _static(name: str) -> str:
    with open(os.path.join(os.path.dirname(__file__), "static", name), encoding="utf-8") as f:
        return f.read()


#: the console's style sheet and its one script (files beside this module, no build step)
CONSOLE_CSS = _static("console.css")
CONSOLE_JS = _static("console.js")


# -- trends ----------------------------------------------------------------------------------

#: the three charts of a trend: field of L{j.Trend}, heading, what its numbers are
TREND_SERIES = (("created", "Pushes", "pushes received"),
                ("failed", "Failures", "pushes that ended failed or expired"),
                ("depth", "Queue depth", "pushes waiting at the end of each bucket"))
#: a chart's drawing box (the SVG scales to its column; the height stays)
CHART_W, CHART_H = 240, 48


def _clock(t: float) -> str:
    """An instant as ``HH:MMZ`` (the charts' axis)."""
    try:
        return time.strftime("%H:%MZ", time.gmtime(t))
    except (OverflowError, ValueError, OSError):
        return "—"


def _span(trend: j.Trend) -> str:
    """The width of a trend's buckets in words (``1 h``, ``15 min``)."""
    w = int(trend.width)
    return f"{w // 3600} h" if w % 3600 == 0 else f"{w // 60} min" if w % 60 == 0 else f"{w} s"


def trend_chart(trend: j.Trend, field: str, ident: str, now: float) -> str:
    """
    One small chart as inline SVG (no script, no style attribute: the console's CSP):
    bars for counts, a line for the queue depth.  Its C{<title>} and C{<desc>} (named by
    C{aria-labelledby}) say what it shows and its numbers in words.
    """
    heading, what = next((h_, w) for f, h_, w in TREND_SERIES if f == field)
    values = [int(v) for v in getattr(trend, field)]
    n = len(values)
    top = max(values) if values else 0
    scale = (CHART_H - 4) / top if top else 0.0
    step = CHART_W / n if n else CHART_W
    shapes = []
    if field == "depth":
        points = " ".join(f"{(k + 1) * step:.1f},{CHART_H - 1 - v * scale:.1f}"
                          for k, v in enumerate(values))
        start_y = f"{CHART_H - 1 - (values[0] * scale if values else 0):.1f}"
        shapes.append(f'<polyline class="line" fill="none" stroke="#7a4a00" stroke-width="2" '
                      f'vector-effect="non-scaling-stroke" points="0,{start_y} {points}"/>')
        summary = (f"{what}: now {values[-1] if values else 0}, at most {top}, over the "
                   f"last {n} buckets of {_span(trend)} ({_clock(trend.start)} to "
                   f"{_clock(now)}).")
    else:
        for k, v in enumerate(values):
            if v:
                height = max(1.0, v * scale)
                shapes.append(f'<rect class="bar" x="{k * step + 0.5:.1f}" '
                              f'y="{CHART_H - 1 - height:.1f}" width="{max(step - 1, 0.5):.1f}"'
                              f' height="{height:.1f}"/>')
        summary = (f"{what}: {sum(values)} in all, at most {top} in one bucket of "
                   f"{_span(trend)}, from {_clock(trend.start)} to {_clock(now)}.")
    fill = ' fill="#a30000"' if field == "failed" else ' fill="#0b4f9c"'
    return (
        f'<figure class="trend t-{h(field)}"><figcaption>{h(heading)} '
        f'<span class="peak">max {top}</span></figcaption>'
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" preserveAspectRatio="none" '
        f'role="img" aria-labelledby="{h(ident)}-t {h(ident)}-d" focusable="false"{fill}>'
        f'<title id="{h(ident)}-t">{h(heading)}</title>'
        f'<desc id="{h(ident)}-d">{h(summary)}</desc>'
        f'<line class="base" x1="0" y1="{CHART_H - 0.5}" x2="{CHART_W}" y2="{CHART_H - 0.5}" '
        f'stroke="#bbb" vector-effect="non-scaling-stroke"/>'
        + "".join(shapes) +
        f'</svg><p class="axis"><span>{h(_clock(trend.start))}</span>'
        f'<span>now</span></p></figure>'
    )


def trend_numbers(trend: j.Trend, ident: str) -> str:
    """The charts' numbers as a table, folded away (for screen readers and for copying)."""
    rows = "".join(
        f'<tr><th scope="row">{h(when(trend.bucket_start(k)))}</th><td>{c}</td><td>{f}</td>'
        f"<td>{d}</td></tr>"
        for k, (c, f, d) in enumerate(zip(trend.created, trend.failed, trend.depth)))
    return (f'<details class="numbers"><summary>The numbers, {h(_span(trend))} by '
            f'{h(_span(trend))}</summary>'
            + _table(h(f"Buckets of {_span(trend)} (UTC start)"),
                     ("From", "Pushes", "Failures", "Queue depth at end"), [rows],
                     ident=f"{ident}-numbers")
            + "</details>")


def trend_block(trend: j.Trend, ident: str, heading: str, now: float, *,
                level: int = 2) -> str:
    """A trend's three charts and its numbers, under a heading (C{heading} is HTML)."""
    charts = "".join(trend_chart(trend, field, f"{ident}-{field}", now)
                     for field, _, _ in TREND_SERIES)
    return (f'<section class="trends" id="{h(ident)}" aria-labelledby="{h(ident)}-h">'
            f'<h{level} id="{h(ident)}-h">{heading}</h{level}>'
            f'<div class="charts">{charts}</div>{trend_numbers(trend, ident)}</section>')


def agent_trends(trend: j.Trend, now: float) -> str:
    """The agent page's trends (last 24 h)."""
    n = len(trend.created)
    span = f"{n} hours" if trend.width == 3600 else f"{n} × {_span(trend)}"
    return trend_block(trend, "agent-trends", h(f"Trends: the last {span}"), now)


def trends_page(total: j.Trend, agents: Sequence[tuple[Mapping[str, Any], j.Trend]],
                now: float, *, quiet: int, left_out: int, **layout: Any) -> bytes:
    """
    The fleet's trends: all agents together, then each agent with pushes in the window
    (busiest first); C{quiet} agents had none, C{left_out} more are not drawn (the cap).
    """
    body = (f"<p>Pushes, failures and queue depth of the last {len(total.created)} buckets "
            f"of {h(_span(total))}, from the push journal (the same on every relay node). "
            "Failures are pushes that ended failed or expired; a retried push counts by its "
            "latest outcome.</p>")
    body += trend_block(total, "fleet-trends", "All agents", now)
    for i, (agent, trend) in enumerate(agents):
        agent_id = agent["id"]
        heading = (f'<a href="{PREFIX}/agent/{h(u(agent_id))}">'
                   f'{h(agent.get("name") or agent_id)}</a> <small>{h(agent_id)}</small>')
        body += trend_block(trend, f"trend-{i}", heading, now, level=3)
    notes = []
    if quiet:
        notes.append(f"{quiet} agent(s) had no push in this time.")
    if left_out:
        notes.append(f"{left_out} more agent(s) with pushes are not drawn here; each "
                     "agent's page has its own.")
    if notes:
        body += f'<p class="note">{h(" ".join(notes))}</p>'
    return page("Trends", body, current="trends", **layout)


# -- bulk retry ------------------------------------------------------------------------------


def _filter_query(filters: Mapping[str, str]) -> str:
    return urlencode({k: v for k, v in filters.items() if v})


def _filter_words(filters: Mapping[str, str]) -> str:
    labels = dict((name, label) for name, label, _ in SEARCH_FIELDS)
    labels["state"] = "State"
    said = [f"{labels.get(k, k)} = {v}" for k, v in filters.items() if v]
    return "; ".join(said) or "no filter (every agent)"


def bulk_retry_link(filters: Mapping[str, str], count: int) -> str:
    """The messages page's "Retry all N failed matching this filter" (operators only)."""
    if count <= 0:
        return ""
    return (f'<p class="bulk"><a class="button" id="bulk-retry" '
            f'href="{PREFIX}/messages/retry?{h(_filter_query(filters))}">'
            f"Retry all {int(count)} failed matching this filter</a></p>")


def bulk_retry_confirm_page(filters: Mapping[str, str], count: int, limit: int, *,
                            csrf: str, **layout: Any) -> bytes:
    """The confirm step: what will be retried, how many, and the cap."""
    query = _filter_query(filters)
    back = f'<p><a href="{PREFIX}/messages?{h(query)}">Back to the messages</a></p>'
    if count <= 0:
        body = "<p>No failed or expired message matches this filter.</p>" + back
        return page("Retry failed messages", body, current="messages", csrf=csrf, **layout)
    doing = min(count, limit)
    cap = (f" Only the newest {limit} are retried by one action; retry again for the "
           f"{count - limit} left." if count > limit else "")
    body = (f'<p id="bulk-count" data-count="{int(count)}">{int(count)} failed or expired '
            f"message(s) match: {h(_filter_words(filters))}.</p>"
            f"<p>Each is queued again and sent to its device as a single retry would "
            f"(oldest first), and each retry is recorded in the audit log. At most {limit} "
            f"per action.{h(cap)}</p>"
            + action_form(f"/messages/retry?{query}", f"Retry {doing} message(s)", csrf,
                          name="bulk-retry")
            + back)
    return page("Retry failed messages", body, current="messages", csrf=csrf, **layout)


def bulk_retry_result_page(filters: Mapping[str, str], done: Any, **layout: Any) -> bytes:
    """What the bulk retry did (C{done}: a L{medagent.relay.bulk.BulkRetry})."""
    query = _filter_query(filters)
    rows = [f'<tr><td><a href="{PREFIX}/message/{h(u(i))}">{h(i)}</a></td>'
            "<td>retried (queued again)</td><td></td></tr>"
            for i in done.retried]
    rows += [f'<tr><td><a href="{PREFIX}/message/{h(u(i))}">{h(i)}</a></td>'
             f'<td>skipped</td><td class="error">{h(why)}</td></tr>'
             for i, why in done.skipped]
    summary = (f'<p class="flash" role="status" id="bulk-result" '
               f'data-retried="{len(done.retried)}" data-skipped="{len(done.skipped)}">'
               f"{len(done.retried)} retried, {len(done.skipped)} skipped"
               + (f", {done.remaining} left over the cap of {done.limit}" if done.remaining
                  else "") + ".</p>")
    body = (summary + f"<p>Filter: {h(_filter_words(filters))}.</p>"
            + _table(h("Messages"), ("Message", "Result", "Why"), rows, ident="bulk-results",
                     empty="Nothing was retried.")
            + f'<p><a href="{PREFIX}/messages?{h(query)}">Back to the messages</a></p>')
    return page("Retry failed messages", body, current="messages", **layout)
