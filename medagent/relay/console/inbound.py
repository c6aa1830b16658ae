"""
The console's inbound messages (device → agent → relay → Bot → answer): the list searched by
agent, channel, time, MSH-10, patient id, accession, DICOM UIDs and outcome; a message's page
(its payload only to roles that may see payloads, each view an C{AuditEvent} without the
payload); and the agent page's "Channels" section.  Pure functions of plain values, as
L{medagent.relay.console.html}, whose helpers (L{html.h} for everything from outside) they
use; the handlers are L{medagent.relay.console.resource}'s.

Patient ids identify people: like payloads, they are shown to (and searched by) operators
and admins only; a viewer sees neither.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence
from urllib.parse import urlencode

from medagent.relay.audit import INTERACTION, REST, client_audit_event
from medagent.relay.auth import Principal
from medagent.relay.console.html import PREFIX, _table, age, h, older_link, page, u, when
from medagent.storage.inbound import OUTCOMES, InboundMessage

#: The list's search fields: (query name, label, input type, PHI: only for payload roles).
SEARCH_FIELDS = (("control_id", "MSH-10 (control id)", "text", False),
                 ("patient_id", "Patient id", "text", True),
                 ("accession", "Order / accession no.", "text", False),
                 ("agent", "Agent id", "text", False),
                 ("channel", "Channel", "text", False),
                 ("study_uid", "Study Instance UID", "text", False),
                 ("sop_uid", "SOP Instance UID", "text", False),
                 ("since", "From (UTC)", "datetime-local", False),
                 ("until", "To (UTC)", "datetime-local", False))
PHI_FIELDS = frozenset(name for name, _, _, phi in SEARCH_FIELDS if phi)
#: The agent page's channel counts cover this many last seconds.
CHANNEL_WINDOW = 24 * 3600.0


def outcome_badge(outcome: str) -> str:
    return f'<span class="state s-{h(outcome)}" data-field="outcome">{h(outcome)}</span>'


def search(query: Mapping[str, str], *, may_see_phi: bool
           ) -> tuple[dict[str, str], dict[str, str], int | None]:
    """The list's filters as shown, as inbound log parameters, and the page cursor; a bad
    one is L{resource.Refused} (400; 403 for a patient id from a role that may not see it),
    as the messages page's (L{resource._search})."""
    from medagent.relay.console.resource import Refused, search_bounds

    names = [name for name, _, _, _ in SEARCH_FIELDS] + ["outcome"]
    filters = {k: query.get(k, "").strip() for k in names}
    if not may_see_phi and any(filters[k] for k in PHI_FIELDS):
        raise Refused(403, "Your role may not search by patient id")
    params = {k: v for k, v in filters.items() if v and k not in ("since", "until", "agent")}
    if params.get("outcome") and params["outcome"] not in OUTCOMES:
        raise Refused(400, f"outcome must be one of {', '.join(OUTCOMES)}")
    if filters["agent"]:
        params["agent"] = filters["agent"].removeprefix("Agent/")
    return filters, params, search_bounds(query, filters, params)


def _answer_text(m: InboundMessage) -> str:
    parts = [str(m.status) if m.status is not None else "—"]
    if m.ack_code:
        parts.append(m.ack_code)
    return " ".join(parts)


def inbound_row(m: InboundMessage, *, show_phi: bool) -> str:
    cells = (
        f'<td>{h(when(m.received))}</td>'
        f'<td><a href="{PREFIX}/agent/{h(u(m.agent_id))}">{h(m.agent_id)}</a></td>'
        f'<td>{h(m.channel)}</td>'
        f'<td>{h(m.message_type or m.content_type)}</td>'
        f'<td><a href="{PREFIX}/inbound/{h(u(m.id))}" data-field="control">'
        f'{h(m.control_id or m.sop_uid or m.id[:12])}</a></td>'
        + (f'<td>{h(m.patient_id or "")}</td>' if show_phi else "")
        + f'<td>{h(m.accession or "")}</td>'
        f'<td>{outcome_badge(m.outcome)}</td>'
        f'<td data-field="answer">{h(_answer_text(m))}</td>'
    )
    return f'<tr id="inbound-{h(m.id)}" data-inbound="{h(m.id)}">{cells}</tr>'


def inbound_heads(show_phi: bool) -> tuple[str, ...]:
    return ("Received", "Agent", "Channel", "Type", "MSH-10 / UID") + (
        ("Patient id",) if show_phi else ()) + ("Order no.", "Outcome", "Answer")


def inbound_event(m: InboundMessage) -> dict[str, Any]:
    """The live stream's event of a message just recorded: what every console role may see
    (no payload, no patient id)."""
    return {"id": m.id, "agent": m.agent_id, "channel": m.channel, "received": m.received,
            "contentType": m.content_type, "messageType": m.message_type,
            "controlId": m.control_id, "accession": m.accession, "sopUid": m.sop_uid,
            "outcome": m.outcome, "status": m.status, "ack": m.ack_code}


def inbound_page(found: Sequence[InboundMessage], filters: Mapping[str, str], total: int,
                 next_cursor: int | None, *, show_phi: bool, live: bool = False,
                 **layout: Any) -> bytes:
    fields = []
    for name, label, kind, phi in SEARCH_FIELDS:
        if phi and not show_phi:
            continue
        fields.append(f'<p><label for="i-{name}">{h(label)}</label>'
                      f'<input id="i-{name}" name="{name}" type="{kind}" '
                      f'value="{h(filters.get(name, ""))}" maxlength="200"></p>')
    options = ['<option value="">any</option>'] + [
        f'<option{" selected" if filters.get("outcome") == o else ""}>{h(o)}</option>'
        for o in OUTCOMES]
    fields.append('<p><label for="i-outcome">Outcome</label>'
                  f'<select id="i-outcome" name="outcome">{"".join(options)}</select></p>')
    form = (f'<form method="get" action="{PREFIX}/inbound" class="search" role="search">'
            + "".join(fields) + '<p><button type="submit" id="inbound-search">Search'
            f'</button> <a href="{PREFIX}/inbound">clear</a></p></form>')
    caption = f'<span data-count="{int(total)}">{int(total)}</span> inbound message(s)'
    table = _table(caption, inbound_heads(show_phi),
                   (inbound_row(m, show_phi=show_phi) for m in found), ident="inbound",
                   attrs=f' data-live="{1 if live else 0}" data-phi="{1 if show_phi else 0}"',
                   empty="No inbound message matches.")
    more = older_link("/inbound", filters, next_cursor)
    return page("Inbound messages", form + table + more, current="inbound", **layout)


def inbound_detail_page(m: InboundMessage, *, can_see_payload: bool, payload_shown: bool,
                        **layout: Any) -> bytes:
    facts = [
        ("Id", h(m.id)),
        ("Outcome", outcome_badge(m.outcome)),
        ("Agent", f'<a href="{PREFIX}/agent/{h(u(m.agent_id))}">{h(m.agent_id)}</a>'),
        ("Channel", h(m.channel)),
        ("Device address", h(m.remote or "—")),
        ("Received", h(when(m.received))),
        ("Content type", h(m.content_type)),
        ("Size", h(f"{m.size} bytes")),
        ("Message type (MSH-9)", h(m.message_type or "—")),
        ("MSH-10", h(m.control_id or "—")),
    ]
    if can_see_payload:
        facts.append(("Patient id", h(m.patient_id or "—")))
    facts += [
        ("Order / accession no.", h(m.accession or "—")),
        ("Study Instance UID", h(m.study_uid or "—")),
        ("SOP Instance UID", h(m.sop_uid or "—")),
        ("Bot", h(m.bot or "—")),
        ("Answer", f'<span id="inbound-answer">{h(_answer_text(m))}</span>'),
        ("Duration", h(f"{m.duration_ms:.1f} ms" if m.duration_ms is not None else "—")),
    ]
    if m.error_kind:
        facts.append(("Failed", f'<span class="error">{h(m.error_kind)}</span>'))
    dl = '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + \
        "</dl>"
    payload = ""
    if can_see_payload:
        if m.body is None:
            payload = ('<section aria-labelledby="pl-h"><h2 id="pl-h">Payload</h2>'
                       "<p>Not kept (the relay runs with <code>--inbound-log off</code>)."
                       "</p></section>")
        elif payload_shown:
            payload = ('<section aria-labelledby="pl-h"><h2 id="pl-h">Payload</h2>'
                       '<p class="note">This view was recorded in the audit log.</p>'
                       f'<pre class="payload" id="payload">'
                       f"{h(m.body.replace(chr(13), chr(10)))}</pre></section>")
        else:
            payload = ('<section aria-labelledby="pl-h"><h2 id="pl-h">Payload</h2>'
                       f'<p><a id="show-payload" href="{PREFIX}/inbound/{h(u(m.id))}'
                       '?payload=1">Show the payload</a> (contains patient data; each view '
                       "is recorded in the audit log)</p></section>")
    title = f"Inbound {m.control_id or m.sop_uid or m.id}"
    return page(title, dl + payload, current="inbound", **layout)


def channels_section(agent_id: str, channels: Sequence[Mapping[str, Any]], now: float,
                     configured: Sequence[str] = ()) -> str:
    """The agent page's "Channels": per channel, messages in the last 24 h, the last one's
    time and what its Bot answered; a C{configured} channel (``Agent.channel[].name``) that
    never sent anything is listed too (a silent device is what to look for)."""
    known = {c["channel"] for c in channels}
    channels = list(channels) + [{"channel": name, "count": 0} for name in
                                 dict.fromkeys(configured) if name not in known]
    rows = []
    for c in channels:
        search = urlencode({"agent": agent_id, "channel": c["channel"]})
        last = c.get("lastReceived")
        answer = " ".join(str(x) for x in (c.get("lastStatus"), c.get("lastAck"))
                          if x is not None) or "—"
        result = outcome_badge(str(c["lastOutcome"])) if c.get("lastOutcome") else "—"
        if c.get("lastErrorKind"):
            result += f' <span class="error">{h(c["lastErrorKind"])}</span>'
        rows.append(
            f'<tr data-channel="{h(c["channel"])}"><th scope="row">{h(c["channel"])}</th>'
            f'<td data-field="count">{int(c.get("count") or 0)}</td>'
            f'<td>{h(when(last))}{h(f" ({age(now - last)} ago)" if last is not None else "")}'
            '</td>'
            f'<td>{h(c.get("lastBot") or "—")}</td><td>{result} {h(answer)}</td>'
            f'<td><a href="{PREFIX}/inbound?{h(search)}">inbound</a></td></tr>')
    return _table(h("Channels (inbound, last 24 h)"),
                  ("Channel", "Messages (24 h)", "Last message", "Bot", "Last Bot result",
                   ""), rows, ident="channels", empty="No inbound message from this agent.")


def inbound_audit_event(principal: Principal, m: InboundMessage, address: str, now: float,
                        via: str) -> dict[str, Any]:
    """The AuditEvent of one inbound payload view: who, which message, from where, through
    what (C{via}: the console, the API); never the payload."""
    return client_audit_event(
        principal, address, now, type=REST,
        subtype={"system": INTERACTION, "code": "read", "display": "read"}, action="R",
        description=f"Inbound message payload viewed ({via})",
        observer=f"medagent-relay {via}",
        entity=[{"what": {"identifier": {"system": "urn:medagent:inbound", "value": m.id}},
                 "type": {"code": "AgentInbound"}},
                {"what": {"reference": f"Agent/{m.agent_id}"}}])
