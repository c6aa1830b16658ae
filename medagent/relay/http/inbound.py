"""
``GET AgentInbound`` (the inbound log, paged by cursor, searched by the console's filters)
and ``GET AgentInbound/{id}`` (one message; ``?_payload=true`` adds its payload, each such
read an C{AuditEvent} without the payload).  Admin clients only: the inbound log holds every
device's messages, so a pusher (its own pushes only), an agent or a Bot reads none of it -
not even whether a message exists.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from medagent.fhir import bad_request, forbidden, not_found
from medagent.relay.console.inbound import inbound_audit_event
from medagent.relay.http.context import Response, RouteContext, client_host, json_response
from medagent.relay.http.pushes import DEFAULT_PAGE, MAX_PAGE, _int_param, check_search, page_links
from medagent.storage.inbound import FILTERS, OUTCOMES, InboundMessage

log = Logger()

#: The query parameters of the list (besides C{_count} and C{_cursor}).
PARAMS = frozenset([k for k, _ in FILTERS] + ["since", "until"])


def _log(ctx: RouteContext) -> Any:
    found = getattr(ctx.api, "inbound", None)
    if found is None:
        raise not_found("The inbound log is not enabled on this relay")
    return found


def _require(ctx: RouteContext) -> None:
    if not ctx.principal.is_admin:
        log.warn("{client_id} ({role}) may not read the inbound log",
                 client_id=ctx.principal.client_id, role=ctx.principal.role)
        raise forbidden("Only an admin client may read inbound messages")


async def list_inbound(ctx: RouteContext) -> Response:
    """``GET AgentInbound?agent=&channel=&control_id=&patient_id=...``: newest first."""
    _require(ctx)
    inbound = _log(ctx)
    params = {k: v[-1] for k, v in ctx.query.items() if k in PARAMS and v}
    unknown = sorted(k for k in ctx.query if k not in PARAMS and k not in ("_count", "_cursor"))
    if unknown:
        raise bad_request(f"Unknown search parameter(s): {', '.join(unknown)[:200]}")
    if params.get("agent"):
        params["agent"] = params["agent"].removeprefix("Agent/")
    if params.get("outcome") and params["outcome"] not in OUTCOMES:
        raise bad_request(f"outcome must be one of {', '.join(OUTCOMES)}")
    check_search(params)
    flat = {k: v[-1] for k, v in ctx.query.items() if v}
    count = _int_param(flat, "_count", DEFAULT_PAGE, 0, MAX_PAGE)
    cursor = _int_param(flat, "_cursor", None, 1, 2**63 - 1)
    found, total, next_before = await inbound.search_page(params, count=count,
                                                          before_seq=cursor)
    return json_response(_page(ctx, found, total, next_before))


async def read_inbound(ctx: RouteContext) -> Response:
    """``GET AgentInbound/{id}[?_payload=true]``."""
    _require(ctx)
    message = await _log(ctx).get(ctx.params["id"])
    wanted = (ctx.query.get("_payload") or [""])[-1]
    if wanted not in ("", "true", "false"):
        raise bad_request("_payload must be true or false")
    include = wanted == "true" and message.body is not None
    if include:  # recorded before it is shown; no record, no payload
        now = ctx.api.clock.seconds() if ctx.api.clock is not None else time.time()
        await ctx.api.store.create(inbound_audit_event(
            ctx.principal, message, client_host(ctx.request), now, "API"))
        log.info("{client_id} read the payload of inbound message {id}",
                 client_id=ctx.principal.client_id, id=message.id)
    return json_response(message.to_json(include_body=include))


def _page(ctx: RouteContext, found: list[InboundMessage], total: int,
          next_before: int | None) -> dict[str, Any]:
    links = page_links(ctx, "AgentInbound", next_before)
    return {
        "resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
        "entry": [{"fullUrl": f"{ctx.base()}/fhir/R4/AgentInbound/{m.id}",
                   "resource": m.to_json()} for m in found],
    }
