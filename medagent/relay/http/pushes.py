"""
``Agent/{id}/$push`` (and ``Agent/$push?identifier=``) and the AgentPush status resource:
list (paged by cursor), read, ``$cancel`` and ``$retry``.  A pusher sees only its own pushes;
another client's push answers exactly like a missing one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping
from urllib.parse import urlencode

from twisted.logger import Logger

from medagent.fhir import FHIRError, bad_request, forbidden, not_found, operation_outcome
from medagent.relay.http.context import Response, RouteContext, json_response
from medagent.relay.push import PushResult
from medagent.storage import journal as j
from medagent.storage.journal import Push

log = Logger()

#: Page size of the push list: default and upper bound of ``_count``.
DEFAULT_PAGE = 100
MAX_PAGE = 1000


async def push(ctx: RouteContext) -> Response:
    """``$push``: journal the message, send it, and (when asked) wait for the answer."""
    if ctx.method != "POST":
        raise FHIRError(405, "$push needs POST", "not-supported")
    identifiers = ctx.query.get("identifier") or []
    identifier = identifiers[-1] if identifiers else None
    payload = ctx.json_body()
    key = ctx.request.getHeader(b"idempotency-key")
    result = await ctx.api.pushes.push(
        ctx.principal,
        (ctx.params.get("id"), identifier),
        payload,
        key.decode("utf-8", "replace") if key else None,
    )
    return push_response(ctx, result)


def push_response(ctx: RouteContext, result: PushResult) -> Response:
    """The HTTP answer to a push (the status semantics are in the README)."""
    push = result.push
    location = ctx.status_url(push)
    headers = {"Content-Location": location, "X-Medagent-Push-Id": push.id}
    if result.duplicate:
        headers["X-Medagent-Duplicate"] = "true"
    if not result.waited:
        outcome = operation_outcome(
            f"Push {push.id} accepted ({push.state})" + (
                "; repeat of an earlier push, not sent again" if result.duplicate else ""),
            id="accepted",
            diagnostics=location,
        )
        return json_response(outcome, 202, **headers)
    if result.timed_out:
        why = f" (last error: {push.last_error})" if push.last_error else ""
        outcome = operation_outcome(
            f"No answer from the device within the wait timeout{why}; push {push.id} is "
            f"{push.state}. Its outcome will be at {location}",
            code="timeout",
            severity="error",
            diagnostics=location,
        )
        return json_response(outcome, 504, **headers)
    if result.retrying:
        outcome = operation_outcome(
            f"The device could not be reached ({push.last_error or 'link failed'}); push "
            f"{push.id} stays {push.state} and is retried. Its outcome will be at "
            f"{location}",
            code="transient",
            severity="error",
            diagnostics=location,
        )
        return json_response(outcome, 502, **headers)
    if (push.reply_status is not None and push.reply_status < 400
            and push.reply_body is not None):
        return Response(push.reply_status, push.reply_body.encode("utf-8"),
                        push.reply_content_type or "text/plain", headers)
    status = push.reply_status if push.reply_status and push.reply_status >= 400 else 502
    text = push.last_error or push.reply_body or f"Push {push.state}"
    code = {504: "timeout", 400: "invalid"}.get(status, "transient")
    return json_response(
        operation_outcome(text, code=code, severity="error", diagnostics=location),
        status, **headers,
    )


async def list_pushes(ctx: RouteContext) -> Response:
    """``GET AgentPush?agent=&state=&_count=&_cursor=``: a page, newest first."""
    principal = ctx.principal
    params = {k: v[-1] for k, v in ctx.query.items()}
    agent = params.get("agent", "").removeprefix("Agent/")
    params.pop("requester", None)  # not a filter callers choose
    if agent:
        params["agent"] = agent
        if not principal.may_list_pushes(agent):
            raise forbidden(f"This client may not read pushes of Agent/{agent}")
    else:
        principal.require_admin()
    if not principal.is_admin:
        params["requester"] = principal.client_id  # a pusher lists its own pushes
    if params.get("state") and params["state"] not in j.STATES:
        raise bad_request(f"state must be one of {', '.join(j.STATES)}")
    check_search(params)
    count = _int_param(params, "_count", DEFAULT_PAGE, 0, MAX_PAGE)
    cursor = _int_param(params, "_cursor", None, 1, 2**63 - 1)
    found, total, next_before = await ctx.api.journal.search_page(
        params, count=count, before_seq=cursor)
    return json_response(_push_page(ctx, found, total, next_before))


async def _readable_push(ctx: RouteContext) -> Push:
    """The push of the path's id, or the same 404 for a missing one and another's."""
    push = await ctx.api.journal.get(ctx.params["id"])
    if not ctx.principal.may_read_push(push.agent_id, push.requester):
        # another client's push looks exactly like a missing one
        raise not_found(f"No push {push.id}")
    return push


async def read_push(ctx: RouteContext) -> Response:
    """``GET AgentPush/{id}``: its status, with the hub's live view of a push in flight."""
    push = await _readable_push(ctx)
    return json_response(_push_doc(ctx.api.hub.live_push(push)))


async def retry(ctx: RouteContext) -> Response:
    """``POST AgentPush/{id}/$retry``."""
    push = await _readable_push(ctx)
    push = await ctx.api.pushes.retry(ctx.principal, push.id)
    return json_response(push.to_json())


async def cancel(ctx: RouteContext) -> Response:
    """``POST AgentPush/{id}/$cancel``."""
    push = await _readable_push(ctx)
    push = await ctx.api.pushes.cancel(ctx.principal, push.id)
    return json_response(push.to_json())


async def resend(ctx: RouteContext) -> Response:
    """``POST AgentPush/{id}/$resend``: a finished push's message again, as a new push linked
    to it (C{resentFrom}); 201 with the new push's status document."""
    push = await _readable_push(ctx)
    new = await ctx.api.pushes.resend(ctx.principal, push.id)
    return json_response(new.to_json(), 201, **{"Content-Location": ctx.status_url(new)})


async def not_supported(ctx: RouteContext) -> Response:
    """Any other method or path below ``AgentPush/{id}``: 405, once the push is found."""
    await _readable_push(ctx)
    raise FHIRError(405, f"{ctx.method} not supported on {'/'.join(ctx.rest)}",
                    "not-supported")


#: The longest value of a search filter (ids, codes, destination URLs; a longer one cannot
#: match anything stored, and is refused rather than carried into a query).
MAX_FILTER = 1000


def check_search(params: Mapping[str, str]) -> None:
    """What every search of the API checks of its filters (a 400 otherwise): none longer
    than L{MAX_FILTER}; C{since} and C{until} are times in seconds since the epoch."""
    long = sorted(k for k, v in params.items() if len(v) > MAX_FILTER)
    if long:
        raise bad_request(f"{long[0][:50]} is longer than {MAX_FILTER} characters")
    for bound in ("since", "until"):
        if params.get(bound):
            try:
                value = float(params[bound])
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and 0 <= value < 253402300800):
                raise bad_request(f"{bound} must be a time in seconds since the epoch")


def page_links(ctx: RouteContext, path: str, next_before: int | None
               ) -> list[dict[str, str]]:
    """A searchset's C{self} and C{next} links (the query as asked, C{_cursor} replaced)."""
    query = ctx.query

    def url(cursor: int | None) -> str:
        keep = [(k, v) for k, vs in query.items() if k != "_cursor" for v in vs]
        if cursor is not None:
            keep.append(("_cursor", str(cursor)))
        qs = urlencode(keep)
        return f"{ctx.base()}/fhir/R4/{path}" + (f"?{qs}" if qs else "")

    links = [{"relation": "self", "url": url(_int_or_none(query, "_cursor"))}]
    if next_before is not None:
        links.append({"relation": "next", "url": url(next_before)})
    return links


def _push_page(ctx: RouteContext, found: list[Push], total: int, next_before: int | None
               ) -> dict[str, Any]:
    """A searchset page of pushes, with the true C{total} and a C{next} link (cursor)."""
    links = page_links(ctx, "AgentPush", next_before)
    return {
        "resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
        "entry": [{"fullUrl": ctx.status_url(p), "resource": _push_doc(p)}
                  for p in found],
    }


def _int_param(params: Mapping[str, str], name: str, default: Any, low: int, high: int) -> Any:
    """A whole-number query parameter within [low, high], or a 400 saying so."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or not low <= int(raw) <= high:
        raise bad_request(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _int_or_none(query: Mapping[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    raw = values[-1] if values else ""
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else None


def _push_doc(push: Push) -> dict[str, Any]:
    """A push's status document; a row too damaged to show still lists (by id and state)."""
    try:
        return push.to_json()
    except Exception:
        log.failure("Push {push_id} could not be shown; listed by id only", push_id=push.id)
        return {"resourceType": "AgentPush", "id": push.id, "state": push.state}


#: the filters ``POST AgentPush/$retry`` takes (those of the list and of the console's
#: messages page, whose bulk retry takes them all)
BULK_FILTERS = ("agent", "state", "destination", "remote", "control_id", "accession",
                "since", "until", "patient_id", "study_uid", "sop_uid")


async def retry_matching(ctx: RouteContext) -> Response:
    """
    ``POST AgentPush/$retry?agent=&state=&destination=&control_id=&accession=&patient_id=
    &study_uid=&sop_uid=&since=&until=&_count=``: retry every failed (or expired) push
    matching the filters, at most C{_count} (default and most:
    L{medagent.relay.bulk.MAX_BULK_RETRY}), each as ``AgentPush/{id}/$retry`` would and
    audited; answers with the counts (C{matched}, C{retried}, C{skipped}, C{remaining}) and
    each push's result.  Operators and admins.
    """
    from medagent.relay import bulk
    from medagent.relay.http.context import client_host

    principal = ctx.principal
    if not principal.may_operate():
        raise forbidden("Bulk retry needs an operator or admin client")
    params = {k: v[-1] for k, v in ctx.query.items() if k in BULK_FILTERS and v and v[-1]}
    unknown = sorted(k for k in ctx.query if k not in BULK_FILTERS and k != "_count")
    if unknown:
        raise bad_request(f"Unknown filter {unknown[0]!r}; filters: {', '.join(BULK_FILTERS)}")
    if "agent" in params:
        params["agent"] = params["agent"].removeprefix("Agent/")
    if params.get("state") and params["state"] not in bulk.RETRYABLE:
        raise bad_request(f"state must be one of {', '.join(bulk.RETRYABLE)} (what can be "
                          "retried)")
    check_search(params)
    limit = _int_param({k: v[-1] for k, v in ctx.query.items()}, "_count",
                       bulk.MAX_BULK_RETRY, 1, bulk.MAX_BULK_RETRY)
    api = ctx.api
    now = api.clock.seconds() if api.clock is not None else 0.0
    done = await bulk.retry_matching(api.pushes, api.journal, api.store, principal, params,
                                     address=client_host(ctx.request), now=now,
                                     via="AgentPush/$retry", limit=limit)
    return json_response(done.to_json())
