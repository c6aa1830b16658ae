"""
``POST Agent/{id}/$pause-lane``, ``POST Agent/{id}/$resume-lane`` (body ``{"destination":
URL or "Device/{id}"}``) and ``GET Agent/{id}/$lanes`` (the agent's paused lanes):
L{medagent.relay.lanes.LaneControl} over HTTP, for operators and admins only.
"""

from __future__ import annotations

from typing import Any

from medagent.fhir import FHIRError, bad_request, forbidden
from medagent.relay.http.context import Response, RouteContext, client_host, json_response


def _control(ctx: RouteContext) -> Any:
    control = getattr(ctx.api, "lanes", None)
    if control is None:
        raise FHIRError(404, "Lane pauses are not available on this relay", "not-found")
    return control


def _destination(ctx: RouteContext) -> Any:
    body = ctx.json_body()
    if not isinstance(body, dict) or "destination" not in body:
        raise bad_request('Body must be {"destination": "<destination URL or Device/id>"}')
    return body["destination"]


async def pause(ctx: RouteContext) -> Response:
    control = _control(ctx)
    if not ctx.principal.may_operate():  # (before reading the body: no oracle)
        raise forbidden("Pausing and resuming lanes needs an operator or admin client")
    result = await control.pause(ctx.principal, ctx.params["id"], _destination(ctx),
                                 client_host(ctx.request))
    return json_response(result)


async def resume(ctx: RouteContext) -> Response:
    control = _control(ctx)
    if not ctx.principal.may_operate():
        raise forbidden("Pausing and resuming lanes needs an operator or admin client")
    result = await control.resume(ctx.principal, ctx.params["id"], _destination(ctx),
                                  client_host(ctx.request))
    return json_response(result)


async def paused(ctx: RouteContext) -> Response:
    control = _control(ctx)
    if not ctx.principal.may_operate():
        raise forbidden("The paused lanes are for operator and admin clients")
    agent = await ctx.api.store.read("Agent", ctx.params["id"])
    return json_response({"agent": agent["id"],
                          "paused": await control.paused(agent["id"])})
